"""POST /v1/responses (stream and not, on the same road as chat completions), the stored responses (GET and
DELETE /v1/responses/<id>, GET /v1/responses/<id>/input_items) and POST /v1/responses/input_tokens."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flask import Blueprint, Response, jsonify, request

from compat.errors import APIError, internal_error, invalid, printable
from compat.responses_api import ResponsesCall, ResponseStream, logprobs_param, output_text, parse_responses
from store.response_store import ConversationTooLong, ResponseStore, StoreUnavailable
from web.context import RequestContext, context, state
from web.generation import resolve, start
from web.json_body import read_json
from web.sse_writer import SSE_HEADERS, sse_stream
from web.tokenizing import input_tokens

bp = Blueprint("responses", __name__)
log = logging.getLogger(__name__)
FINAL_EVENTS = ("response.completed", "response.incomplete", "response.failed")  # each carries the whole response


def _store() -> ResponseStore:
    return state().responses


def _owner(ctx: RequestContext) -> str:
    return ctx.key.name if ctx.key is not None else ""


def not_found(response_id: str, param: str | None = None) -> APIError:
    return APIError(404, f"Response with id '{response_id}' not found.", param=param, code="response_not_found")


@bp.post("/v1/responses")
def create_response() -> Response:
    ctx = context()
    body = read_json(ctx, pass_on=False)  # its fields are the Responses API's, not an upstream's
    owner, store = _owner(ctx), _store()
    app_state = state()
    call = parse_responses(body, app_state.limits, _history(body, owner))
    route, answer = start(ctx, call.request, call.stream, params={"logprobs": logprobs_param(call.request)})
    codec = ResponseStream(route.model_id, call.echo, call.echo["parallel_tool_calls"], call.request.logprobs)
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

    def kept(events: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """The stream's events, the response stored before its last event (which says whether it was)."""
        for event in events:
            if event["type"] in FINAL_EVENTS:
                _keep(store, call, event["response"], owner)
            yield event

    answer.hand_over(lambda: codec.piece_frame(_frame))
    body = sse_stream(kept(codec.events(answer.events)), answer.close, ctx.record, answer.client, frame=_frame,
                      failed=lambda error: kept(codec.failed(error)), done=None)
    return Response(body, status=200, content_type="text/event-stream", headers=SSE_HEADERS)


@bp.post("/v1/responses/input_tokens")
def count_input_tokens() -> Response:
    """The tokens of the prompt a /v1/responses body makes: exact on the local model, estimated elsewhere."""
    ctx = context()
    body = read_json(ctx, pass_on=False)
    call = parse_responses(body, state().limits, _history(body, _owner(ctx)))
    route = resolve(ctx, call.request.model, stream=False)
    return jsonify({"object": "response.input_tokens", "input_tokens": input_tokens(route, call.request)})


def _history(body: object, owner: str) -> list[dict[str, Any]] | None:
    """The input and output of the body's previous_response_id (one of ``owner``'s), if it names one."""
    previous = body.get("previous_response_id") if isinstance(body, dict) else None
    if previous is None:
        return None
    if not isinstance(previous, str) or not previous:
        raise invalid("previous_response_id must be a string.", "previous_response_id", "invalid_type")
    if printable(previous) != previous:  # a lone surrogate: no id has one (and SQLite cannot take it)
        raise invalid("previous_response_id is not a response id: it holds a lone UTF-16 surrogate.",
                      "previous_response_id", "invalid_value")
    with _store_errors("previous_response_id"):
        earlier = _store().conversation(previous, owner)
    if earlier is None:
        raise APIError(404, f"Previous response with id '{previous}' not found.", param="previous_response_id",
                       code="previous_response_not_found")
    return [*earlier.input_items, *earlier.response.get("output", [])]


def _frame(event: dict[str, Any]) -> bytes:
    data = json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "replace")
    return b"event: " + str(event["type"]).encode() + b"\ndata: " + data + b"\n\n"


def _keep(store: ResponseStore, call: ResponsesCall, response: dict[str, Any], owner: str) -> None:
    """Store the response if it asked to be, and say in it whether it was: the answer is given either way."""
    if not call.store:
        return
    try:
        stored = store.put(owner, response, list(call.input_items), call.echo["previous_response_id"], call.history)
    except StoreUnavailable:  # logged by the store; /ready says so
        stored = False
    except Exception:  # a failure of its own must not turn the answer into an error
        log.exception("could not store response %s", response.get("id"))
        stored = False
    response["store"] = stored


@contextmanager
def _store_errors(param: str | None = None) -> Iterator[None]:
    """The store's failures as answers: never a 500."""
    try:
        yield
    except StoreUnavailable:
        raise APIError(503, "Stored responses are unavailable right now (the server cannot use its state "
                            "directory); see the server log.", type="server_error", code="store_unavailable") from None
    except ConversationTooLong as exc:
        raise invalid(f"This conversation cannot be read back: {exc}. Start a new one (send the input without "
                      "previous_response_id).", param, "conversation_too_long") from None


@bp.get("/v1/responses/<response_id>")
def retrieve_response(response_id: str) -> Response:
    with _store_errors():
        stored = _store().get(response_id, _owner(context()))
    if stored is None:
        raise not_found(response_id)
    return jsonify({**stored, "output_text": output_text(stored)})


@bp.delete("/v1/responses/<response_id>")
def delete_response(response_id: str) -> Response:
    with _store_errors():
        deleted = _store().delete(response_id, _owner(context()))
    if not deleted:
        raise not_found(response_id)
    return jsonify({"id": response_id, "object": "response", "deleted": True})


@bp.get("/v1/responses/<response_id>/input_items")
def list_input_items(response_id: str) -> Response:
    with _store_errors():
        stored = _store().conversation(response_id, _owner(context()))
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
