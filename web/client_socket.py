"""The HTTP client's connection, where the WSGI server lets us see it (gunicorn puts the socket in
``environ["gunicorn.socket"]``; elsewhere nothing is watched): is the client still there, and how
long may a write to it block. A generation must not run for a client that left, nor wait on one
that stopped reading."""

from __future__ import annotations

import select
import socket
import time
from typing import Any

from backends.base import ClientGone, ClientStream, PieceFrame

__all__ = ["ClientGone", "ClientSocket"]

_CHECK_SECONDS = 0.1  # a look at the socket costs a system call: at most this often
_SEND_BUFFER = 16 * 1024  # bytes (the kernel doubles it): ample for token streams, quick to fill when stalled


class ClientSocket:
    def __init__(self, environ: dict[str, Any], write_timeout: float) -> None:
        self._sock: socket.socket | None = environ.get("gunicorn.socket")
        self._chunked = environ.get("SERVER_PROTOCOL") != "HTTP/1.0"
        self._write_timeout = write_timeout
        self._checked = 0.0
        self._old_timeout: float | None = None

    def check(self) -> None:
        """Raise ClientGone if the client has closed its end (a look at most every 0.1 s)."""
        now = time.monotonic()
        if self._sock is None or now - self._checked < _CHECK_SECONDS:
            return
        self._checked = now
        try:
            readable, _, _ = select.select([self._sock], [], [], 0)
            # Readable with nothing to read is the end of the connection; bytes are a pipelined request.
            gone = bool(readable) and self._sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            gone = True
        if gone:
            raise ClientGone

    def stream(self, frame: PieceFrame | None) -> ClientStream | None:
        """The connection, for a backend that writes a stream's text pieces itself in ``frame``, or
        None where it cannot be handed over. gunicorn sends an HTTP/1.1 answer of unknown length in
        chunks, an HTTP/1.0 one as it is."""
        if self._sock is None or frame is None:
            return None
        return ClientStream(self._sock.fileno(), frame, self._chunked, self._write_timeout)

    def bound_writes(self) -> None:
        """From now on a write that blocks longer than the write timeout fails (and ends the answer).
        A small send buffer, so that a client that stops reading is noticed after a few chunks, not
        after the megabytes the kernel would otherwise queue for it."""
        if self._sock is not None:
            self._old_timeout = self._sock.gettimeout()
            self._sock.settimeout(self._write_timeout)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)

    def write_timed_out(self, last_write: float) -> bool:
        """Was the answer ended by a write that blocked for the write timeout?"""
        return self._sock is not None and time.monotonic() - last_write >= self._write_timeout

    def unbound_writes(self) -> None:
        if self._sock is not None:
            self._sock.settimeout(self._old_timeout)
