"""The engine process: ``python -m backends.chatglm.engine.server --address ADDR --model PATH ...``

It binds its address first: the address is the machine-wide lock, so a second engine started for
the same address finds it taken and exits (status 3) while the first goes on. Then it loads its
default model (``--model``; the others, ``--also``, on their first request: hosts.py) and serves each
connection in a thread of its own; with aigate's
patched chatglm-cpp a model step runs without the GIL, so the other threads (status, the line,
the generations waiting for the next step) keep moving while the model computes.

Only its own user's processes are served (address.py). Connections past what the slots and the line
can use are answered "full" at once, without a thread; a failed accept (out of descriptors) waits a
moment and goes on; a request must arrive whole, within bounds of size and time; and a reader may
fall behind the model by CLIENT_WRITE_TIMEOUT at most (pace.py). A bad message costs one log line.

A request whose images come later (GLM-4V, protocol.py) is checked first (the model has vision, one
image, the prompt fits), then takes its place in the line, and only then asks the worker for its
pixels: a request refused costs the worker no decode. A worker that does not send them within
``--images-timeout`` is told so (QueueTimeout) and its place goes to the next.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends.base import (
    BackendError,
    ChatRequest,
    ClientGone,
    InvalidImage,
    QueueFull,
    QueueTimeout,
    Unavailable,
)
from backends.chatglm.engine import protocol
from backends.chatglm.engine.address import ADDRESS_TAKEN, UnsafeAddress, is_abstract, peer, private_directory, sockaddr
from backends.chatglm.engine.client_writer import peer_closed
from backends.chatglm.engine.hosts import Hosts, ModelHost
from backends.chatglm.engine.line import Line
from backends.chatglm.engine.model import LOGITS, PATCHED, Model, Slot, common_prefix, controls_of
from backends.chatglm.engine.relay import Relay, say
from backends.chatglm.engine.runners import BATCHED
from backends.chatglm.ggml_file import ModelFile, ModelFileError, read_model_file

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


@dataclass
class Loaded:
    """A loaded model and the line for its slots."""

    model: Model
    line: Line[Slot]


class Engine:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.files: dict[str, ModelFile] = {}  # each model's file, read at start: what it honours before it loads
        hosts = [ModelHost[Loaded](model_id, Path(path)) for model_id, path in configured(args)]
        self.hosts = Hosts(hosts, self.load, unload, args.max_loaded, args.keep_alive)
        for host in hosts:
            try:
                self.files[host.id] = read_model_file(host.path)
            except (ModelFileError, OSError) as exc:  # the configuration check read it: it changed since
                host.state, host.error = "failed", f"loading {host.id} failed: {exc}"
        self.connections = 0
        # a connection per slot and per place in each model's line, and so threads
        self.max_connections = (args.slots + args.max_queue) * len(hosts) + SPARE_CONNECTIONS
        self.handovers = 0  # streams whose text this engine wrote to the client itself
        self.images_asked = 0  # requests whose images a worker was asked for (and so decoded)
        self.last_seen = time.monotonic()
        self._lock = threading.Lock()
        self._strangers = Tally("refused connections from another user's processes")
        self._full = Tally("refused connections: every connection is in use")
        self._failed_accepts = Tally("accepting a connection failed")

    def load(self, host: ModelHost[Loaded]) -> Loaded:
        """``host``'s model, loaded (the loader thread's call: hosts.py). Raises what loading may raise."""
        file = read_model_file(host.path)
        context = min(self.args.context_length or file.config.max_length, file.config.max_length)
        model = Model(file, context, self.args.slots)
        note = (" (batched)" if BATCHED else " (chatglm-cpp without model.step: the slots take turns)"
                if LOGITS else " (chatglm-cpp without next_token_logits: no sampling controls, no schemas)") \
            if PATCHED else " (stock chatglm-cpp: the slots take turns, prefix reuse at decode speed, no sampling " \
                            "controls)"
        log.info("%s: context %d tokens, %d slot(s)%s", host.id, model.context_length, len(model.slots), note)
        return Loaded(model, Line(model.slots, self.args.max_queue, self.args.queue_timeout))

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
                                   retry_after=self.retry_after()))
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
            request = protocol.parse_request(line)
            conn.settimeout(self.args.send_timeout)  # a worker that stops reading lets go of its slot
            if request is None:
                conn.sendall(protocol.encode(self.status()))
            elif isinstance(request, protocol.Tokenize):
                self.tokenize(conn, request.request)
            elif isinstance(request, protocol.Detokenize):
                self.detokenize(conn, request)
            else:
                self.generate(conn, request)
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

    def retry_after(self) -> float:
        lines = [h.loaded.line for h in self.hosts.states() if h.loaded is not None]
        return max((line.retry_after() for line in lines), default=1.0)

    def status(self) -> dict[str, object]:
        models = [self.model_status(h) for h in self.hosts.states()]
        default = models[0]
        return {"loaded": self.hosts.started.is_set() and default["state"] != "failed", "error": default["error"],
                "running": sum(m["running"] for m in models), "waiting": sum(m["waiting"] for m in models),
                "pid": os.getpid(), "patched": PATCHED, "batched": BATCHED, "handovers": self.handovers,
                "images": self.images_asked,
                # what the default model honours (ModelInfo.controls, .structured_outputs); each model's below
                "controls": default["controls"], "constrains": default["constrains"], "models": models}

    def model_status(self, host: ModelHost[Loaded]) -> dict[str, Any]:
        """One model's state, and what it honours (known from its file before it loads)."""
        loaded = host.loaded
        running, waiting = loaded.line.counts() if loaded is not None else (0, 0)
        file = self.files.get(host.id)
        return {"id": host.id, "state": host.state, "error": host.error, "running": running,
                "waiting": waiting + host.waiting,
                "controls": sorted(controls_of(file)) if file is not None else [],
                "constrains": loaded.model.constrains if loaded is not None else LOGITS and file is not None}

    def tokenize(self, conn: socket.socket, request: ChatRequest) -> None:
        """The request's prompt as the model reads it (the tokenizer only: no slot, no line; its model
        loaded if it is not)."""
        try:
            with self.hosts.use(request.model, self.args.queue_timeout) as host:
                line = self._tokenized(host, request)
        except BackendError as exc:
            line = protocol.error_message(exc)
        conn.sendall(protocol.encode(line))

    @staticmethod
    def _tokenized(host: ModelHost[Loaded], request: ChatRequest) -> dict[str, Any]:
        model = loaded_of(host).model
        ids = model.request_ids(request)
        return {"tokens": ids, "positions": model.positions(request, ids), "context": model.context_length}

    def detokenize(self, conn: socket.socket, request: protocol.Detokenize) -> None:
        try:
            with self.hosts.use(request.model, self.args.queue_timeout) as host:
                line: dict[str, Any] = {"text": loaded_of(host).model.detokenize(request.tokens)}
        except BackendError as exc:
            line = protocol.error_message(exc)
        conn.sendall(protocol.encode(line))

    def generate(self, conn: socket.socket, generate: protocol.Generate) -> None:
        try:
            # Its model held from before its place in the model's line to its last event (loaded first if it
            # is not: the wait bounded like the line's).
            with self.hosts.use(generate.request.model, self.args.queue_timeout, lambda: peer_closed(conn)) as host:
                self._generate_on(loaded_of(host), conn, generate)
        except BackendError as exc:
            conn.sendall(protocol.encode(protocol.error_message(exc)))
        except RuntimeError:  # chatglm.cpp's own checks (a CHATGLM_CHECK): this request failed, not the engine
            log.exception("the model failed on a request")
            conn.sendall(protocol.encode(protocol.error_message(
                BackendError("The local model failed on this request; the error has been logged."))))

    def _generate_on(self, loaded: Loaded, conn: socket.socket, generate: protocol.Generate) -> None:
        request, later = generate.request, generate.images_later
        model = loaded.model
        # The writer's frame has choice 0 and no logprobs baked in: such answers go through the worker.
        offer = generate.handover and request.n == 1 and not request.logprobs
        relay: Relay | None = None  # the events on their way out (relay.py: its stages)
        try:
            prompt = model.prompt_ids(request)
            model.check(request)
            prepare: Callable[[], None] | None = None
            if later is not None:  # checked before the line takes it: a request refused costs no decode
                if (later.size, later.count) != model.images_wanted(request):
                    raise InvalidImage("The image was not prepared for this model.", param="messages")
                asked = later

                def fetch_images() -> None:  # the pixels, asked for once the line has taken the request
                    nonlocal request
                    request = self.images(conn, request, asked)
                prepare = fetch_images
            relay = Relay(conn, self.args.send_timeout, offer, self.count_handover, request.n)
            gone = lambda: peer_closed(conn) or relay.client_gone()  # noqa: E731
            with loaded.line.slot(lambda s: common_prefix(s.cached, prompt), gone, prepare) as slot:
                for event in slot.generate(request, prompt, at_most_every(CANCEL_CHECK_SECONDS, gone)):
                    if not relay.pass_on(event):
                        break
        finally:
            if relay is not None:
                relay.end()  # a client's connection still held goes back to the worker first

    def count_handover(self) -> None:
        with self._lock:
            self.handovers += 1

    def images(self, conn: socket.socket, request: ChatRequest, later: protocol.ImagesLater) -> ChatRequest:
        """``request`` with the pixels of its images, asked of the worker now that the request has its
        place in line. Raises ClientGone when the worker leaves (a bad image: it tells its client) or
        does not send them in time (it is told so), BadMessage for anything but an images line."""
        with self._lock:
            self.images_asked += 1
        conn.sendall(protocol.encode({"send_images": later.count}))
        try:
            line = protocol.read_line(conn, protocol.MAX_LINE, self.args.images_timeout)
        except TimeoutError:
            say(conn, protocol.error_message(QueueTimeout(
                f"the request's images did not come within {self.args.images_timeout:g}s", retry_after=1)))
            raise ClientGone("images_timeout") from None
        conn.settimeout(self.args.send_timeout)
        if not line:
            raise ClientGone
        return protocol.with_images(request, line, later.size)


