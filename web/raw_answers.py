"""A backend's RawAnswer (an audio file, an upstream's answer) as the client's response: its first
piece pulled before any header is sent, so that a failure up to then is still an HTTP error; the
rest written as it arrives; the exchange with the server closed when the response is. A failure
after the first piece (an upstream that breaks off, or passes UPSTREAM_MAX_MEDIA_BYTES) ends the
connection, so the client cannot take a cut file for a whole one: one log line, no traceback."""

from __future__ import annotations

import errno
import itertools
import logging
from collections.abc import Iterator

from flask import Response

from backends.base import BackendError
from backends.media import RawAnswer
from web.context import context
from web.record import RequestRecord

log = logging.getLogger("aigate")


def passed_on(answer: RawAnswer) -> Response:
    chunks = answer.chunks
    try:
        first = next(chunks, b"")
    except BaseException:
        chunks.close()
        raise
    rest = _ended_on_failure(chunks, context().record)
    response = Response(itertools.chain((first,), rest), content_type=answer.content_type)
    response.call_on_close(chunks.close)
    return response


def _ended_on_failure(chunks: Iterator[bytes], record: RequestRecord) -> Iterator[bytes]:
    try:
        yield from chunks
    except BackendError as exc:
        record.error = "upstream_error"
        log.warning("request %s: the answer broke off after its first bytes (%s); connection closed", record.id, exc)
        # gunicorn closes the connection on a broken pipe without logging a traceback; an HTTP/1.1
        # answer of unknown length then lacks its last chunk, which the client reads as cut short.
        raise BrokenPipeError(errno.EPIPE, "the answer broke off") from None
