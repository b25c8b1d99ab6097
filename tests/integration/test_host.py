"""How a replica applies its CPU settings, in a child process (a priority is not raised back);
how `q3serve up` sizes the pools for the host is tests/unit/test_host.py."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE is Linux's")
def test_low_priority_reaches_every_thread_and_threads_started_later() -> None:
    """In a child process (a priority is not raised back): a thread that exists before the call
    and one started after it both run in SCHED_IDLE; the intra-op threads are set."""
    code = """
import os, threading, torch
from deployments.host import apply_cpu_settings, priority_of
tids, go = [], threading.Event()
def idle():
    tids.append(threading.get_native_id()); go.wait(30)
before = threading.Thread(target=idle); before.start()
while not tids: pass
print(priority_of(0))
apply_cpu_settings(3, "low")
after = threading.Thread(target=idle); after.start()
while len(tids) < 2: pass
print(torch.get_num_threads(), *[priority_of(t) for t in tids], priority_of(0))
go.set()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["normal", "3", "low", "low", "low"], out.stderr