def configured(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The engine's models, (id, path), its default first."""
    models = [(args.model_id or Path(args.model).name.removesuffix(".bin"), args.model)]
    for entry in args.also:
        model_id, sep, path = entry.partition("=")
        if not sep or not model_id or not path:
            raise SystemExit(f"--also {entry!r} is not ID=PATH")
        models.append((model_id, path))
    return models


def loaded_of(host: ModelHost[Loaded]) -> Loaded:
    """A held host's model (Hosts.use yields it loaded)."""
    if host.loaded is None:
        raise Unavailable(f"model {host.id} is not loaded", retry_after=1)
    return host.loaded


def unload(loaded: Loaded) -> None:
    """Let a model go (Model.close); the loader then drops the last reference."""
    loaded.model.close()


def refuse(conn: socket.socket, error: BackendError) -> None:
    say(conn, protocol.error_message(error))
    conn.close()


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
    parser.add_argument("--model", required=True, help="the default model: loaded at start")
    parser.add_argument("--model-id", default="", help="its id (default: the file name without .bin)")
    parser.add_argument("--also", action="append", default=[], metavar="ID=PATH",
                        help="another model, loaded on its first request (repeat for more)")
    parser.add_argument("--max-loaded", type=int, default=1, help="models loaded at once, at most")
    parser.add_argument("--keep-alive", type=float, default=0.0,
                        help="seconds an idle model stays loaded (0: until another needs its room)")
    parser.add_argument("--context-length", type=int, default=0, help="0: the model's own")
    parser.add_argument("--slots", type=int, default=1)
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--queue-timeout", type=float, default=60.0)
    parser.add_argument("--send-timeout", type=float, default=30.0)
    parser.add_argument("--images-timeout", type=float, default=60.0,
                        help="how long a worker may take to send a request's images once asked")
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
    engine.hosts.start()
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
