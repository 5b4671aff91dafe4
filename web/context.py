"""The HTTP runtime's two typed ways in: ``state()``, the objects create_app builds once for an app
(AppState: settings, registry, the policy with its limits and fallbacks, token budgets, stored
responses, running streams), instead of ``app.extensions["aigate"]`` by string; and ``context()``, the
one request's RequestContext (its id, log record, key and quota), which the code that needs it is
handed explicitly. Everything in web/ that needs these imports them from here; this imports nothing
of web/ but what it carries (record.py, streams.py), so no circle closes through it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from flask import Flask, current_app, g

from backends.base import ClientStream
from backends.registry import Registry
from compat.requests import Limits
from config.policy import Policy
from config.settings import ApiKey, Settings
from store.response_store import ResponseStore
from web.record import RequestRecord
from web.streams import RunningStreams


@dataclass(frozen=True)
class Quota:
    """A client's rate limits (web/rate_limits.py works them out): its counters' key and its limits."""

    who: str  # the counters' key
    requests_per_minute: int
    tokens_per_minute: int


class Budgets(Protocol):
    """The keys' tokens per minute as a generation uses them (web.rate_limits.TokenBudgets)."""

    def reserve(self, ctx: RequestContext, most: int) -> None: ...


@dataclass
class AppState:
    settings: Settings
    registry: Registry
    responses: ResponseStore
    policy: Policy  # what the settings decide about each request (config/policy.py)
    streams: RunningStreams = field(default_factory=RunningStreams)  # ended by the worker's graceful timeout
    budgets: Budgets | None = None  # the keys' tokens per minute (set once the hooks are in)

    @property
    def limits(self) -> Limits:
        return self.policy.limits

    @property
    def fallbacks(self) -> Mapping[str, tuple[str, ...]]:
        """model -> the models to try, in order, when it fails before answering."""
        return self.policy.fallbacks




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
    # How a streamed answer offers its connection to a backend that writes the text itself: set by
    # generation.Answer.hand_over, the one place a client's socket is offered from.
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
