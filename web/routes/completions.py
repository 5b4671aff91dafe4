"""POST /v1/completions (legacy): plain text continuation, for editors' code completion."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import replace
from functools import partial

from flask import Blueprint, Response, jsonify

from backends.base import Event, PieceFrame
from compat import sse
from compat.completion_objects import Completion, fold_text_completion, text_completion_chunk, text_completion_chunks
from compat.requests import parse_completion
from web.context import context, state
from web.generation import Answer, most_tokens, start
from web.json_body import read_json
from web.sse_writer import SSE_HEADERS, sse_stream

bp = Blueprint("completions", __name__)


@bp.post("/v1/completions")
def create_completion() -> Response:
    ctx = context()
    call = parse_completion(read_json(ctx, pass_on=True), state().limits)
    # Only the first prompt starts before the response: each holds a generation slot, so the
    # others start one after the other, on the model that took the first, as the answer is written.
    # Every prompt's answer is reserved from a token budget up front: the call is admitted whole or not at all.
    route, first = start(ctx, call.requests[0], call.stream,
                         reserve=lambda route: sum(most_tokens(route, r) for r in call.requests))
    log_prompts = state().settings.log_prompts
    completion = Completion(route.model_id, id="cmpl-" + secrets.token_hex(12))
    running = [first]

    def piece(index: int) -> PieceFrame:  # prompt ``index``'s text pieces are choice ``index`` (handed over: n is 1)
        return sse.piece_frame(sse.encode(text_completion_chunk(completion, sse.PIECE, index)))

    def answers() -> Iterator[tuple[str, Iterator[Event]]]:
        for i, request in enumerate(call.requests):
            # The same max_tokens as the first: a fallback model's ceiling may have lowered it.
            answer = first if i == 0 else Answer(ctx, route, replace(request, max_tokens=first.request.max_tokens),
                                                 log_prompts, first.client)
            if i:
                running.append(answer)
            if call.stream:
                answer.hand_over(partial(piece, i))
            yield (request.prompt or "") if call.echo else "", answer.events
            answer.close()

    def close() -> None:
        for answer in running:
            answer.close()

    asked = call.requests[0]  # every prompt asks for the same choices and log probabilities
    if not call.stream:
        try:
            return jsonify(fold_text_completion(completion, answers(), asked.n, asked.logprobs))
        finally:
            close()
    body = sse_stream(text_completion_chunks(completion, answers(), call.include_usage, asked.n, asked.logprobs),
                      close, ctx.record, first.client)
    return Response(body, status=200, content_type="text/event-stream", headers=SSE_HEADERS)
