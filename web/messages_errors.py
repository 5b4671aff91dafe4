"""WSGI middleware: on the Anthropic Messages API's paths (/v1/messages and below), errors in Anthropic's
shape, `{"type": "error", "error": {"type", "message"}, "request_id"}`, which is what its SDKs and
Claude Code read, and the request's id also as `request-id` (the header they read).

Every error on those paths, wherever it is made (the body reader's 413 and 408, the key check's 401,
the rate limits' 429, the routes' 400 and 404, a backend's failure), is first written in OpenAI's
shape like everywhere else; this rewrites it on the way out, with its status and headers (Retry-After,
x-should-retry) kept. Answers that are not errors pass through untouched, streams included.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from compat.messages_codec import error_body

PREFIX = "/v1/messages"


def on_messages_path(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


class AnthropicErrors:
    def __init__(self, app: WSGIApplication) -> None:
        self.app = app

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if not on_messages_path(environ.get("PATH_INFO", "")):
            return self.app(environ, start_response)
        held: dict[str, Any] = {}
        written: list[bytes] = []
        returned = False

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], object]:
            headers = [*headers, *(("request-id", v) for k, v in headers if k.lower() == "x-request-id")]
            if returned or int(status[:3]) < 400 or not _is_json(headers):
                return start_response(status, headers, exc_info)
            held.update(status=status, headers=headers)
            return written.append

        result = self.app(environ, start)
        returned = True
        if not held:
            return result
        try:
            body = b"".join([*written, *result])
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()  # the request's log line is written when its answer closes
        data = _anthropic(body, int(held["status"][:3]), held["headers"])
        headers = [(k, str(len(data)) if k.lower() == "content-length" else v) for k, v in held["headers"]]
        if not any(k.lower() == "content-length" for k, _ in headers):
            headers.append(("Content-Length", str(len(data))))
        start_response(held["status"], headers)
        return [data]


def _is_json(headers: list[tuple[str, str]]) -> bool:
    return any(k.lower() == "content-type" and v.startswith("application/json") for k, v in headers)


def _anthropic(body: bytes, status: int, headers: list[tuple[str, str]]) -> bytes:
    """An OpenAI error body as Anthropic's (anything else as it is)."""
    try:
        error = json.loads(body)["error"]
        message = error["message"]
    except (ValueError, KeyError, TypeError):
        return body
    request_id = next((v for k, v in headers if k.lower() == "x-request-id"), None)
    return json.dumps(error_body(status, str(message), request_id)).encode()
