"""The request log, a Flask extension: every request gets its context (RequestContext: an
id, a RequestRecord, the bearer key web.auth.KeyCheck found, or its 401) before anything else looks
at it, and one log line, plus its metrics, written when the response is closed (for a stream, when its
last byte is sent or the client went away). Never the prompt, the answer or a key, unless LOG_PROMPTS
is set."""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from flask import Flask, Response, request

from web import metrics
from web.auth import key_of
from web.context import RequestContext, begin, context_if_any, state
from web.record import RequestRecord

log = logging.getLogger("aigate.requests")

EXTENSION = "aigate.request_log"
REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")  # an incoming id kept as it is: a plain token


class HideHeaderLines(logging.Filter):
    """For gunicorn's log: a header line it could not parse is logged whole, and may hold a key."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Invalid HTTP Header: " in message:
            record.msg, record.args = message.split("Invalid HTTP Header: ")[0] + "Invalid HTTP Header (hidden)", ()
        return True


class QuietWriteTimeouts(logging.Filter):
    """For gunicorn's log: a client that left its answer unread for CLIENT_WRITE_TIMEOUT ends the
    write with a timeout, which gunicorn logs with a traceback; one line says it (the request's own
    line says error=client_too_slow)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], TimeoutError):
            record.msg, record.args, record.exc_info, record.exc_text = (
                "a client left its answer unread for CLIENT_WRITE_TIMEOUT: connection closed", (), None, None)
        return True


@dataclass(frozen=True)
class RequestLog:
    """The extension's state (app.extensions[EXTENSION]): whether prompts are logged, and what counts
    a closed request in the metrics (the metrics extension's, when it is installed)."""

    log_prompts: bool
    count: Callable[[RequestRecord, float, float | None], None] | None

    def write(self, record: RequestRecord) -> None:
        """The request's line and metrics, once its response is closed."""
        ended = time.monotonic()
        record.completion_tokens += record.unfinished_tokens
        record.unfinished_tokens = 0
        ttft = None if record.first_token_at is None else record.first_token_at - record.started
        if self.count is not None:  # first: a request whose line is in the log is in the metrics
            self.count(record, ended, ttft)
        if log.isEnabledFor(logging.INFO):  # the line is built only to be written
            _line(record, ended, ttft, self.log_prompts)


def init_app(app: Flask) -> RequestLog:
    """Install the request log's two hooks: before any other hook that reads the request's key
    (rate_limits), and after metrics.init_app (a request's metrics are written with its line)."""
    settings = state(app).settings
    found = app.extensions.get(metrics.EXTENSION)
    requests_log = app.extensions[EXTENSION] = RequestLog(settings.log_prompts, found.count if found else None)

    @app.before_request
    def open_request() -> Response | None:
        # An incoming id (from a proxy or the client) is kept if it is a plain token, so logs line up.
        incoming = request.headers.get("X-Request-ID", "")
        request_id = incoming if REQUEST_ID.fullmatch(incoming) else "req_" + secrets.token_hex(12)
        ctx = RequestContext(request_id, RequestRecord(request_id, request.method, request.path,
                                                               request.remote_addr or "-"))
        begin(ctx)
        if request.method == "OPTIONS":  # a CORS preflight, without auth (flask-cors adds its headers)
            return Response(status=204)
        if request.path.startswith("/v1/"):
            ctx.key = key_of(request.environ)  # checked before the body was read (web.auth.KeyCheck), or its 401
            ctx.record.key = ctx.key.name if ctx.key else "-"
        return None

    @app.after_request
    def close_request(response: Response) -> Response:
        ctx = context_if_any()
        if ctx is None:  # a hook before ours answered
            response.headers["x-request-id"] = ""
            return response
        record = ctx.record
        record.status = response.status_code
        record.route = request.url_rule.rule if request.url_rule else "other"
        response.call_on_close(lambda: requests_log.write(record))
        response.headers["x-request-id"] = ctx.id
        return response

    return requests_log


def _line(record: RequestRecord, ended: float, ttft: float | None, log_prompts: bool) -> None:
    fields = {
        "id": record.id, "method": record.method, "path": record.path, "status": record.status,
        "client": record.client, "key": record.key,
        "model": record.model or "-", "backend": record.backend or "-", "stream": str(record.stream).lower(),
        "prompt_tokens": record.prompt_tokens, "cached_tokens": record.cached_tokens,
        "completion_tokens": record.completion_tokens,
        "ttft_ms": "-" if ttft is None else f"{ttft * 1000:.1f}",
        "duration_ms": f"{(ended - record.started) * 1000:.1f}",
        "finish": record.finish_reason or "-", "error": record.error or "-",
    }
    log.info("request %s", " ".join(f"{k}={v}" for k, v in fields.items()))
    if log_prompts and record.messages:
        log.info("request %s prompt=%r answer=%r", record.id,
                 [(m.role, m.content) for m in record.messages], "".join(record.answer))
