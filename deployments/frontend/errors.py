"""The front end's errors, which every adapter maps to its protocol's codes: a bad field
(RequestError, 400 / INVALID_ARGUMENT), an unknown model (404 / NOT_FOUND), no or a wrong key
(401 / UNAUTHENTICATED), full queues (Overloaded, 429 / RESOURCE_EXHAUSTED), no pool (503 /
UNAVAILABLE), and a pool lost mid-stream (InstanceLost, a retriable 503 / UNAVAILABLE)."""

from __future__ import annotations

from cluster import RequestError
from deployments.router import InstanceLost, Overloaded, PoolsUnavailable

__all__ = ["InstanceLost", "ModelNotFound", "Overloaded", "PoolsUnavailable", "RequestError", "Unauthenticated",
           "REQUEST_ERRORS"]


class ModelNotFound(LookupError):
    """The request names a model this server does not serve (404 / NOT_FOUND)."""


class Unauthenticated(PermissionError):
    """No or a wrong API key (401 / UNAUTHENTICATED)."""


# What a request can fail with before its first output (each maps to a 4xx or a 503).
REQUEST_ERRORS = (RequestError, ModelNotFound, Unauthenticated, Overloaded, PoolsUnavailable)
