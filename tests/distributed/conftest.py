"""A small local Ray cluster per test module (logical CPUs above the 2 real cores: actors mostly
wait in collectives), shut down when the module ends so no process outlives the suite."""

from __future__ import annotations

import pytest
import ray


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=12, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
