"""POST /v1/chat/completions: one road for stream and non-stream."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import replace
from itertools import chain

from flask import Blueprint, Response, current_app, g, jsonify, request

import metrics

from backends.base import BackendError, Event
from compat import sse
from compat.errors import from_backend, internal_error, invalid, model_not_found
from compat.requests import parse_chat
from compat.responses import Completion, fold, stream_chunks
from request_log import RequestRecord

log = logging.getLogger(__name__)
bp = Blueprint("chat", __name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@bp.post("/v1/chat/completions")
def create_chat_completion():
    call = parse_chat(json_body())
    route = current_app.extensions["aigate"].registry.resolve(call.request.model)
    if route is None:
        raise model_not_found(call.request.model)
    record: RequestRecord = g.record
    record.model, record.backend, record.stream = route.model_id, route.backend.name, call.stream
    log_prompts = current_app.extensions["aigate"].settings.log_prompts
    if log_prompts:
        record.messages = call.request.messages
    events = route.backend.chat(replace(call.request, model=route.model_id))
    # Peek: anything that fails before the first event (a full queue, a prompt too long) still
    # gets a real HTTP status, which is what the SDKs' retry logic reads.
    first = next(events)
    completion = Completion(route.model_id)
    answer = record.observe(chain([first], events), keep_text=log_prompts)
    if not call.stream:
        try:
            return jsonify(fold(completion, answer))
        finally:
            events.close()
    body = sse_stream(stream_chunks(completion, answer, call.include_usage), events, record)
    return Response(body, status=200, content_type="text/event-stream", headers=SSE_HEADERS)


def sse_stream(chunks: Iterator[dict], events: Iterator[Event], record: RequestRecord) -> Iterator[bytes]:
    """Write each chunk the moment it exists. A failure after the first byte goes in-band as an
    error event; a client that goes away closes this generator, which closes the backend's."""
    metrics.ACTIVE_STREAMS.inc()
    try:
        for c in chunks:
            yield sse.encode(c)
    except BackendError as exc:
        error = from_backend(exc)
        record.error = error.code or error.type
        yield sse.encode(error.body())
    except Exception:
        log.exception("stream failed after it started")
        record.error = "internal_error"
        yield sse.encode(internal_error().body())
    finally:
        events.close()  # type: ignore[attr-defined]
        metrics.ACTIVE_STREAMS.dec()
    yield sse.DONE


def json_body() -> object:
    """The body as JSON whatever the Content-Type says (curl -d sends a form type)."""
    try:
        return json.loads(request.get_data(cache=False))
    except (ValueError, RecursionError):
        raise invalid("We could not parse the JSON body of your request. The OpenAI API expects a "
                      "JSON payload.", code="invalid_json") from None
