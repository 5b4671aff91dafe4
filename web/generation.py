"""How every generation starts, whatever the endpoint: the model resolved (an alias, a key that may
not use it), what it may cost reserved from the key's tokens per minute, the backend started and its
first event pulled before any header is sent, and, when that fails in a way another model may not,
the next of MODEL_FALLBACKS."""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import replace

from flask import request as flask_request

from backends.base import (
    ChatRequest,
    Control,
    Event,
    PieceFrame,
    QueueFull,
    QueueTimeout,
    RateLimited,
    Unavailable,
    UpstreamError,
)
from backends.registry import Route
from compat import controls, structured
from compat.errors import model_not_found
from config.settings import ApiKey
from web.auth import allowed
from web.client_socket import ClientSocket
from web.context import RequestContext, state

log = logging.getLogger(__name__)

# Failures before the first byte that another model may not have: worth trying the next one.
FALL_BACK_ON = (RateLimited, UpstreamError, QueueFull, QueueTimeout, Unavailable)


def start(ctx: RequestContext, request: ChatRequest, stream: bool,
          reserve: Callable[[Route], int] | None = None,
          params: Mapping[Control, str] | None = None) -> tuple[Route, Answer]:
    """The request's model, or, when it fails before answering, the next of MODEL_FALLBACKS.
    ``reserve`` says what the whole call may cost (/v1/completions runs one answer per prompt);
    ``params`` names the fields that ask for a sampling control where the endpoint's differ from chat's."""
    app_state = state()
    key = ctx.key
    chain = [request.model, *(name for name in app_state.fallbacks.get(request.model, ()) if find(key, name))]
    first = resolve(ctx, request.model, stream)
    # A schema or a sampling control is honoured or refused: no fallback that would drop it either.
    fmt, wanted = request.response_format, controls.asked(request, params)
    if fmt is not None and not structured.supports(first):
        structured.refuse(fmt, request.model, app_state.registry)
    for control in controls.lacks(first, wanted):
        controls.refuse(control, wanted[control], request.model, app_state.registry)
    if fmt is not None or wanted:
        chain = [request.model, *(n for n in chain[1:] if (r := find(key, n)) is not None
                                  and (fmt is None or structured.supports(r)) and not controls.lacks(r, wanted))]
    most = reserve(first) if reserve else most_tokens(first, request)
    if app_state.budgets is not None:
        app_state.budgets.reserve(ctx, most)  # a 429 if the key's tokens per minute lack it
    ctx.reserved_tokens = most
    client = ClientSocket(flask_request.environ, app_state.settings.client_write_timeout)
    for i, name in enumerate(chain):
        route = first if i == 0 else resolve(ctx, name, stream)
        asked = request if i == 0 else within_ceiling(request, app_state.limits.ceiling(name))
        try:
            return route, Answer(ctx, route, asked, app_state.settings.log_prompts, client)
        except FALL_BACK_ON as exc:
            if i == len(chain) - 1:
                raise
            log.warning("%s failed before answering (%s); falling back to %s", route.model_id, exc, chain[i + 1])
    raise AssertionError("unreachable")


def most_tokens(route: Route, request: ChatRequest) -> int:
    """What an answer may cost at most: its prompt and max_tokens, or, with no max_tokens, what the
    backend lets an open-ended answer take; the prompt once, each of its n choices' tokens (OpenAI's usage)."""
    prompt = request.estimated_prompt_tokens
    if request.max_tokens is not None:
        return prompt + request.n * request.max_tokens
    room = route.info.open_ended_tokens
    if room is None:
        return prompt
    return prompt + request.n * (max(prompt, room) - prompt if route.info.shared_context else room)


def within_ceiling(request: ChatRequest, ceiling: int | None) -> ChatRequest:
    """A fallback model's MAX_TOKENS_CEILING clamps the request (the client asked another model)."""
    if ceiling is not None and (request.max_tokens is None or request.max_tokens > ceiling):
        return replace(request, max_tokens=ceiling)
    return request


def resolve(ctx: RequestContext, model: str, stream: bool) -> Route:
    """The route to ``model`` (a 404 if none, or if the request's key may not use it), noted in the
    request's record."""
    route = find(ctx.key, model)
    if route is None:
        raise model_not_found(model)
    record = ctx.record
    record.model, record.backend, record.stream = route.model_id, route.backend.name, stream
    return route


def find(key: ApiKey | None, name: str) -> Route | None:
    """The backend serving ``name`` (an id or alias), if ``key`` may use it."""
    route = state().registry.resolve(name)
    return route if route is not None and allowed(key, name, route.model_id) else None


class Answer:
    """A backend's events with the first one already pulled: whatever fails up to then (a full
    queue, a prompt too long, an upstream 429) is still an HTTP status, which is what the SDKs'
    retry logic reads. Closing it stops the backend's work."""

    def __init__(self, ctx: RequestContext, route: Route, request: ChatRequest, log_prompts: bool,
                 client: ClientSocket) -> None:
        self.request = request  # as sent to the backend (a fallback's ceiling applied)
        self.client = client
        self._ctx = ctx
        record = ctx.record
        if log_prompts:
            record.messages = request.messages
        self._events: Generator[Event, None, None] = route.backend.chat(replace(request, model=route.model_id), ctx)
        first = next(self._events)
        self.events = record.observe(self._chain(first), keep_text=log_prompts)

    def _chain(self, first: Event) -> Iterator[Event]:
        """The events, while the client is there to take them: a client that left stops the work
        (ClientGone) whether it asked for a stream or the whole answer."""
        yield first
        for event in self._events:
            self.client.check()
            yield event

    def hand_over(self, frame: Callable[[], PieceFrame | None]) -> None:
        """Offer the client's connection to a backend that writes a stream's text pieces itself (the
        local engine), each in ``frame()``: the wire's chunk around a text piece, made when the backend
        asks (after the first event, so it carries the model that answered and the message's id; None:
        not at this point of the answer, the backend writes through the road). Not offered for several
        choices or log probabilities: the frame holds one choice's index and no logprobs."""
        if self.request.n > 1 or self.request.logprobs:
            return
        self._ctx.offer_client = lambda: self.client.stream(frame())

    def close(self) -> None:
        self._events.close()
