"""The engine process: ``python -m backends.engine.server --address ADDR --model PATH ...``

It binds its address first: the address is the machine-wide lock, so a second engine started for
the same address finds it taken and exits (status 3) while the first goes on. Then it loads the
model (one Pipeline per slot) and serves each connection in a thread of its own; with aigate's
patched chatglm-cpp a model step runs without the GIL, so the other threads (status, the line,
other slots) keep moving while a prompt is evaluated.

Only its own user's processes are served (address.py). Connections past what the slots and the line
can use are answered "full" at once, without a thread; a failed accept (out of descriptors) waits a
moment and goes on; a request must arrive whole, within bounds of size and time; and a reader may
fall behind the model by CLIENT_WRITE_TIMEOUT at most (pace.py). A bad message costs one log line.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from backends.base import BackendError, ChatRequest, ClientGone, Finish, QueueFull, TextDelta, Unavailable
from backends.engine import protocol
from backends.engine.address import ADDRESS_TAKEN, UnsafeAddress, is_abstract, peer, private_directory, sockaddr
from backends.engine.client_writer import ClientWriter, peer_closed
from backends.engine.line import Line
from backends.engine.model import PATCHED, Model, Slot, common_prefix
from backends.engine.pace import Pace
from backends.ggml_file import ModelFileError, read_model_file

log = logging.getLogger("aigate.engine")

ADDRESS_UNSAFE = 4  # exit status: the socket's directory is not this user's own (address.py says why)
SPARE_CONNECTIONS = 32  # besides a connection per slot and per place in the line: status probes, requests
# waiting for the model to load or being read
ACCEPT_PAUSE = 0.1  # after a failed accept (no descriptor left): the connection waits in the backlog meanwhile
TALLY_SECONDS = 10.0
LOOK_SECONDS = 1.0  # how often the main loop looks at the parent, the idle time and the socket's path
TOUCH_SECONDS = 3600.0  # how often the socket and its lock get a fresh time, so that no tmp cleaner ages them


def bind(address: str) -> socket.socket:
    """Listen at ``address``; OSError(EADDRINUSE) if another engine already does, UnsafeAddress if
    its directory is not this user's own."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if is_abstract(address):  # the kernel refuses a second bind and frees it with the process
        listener.bind(sockaddr(address))
    else:  # a path outlives its engine, so a lock held for life says whether one is alive
        private_directory(address)
        lock = os.open(address + ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OSError(errno.EADDRINUSE, f"{address} is held by another engine") from None
        Path(address).unlink(missing_ok=True)  # left by a dead engine
        listener.bind(address)
        os.chmod(address, 0o600)
    listener.listen(128)
    return listener


class Tally:
    """A warning that may come in floods (refused connections, failed accepts): one line at most every
    TALLY_SECONDS, with how many there were."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.count = 0
        self.last = -TALLY_SECONDS

    def __call__(self, detail: str) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= TALLY_SECONDS:
            log.warning("%s (%d in the last %ds): %s", self.what, self.count, TALLY_SECONDS, detail)
            self.count, self.last = 0, now


CANCEL_CHECK_SECONDS = 0.05  # between tokens a look at the worker's socket costs a system call: at most this often


def at_most_every(seconds: float, check: Callable[[], bool]) -> Callable[[], bool]:
    """``check``, asked at most once every ``seconds`` (False in between). A worker that leaves is
    also noticed at once by the acknowledgement it no longer sends."""
    last = time.monotonic()

    def throttled() -> bool:
        nonlocal last
        now = time.monotonic()
        if now - last < seconds:
            return False
        last = now
        return check()
    return throttled


class Engine:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.model: Model | None = None
        self.line: Line[Slot] | None = None
        self.load_error: str | None = None
        self.loaded = threading.Event()
        self.connections = 0
        self.max_connections = args.slots + args.max_queue + SPARE_CONNECTIONS  # and so threads
        self.handovers = 0  # streams whose text this engine wrote to the client itself
        self.last_seen = time.monotonic()
        self._lock = threading.Lock()
        self._strangers = Tally("refused connections from another user's processes")
        self._full = Tally("refused connections: every connection is in use")
        self._failed_accepts = Tally("accepting a connection failed")

    def load(self) -> None:
        try:
            file = read_model_file(self.args.model)
            model = Model(file, self.args.context_length or file.config.max_length, self.args.slots)
        except (ModelFileError, RuntimeError, OSError) as exc:
            self.load_error = f"loading {self.args.model} failed: {exc}"
            log.error("%s", self.load_error)
        else:
            self.model = model
            self.line = Line(model.slots, self.args.max_queue, self.args.queue_timeout)
            log.info("loaded %s, context %d tokens, %d slot(s)%s", self.args.model, model.context_length,
                     len(model.slots), "" if PATCHED else " (stock chatglm-cpp: prefix reuse at decode speed)")
        self.loaded.set()

    def admit(self, conn: socket.socket) -> None:
        """Serve ``conn`` in a thread of its own, if it is this user's and there is room; else close it
        at once (a connection too many hears why: the line is full)."""
        try:
            pid, uid = peer(conn)
        except OSError:  # gone already
            conn.close()
            return
        if uid != os.getuid():
            conn.close()
            self._strangers(f"process {pid} of uid {uid}")
            return
        with self._lock:
            room = self.connections < self.max_connections
            if room:
                self.connections += 1
        if not room:
            self._full(f"{self.max_connections} connections at once")
            refuse(conn, QueueFull(f"the local engine has {self.max_connections} connections already; retry later",
                                   retry_after=self.line.retry_after() if self.line else 1.0))
            return
        try:
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()
        except RuntimeError as exc:  # no thread to be had: as if full
            self.done(conn)
            self._full(str(exc))

    def accept_failed(self, exc: OSError) -> None:
        """Out of descriptors (EMFILE, ENFILE) or memory: the engine goes on; the connection waits."""
        self._failed_accepts(exc.strerror or str(exc))
        time.sleep(ACCEPT_PAUSE)

    def serve(self, conn: socket.socket) -> None:
        try:
            line = protocol.read_line(conn, protocol.MAX_LINE, self.args.send_timeout)
            if not line:  # connected and left
                return
            op, request, handover = protocol.parse_request(line)
            conn.settimeout(self.args.send_timeout)  # a worker that stops reading lets go of its slot
            if request is None:
                conn.sendall(protocol.encode(self.status()))
            elif isinstance(request, ChatRequest) and op == "tokenize":
                self.tokenize(conn, request)
            elif isinstance(request, ChatRequest):
                self.generate(conn, request, handover)
            else:
                self.detokenize(conn, request)
        except protocol.BadMessage as exc:
            log.warning("closed an engine connection that sent %s", exc)
        except (OSError, ClientGone) as exc:  # the worker went away (its client left) or stopped reading
            log.debug("connection ended early: %r", exc)
        except Exception:  # a bug: say where, keep serving
            log.exception("engine request failed")
        finally:
            self.done(conn)

    def done(self, conn: socket.socket) -> None:
        try:
            conn.close()
        finally:
            with self._lock:
                self.connections -= 1
                self.last_seen = time.monotonic()

    def status(self) -> dict[str, object]:
        running, waiting = self.line.counts() if self.line else (0, 0)
        return {"loaded": self.model is not None, "error": self.load_error, "running": running,
                "waiting": waiting, "pid": os.getpid(), "patched": PATCHED, "handovers": self.handovers}

    def loaded_model(self) -> Model:
        """The model, once loaded: a request that arrives while it loads (at start, or after a crash) waits."""
        if not self.loaded.wait(self.args.queue_timeout) or self.model is None or self.line is None:
            raise Unavailable(self.load_error or "the local model is still loading",
                              retry_after=None if self.load_error else 2)
        return self.model

    def tokenize(self, conn: socket.socket, request: ChatRequest) -> None:
        """The request's prompt as the model reads it (the tokenizer only: no slot, no line)."""
        try:
            model = self.loaded_model()
            ids = model.request_ids(request)
            line = {"tokens": ids, "positions": model.positions(request, ids), "context": model.context_length}
        except BackendError as exc:
            line = protocol.error_message(exc)
        conn.sendall(protocol.encode(line))

    def detokenize(self, conn: socket.socket, tokens: list[int]) -> None:
        try:
            line: dict[str, Any] = {"text": self.loaded_model().detokenize(tokens)}
        except BackendError as exc:
            line = protocol.error_message(exc)
        conn.sendall(protocol.encode(line))

    def generate(self, conn: socket.socket, request: ChatRequest, offer: bool) -> None:
        writer: ClientWriter | None = None  # the client's connection, once the worker handed it over
        try:
            try:
                # A request that arrives while the model loads (at start, or after a crash) waits for it.
                if not self.loaded.wait(self.args.queue_timeout) or self.model is None or self.line is None:
                    raise Unavailable(self.load_error or "the local model is still loading",
                                      retry_after=None if self.load_error else 2)
                prompt = self.model.prompt_ids(request)
                gone = lambda: peer_closed(conn) or (writer is not None and writer.client_gone())  # noqa: E731
                with self.line.slot(lambda s: common_prefix(s.cached, prompt), gone) as slot:
                    pace = Pace(self.args.send_timeout)
                    for event in slot.generate(request, prompt, at_most_every(CANCEL_CHECK_SECONDS, gone)):
                        if writer is not None:
                            if isinstance(event, TextDelta):
                                if writer.write(event.text, pace):
                                    continue
                                break  # the client left or stopped reading (the summary says which)
                            self.hand_back(conn, writer)
                            writer = None
                        line = protocol.event_message(event)
                        offered = offer and isinstance(event, TextDelta)
                        if offered:
                            line["handover"], offer = True, False
                        conn.sendall(protocol.encode(line))
                        if isinstance(event, Finish):
                            break
                        # The next step waits until the worker has passed this event on: on a small machine
                        # its work then never competes with the model's threads for the cores.
                        writer = self.acknowledged(conn, pace, offered)
                        if writer is not None:
                            with self._lock:
                                self.handovers += 1
            finally:
                if writer is not None:  # ended while writing to the client: the worker gets it back first
                    self.hand_back(conn, writer)
        except BackendError as exc:
            conn.sendall(protocol.encode(protocol.error_message(exc)))
        except RuntimeError:  # chatglm.cpp's own checks (a CHATGLM_CHECK): this request failed, not the engine
            log.exception("the model failed on a request")
            conn.sendall(protocol.encode(protocol.error_message(
                BackendError("The local model failed on this request; the error has been logged."))))

    def acknowledged(self, conn: socket.socket, pace: Pace, offered: bool) -> ClientWriter | None:
        """The worker's answer to an event: ACK, or (where ``offered``) HANDOVER with the client's
        socket (a writer for it). Raises ClientGone when the worker left or fell too far behind (it is
        told so, as if its client had been too slow), BadMessage for anything else."""
        pace.wait()
        fds: list[int] = []
        try:
            data, fds, _, _ = socket.recv_fds(conn, 1, 1)
            frame = b""
            if data == protocol.HANDOVER and len(fds) == 1 and offered:
                frame = protocol.read_line(conn, protocol.MAX_FRAME, self.args.send_timeout)
                conn.settimeout(self.args.send_timeout)
            on_time = pace.waited()
            if on_time and data == protocol.ACK and not fds:
                pace.retime(conn, self.args.send_timeout)
                return None
            if on_time and frame:
                pace.retime(conn, self.args.send_timeout)
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

    @staticmethod
    def hand_back(conn: socket.socket, writer: ClientWriter) -> None:
        """Tell the worker what was written to its client, and stop writing to it."""
        writer.close()
        conn.sendall(protocol.encode(writer.summary()))


def say(conn: socket.socket, message: dict[str, Any]) -> None:
    """One line, if the peer has room for it now (a system call, no waiting)."""
    try:
        conn.setblocking(False)
        conn.send(protocol.encode(message))
    except OSError:
        pass


def refuse(conn: socket.socket, error: BackendError) -> None:
    say(conn, protocol.error_message(error))
    conn.close()


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def parent_gone(parent: int) -> bool:
    return parent > 0 and os.getppid() != parent


def socket_gone(address: str, bound: os.stat_result | None) -> bool:
    """Has the socket's path been removed (a tmp cleaner) or taken over since this engine bound it?"""
    if bound is None:
        return False
    try:
        now = os.stat(address)
    except FileNotFoundError:
        return True
    return (now.st_dev, now.st_ino) != (bound.st_dev, bound.st_ino)


def touch(address: str) -> None:
    for path in (address, address + ".lock"):
        try:
            os.utime(path)
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--context-length", type=int, default=0, help="0: the model's own")
    parser.add_argument("--slots", type=int, default=1)
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--queue-timeout", type=float, default=60.0)
    parser.add_argument("--send-timeout", type=float, default=30.0)
    parser.add_argument("--idle-exit", type=float, default=0.0, help="exit after this long without requests (0: never)")
    parser.add_argument("--parent", type=int, default=0, help="exit when this process is no longer the parent")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s [%(process)d] [%(levelname)s] engine: %(message)s")
    try:
        listener = bind(args.address)
    except UnsafeAddress as exc:
        log.error("cannot listen: %s", exc)
        return ADDRESS_UNSAFE
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EEXIST):
            return ADDRESS_TAKEN
        raise
    bound = None if is_abstract(args.address) else os.stat(args.address)
    log.info("listening at %s", args.address)
    engine = Engine(args)
    threading.Thread(target=engine.load, name="load", daemon=True).start()
    listener.settimeout(LOOK_SECONDS)
    look = touched = time.monotonic()
    while True:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            pass
        except OSError as exc:
            engine.accept_failed(exc)
        else:
            engine.admit(conn)
        now = time.monotonic()
        if now - look < LOOK_SECONDS:
            continue
        look = now
        if parent_gone(args.parent):
            break
        if args.idle_exit and engine.connections == 0 and now - engine.last_seen > args.idle_exit:
            log.info("no requests for %gs: exiting", args.idle_exit)
            break
        if socket_gone(args.address, bound):  # the next engine binds it afresh
            log.error("%s was removed or replaced (a tmp cleaner?): exiting so that it is made again", args.address)
            break
        if now - touched > TOUCH_SECONDS:
            touch(args.address)
            touched = now
    return 0


if __name__ == "__main__":
    sys.exit(main())
