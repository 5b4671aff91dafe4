"""OpenAI error objects: {"error": {"message", "type", "param", "code"}} with the right status."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from backends.base import (
    BackendError,
    ContextLengthExceeded,
    ImageTooLarge,
    InvalidImage,
    InvalidRequest,
    ModelNotFound,
    NotSupportedByModel,
    QueueFull,
    QueueTimeout,
    RateLimited,
    SchemaNotMet,
    ToolsNotSupported,
    TooManyImages,
    Unavailable,
    UnsupportedContent,
    UpstreamAuthFailed,
    UpstreamBrokenAnswer,
    UpstreamError,
    UpstreamNotFound,
    UpstreamOverCapacity,
    UpstreamQuotaExceeded,
    UpstreamRateLimited,
    UpstreamRefused,
    UpstreamTimeout,
)


@dataclass
class APIError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A message or param may quote the client's input, which may hold a lone UTF-16 surrogate
        # ("\\ud800" in its JSON): written as that escape, the error can be encoded wherever it goes.
        self.message = printable(self.message)
        self.param = None if self.param is None else printable(self.param)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __str__(self) -> str:
        return self.message


def printable(text: str) -> str:
    """``text`` with any lone surrogate written as its escape (\\ud800), so that it encodes as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist or you do not have access to it.",
                     param="model", code="model_not_found")


def retry_headers(seconds: float | None) -> dict[str, str]:
    if seconds is None:
        return {}
    return {"Retry-After": str(max(1, math.ceil(seconds))), "retry-after-ms": str(int(seconds * 1000))}


@dataclass(frozen=True)
class _Face:
    """How one kind of backend error looks to a client."""

    status: int
    type: str
    code: str | None
    param: str | None = None  # the param said, unless the backend names one where ``named`` allows it
    named: bool = False  # the backend's param is passed on (the client's mistake is in that field)
    retry: bool = True  # Retry-After from the error's retry_after, if it has one
    no_retry: bool = False  # x-should-retry: false (resending will not help)


_INVALID, _LIMIT, _SERVER = "invalid_request_error", "rate_limit_error", "server_error"

# Every backend error class -> its HTTP face. An error takes the row of its nearest class here.
BACKEND_ERRORS: dict[type[BackendError], _Face] = {
    ContextLengthExceeded: _Face(400, _INVALID, "context_length_exceeded", named=True, param="messages", retry=False),
    NotSupportedByModel: _Face(400, _INVALID, "model_not_supported", named=True, retry=False),
    UpstreamRefused: _Face(400, _INVALID, "upstream_bad_request", named=True, retry=False),
    SchemaNotMet: _Face(400, _INVALID, "json_schema_not_met", named=True, retry=False),
    ToolsNotSupported: _Face(400, _INVALID, "tools_not_supported", named=True, retry=False),
    UnsupportedContent: _Face(400, _INVALID, "unsupported_content", named=True, retry=False),
    InvalidImage: _Face(400, _INVALID, "invalid_image", named=True, retry=False),
    ImageTooLarge: _Face(400, _INVALID, "image_too_large", named=True, retry=False),
    TooManyImages: _Face(400, _INVALID, "too_many_images", named=True, retry=False),
    InvalidRequest: _Face(400, _INVALID, "invalid_request", named=True, retry=False),
    ModelNotFound: _Face(404, _INVALID, "model_not_found", param="model", retry=False),
    UpstreamOverCapacity: _Face(429, _LIMIT, "upstream_capacity"),
    UpstreamQuotaExceeded: _Face(429, _LIMIT, "upstream_quota_exceeded"),
    UpstreamRateLimited: _Face(429, _LIMIT, "upstream_rate_limited"),
    RateLimited: _Face(429, _LIMIT, "rate_limit_exceeded"),
    UpstreamTimeout: _Face(504, _SERVER, "upstream_timeout", retry=False),
    # A configuration problem will not mend itself: tell the SDKs not to resend.
    UpstreamAuthFailed: _Face(502, _SERVER, "upstream_auth_failed", retry=False, no_retry=True),
    UpstreamBrokenAnswer: _Face(502, _SERVER, "upstream_broken_answer"),
    UpstreamNotFound: _Face(502, _SERVER, "upstream_not_found"),
    UpstreamError: _Face(502, _SERVER, "upstream_error"),
    QueueFull: _Face(429, _LIMIT, "queue_full"),
    Unavailable: _Face(503, _SERVER, "model_not_ready"),
    QueueTimeout: _Face(503, _SERVER, "queue_timeout"),
    BackendError: _Face(500, _SERVER, None, named=True, retry=False, no_retry=True),  # a backend's bug
}


def from_backend(exc: BackendError) -> APIError:
    """The HTTP face of a backend's error."""
    face = next(BACKEND_ERRORS[cls] for cls in type(exc).__mro__ if cls in BACKEND_ERRORS)
    headers = {"x-should-retry": "false"} if face.no_retry else retry_headers(exc.retry_after) if face.retry else {}
    param = (exc.param if face.named else None) or face.param
    return APIError(face.status, exc.message, type=face.type, param=param, code=face.code, headers=headers)


def internal_error() -> APIError:
    """For a bug: the client learns nothing of our internals, and is told not to resend."""
    return APIError(500, "The server had an error while processing your request; it has been logged.",
                    type="server_error", headers={"x-should-retry": "false"})
