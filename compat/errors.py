"""OpenAI error objects: {"error": {"message", "type", "param", "code"}} with the right status."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from flask import Response, jsonify

from backends.base import (BackendError, ContextLengthExceeded, InvalidRequest, ModelNotFound, QueueFull, QueueTimeout,
                           RateLimited, Unavailable, UpstreamError, UpstreamTimeout)


@dataclass
class APIError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __str__(self) -> str:
        return self.message


def error_response(err: APIError) -> Response:
    response = jsonify(err.body())
    response.status_code = err.status
    response.headers.update(err.headers)
    return response


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist or you do not have access to it.",
                     param="model", code="model_not_found")


def retry_headers(seconds: float | None) -> dict[str, str]:
    if seconds is None:
        return {}
    return {"Retry-After": str(max(1, math.ceil(seconds))), "retry-after-ms": str(int(seconds * 1000))}


def from_backend(exc: BackendError) -> APIError:
    """The HTTP face of a backend's error."""
    if isinstance(exc, ContextLengthExceeded):
        return APIError(400, exc.message, param=exc.param or "messages", code="context_length_exceeded")
    if isinstance(exc, InvalidRequest):
        return APIError(400, exc.message, param=exc.param, code=exc.extra.get("code", "invalid_request"))
    if isinstance(exc, ModelNotFound):
        return APIError(404, exc.message, param="model", code="model_not_found")
    if isinstance(exc, RateLimited):
        return APIError(429, exc.message, type="rate_limit_error", code=exc.extra.get("code", "rate_limit_exceeded"),
                        headers=retry_headers(exc.retry_after))
    if isinstance(exc, UpstreamTimeout):
        return APIError(504, exc.message, type="server_error", code="upstream_timeout")
    if isinstance(exc, UpstreamError):
        code = exc.extra.get("code", "upstream_error")
        # A configuration problem will not mend itself: tell the SDKs not to resend.
        headers = {"x-should-retry": "false"} if code == "upstream_auth_failed" else retry_headers(exc.retry_after)
        return APIError(502, exc.message, type="server_error", code=code, headers=headers)
    if isinstance(exc, QueueFull):
        return APIError(429, exc.message, type="rate_limit_error", code="queue_full",
                        headers=retry_headers(exc.retry_after))
    if isinstance(exc, Unavailable):
        return APIError(503, exc.message, type="server_error", code="model_not_ready",
                        headers=retry_headers(exc.retry_after))
    if isinstance(exc, QueueTimeout):
        return APIError(503, exc.message, type="server_error", code="queue_timeout",
                        headers=retry_headers(exc.retry_after))
    return APIError(500, exc.message, type="server_error", param=exc.param, headers={"x-should-retry": "false"})


def internal_error() -> APIError:
    """For a bug: the client learns nothing of our internals, and is told not to resend."""
    return APIError(500, "The server had an error while processing your request; it has been logged.",
                    type="server_error", headers={"x-should-retry": "false"})
