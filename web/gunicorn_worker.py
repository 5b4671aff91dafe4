"""gunicorn's gevent worker with a bound on the time a client takes to send its request headers, and
idle connections that give way when the worker's connections are nearly all taken.

gunicorn bounds only the wait between keep-alive requests (KEEPALIVE, then a silent close) and
nothing at all with KEEPALIVE=0, so a client that sends its headers a byte at a time holds one of
the worker's WORKER_CONNECTIONS for as long as it likes. Here the headers of each request must
arrive within HEADER_TIMEOUT seconds of their first byte (a 408 after), and a new connection must
send its first byte within HEADER_TIMEOUT too (closed silently after, as an idle keep-alive is).
The body has its own bound in the app (BODY_TIMEOUT, web/body.py).

Those bounds still let idle connections fill the worker: WORKER_CONNECTIONS keep-alives (a request
each, even one refused for want of a key) kept it from accepting anyone for KEEPALIVE seconds. So
when the open connections come within a tenth of WORKER_CONNECTIONS, connections waiting for a request
are closed, the longest waiting first, until that tenth is free again (OpenConnections): an idle
keep-alive at once, a new connection that has not sent its first byte once it had GRACE seconds.
A client whose idle keep-alive is closed connects again, as it would after KEEPALIVE.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import time
from typing import Any

import gevent
import gunicorn.util
from gunicorn.http.errors import NoMoreData
from gunicorn.workers.ggevent import GeventWorker

from config.settings import Settings, checked

log = logging.getLogger("aigate")

GRACE = 1.0  # seconds a new connection has for its first byte while connections are scarce
REPORT_EVERY = 60.0  # seconds between two log lines about idle connections closed to make room


class HeadersTimedOut(Exception):
    """Not an OSError: gunicorn passes those on as socket faults; this one it hands to handle_error."""


class _Connection:
    """The client's socket, timing the reads of each request's headers (all else passed through)."""

    def __init__(self, sock: socket.socket, limit: float, pool: OpenConnections | None = None) -> None:
        self._sock = sock
        # Looked up once: the response's writes go through these for every chunk of a stream.
        self.sendall, self.send, self.fileno = sock.sendall, sock.send, sock.fileno
        self.limit = limit
        self.pool = pool
        self.reading_headers = True
        self.first_request = True
        self.started: float | None = None  # when the current request's first byte arrived
        self.idle_since: float | None = None  # waiting for a request's first byte since then
        self.gave_way = False  # closed to make room (OpenConnections)

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
        self.idle_since = time.monotonic()
        if self.pool is not None:
            self.pool.make_room()  # this one may be the one to go
        if self.gave_way:
            self.idle_since = None
            return b""
        self._sock.settimeout(self.limit if self.first_request else None)
        try:
            data = self._sock.recv(size, flags)
        except TimeoutError:
            raise NoMoreData(b"") from None  # a connection that never said anything: close it
        except OSError:
            if self.gave_way:  # shut down under it
                return b""
            raise
        finally:
            self._sock.settimeout(None)
            self.idle_since = None
        if data:
            self.started = time.monotonic()
        return data

    def has_bytes_waiting(self) -> bool:
        """Has the client sent something (a request, or its close) not read yet?"""
        try:
            return bool(select.select([self._sock], [], [], 0)[0])
        except (OSError, ValueError):
            return True  # closing anyway: not one to close

    def give_way(self) -> None:
        """Close while waiting for a request: the waiting read ends as if the client had left."""
        self.gave_way = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def request_read(self) -> None:
        self.reading_headers = False

    def response_done(self) -> None:
        self.reading_headers, self.first_request, self.started = True, False, None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class OpenConnections:
    """A worker's client connections. Once more than ``limit`` minus a tenth are open, the ones waiting
    for a request give way, the longest waiting first, until a tenth is free: WORKER_CONNECTIONS full
    of idle connections would stop gevent accepting anyone (new clients wait in the listen backlog)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.keep = limit - max(1, limit // 10)  # past this many, idle connections give way
        self.open: set[_Connection] = set()
        self._wake: gevent.Greenlet | None = None  # make_room again once a new connection's GRACE is over
        self._closed, self._reported = 0, float("-inf")

    def add(self, conn: _Connection) -> None:
        self.open.add(conn)

    def remove(self, conn: _Connection) -> None:
        self.open.discard(conn)

    def make_room(self) -> None:
        excess = len(self.open) - self.keep
        if excess <= 0:
            return
        now = time.monotonic()
        waiting = sorted((c for c in self.open if c.idle_since is not None), key=lambda c: c.idle_since or 0)
        later = None
        for conn in waiting:
            if excess <= 0:
                break
            since = conn.idle_since or now
            if conn.first_request and now - since < GRACE:  # a new connection: its request may be on its way
                later = since + GRACE if later is None else min(later, since + GRACE)
                continue
            if conn.has_bytes_waiting():
                continue
            self.open.discard(conn)
            conn.give_way()
            excess -= 1
            self._closed += 1
        if excess > 0 and later is not None and self._wake is None:
            self._wake = gevent.spawn_later(max(0.0, later - now) + 0.01, self._woken)
        self._report(now)

    def _woken(self) -> None:
        self._wake = None
        self.make_room()

    def _report(self, now: float) -> None:
        if self._closed and now - self._reported >= REPORT_EVERY:
            log.info("WORKER_CONNECTIONS (%d) nearly all taken: %d connection(s) waiting for a request closed to "
                     "make room", self.limit, self._closed)
            self._closed, self._reported = 0, now


class Worker(GeventWorker):  # type: ignore[misc]  # gunicorn ships no type hints
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connections = OpenConnections(self.worker_connections)

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        if isinstance(client, ssl.SSLSocket):  # TLS belongs in front (nginx, Apache); left as it is
            super().handle(listener, client, addr)
            return
        settings = checked()
        conn = _Connection(client, settings.header_timeout if settings else Settings.header_timeout,
                           self.connections)
        self.connections.add(conn)
        try:
            super().handle(listener, conn, addr)
        finally:
            self.connections.remove(conn)

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
            super().handle_error(req, client, addr, exc)
            return
        limit = client.limit if isinstance(client, _Connection) else 0
        log.info("request headers from %s did not arrive within %gs (HEADER_TIMEOUT): 408", addr[0] if addr else "-",
                 limit)
        try:
            gunicorn.util.write_error(client, 408, "Request Timeout",
                                      f"the request headers did not arrive within {limit:g} seconds (HEADER_TIMEOUT)")
        except OSError:
            pass


def _close_after_an_unread_body(req: Any) -> None:
    """A body the app left unread or could not read (web/body.py marks gunicorn's reader failed: a
    request refused for its key, its size or its time) ends the connection, as gunicorn does; the answer
    says so (Connection: close), so that a client does not send its next request on it meanwhile."""
    keeps_alive = req.should_close
    req.should_close = lambda: getattr(req.body, "failed", False) is True or keeps_alive()
