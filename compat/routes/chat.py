"""POST /v1/chat/completions: one road for stream and non-stream."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import replace
from itertools import chain

from flask import Blueprint, Response, current_app, jsonify, request

from backends.base import BackendError, Event
from compat import sse
from compat.errors import from_backend, internal_error, invalid, model_not_found
from compat.requests import parse_chat
from compat.responses import Completion, fold, stream_chunks

log = logging.getLogger(__name__)
bp = Blueprint("chat", __name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@bp.post("/v1/chat/completions")
def create_chat_completion():
    call = parse_chat(json_body())
    route = current_app.extensions["aigate"].registry.resolve(call.request.model)
    if route is None:
        raise model_not_found(call.request.model)
    events = route.backend.chat(replace(call.request, model=route.model_id))
    # Peek: anything that fails before the first event (a full queue, a prompt too long) still
    # gets a real HTTP status, which is what the SDKs' retry logic reads.
    first = next(events)
    completion = Completion(route.model_id)
    answer = chain([first], events)
    if not call.stream:
        try:
            return jsonify(fold(completion, answer))
        finally:
            events.close()
    body = sse_stream(stream_chunks(completion, answer, call.include_usage), events)
    return Response(body, status=200, content_type="text/event-stream", headers=SSE_HEADERS)


def sse_stream(chunks: Iterator[dict], events: Iterator[Event]) -> Iterator[bytes]:
    """Write each chunk the moment it exists. A failure after the first byte goes in-band as an
    error event; a client that goes away closes this generator, which closes the backend's."""
    try:
        for c in chunks:
            yield sse.encode(c)
    except BackendError as exc:
        yield sse.encode(from_backend(exc).body())
    except Exception:
        log.exception("stream failed after it started")
        yield sse.encode(internal_error().body())
    finally:
        events.close()  # type: ignore[attr-defined]
    yield sse.DONE


def json_body() -> object:
    """The body as JSON whatever the Content-Type says (curl -d sends a form type)."""
    try:
        return json.loads(request.get_data(cache=False))
    except (ValueError, RecursionError):
        raise invalid("We could not parse the JSON body of your request. The OpenAI API expects a "
                      "JSON payload.", code="invalid_json") from None
