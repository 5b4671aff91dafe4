"""The engine process: ``python -m backends.engine.server --address ADDR --model PATH ...``

It binds its address first: the address is the machine-wide lock, so a second engine started for
the same address finds it taken and exits (status 3) while the first goes on. Then it loads the
model (one Pipeline per slot) and serves each connection in a thread of its own; with aigate's
patched chatglm-cpp a model step runs without the GIL, so the other threads (status, the line,
other slots) keep moving while a prompt is evaluated.
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

from backends.base import BackendError, ClientGone, Finish, TextDelta, Unavailable
from backends.engine import protocol
from backends.engine.client_writer import ClientWriter, peer_closed
from backends.engine.line import Line
from backends.engine.model import PATCHED, Model, Slot, common_prefix
from backends.ggml_file import ModelFileError, read_model_file

log = logging.getLogger("aigate.engine")

ADDRESS_TAKEN = 3  # exit status: another engine already serves this address


def bind(address: str) -> socket.socket:
    """Listen at ``address``; OSError(EADDRINUSE) if another engine already does."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if address.startswith("@"):  # abstract: the kernel refuses a second bind and frees it with the process
        listener.bind("\0" + address[1:])
    else:  # a path outlives its engine, so a lock held for life says whether one is alive
        lock = os.open(address + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OSError(errno.EADDRINUSE, f"{address} is held by another engine") from None
        Path(address).unlink(missing_ok=True)  # left by a dead engine
        listener.bind(address)
        os.chmod(address, 0o600)
    listener.listen(128)
    return listener


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
        self.handovers = 0  # streams whose text this engine wrote to the client itself
        self.last_seen = time.monotonic()
        self._lock = threading.Lock()

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

    def serve(self, conn: socket.socket) -> None:
        with self._lock:
            self.connections += 1
        try:
            conn.settimeout(self.args.send_timeout)  # a worker that stops reading lets go of its slot
            line = conn.makefile("rb").readline(protocol.MAX_LINE)
            message = protocol.decode(line)
            if message.get("op") == "status":
                conn.sendall(protocol.encode(self.status()))
            elif message.get("op") == "generate":
                self.generate(conn, message)
        except (OSError, ClientGone) as exc:  # the worker went away (its client left) or stopped reading
            log.debug("connection ended early: %r", exc)
        except Exception:  # a malformed message is a bug in the worker: say so, keep serving
            log.exception("engine request failed")
        finally:
            conn.close()
            with self._lock:
                self.connections -= 1
                self.last_seen = time.monotonic()

    def status(self) -> dict[str, object]:
        running, waiting = self.line.counts() if self.line else (0, 0)
        return {"loaded": self.model is not None, "error": self.load_error, "running": running,
                "waiting": waiting, "pid": os.getpid(), "patched": PATCHED, "handovers": self.handovers}

    def generate(self, conn: socket.socket, message: dict[str, Any]) -> None:
        request = protocol.chat_request(message["request"])
        writer: ClientWriter | None = None  # the client's connection, once the worker handed it over
        try:
            try:
                # A request that arrives while the model loads (at start, or after a crash) waits for it.
                if not self.loaded.wait(self.args.queue_timeout) or self.model is None or self.line is None:
                    raise Unavailable(self.load_error or "the local model is still loading",
                                      retry_after=None if self.load_error else 2)
                prompt = self.model.prompt_ids(request)
                gone = lambda: peer_closed(conn) or (writer is not None and writer.client_gone())  # noqa: E731
                offer = bool(message.get("handover"))
                with self.line.slot(lambda s: common_prefix(s.cached, prompt), gone) as slot:
                    for event in slot.generate(request, prompt, at_most_every(CANCEL_CHECK_SECONDS, gone)):
                        if writer is not None:
                            if isinstance(event, TextDelta):
                                if writer.write(event.text):
                                    continue
                                break  # the client left or stopped reading (the summary says which)
                            self.hand_back(conn, writer)
                            writer = None
                        line = protocol.event_message(event)
                        if offer and isinstance(event, TextDelta):
                            line["handover"], offer = True, False
                        conn.sendall(protocol.encode(line))
                        if isinstance(event, Finish):
                            break
                        # The next step waits until the worker has passed this event on: on a small machine
                        # its work then never competes with the model's threads for the cores.
                        writer = self.acknowledged(conn)
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

    @staticmethod
    def acknowledged(conn: socket.socket) -> ClientWriter | None:
        """The worker's answer to an event: ACK, or HANDOVER with the client's socket (a writer for it)."""
        data, fds, _, _ = socket.recv_fds(conn, 1, 1)
        if data == protocol.ACK and not fds:
            return None
        if data == protocol.HANDOVER and len(fds) == 1:
            frame = b""
            while not frame.endswith(b"\n"):
                more = conn.recv(4096)
                if not more:
                    break
                frame += more
            try:
                return ClientWriter(fds[0], protocol.decode(frame))
            except (ValueError, KeyError, TypeError, OSError):
                os.close(fds[0])
                raise
        for fd in fds:
            os.close(fd)
        raise ClientGone

    @staticmethod
    def hand_back(conn: socket.socket, writer: ClientWriter) -> None:
        """Tell the worker what was written to its client, and stop writing to it."""
        writer.close()
        conn.sendall(protocol.encode(writer.summary()))


def parent_gone(parent: int) -> bool:
    return parent > 0 and os.getppid() != parent


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
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EEXIST):
            return ADDRESS_TAKEN
        raise
    log.info("listening at %s", args.address)
    engine = Engine(args)
    threading.Thread(target=engine.load, name="load", daemon=True).start()
    listener.settimeout(1.0)
    while not parent_gone(args.parent):
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            idle = engine.connections == 0 and time.monotonic() - engine.last_seen > args.idle_exit
            if args.idle_exit and idle:
                log.info("no requests for %gs: exiting", args.idle_exit)
                break
            continue
        threading.Thread(target=engine.serve, args=(conn,), daemon=True).start()
    return 0


if __name__ == "__main__":
    sys.exit(main())
