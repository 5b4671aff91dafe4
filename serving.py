"""The serving layer's two typed ways in: ``state()``, the objects create_app builds once for an app
(app.AppState: settings, registry, the policy with its limits and fallbacks, token budgets, stored
responses, running streams), instead of ``app.extensions["aigate"]`` by string; and ``context()``, the
one request's RequestContext (its id, log record and key), which the code that needs it is handed
explicitly."""

from __future__ import annotations

from collections.abc import Callable, Mapping
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
    # How a streamed answer offers its connection to a backend that writes the text itself (set by the
    # route once the answer has begun: the frames carry the model that answered, the message's id).
    offer_client: Callable[[], ClientStream | None] | None = None

    def served_by(self, backend: str) -> None:
        """A backend says which of its servers answered (``upstream/<name>``): the log line says it."""
        self.record.backend = backend

    def client_stream(self) -> ClientStream | None:
        """The client's connection and a text piece's frame, for a backend that writes them itself."""
        return self.offer_client() if self.offer_client is not None else None


def begin(ctx: RequestContext) -> None:
    g.aigate_request = ctx  # one namespaced attribute on g, as Flask's extension guide advises


def context() -> RequestContext:
    """The current request's context (every request has one: the request log's first hook made it)."""
    return cast(RequestContext, g.aigate_request)


def context_if_any() -> RequestContext | None:
    """The context, or None when the request log's hook did not run (an app without it, in a test)."""
    return cast("RequestContext | None", g.get("aigate_request"))
