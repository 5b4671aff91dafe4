"""How far a generation's reader may fall behind the model.

The reader is the worker, acknowledging each event once it has passed it on, or the client a
streamed answer was handed to. While the engine waits for it, the generation holds its slot and
computes nothing. A per-wait timeout alone lets a reader that answers just before it hold the slot
for ever (an event every 25 s against a 30 s timeout); so the waits are drawn from one allowance
(CLIENT_WRITE_TIMEOUT) that the model's own time refills, up to the allowance: a reader may be as
slow as the model, and may fall behind it by the allowance at most, in one wait or in many.

A reading costs two clock reads (no system call) a token; the reader's socket timeout is lowered to
the allowance left only once that has moved by a good part of a second.
"""

from __future__ import annotations

import socket
import time

_RETIME = 0.25  # how far the allowance left may move before the socket's timeout follows it


class Pace:
    def __init__(self, allowance: float) -> None:
        self.allowance = allowance
        self.left = allowance  # what the reader may still keep the model waiting, in seconds
        self._mark = time.monotonic()

    def wait(self) -> None:
        """A wait for the reader begins: the model's time since the last one refills the allowance."""
        now = time.monotonic()
        self.left = min(self.allowance, self.left + now - self._mark)
        self._mark = now

    def waited(self) -> bool:
        """The wait has ended: False once the reader has used up the allowance."""
        now = time.monotonic()
        self.left -= now - self._mark
        self._mark = now
        return self.left > 0

    def retime(self, sock: socket.socket, ceiling: float) -> None:
        """Keep ``sock``'s timeout (at most ``ceiling``, its own) within the allowance left, so that one
        wait cannot overrun it; a system call only when the timeout has to move."""
        current = sock.gettimeout() or ceiling
        wanted = min(ceiling, max(self.left, 0.001))
        if wanted < current - _RETIME or (current < ceiling and wanted > current + _RETIME):
            sock.settimeout(wanted)
