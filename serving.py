"""The serving layer's two typed ways in: ``state()``, the objects create_app builds once for an app
(app.AppState: settings, registry, the policy with its limits and fallbacks, token budgets, stored
responses, running streams), instead of ``app.extensions["aigate"]`` by string; and ``context()``, the
one request's RequestContext (its id, log record and key), which the code that needs it is handed
explicitly."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from flask import Flask, current_app, g

if TYPE_CHECKING:  # app imports the routes, which import this
    from app import AppState
    from backends.base import ClientStream
    from rate_limits import Quota
    from request_log import RequestRecord
    from settings import ApiKey

EXTENSION = "aigate"  # its key in app.extensions (Flask's place for an extension's state)


def state(app: Flask | None = None) -> AppState:
    """The serving objects of ``app``, or of the app handling the current request."""
    return cast("AppState", (app or current_app).extensions[EXTENSION])


@dataclass(slots=True)
class RequestContext:
    """What one request carries through aigate, made once by the request log's first hook
    (request_log.init_app's open_request). A backend is handed it as its backends.base.Caller."""

    id: str  # the x-request-id header and the log line's id
    record: RequestRecord  # what the log line and the metrics say of the request
    key: ApiKey | None = None  # the bearer key it came with (None: no API_KEYS, or not a /v1 path)
    # The client's JSON body, kept when it has the shape of OpenAI's chat, completions or embeddings
    # body: an OpenAI-compatible upstream passes on the fields aigate does not read (None otherwise).
    body: Mapping[str, Any] | None = None
    quota: Quota | None = None  # its rate limits (rate_limits.quota: worked out once, when first asked)
    quota_known: bool = False
    reserved_tokens: int = 0  # what its generations may cost, reserved from the key's tokens per minute
    # A streamed chat answer's connection, offered to a backend that writes its text itself (set by the
    # route once the answer's first event is in: the frames carry the model that answered).
    client_stream: ClientStream | None = None

    def served_by(self, backend: str) -> None:
        """A backend says which of its servers answered (``upstream/<name>``): the log line says it."""
        self.record.backend = backend


def begin(ctx: RequestContext) -> None:
    g.aigate_request = ctx  # one namespaced attribute on g, as Flask's extension guide advises


def context() -> RequestContext:
    """The current request's context (every request has one: the request log's first hook made it)."""
    return cast(RequestContext, g.aigate_request)


def context_if_any() -> RequestContext | None:
    """The context, or None when the request log's hook did not run (an app without it, in a test)."""
    return cast("RequestContext | None", g.get("aigate_request"))
