"""POST /v1/completions (legacy): plain text continuation, for editors' code completion."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import replace

from flask import Blueprint, Response, g, jsonify

from backends.base import Event
from compat.requests import parse_completion
from compat.responses import Completion, fold_text_completion, text_completion_chunks
from compat.routes.road import SSE_HEADERS, Answer, json_body, most_tokens, sse_stream, start
from serving import state

bp = Blueprint("completions", __name__)


@bp.post("/v1/completions")
def create_completion():
    call = parse_completion(json_body(), state().limits)
    # Only the first prompt starts before the response: each holds a generation slot, so the
    # others start one after the other, on the model that took the first, as the answer is written.
    # Every prompt's answer is reserved from a token budget up front: the call is admitted whole or not at all.
    route, first = start(call.requests[0], call.stream,
                         reserve=lambda route: sum(most_tokens(route, r) for r in call.requests))
    log_prompts = state().settings.log_prompts
    record = g.record
    running = [first]

    def answers() -> Iterator[tuple[str, Iterator[Event]]]:
        for i, request in enumerate(call.requests):
            # The same max_tokens as the first: a fallback model's ceiling may have lowered it.
            answer = first if i == 0 else Answer(route, replace(request, max_tokens=first.request.max_tokens),
                                                 record, log_prompts, first.client)
            if i:
                running.append(answer)
            yield (request.prompt or "") if call.echo else "", answer.events
            answer.close()

    def close() -> None:
        for answer in running:
            answer.close()

    completion = Completion(route.model_id, id="cmpl-" + secrets.token_hex(12))
    if not call.stream:
        try:
            return jsonify(fold_text_completion(completion, answers()))
        finally:
            close()
    body = sse_stream(text_completion_chunks(completion, answers(), call.include_usage), close, record,
                      first.client)
    return Response(body, status=200, content_type="text/event-stream", headers=SSE_HEADERS)
