"""POST /v1/chat/completions: one road for stream and non-stream."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from compat import sse
from compat.completion_objects import Completion, content_chunk, fold, legacy_function_call, stream_chunks
from compat.requests import parse_chat
from web.context import context, state
from web.generation import start
from web.json_body import read_json
from web.sse_writer import SSE_HEADERS, sse_stream

bp = Blueprint("chat", __name__)


@bp.post("/v1/chat/completions")
def create_chat_completion() -> Response:
    ctx = context()
    call = parse_chat(read_json(ctx, pass_on=True), state().limits)
    route, answer = start(ctx, call.request, call.stream)
    completion = Completion(route.model_id)  # the model that answered: a fallback says so here
    shape = legacy_function_call if call.legacy_functions else (lambda obj: obj)
    asked = call.request
    if not call.stream:
        try:
            return jsonify(shape(fold(completion, answer.events, asked.n, asked.logprobs)))
        finally:
            answer.close()

    answer.hand_over(lambda: sse.piece_frame(sse.encode(shape(content_chunk(completion, sse.PIECE)))))
    chunks = map(shape, stream_chunks(completion, answer.events, call.include_usage, asked.n, asked.logprobs))
    body = sse_stream(chunks, answer.close, ctx.record, answer.client)
    return Response(body, status=200, content_type="text/event-stream", headers=SSE_HEADERS)
