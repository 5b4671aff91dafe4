"""The road every generation takes, whatever the endpoint: resolve the model, start the
backend and pull its first event before any header is sent, then write SSE or fold."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import replace

from flask import g, has_app_context
from flask import request as flask_request

import metrics
from backends.base import (BackendError, ChatRequest, Event, QueueFull, QueueTimeout, RateLimited, Unavailable,
                           UpstreamError)
from backends.registry import Route
from compat import sse, structured
from compat.auth import allowed
from compat.client_socket import ClientGone, ClientSocket
from compat.errors import APIError, from_backend, internal_error, invalid, model_not_found
from request_log import RequestRecord
from streams import STOPPED_CODE, RunningStreams, ServerStopping
from serving import state

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


MAX_JSON_DEPTH = 64  # a tool's JSON Schema nests deepest, and rarely past 20


def json_body() -> object:
    """The body as JSON whatever the Content-Type says (curl -d sends a form type)."""
    try:
        body = json.loads(flask_request.get_data(cache=False))
    except (ValueError, RecursionError):
        raise invalid("We could not parse the JSON body of your request. The OpenAI API expects a "
                      "JSON payload.", code="invalid_json") from None
    if json_depth(body) > MAX_JSON_DEPTH:
        raise invalid(f"The JSON body is nested more than {MAX_JSON_DEPTH} levels deep.", code="invalid_json")
    g.json_body = body  # an upstream passes on the fields aigate does not read (backends/upstream)
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


def start(request: ChatRequest, stream: bool,
          reserve: Callable[[Route], int] | None = None) -> tuple[Route, Answer]:
    """The request's model, or, when it fails before answering, the next of MODEL_FALLBACKS.
    ``reserve`` says what the whole call may cost (/v1/completions runs one answer per prompt)."""
    app_state = state()
    chain = [request.model, *(name for name in app_state.fallbacks.get(request.model, ()) if find(name))]
    first = resolve(request.model, stream)
    if request.response_format is not None:  # a schema is honoured or refused: no fallback that would drop it
        if not structured.supports(first):
            structured.refuse(request.response_format, request.model, app_state.registry)
        chain = [request.model, *(n for n in chain[1:] if (r := find(n)) is not None and structured.supports(r))]
    most = reserve(first) if reserve else most_tokens(first, request)
    if app_state.budgets is not None:
        app_state.budgets.reserve(most)  # a 429 if the key's tokens per minute lack it
    g.record.reserved_tokens = most
    client = ClientSocket(flask_request.environ, app_state.settings.client_write_timeout)
    for i, name in enumerate(chain):
        route = first if i == 0 else resolve(name, stream)
        asked = request if i == 0 else within_ceiling(request, app_state.limits.ceiling(name))
        try:
            return route, Answer(route, asked, g.record, app_state.settings.log_prompts, client)
        except FALL_BACK_ON as exc:
            if i == len(chain) - 1:
                raise
            log.warning("%s failed before answering (%s); falling back to %s", route.model_id, exc, chain[i + 1])
    raise AssertionError("unreachable")


def most_tokens(route: Route, request: ChatRequest) -> int:
    """What an answer may cost at most: its prompt and max_tokens, or, with no max_tokens, what the
    backend lets an open-ended answer take."""
    prompt = request.estimated_prompt_tokens
    if request.max_tokens is not None:
        return prompt + request.max_tokens
    open_ended = state().open_ended.get(route.backend.name)
    if open_ended is None:
        return prompt
    if route.backend.name == "chatglm":  # a context holds the prompt and the answer together
        return max(prompt, open_ended)
    return prompt + open_ended


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
    route = state().registry.resolve(name)
    return route if route is not None and allowed(name, route.model_id) else None


class Answer:
    """A backend's events with the first one already pulled: whatever fails up to then (a full
    queue, a prompt too long, an upstream 429) is still an HTTP status, which is what the SDKs'
    retry logic reads. Closing it stops the backend's work."""

    def __init__(self, route: Route, request: ChatRequest, record: RequestRecord, log_prompts: bool,
                 client: ClientSocket) -> None:
        self.request = request  # as sent to the backend (a fallback's ceiling applied)
        self.client = client
        if log_prompts:
            record.messages = request.messages
        self._events: Generator[Event, None, None] = route.backend.chat(replace(request, model=route.model_id))
        first = next(self._events)
        self.events = record.observe(self._chain(first), keep_text=log_prompts)

    def _chain(self, first: Event) -> Iterator[Event]:
        """The events, while the client is there to take them: a client that left stops the work
        (ClientGone) whether it asked for a stream or the whole answer."""
        yield first
        for event in self._events:
            self.client.check()
            yield event

    def close(self) -> None:
        self._events.close()


def sse_stream(chunks: Iterator[dict], close: Callable[[], None], record: RequestRecord, client: ClientSocket, *,
               frame: Callable[[dict], bytes] = sse.encode,
               failed: Callable[[APIError], Iterable[dict]] = lambda error: [error.body()],
               done: bytes | None = sse.DONE, finished: Callable[[], None] | None = None) -> Iterator[bytes]:
    """Write each chunk the moment it exists (``frame`` encodes it). A failure after the first byte
    goes in-band (``failed`` says how); a client that goes away, or leaves its bytes unread for
    CLIENT_WRITE_TIMEOUT, closes this generator, which closes the backend's. ``finished`` runs once
    the answer was written whole or its failure told."""
    # Taken now: the body is written after the view returns (outside an app, as in a unit test, none).
    running = state().streams if has_app_context() else RunningStreams()
    return _sse(chunks, close, record, client, running, frame, failed, done, finished)


def _sse(chunks: Iterator[dict], close: Callable[[], None], record: RequestRecord, client: ClientSocket,
         running: RunningStreams, frame: Callable[[dict], bytes], failed: Callable[[APIError], Iterable[dict]],
         done: bytes | None, finished: Callable[[], None] | None) -> Iterator[bytes]:
    token = running.add(record)
    client.bound_writes()
    written = time.monotonic()
    try:
        metrics.stream_started()  # inside the try: whatever happens, the backend is closed
        for c in chunks:
            yield frame(c)
            written = time.monotonic()
    except ClientGone:
        record.error = "client_gone"
        return
    except GeneratorExit:  # the server closes the answer: the client left, or did not read in time
        record.error = "client_too_slow" if client.write_timed_out(written) else "client_gone"
        raise
    except ServerStopping:  # the worker's graceful timeout ran out: say so while we still can
        record.error = STOPPED_CODE
        yield from map(frame, failed(server_stopping()))
    except BackendError as exc:
        error = from_backend(exc)
        record.error = error.code or error.type
        yield from map(frame, failed(error))
    except Exception:
        log.exception("stream failed after it started")
        record.error = "internal_error"
        yield from map(frame, failed(internal_error()))
    finally:
        running.discard(token)
        close()
        client.unbound_writes()
        metrics.stream_ended()
    if finished is not None:
        finished()
    if done is not None:
        yield done


def server_stopping() -> APIError:
    return APIError(503, "The server is restarting or shutting down and this answer ran past its graceful "
                         "timeout, so it was cut short. Send the request again.", type="server_error",
                    code=STOPPED_CODE)
