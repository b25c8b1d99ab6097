"""The protocol-neutral front end: one typed request in (`FrontRequest`), the one pipeline
(`Frontend`), typed deltas or whole choices out (`Delta`, `Choice`, `Usage`)."""

from deployments.frontend.deltas import Choice, Delta, Usage
from deployments.frontend.errors import (REQUEST_ERRORS, InstanceLost, ModelNotFound, Overloaded, PoolsUnavailable,
                                         RequestError, Unauthenticated)
from deployments.frontend.pipeline import Frontend, Opened
from deployments.frontend.request import FrontRequest
from deployments.frontend.sampling import SamplingFields

__all__ = ["Choice", "Delta", "FrontRequest", "Frontend", "InstanceLost", "ModelNotFound", "Opened", "Overloaded",
           "PoolsUnavailable", "REQUEST_ERRORS", "RequestError", "SamplingFields", "Unauthenticated", "Usage"]
