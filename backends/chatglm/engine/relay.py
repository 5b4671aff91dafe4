"""One generation's events on their way out of the engine, in explicit stages:

  RELAYING  each event goes to the worker as a line, and the next model step waits for its ACK (on a
            small machine the worker's work then never competes with the model's threads);
  WRITING   the worker handed the client's connection over (after the first text piece it was
            offered): the engine writes the text pieces to the client itself, at the client's pace;
  ENDED     the answer is over: finished, or the client or the worker left. A connection still held
            goes back to the worker first, with what was written (a Written event on its side).

server.Engine.generate drives it: ``pass_on`` each event until it says stop, then ``end`` once the
generation has let go of its slot (so the worker, told the answer is over, finds the slot free).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from enum import Enum
from typing import Any

from backends.base import ClientGone, Event, Finish, TextDelta
from backends.chatglm.engine import protocol
from backends.chatglm.engine.client_writer import ClientWriter
from backends.chatglm.engine.pace import Pace


class Stage(Enum):
    RELAYING = "relaying"
    WRITING = "writing"
    ENDED = "ended"


class Relay:
    def __init__(self, conn: socket.socket, send_timeout: float, offer: bool,
                 handed_over: Callable[[], None] = lambda: None, choices: int = 1) -> None:
        self.conn = conn
        self.choices = choices  # the answer is over with the last choice's Finish
        self.handed_over = handed_over  # told when the worker hands its client over (the engine counts them)
        self.send_timeout = send_timeout
        self.offer = offer  # a handover is offered with the first text piece, once
        self.pace = Pace(send_timeout)
        self.stage = Stage.RELAYING
        self.writer: ClientWriter | None = None  # WRITING: the client's connection

    def client_gone(self) -> bool:
        return self.writer is not None and self.writer.client_gone()

    def pass_on(self, event: Event) -> bool:
        """Send ``event`` on its way; False once the answer is over (the last Finish sent, or the client left)."""
        if self.stage is Stage.WRITING and self.writer is not None:
            if isinstance(event, TextDelta):
                # False: the client left or stopped reading. The connection goes back (with the summary
                # saying which) in ``end``, once the generation has let go of its slot.
                return self.writer.write(event.text, self.pace)
            self._give_back()  # the last events (a tool call, the Finish) go through the worker
        line = protocol.event_message(event)
        offered = self.offer and isinstance(event, TextDelta)
        if offered:
            line["handover"], self.offer = True, False
        self.conn.sendall(protocol.encode(line))
        if isinstance(event, Finish) and event.choice >= self.choices - 1:
            self.stage = Stage.ENDED
            return False
        self.writer = self.acknowledged(offered)
        if self.writer is not None:
            self.stage = Stage.WRITING
            self.handed_over()
        return True

    def end(self) -> None:
        """The answer is over, however it ended: a connection still held goes back to the worker."""
        if self.stage is Stage.WRITING:
            self._give_back()
        self.stage = Stage.ENDED

    def _give_back(self) -> None:
        """Tell the worker what was written to its client, and stop writing to it."""
        if self.writer is not None:
            self.writer.close()
            self.conn.sendall(protocol.encode(self.writer.summary()))
        self.writer, self.stage = None, Stage.RELAYING

    def acknowledged(self, offered: bool) -> ClientWriter | None:
        """The worker's answer to an event: ACK, or (where ``offered``) HANDOVER with the client's
        socket (a writer for it). Raises ClientGone when the worker left or fell too far behind (it is
        told so, as if its client had been too slow), BadMessage for anything else."""
        conn, pace = self.conn, self.pace
        pace.wait()
        fds: list[int] = []
        try:
            data, fds, _, _ = socket.recv_fds(conn, 1, 1)
            frame = b""
            if data == protocol.HANDOVER and len(fds) == 1 and offered:
                frame = protocol.read_line(conn, protocol.MAX_FRAME, self.send_timeout)
                conn.settimeout(self.send_timeout)
            on_time = pace.waited()
            if on_time and data == protocol.ACK and not fds:
                pace.retime(conn, self.send_timeout)
                return None
            if on_time and frame:
                pace.retime(conn, self.send_timeout)
                try:
                    return ClientWriter(fds[0], protocol.decode(frame))
                except (ValueError, KeyError, TypeError, OSError) as exc:
                    raise protocol.BadMessage(f"a malformed handover frame ({type(exc).__name__})") from None
        except TimeoutError:
            on_time = False
        except BaseException:
            close_all(fds)
            raise
        close_all(fds)
        if not on_time:
            say(conn, {"written": "", "deltas": 0, "client": "client_too_slow"})
            raise ClientGone("client_too_slow")
        if not data:
            raise ClientGone
        raise protocol.BadMessage(f"an answer to an event of {data!r} with {len(fds)} descriptor(s)"
                                  + ("" if offered else ", where no handover was offered"))


def say(conn: socket.socket, message: dict[str, Any]) -> None:
    """One line, if the peer has room for it now (a system call, no waiting)."""
    try:
        conn.setblocking(False)
        conn.send(protocol.encode(message))
    except OSError:
        pass


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
