"""A worker's side of the engine socket. Under gunicorn's gevent workers the socket module is
patched, so waiting for the engine (its line, a long prompt evaluation) yields to the other
requests of the worker; elsewhere it simply blocks, one request per process.

Nothing is sent on a connection before the kernel has said that the process at the other end is
this user's (address.check_peer): another user's process that took the engine's address gets no
request, and never the client's socket.

A request's images go later (protocol.py): the engine asks for them once its line has taken the
request, and only then are they decoded (LaterImages.decode, in the backend's image pool)."""

from __future__ import annotations

import array
import logging
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from backends.base import ChatRequest, ClientGone, ClientStream, Event, Finish, Unavailable
from backends.chatglm.engine import protocol
from backends.chatglm.engine.address import ForeignPeer, check_peer, sockaddr

log = logging.getLogger("aigate")

_RETRY_SECONDS = 0.05
_TAKE_BACK_SECONDS = 2.0  # an engine notices within CANCEL_CHECK_SECONDS and a decode step


_BUSY = {"loaded": True, "error": None, "running": 1, "waiting": 0, "pid": None}  # answering, but not now
_told: set[int] = set()  # the foreign processes this process has logged


def connect(address: str, timeout: float | None = None) -> socket.socket:
    """A connection to the engine. Raises OSError (ConnectionRefusedError, FileNotFoundError) when no
    engine listens there, ForeignPeer when another user's process does."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(sockaddr(address))
        check_peer(sock, address)
    except ForeignPeer as exc:
        sock.close()
        if exc.pid not in _told:  # once per process, not once per probe
            _told.add(exc.pid)
            log.error("%s", exc)
        raise
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass(frozen=True)
class LaterImages:
    """A request's images, decoded when the engine asks for them."""

    size: int  # each image's side in pixels, once decoded
    decode: Callable[[], list[str]]  # each image's pixels (base64 RGB), in order; raises BackendError


class EngineClient:
    def __init__(self, address: str, start: Callable[[], None] | None, wait_seconds: float) -> None:
        self.address = address
        self._start = start  # how to start an engine when none listens; None: a keeper restarts it
        self.wait_seconds = wait_seconds  # how long a request waits for an engine that is (re)starting
        self.foreign: ForeignPeer | None = None  # another user's process holds the address (at the last look)

    def status(self, timeout: float = 2.0) -> dict[str, Any] | None:
        """The engine's state, or None when no engine of this user listens (``foreign`` says whether
        another user's process does)."""
        try:
            sock = connect(self.address, timeout)
        except ForeignPeer as exc:
            self.foreign = exc
            return None
        except OSError:
            self.foreign = None
            return None
        self.foreign = None
        try:
            with sock:
                _send(sock, protocol.encode({"op": "status"}))
                status = protocol.decode(sock.makefile("rb").readline(protocol.MAX_LINE))
        except TimeoutError:  # a stock chatglm-cpp holds the GIL through a prompt evaluation: busy, not gone
            return dict(_BUSY)
        except (OSError, ValueError):
            return None
        return status if "loaded" in status else dict(_BUSY)  # else: refused, every connection in use

    def tokenize(self, request: ChatRequest) -> dict[str, Any]:
        """The request's prompt as the model reads it: {"tokens", "positions", "context"}. Its images go
        as placeholders: counting needs how many there are, not their pixels."""
        return self._ask(protocol.tokenize_request(protocol.without_images(request)))

    def detokenize(self, tokens: list[int], model: str = "") -> str:
        return str(self._ask(protocol.detokenize_request(tokens, model))["text"])

    def _ask(self, message: dict[str, Any]) -> dict[str, Any]:
        """The engine's one-line answer to ``message`` (its error raised)."""
        with self._connect_waiting() as sock:
            _send(sock, protocol.encode(message))
            try:
                line = sock.makefile("rb").readline(protocol.MAX_LINE)
            except OSError:
                line = b""
        if not line:
            raise Unavailable("the local engine stopped before it answered (it crashed or was restarted); it is "
                              "being started again, retry", retry_after=2)
        return protocol.answer(protocol.decode(line))

    def ensure_started(self) -> None:
        if self._start is not None and self.status() is None:
            self._start()

    def generate(self, request: ChatRequest, stream: Callable[[], ClientStream | None] | None = None,
                 images: LaterImages | None = None) -> Iterator[Event]:
        """The engine's events for ``request``; closing the iterator cancels the generation. With
        ``stream`` (the client's connection, once the first event is passed on), the engine may write
        the text pieces to the client itself: they come back as one Written event. With ``images``,
        the request's images go as placeholders and are decoded only when the engine asks for them
        (what ``images.decode`` raises is raised before any event)."""
        sock = self._connect_waiting()
        handed = False  # the engine is writing to the client
        try:
            later = None
            if images is not None:
                request = protocol.without_images(request)
                later = protocol.ImagesLater(sum(len(m.images) for m in request.messages), images.size)
            _send(sock, protocol.encode(protocol.generate_request(request, stream is not None, later)))
            lines = sock.makefile("rb")
            while True:
                try:
                    line = lines.readline(protocol.MAX_LINE)
                except OSError:
                    line = b""
                if not line:
                    raise Unavailable("the local engine stopped during this generation (it crashed or was "
                                      "restarted); it is being started again, retry", retry_after=2)
                message = protocol.decode(line)
                if "send_images" in message and images is not None:  # the line has taken the request
                    _send(sock, protocol.encode({"images": images.decode()}))
                    continue
                if "written" in message:  # the connection is ours again
                    handed = False
                    yield protocol.written(message)
                    if message["client"]:
                        raise ClientGone(message["client"])
                    continue
                event = protocol.event(message)
                yield event
                if isinstance(event, Finish) and event.choice >= request.n - 1:  # the last choice's
                    return
                client = stream() if stream is not None and message.get("handover") else None
                if client is None:
                    sock.sendall(protocol.ACK)  # passed on: the engine may take its next step
                else:
                    frame = protocol.HANDOVER + protocol.encode(protocol.handover_message(client))
                    sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [client.fileno]))])
                    handed = True
        finally:
            if handed:  # ended while the engine writes (the worker is stopping): take the connection back first
                _take_back(sock)
            sock.close()

    def _connect_waiting(self) -> socket.socket:
        """A connection to the engine, waiting for one that is starting (and starting it if that is
        ours to do) for up to ``wait_seconds``."""
        deadline = time.monotonic() + self.wait_seconds
        started = False
        while True:
            try:
                return connect(self.address)
            except OSError as exc:
                if time.monotonic() >= deadline:
                    why = ("its address is held by another user's process" if isinstance(exc, ForeignPeer)
                           else "it is being started")
                    raise Unavailable(f"the local engine is not running; {why}, retry", retry_after=2) from None
            if not started and self._start is not None:
                self._start()
                started = True
            time.sleep(_RETRY_SECONDS)  # cooperative under gevent


def _send(sock: socket.socket, line: bytes) -> None:
    """Send a request line. An engine with every connection in use answers at once and closes without
    reading it: its answer is read next, as any other."""
    try:
        sock.sendall(line)
    except (BrokenPipeError, ConnectionResetError):
        pass


def _take_back(sock: socket.socket) -> None:
    """Ask the engine to stop writing to the client (it sees our end close within a step) and wait
    until it has, so that nothing written after this interleaves with its frames."""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(_TAKE_BACK_SECONDS)
        while sock.recv(65536):
            pass
    except OSError:
        pass
