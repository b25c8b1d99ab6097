"""The front end's errors, which every adapter maps to its protocol's codes: a bad field
(RequestError, 400 / INVALID_ARGUMENT), an unknown model (404 / NOT_FOUND), no or a wrong key
(401 / UNAUTHENTICATED), full queues (Overloaded, 429 / RESOURCE_EXHAUSTED), no pool (503 /
UNAVAILABLE), and a pool lost mid-stream (InstanceLost, a retriable 503 / UNAVAILABLE)."""

from __future__ import annotations

from cluster import RequestError
from deployments.router import InstanceLost, Overloaded, PoolsUnavailable

__all__ = ["InstanceLost", "ModelNotFound", "Overloaded", "PoolsUnavailable", "RequestError", "Unauthenticated",
           "REQUEST_ERRORS", "http_status"]


class ModelNotFound(LookupError):
    """The request names a model this server does not serve (404 / NOT_FOUND)."""


class Unauthenticated(PermissionError):
    """No or a wrong API key (401 / UNAUTHENTICATED)."""


# What a request can fail with before its first output, and the HTTP code each gets (the status
# tag of q3serve_requests_total for every protocol).
HTTP_STATUS: dict[type[Exception], int] = {RequestError: 400, Unauthenticated: 401, ModelNotFound: 404,
                                           Overloaded: 429, PoolsUnavailable: 503}
REQUEST_ERRORS = tuple(HTTP_STATUS)


def http_status(exc: Exception) -> int:
    return next(code for kind, code in HTTP_STATUS.items() if isinstance(exc, kind))
