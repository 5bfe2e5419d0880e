"""Errors the cores raise, each mapped onto one gRPC status by the servicers."""

from __future__ import annotations

import grpc


class SessionError(Exception):
    """A session-store failure."""


class SessionNotFound(SessionError):
    pass


class CapacityExhausted(SessionError):
    pass


class InvalidRequest(ValueError):
    """The caller sent something the service cannot act on."""


class ContextExhausted(InvalidRequest):
    """The session's context is full: no room for the tokens asked for."""


class StaleRequest(Exception):
    """The caller's view of a session disagrees with the service's (e.g. committed length)."""


class ServiceStopped(Exception):
    """The thread that owns the service's model has died: nothing it held will be computed."""


STATUS_BY_ERROR: list[tuple[type[BaseException], grpc.StatusCode]] = [  # subclasses before their bases
    (ContextExhausted, grpc.StatusCode.OUT_OF_RANGE),
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (SessionNotFound, grpc.StatusCode.NOT_FOUND),
    (CapacityExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (StaleRequest, grpc.StatusCode.FAILED_PRECONDITION),
    (ServiceStopped, grpc.StatusCode.UNAVAILABLE),
]


def status_for(error: BaseException) -> grpc.StatusCode | None:
    for kind, code in STATUS_BY_ERROR:
        if isinstance(error, kind):
            return code
    return None
