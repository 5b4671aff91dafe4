"""The road every generation takes, whatever the endpoint: resolve the model, start the
backend and pull its first event before any header is sent, then write SSE or fold."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Generator, Iterator
from dataclasses import replace

from flask import current_app, g, request

import metrics
from backends.base import (BackendError, ChatRequest, Event, QueueFull, QueueTimeout, RateLimited, Unavailable,
                           UpstreamError)
from backends.registry import Route
from compat import sse, structured
from compat.auth import allowed
from compat.errors import from_backend, internal_error, invalid, model_not_found
from request_log import RequestRecord

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


MAX_JSON_DEPTH = 64  # a tool's JSON Schema nests deepest, and rarely past 20


def json_body() -> object:
    """The body as JSON whatever the Content-Type says (curl -d sends a form type)."""
    try:
        body = json.loads(request.get_data(cache=False))
    except (ValueError, RecursionError):
        raise invalid("We could not parse the JSON body of your request. The OpenAI API expects a "
                      "JSON payload.", code="invalid_json") from None
    if json_depth(body) > MAX_JSON_DEPTH:
        raise invalid(f"The JSON body is nested more than {MAX_JSON_DEPTH} levels deep.", code="invalid_json")
    return body


def json_depth(value: object) -> int:
    """How deeply arrays and objects nest in ``value``, without recursing."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in children)
    return deepest


# Failures before the first byte that another model may not have: worth trying the next one.
FALL_BACK_ON = (RateLimited, UpstreamError, QueueFull, QueueTimeout, Unavailable)


def start(request: ChatRequest, stream: bool) -> tuple[Route, Answer]:
    """The request's model, or, when it fails before answering, the next of MODEL_FALLBACKS."""
    state = current_app.extensions["aigate"]
    chain = [request.model, *(name for name in state.fallbacks.get(request.model, ()) if find(name))]
    if request.response_format is not None:  # a schema is honoured or refused: no fallback that would drop it
        first = resolve(request.model, stream)
        if not structured.supports(first):
            structured.refuse(request.response_format, request.model, state.registry)
        chain = [request.model, *(n for n in chain[1:] if structured.supports(find(n)))]  # type: ignore[arg-type]
    g.record.admit(request.estimated_prompt_tokens + (request.max_tokens or 0))
    for i, name in enumerate(chain):
        route = resolve(name, stream)
        asked = request if i == 0 else within_ceiling(request, state.limits.ceiling(name))
        try:
            return route, Answer(route, asked, g.record, state.settings.log_prompts)
        except FALL_BACK_ON as exc:
            if i == len(chain) - 1:
                raise
            log.warning("%s failed before answering (%s); falling back to %s", route.model_id, exc, chain[i + 1])
    raise AssertionError("unreachable")


def within_ceiling(request: ChatRequest, ceiling: int | None) -> ChatRequest:
    """A fallback model's MAX_TOKENS_CEILING clamps the request (the client asked another model)."""
    if ceiling is not None and (request.max_tokens is None or request.max_tokens > ceiling):
        return replace(request, max_tokens=ceiling)
    return request


def resolve(model: str, stream: bool) -> Route:
    route = find(model)
    if route is None:
        raise model_not_found(model)
    record: RequestRecord = g.record
    record.model, record.backend, record.stream = route.model_id, route.backend.name, stream
    return route


def find(name: str) -> Route | None:
    """The backend serving ``name`` (an id or alias), if the request's key may use it."""
    route = current_app.extensions["aigate"].registry.resolve(name)
    return route if route is not None and allowed(name, route.model_id) else None


class Answer:
    """A backend's events with the first one already pulled: whatever fails up to then (a full
    queue, a prompt too long, an upstream 429) is still an HTTP status, which is what the SDKs'
    retry logic reads. Closing it stops the backend's work."""

    def __init__(self, route: Route, request: ChatRequest, record: RequestRecord, log_prompts: bool) -> None:
        self.request = request  # as sent to the backend (a fallback's ceiling applied)
        if log_prompts:
            record.messages = request.messages
        self._events: Generator[Event, None, None] = route.backend.chat(replace(request, model=route.model_id))
        first = next(self._events)
        self.events = record.observe(self._chain(first), keep_text=log_prompts)

    def _chain(self, first: Event) -> Iterator[Event]:
        yield first
        yield from self._events

    def close(self) -> None:
        self._events.close()


def sse_stream(chunks: Iterator[dict], close: Callable[[], None], record: RequestRecord) -> Iterator[bytes]:
    """Write each chunk the moment it exists. A failure after the first byte goes in-band as an
    error event; a client that goes away closes this generator, which closes the backend's."""
    metrics.ACTIVE_STREAMS.inc()
    try:
        for c in chunks:
            yield sse.encode(c)
    except BackendError as exc:
        error = from_backend(exc)
        record.error = error.code or error.type
        yield sse.encode(error.body())
    except Exception:
        log.exception("stream failed after it started")
        record.error = "internal_error"
        yield sse.encode(internal_error().body())
    finally:
        close()
        metrics.ACTIVE_STREAMS.dec()
    yield sse.DONE
