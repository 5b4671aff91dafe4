"""gunicorn's gevent worker with a bound on the time a client takes to send its request headers.

gunicorn bounds only the wait between keep-alive requests (KEEPALIVE, then a silent close) and
nothing at all with KEEPALIVE=0, so a client that sends its headers a byte at a time holds one of
the worker's WORKER_CONNECTIONS for as long as it likes. Here the headers of each request must
arrive within HEADER_TIMEOUT seconds of their first byte (a 408 after), and a new connection must
send its first byte within HEADER_TIMEOUT too (closed silently after, as an idle keep-alive is).
The body has its own bound in the app (BODY_TIMEOUT, compat/body.py).
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from typing import Any

import gunicorn.util
from gunicorn.http.errors import NoMoreData
from gunicorn.workers.ggevent import GeventWorker

from settings import Settings, checked

log = logging.getLogger("aigate")


class HeadersTimedOut(Exception):
    """Not an OSError: gunicorn passes those on as socket faults; this one it hands to handle_error."""


class _Connection:
    """The client's socket, timing the reads of each request's headers (all else passed through)."""

    def __init__(self, sock: socket.socket, limit: float) -> None:
        self._sock = sock
        # Looked up once: the response's writes go through these for every chunk of a stream.
        self.sendall, self.send, self.fileno = sock.sendall, sock.send, sock.fileno
        self.limit = limit
        self.reading_headers = True
        self.first_request = True
        self.started: float | None = None  # when the current request's first byte arrived

    def recv(self, size: int, flags: int = 0) -> bytes:
        if not self.reading_headers:
            return self._sock.recv(size, flags)
        if self.started is None:  # waiting for a request: an idle keep-alive is gunicorn's to bound
            return self._first_bytes(size, flags)
        remaining = self.started + self.limit - time.monotonic()
        if remaining <= 0:
            raise HeadersTimedOut
        self._sock.settimeout(remaining)
        try:
            return self._sock.recv(size, flags)
        except TimeoutError:
            raise HeadersTimedOut from None
        finally:
            self._sock.settimeout(None)

    def _first_bytes(self, size: int, flags: int) -> bytes:
        self._sock.settimeout(self.limit if self.first_request else None)
        try:
            data = self._sock.recv(size, flags)
        except TimeoutError:
            raise NoMoreData(b"") from None  # a connection that never said anything: close it
        finally:
            self._sock.settimeout(None)
        if data:
            self.started = time.monotonic()
        return data

    def request_read(self) -> None:
        self.reading_headers = False

    def response_done(self) -> None:
        self.reading_headers, self.first_request, self.started = True, False, None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class Worker(GeventWorker):
    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        if not isinstance(client, ssl.SSLSocket):  # TLS belongs in front (nginx, Apache); left as it is
            settings = checked()
            client = _Connection(client, settings.header_timeout if settings else Settings.header_timeout)
        super().handle(listener, client, addr)

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> Any:
        if isinstance(sock, _Connection):
            sock.request_read()
        _close_after_an_unread_body(req)
        try:
            return super().handle_request(listener_name, req, sock, addr)
        finally:
            if isinstance(sock, _Connection):
                sock.response_done()

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        if not isinstance(exc, HeadersTimedOut):
            return super().handle_error(req, client, addr, exc)
        limit = client.limit if isinstance(client, _Connection) else 0
        log.info("request headers from %s did not arrive within %gs (HEADER_TIMEOUT): 408", addr[0] if addr else "-",
                 limit)
        try:
            gunicorn.util.write_error(client, 408, "Request Timeout",
                                      f"the request headers did not arrive within {limit:g} seconds (HEADER_TIMEOUT)")
        except OSError:
            pass


def _close_after_an_unread_body(req: Any) -> None:
    """A body the app left unread or could not read (compat/body.py marks gunicorn's reader failed: a
    request refused for its key, its size or its time) ends the connection, as gunicorn does; the answer
    says so (Connection: close), so that a client does not send its next request on it meanwhile."""
    keeps_alive = req.should_close
    req.should_close = lambda: getattr(req.body, "failed", False) is True or keeps_alive()
