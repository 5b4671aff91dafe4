"""Read a request's body whole, in bounded time and size, before the app sees it (WSGI middleware).

Every route reads its JSON body whole anyway; reading it here first means a chunked body over
MAX_BODY_BYTES is a 413 (werkzeug would cut it at the limit and hand on the first part), broken
chunked framing is a 400 (gunicorn raises it from inside the app's read), and a client that sends
its body slowly is a 408 after BODY_TIMEOUT seconds instead of holding a connection for ever.
A Content-Length over the limit is a 413 before any of it is read. An upload (a path of
``upload_paths``: multipart audio) has its own, larger bound, and its body is spooled to a temporary
file past SPOOL_BYTES instead of held in memory.
"""

from __future__ import annotations

import io
import json
import logging
import secrets
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import IO, Any
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger("aigate")

READ_STEP = 64 * 1024
SPOOL_BYTES = 1024 * 1024  # an upload's body past this goes to a temporary file
TOO_LARGE = ("413 Request Entity Too Large", "request_too_large", "The request body is too large (MAX_BODY_BYTES).")
UPLOAD_TOO_LARGE = ("413 Request Entity Too Large", "request_too_large",
                    "The upload is too large (MAX_UPLOAD_BYTES).")


class BodyRefused(Exception):
    def __init__(self, status: str, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class BodyReader:
    def __init__(self, app: WSGIApplication, max_bytes: int, timeout: float, upload_paths: frozenset[str] = frozenset(),
                 max_upload_bytes: int = 0) -> None:
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout
        self.upload_paths, self.max_upload_bytes = upload_paths, max_upload_bytes

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        length = _content_length(environ)
        if not chunked and not length:
            return self.app(environ, start_response)
        upload = environ.get("PATH_INFO", "") in self.upload_paths
        limit, too_large = (self.max_upload_bytes, UPLOAD_TOO_LARGE) if upload else (self.max_bytes, TOO_LARGE)
        try:
            if not chunked and length is not None and length > limit:  # refused unread
                raise BodyRefused(*too_large)
            sink: IO[bytes] = tempfile.SpooledTemporaryFile(SPOOL_BYTES) if upload else io.BytesIO()
            size = self._read(environ, None if chunked else length, limit, too_large, sink)
        except BodyRefused as refused:
            _do_not_reuse(environ)
            return _refuse(refused, start_response)
        sink.seek(0)
        environ["wsgi.input"] = sink
        environ["CONTENT_LENGTH"] = str(size)
        environ.pop("HTTP_TRANSFER_ENCODING", None)  # werkzeug would read no body for a chunked one
        environ["wsgi.input_terminated"] = False
        return self.app(environ, start_response)

    def _read(self, environ: dict[str, Any], length: int | None, limit: int, too_large: tuple[str, str, str],
              sink: IO[bytes]) -> int:
        """The whole body into ``sink``: ``length`` bytes, or a chunked body to its end (at most ``limit``)."""
        stream = environ["wsgi.input"]
        wanted = limit + 1 if length is None else length
        received = 0
        try:
            with _deadline(environ, self.timeout):
                while received < wanted:
                    data = stream.read(min(READ_STEP, wanted - received))
                    if not data:
                        break
                    sink.write(data)
                    received += len(data)
        except (_TimedOut, TimeoutError):
            raise BodyRefused("408 Request Timeout", "request_timeout",
                              f"The request body did not arrive within {self.timeout:g} seconds "
                              "(BODY_TIMEOUT).") from None
        except OSError:  # the client went away mid-body: nobody will read the answer
            raise BodyRefused("400 Bad Request", "incomplete_body", "The request body was cut short.") from None
        except Exception as exc:  # gunicorn's framing errors: a bad chunk size, a missing CRLF...
            log.info("malformed request body refused: %s", type(exc).__name__)
            raise BodyRefused("400 Bad Request", "malformed_body",
                              "The request body's chunked transfer encoding is malformed.") from None
        if length is None and received > limit:
            raise BodyRefused(*too_large)
        if length is not None and received < length:
            raise BodyRefused("400 Bad Request", "incomplete_body", "The request body was cut short.")
        return received


class _TimedOut(BaseException):
    """BODY_TIMEOUT ran out (a BaseException, so no reader on the way catches it as an error)."""


@contextmanager
def _deadline(environ: dict[str, Any], seconds: float) -> Iterator[None]:
    """Under gunicorn's gevent worker, one timer over the whole read (one read() may wait on many
    small pieces); under other gunicorn workers, a socket timeout on each wait; other servers
    (Passenger, mod_wsgi) have their own limits."""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        yield
        return
    try:
        from gevent import Timeout, monkey
    except ImportError:  # pragma: no cover - gevent is a requirement
        monkey = None
    if monkey is not None and monkey.is_module_patched("socket"):
        with Timeout(seconds, _TimedOut):
            yield
        return
    previous = sock.gettimeout()
    sock.settimeout(seconds)
    try:
        yield
    finally:
        sock.settimeout(previous)


def _content_length(environ: dict[str, Any]) -> int | None:
    try:
        return max(0, int(environ.get("CONTENT_LENGTH") or ""))
    except ValueError:
        return None


def drop_body(environ: dict[str, Any]) -> None:
    """The request goes on without its body, unread (web/auth.py: a request that may not send one):
    the app sees an empty body, and a connection that had one is closed after the answer."""
    if "chunked" not in environ.get("HTTP_TRANSFER_ENCODING", "").lower() and not _content_length(environ):
        return  # none was sent
    _do_not_reuse(environ)
    environ["wsgi.input"] = io.BytesIO(b"")
    environ["CONTENT_LENGTH"] = "0"
    environ.pop("HTTP_TRANSFER_ENCODING", None)
    environ["wsgi.input_terminated"] = False


def _do_not_reuse(environ: dict[str, Any]) -> None:
    """The rest of the body was not read, so where a next request would begin is unknown: gunicorn
    closes a connection whose body read failed rather than drain it (without a time limit)."""
    stream = environ.get("wsgi.input")
    if stream is not None and hasattr(stream, "failed"):
        stream.failed = True


def _refuse(refused: BodyRefused, start_response: StartResponse) -> list[bytes]:
    body = json.dumps({"error": {"message": refused.message, "type": "invalid_request_error", "param": None,
                                 "code": refused.code}}).encode()
    start_response(refused.status, [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                                    ("x-request-id", "req_" + secrets.token_hex(12))])
    return [body]
