"""POST /v1/chat/completions: one road for stream and non-stream."""

from __future__ import annotations

from flask import Blueprint, Response, g, jsonify

from compat.requests import parse_chat
from compat.responses import Completion, fold, legacy_function_call, stream_chunks
from compat.routes.road import SSE_HEADERS, json_body, sse_stream, start
from serving import state

bp = Blueprint("chat", __name__)


@bp.post("/v1/chat/completions")
def create_chat_completion():
    call = parse_chat(json_body(), state().limits)
    route, answer = start(call.request, call.stream)
    completion = Completion(route.model_id)  # the model that answered: a fallback says so here
    shape = legacy_function_call if call.legacy_functions else (lambda obj: obj)
    if not call.stream:
        try:
            return jsonify(shape(fold(completion, answer.events)))
        finally:
            answer.close()
    chunks = map(shape, stream_chunks(completion, answer.events, call.include_usage))
    body = sse_stream(chunks, answer.close, g.record, answer.client)
    return Response(body, status=200, content_type="text/event-stream", headers=SSE_HEADERS)
