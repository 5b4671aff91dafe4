"""Writing a stream: each chunk as SSE the moment it exists, a failure after the first byte in-band,
and a client that leaves (or stops reading) closing the backend's work."""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flask import has_app_context

from backends.base import BackendError
from compat import sse
from compat.errors import APIError, from_backend, internal_error
from web import metrics
from web.client_socket import ClientGone, ClientSocket
from web.context import state
from web.record import RequestRecord
from web.streams import STOPPED_CODE, RunningStreams, ServerStopping

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_stream(chunks: Iterator[dict[str, Any]], close: Callable[[], None], record: RequestRecord,
               client: ClientSocket, *,
               frame: Callable[[dict[str, Any]], bytes] = sse.encode,
               failed: Callable[[APIError], Iterable[dict[str, Any]]] = lambda error: [error.body()],
               done: bytes | None = sse.DONE, finished: Callable[[], None] | None = None) -> Iterator[bytes]:
    """Write each chunk the moment it exists (``frame`` encodes it). A failure after the first byte
    goes in-band (``failed`` says how) and in ``record`` (the request's); a client that goes away, or
    leaves its bytes unread for CLIENT_WRITE_TIMEOUT, closes this generator, which closes the
    backend's. ``finished`` runs once the answer was written whole or its failure told."""
    # Taken now: the body is written after the view returns (outside an app, as in a unit test, none).
    running = state().streams if has_app_context() else RunningStreams()
    return _sse(chunks, close, record, client, running, frame, failed, done, finished)


def _sse(chunks: Iterator[dict[str, Any]], close: Callable[[], None], record: RequestRecord, client: ClientSocket,
         running: RunningStreams, frame: Callable[[dict[str, Any]], bytes],
         failed: Callable[[APIError], Iterable[dict[str, Any]]],
         done: bytes | None, finished: Callable[[], None] | None) -> Iterator[bytes]:
    token = running.add(record)
    client.bound_writes()
    written = time.monotonic()
    try:
        metrics.stream_started()  # inside the try: whatever happens, the backend is closed
        for c in chunks:
            yield frame(c)
            written = time.monotonic()
    except ClientGone as exc:
        record.error = exc.reason
        if exc.reason == "client_too_slow":  # a frame may be cut short: the connection cannot go on
            raise BrokenPipeError(errno.EPIPE, "the client did not take its bytes in time") from None  # gunicorn: quiet
        return
    except GeneratorExit:  # the server closes the answer: the client left, or did not read in time
        record.error = "client_too_slow" if client.write_timed_out(written) else "client_gone"
        raise
    except ServerStopping:  # the worker's graceful timeout ran out: say so while we still can
        record.error = STOPPED_CODE
        yield from map(frame, failed(server_stopping()))
    except BackendError as exc:
        error = from_backend(exc)
        record.error = error.code or error.type
        yield from map(frame, failed(error))
    except Exception:
        log.exception("stream failed after it started")
        record.error = "internal_error"
        yield from map(frame, failed(internal_error()))
    finally:
        running.discard(token)
        close()
        client.unbound_writes()
        metrics.stream_ended()
    if finished is not None:
        finished()
    if done is not None:
        yield done


def server_stopping() -> APIError:
    return APIError(503, "The server is restarting or shutting down and this answer ran past its graceful "
                         "timeout, so it was cut short. Send the request again.", type="server_error",
                    code=STOPPED_CODE)
