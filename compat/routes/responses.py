"""POST /v1/responses (stream and not, on the same road as chat completions) and the stored
responses: GET and DELETE /v1/responses/<id>, GET /v1/responses/<id>/input_items."""

from __future__ import annotations

import json
import logging
from typing import Any

from flask import Blueprint, Response, jsonify, request

from compat.errors import APIError, internal_error, invalid, printable
from compat.generation import start
from compat.json_body import read_json
from compat.responses_api import ResponsesCall, ResponseStream, output_text, parse_responses
from compat.sse_writer import SSE_HEADERS, sse_stream
from response_store import ResponseStore
from serving import RequestContext, context, state

bp = Blueprint("responses", __name__)
log = logging.getLogger(__name__)


def _store() -> ResponseStore:
    return state().responses


def _owner(ctx: RequestContext) -> str:
    return ctx.key.name if ctx.key is not None else ""


def not_found(response_id: str, param: str | None = None) -> APIError:
    return APIError(404, f"Response with id '{response_id}' not found.", param=param, code="response_not_found")


@bp.post("/v1/responses")
def create_response():
    ctx = context()
    body = read_json(ctx, pass_on=False)  # its fields are the Responses API's, not an upstream's
    previous = body.get("previous_response_id") if isinstance(body, dict) else None
    history = None
    if previous is not None:
        if not isinstance(previous, str) or not previous:
            raise invalid("previous_response_id must be a string.", "previous_response_id", "invalid_type")
        if printable(previous) != previous:  # a lone surrogate: no id has one (and SQLite cannot take it)
            raise invalid("previous_response_id is not a response id: it holds a lone UTF-16 surrogate.",
                          "previous_response_id", "invalid_value")
        stored = _store().get(previous, _owner(ctx))
        if stored is None:
            raise APIError(404, f"Previous response with id '{previous}' not found.", param="previous_response_id",
                           code="previous_response_not_found")
        history = stored.input_items + stored.response.get("output", [])
    app_state = state()
    call = parse_responses(body, app_state.limits, history)
    route, answer = start(ctx, call.request, call.stream)
    codec = ResponseStream(route.model_id, call.echo, call.echo["parallel_tool_calls"])
    owner, store = _owner(ctx), _store()
    if not call.stream:
        try:
            for _ in codec.events(answer.events):
                pass
        finally:
            answer.close()
        final = codec.final
        if final is None:  # events() ends with a response or raises: never, but not silently
            raise internal_error()
        _keep(store, call, final, owner)
        return jsonify({**final, "output_text": output_text(final)})

    def finished() -> None:
        if codec.final is not None:
            _keep(store, call, codec.final, owner)

    ctx.offer_client = lambda: answer.client.stream(codec.piece_frame(_frame))  # to a backend that writes text itself
    body = sse_stream(codec.events(answer.events), answer.close, ctx.record, answer.client, frame=_frame,
                      failed=codec.failed, done=None, finished=finished)
    return Response(body, status=200, content_type="text/event-stream", headers=SSE_HEADERS)


def _frame(event: dict[str, Any]) -> bytes:
    data = json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "replace")
    return b"event: " + event["type"].encode() + b"\ndata: " + data + b"\n\n"


def _keep(store: ResponseStore, call: ResponsesCall, response: dict[str, Any], owner: str) -> None:
    if not call.store:
        return
    try:
        store.put(owner, response, list(call.input_items))
    except Exception:  # the answer was given; a full disk must not turn it into an error
        log.exception("could not store response %s", response.get("id"))


@bp.get("/v1/responses/<response_id>")
def retrieve_response(response_id: str):
    stored = _store().get(response_id, _owner(context()))
    if stored is None:
        raise not_found(response_id)
    return jsonify({**stored.response, "output_text": output_text(stored.response)})


@bp.delete("/v1/responses/<response_id>")
def delete_response(response_id: str):
    if not _store().delete(response_id, _owner(context())):
        raise not_found(response_id)
    return jsonify({"id": response_id, "object": "response", "deleted": True})


@bp.get("/v1/responses/<response_id>/input_items")
def list_input_items(response_id: str):
    stored = _store().get(response_id, _owner(context()))
    if stored is None:
        raise not_found(response_id)
    order = request.args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise invalid("order must be 'asc' or 'desc'.", "order", "invalid_value")
    try:
        limit = int(request.args.get("limit", "20"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise invalid("limit must be a whole number from 1 to 100.", "limit", "invalid_value")
    items = stored.input_items if order == "asc" else stored.input_items[::-1]
    ids = [item.get("id") for item in items]
    for cursor, skip in (("after", 1), ("before", 0)):
        value = request.args.get(cursor)
        if value is None:
            continue
        if value not in ids:
            raise invalid(f"{cursor} names no item of this response.", cursor, "invalid_value")
        at = ids.index(value)
        items, ids = (items[at + 1:], ids[at + 1:]) if skip else (items[:at], ids[:at])
    page = items[:limit]
    return jsonify({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                    "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit})
