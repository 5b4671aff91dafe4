"""Starting the engine and keeping it running.

Under gunicorn the master keeps it (``Keeper``, started by gunicorn.conf.py's ``when_ready``): it
starts the engine before the first worker and starts it again whenever it dies, so a crash of
chatglm.cpp costs only the generations in flight. With no master (Passenger, mod_wsgi, a dev
server) the first worker that finds no engine starts one (``start_detached``), which exits after
ENGINE_IDLE_TIMEOUT without requests. Either way the engine's address is the lock: however many
processes start one at once, one binds it and the others exit.

The keeper knows the pid it started. Its probe, like every worker's connection, believes only a
process of aigate's own user (address.py): an engine of the same user that it did not start is one
of a previous master on its way out, and waited for; another user's process holding an abstract
address is named in the log, and the engine is tried again until the address is free.
"""

from __future__ import annotations

import logging
import os
import subprocess  # nosec B404: our own interpreter and module, no shell
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from backends.chatglm.engine.address import ADDRESS_TAKEN
from backends.chatglm.engine.client import EngineClient

log = logging.getLogger("aigate")

KEPT_BY = "AIGATE_ENGINE_KEEPER"  # set in the master for its workers: the pid that keeps the engine
CHECKOUT = Path(__file__).resolve().parents[3]  # where `python -m backends.chatglm.engine.server` resolves


@dataclass(frozen=True)
class EngineSettings:
    """What the engine is started with (config.settings.Settings.engine reads them off the settings)."""

    address: str
    model: Path  # the default model, loaded at start
    context_length: int  # 0: the model's own
    slots: int
    max_queue: int
    queue_timeout: float
    send_timeout: float
    images_timeout: float  # how long the engine waits for a request's decoded images once it asked for them
    idle_timeout: float  # a detached engine's exit after this long without requests
    log_level: str
    model_id: str = ""  # the default model's id ("": its file name without .bin)
    also: tuple[tuple[str, Path], ...] = ()  # the other models, (id, path), each loaded on its first request
    max_loaded: int = 1  # models loaded at once
    keep_alive: float = 0.0  # seconds an idle model stays loaded (0: until another needs its room)


def engine_command(engine: EngineSettings, *, parent: int = 0, idle_exit: float = 0.0) -> list[str]:
    return [sys.executable, "-m", "backends.chatglm.engine.server", "--address", engine.address,
            "--model", str(engine.model), "--context-length", str(engine.context_length),
            "--slots", str(engine.slots), "--max-queue", str(engine.max_queue),
            "--queue-timeout", str(engine.queue_timeout), "--send-timeout", str(engine.send_timeout),
            "--images-timeout", str(engine.images_timeout),
            "--idle-exit", str(idle_exit), "--parent", str(parent), "--log-level", engine.log_level,
            "--model-id", engine.model_id, *(f"--also={model_id}={path}" for model_id, path in engine.also),
            "--max-loaded", str(engine.max_loaded), "--keep-alive", str(engine.keep_alive)]


def client(engine: EngineSettings) -> EngineClient:
    """The client a worker uses: it starts an engine itself only where no master keeps one."""
    kept = os.environ.get(KEPT_BY, "") == str(os.getppid())
    return EngineClient(engine.address, None if kept else lambda: start_detached(engine),
                        wait_seconds=max(engine.queue_timeout, 5.0))


def start_detached(engine: EngineSettings) -> None:
    """Start an engine that outlives this process (another worker may be using it)."""
    subprocess.Popen(engine_command(engine, idle_exit=engine.idle_timeout),  # nosec B603
                     cwd=CHECKOUT, stdin=subprocess.DEVNULL, start_new_session=True)


# Popen waits for the new child's exec on a close-on-exec pipe. If gunicorn's master forks a worker
# while that pipe is open, the worker inherits the writing end and never execs, so the Popen (and with
# it the keeper) waits as long as that worker lives. Forks in this process wait for a Popen in flight.
_spawning = threading.Lock()
os.register_at_fork(before=_spawning.acquire, after_in_parent=_spawning.release,
                    after_in_child=_spawning.release)


class Keeper:
    """Runs the engine as a child of this process and starts it again when it exits."""

    def __init__(self, engine: EngineSettings) -> None:
        self.engine = engine
        self.process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="aigate-engine-keeper", daemon=True)

    def start(self) -> None:
        os.environ[KEPT_BY] = str(os.getpid())  # the workers fork from here and read it
        self._thread.start()

    def stop(self, grace: float = 10.0) -> None:
        self._stopping.set()
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                process.kill()
        self._thread.join(grace)

    def _run(self) -> None:
        probe = EngineClient(self.engine.address, None, 0)
        command = engine_command(self.engine, parent=os.getpid())
        pause = 0.2
        while not self._stopping.is_set():
            if probe.status() is not None:  # an engine of this user, not ours: a previous master's, on its way out
                self._stopping.wait(1.0)
                continue
            started = time.monotonic()
            with _spawning:
                self.process = subprocess.Popen(command, cwd=CHECKOUT, stdin=subprocess.DEVNULL)  # nosec B603
            # gunicorn's master reaps any child it did not start, so this may not learn the status.
            code = self.process.wait()
            if self._stopping.is_set():
                break
            lived = time.monotonic() - started
            if code == ADDRESS_TAKEN and probe.status() is None and probe.foreign is not None:
                log.error("the local engine (pid %d) cannot listen: %s; trying again", self.process.pid, probe.foreign)
            else:
                log.error("the local engine (pid %d) exited after %.1fs (status %s); starting it again",
                          self.process.pid, lived, code)
            pause = 0.2 if lived > 30 else min(pause * 2, 10.0)  # a crash loop backs off
            self._stopping.wait(pause)
