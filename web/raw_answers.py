"""A backend's RawAnswer (an audio file, an upstream's answer) as the client's response: its first
piece pulled before any header is sent, so that a failure up to then is still an HTTP error; the
rest written as it arrives; the exchange with the server closed when the response is."""

from __future__ import annotations

import itertools

from flask import Response

from backends.media import RawAnswer


def passed_on(answer: RawAnswer) -> Response:
    chunks = answer.chunks
    try:
        first = next(chunks, b"")
    except BaseException:
        chunks.close()
        raise
    response = Response(itertools.chain((first,), chunks), content_type=answer.content_type)
    response.call_on_close(chunks.close)
    return response
