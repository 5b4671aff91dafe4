"""POST /v1/chat/completions: one road for stream and non-stream."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, g, jsonify

from compat.requests import parse_chat
from compat.responses import Completion, fold, stream_chunks
from compat.routes.road import SSE_HEADERS, Answer, json_body, resolve, sse_stream

bp = Blueprint("chat", __name__)


@bp.post("/v1/chat/completions")
def create_chat_completion():
    call = parse_chat(json_body())
    route = resolve(call.request.model, call.stream)
    answer = Answer(route, call.request, g.record, current_app.extensions["aigate"].settings.log_prompts)
    completion = Completion(route.model_id)
    if not call.stream:
        try:
            return jsonify(fold(completion, answer.events))
        finally:
            answer.close()
    body = sse_stream(stream_chunks(completion, answer.events, call.include_usage), answer.close, g.record)
    return Response(body, status=200, content_type="text/event-stream", headers=SSE_HEADERS)
