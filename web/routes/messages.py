"""POST /v1/messages (the Anthropic Messages API, stream and not) and POST /v1/messages/count_tokens,
on the same road as chat completions: the same start (model, key, token budget, first event before
any header), events, log line and metrics; only the codec differs. Their errors are Anthropic's shape
(web/messages_errors.py)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from compat.errors import internal_error
from compat.messages_codec import MessageStream, frame, token_count
from compat.messages_request import parse_count_tokens, parse_messages
from web.context import context, state
from web.generation import start
from web.json_body import read_json
from web.sse_writer import SSE_HEADERS, sse_stream

bp = Blueprint("messages", __name__)


@bp.post("/v1/messages")
def create_message() -> Response:
    ctx = context()
    call = parse_messages(read_json(ctx, pass_on=False), state().limits)  # Anthropic's fields, not an upstream's
    route, answer = start(ctx, call.request, call.stream)
    codec = MessageStream(route.model_id, call.first_tool_call_only)
    if not call.stream:
        try:
            for _ in codec.events(answer.events):
                pass
        finally:
            answer.close()
        if codec.final is None:  # events() ends with a message or raises: never, but not silently
            raise internal_error()
        return jsonify(codec.final)
    answer.hand_over(codec.piece_frame)
    body = sse_stream(codec.events(answer.events), answer.close, ctx.record, answer.client, frame=frame,
                      failed=codec.failed, done=None)
    return Response(body, status=200, content_type="text/event-stream", headers=SSE_HEADERS)


@bp.post("/v1/messages/count_tokens")
def count_tokens() -> Response:
    """The prompt's tokens, as the model that would answer counts them: it is run for one token."""
    ctx = context()
    request = parse_count_tokens(read_json(ctx, pass_on=False), state().limits)
    _, answer = start(ctx, request, False)
    try:
        return jsonify(token_count(answer.events))
    finally:
        answer.close()
