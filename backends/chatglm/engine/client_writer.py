"""The engine's side of a handed-over stream: the worker passes the client's connection (SCM_RIGHTS)
after the answer's first piece, and the engine writes each following text piece's frame to it
itself, so that no worker wakes between the model's steps. The worker gets the connection back,
with what was written, at the first event that is not text (a tool call, the finish, an error), or
when the client leaves or stops reading."""

from __future__ import annotations

import json
import select
import socket
from typing import Any

import msgspec

from backends.chatglm.engine.pace import Pace

_encode = msgspec.json.Encoder().encode


def piece(text: str) -> bytes:
    """A text piece as a JSON string, as compat/sse.py's encoder writes it."""
    try:
        return _encode(text)
    except UnicodeEncodeError:  # a lone surrogate: replaced, as compat/sse.py does
        return json.dumps(text, ensure_ascii=False).encode("utf-8", "replace")


def peer_closed(sock: socket.socket) -> bool:
    """Has the other end closed? Readable with nothing to read is the end; bytes are not (the worker
    sends none while a generation runs; a client's bytes are its next, pipelined request)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class ClientWriter:
    def __init__(self, fd: int, frame: dict[str, Any]) -> None:
        """Takes ``fd`` only if it returns (a bad frame raises first, the descriptor still the caller's)."""
        self._timeout = float(frame["write_timeout"])
        self._prefix = str(frame["prefix"]).encode()
        self._suffix = str(frame["suffix"]).encode()
        self._number: int | None = frame["number"]  # the Responses API's sequence_number, one up a piece
        if self._number is not None and not isinstance(self._number, int):
            raise TypeError("number")
        self._after_number = str(frame["after_number"]).encode()
        self._chunked = bool(frame["chunked"])
        self.pieces: list[str] = []
        self.failed: str | None = None  # client_gone or client_too_slow, once a write failed
        self._sock = socket.socket(fileno=fd)  # ENOTSOCK for anything else, the descriptor not taken
        # A timeout keeps the descriptor non-blocking, which the worker's gevent socket (the same
        # open connection) relies on; it also bounds a client that stops reading.
        try:
            self._sock.settimeout(self._timeout)
        except BaseException:
            self._sock.detach()
            raise

    def write(self, text: str, pace: Pace) -> bool:
        """Write one piece's frame; False (and ``failed`` says why) when the client is not taking it,
        or takes it so slowly that it is ``pace``'s allowance behind the model."""
        if not text:
            return True
        if self._number is None:
            body = self._prefix + piece(text) + self._suffix
        else:
            body = b"%b%d%b%b%b" % (self._prefix, self._number + len(self.pieces), self._after_number, piece(text),
                                    self._suffix)
        pace.wait()
        try:
            self._sock.sendall(b"%X\r\n%b\r\n" % (len(body), body) if self._chunked else body)
        except TimeoutError:
            self.failed = "client_too_slow"
            return False
        except OSError:
            self.failed = "client_gone"
            return False
        self.pieces.append(text)
        if not pace.waited():
            self.failed = "client_too_slow"
            return False
        pace.retime(self._sock, self._timeout)
        return True

    def client_gone(self) -> bool:
        if self.failed is None and peer_closed(self._sock):
            self.failed = "client_gone"
        return self.failed is not None

    def summary(self) -> dict[str, Any]:
        """What the worker is told when it gets the connection back."""
        return {"written": "".join(self.pieces), "deltas": len(self.pieces), "client": self.failed}

    def close(self) -> None:
        self._sock.close()  # this process's descriptor only: the worker's stays open
