"""OpenAI's error JSON, and the HTTP status of each gRPC status a coordinator answers with."""

from __future__ import annotations

import math
from dataclasses import dataclass

import grpc

RETRY_AFTER_MS = "retry-after-ms"  # the coordinator's trailing metadata on RESOURCE_EXHAUSTED

# gRPC status -> (HTTP status, OpenAI error type)
STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}


@dataclass
class ApiError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    retry_after_s: int | None = None

    @classmethod
    def invalid(cls, param: str | None, message: str) -> "ApiError":
        return cls(400, message, param=param)

    @classmethod
    def from_rpc(cls, err: grpc.aio.AioRpcError) -> "ApiError":
        status, kind = STATUS.get(err.code(), (500, "server_error"))
        retry_after = None
        if status == 429:
            trailer = dict(err.trailing_metadata() or ())
            retry_ms = trailer.get(RETRY_AFTER_MS, "")
            retry_after = max(1, math.ceil(int(retry_ms) / 1e3)) if retry_ms.isdigit() else 1
        return cls(status, err.details() or err.code().name, kind, code=err.code().name.lower(),
                   retry_after_s=retry_after)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else {}
