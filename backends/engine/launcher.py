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

from backends.engine.address import ADDRESS_TAKEN
from backends.engine.client import EngineClient
from settings import PROJECT_DIR, Settings

log = logging.getLogger("aigate")

KEPT_BY = "AIGATE_ENGINE_KEEPER"  # set in the master for its workers: the pid that keeps the engine


def engine_command(settings: Settings, *, parent: int = 0, idle_exit: float = 0.0) -> list[str]:
    if settings.model_path is None:
        raise ValueError("no local model is configured")
    return [sys.executable, "-m", "backends.engine.server", "--address", settings.engine_address,
            "--model", str(settings.model_path), "--context-length", str(settings.chatglm_max_length or 0),
            "--slots", str(settings.generation_slots), "--max-queue", str(settings.max_queue),
            "--queue-timeout", str(settings.queue_timeout), "--send-timeout", str(settings.client_write_timeout),
            # a worker may wait for a free image decoder as long as for a slot, then decode, then send
            "--images-timeout", str(settings.queue_timeout + settings.image_decode_seconds
                                    + settings.client_write_timeout),
            "--idle-exit", str(idle_exit), "--parent", str(parent), "--log-level", settings.log_level]


def client(settings: Settings) -> EngineClient:
    """The client a worker uses: it starts an engine itself only where no master keeps one."""
    kept = os.environ.get(KEPT_BY, "") == str(os.getppid())
    return EngineClient(settings.engine_address, None if kept else lambda: start_detached(settings),
                        wait_seconds=max(settings.queue_timeout, 5.0))


def start_detached(settings: Settings) -> None:
    """Start an engine that outlives this process (another worker may be using it)."""
    subprocess.Popen(engine_command(settings, idle_exit=settings.engine_idle_timeout),  # nosec B603
                     cwd=PROJECT_DIR, stdin=subprocess.DEVNULL, start_new_session=True)


# Popen waits for the new child's exec on a close-on-exec pipe. If gunicorn's master forks a worker
# while that pipe is open, the worker inherits the writing end and never execs, so the Popen (and with
# it the keeper) waits as long as that worker lives. Forks in this process wait for a Popen in flight.
_spawning = threading.Lock()
os.register_at_fork(before=_spawning.acquire, after_in_parent=_spawning.release,
                    after_in_child=_spawning.release)


class Keeper:
    """Runs the engine as a child of this process and starts it again when it exits."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
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
        probe = EngineClient(self.settings.engine_address, None, 0)
        command = engine_command(self.settings, parent=os.getpid())
        pause = 0.2
        while not self._stopping.is_set():
            if probe.status() is not None:  # an engine of this user, not ours: a previous master's, on its way out
                self._stopping.wait(1.0)
                continue
            started = time.monotonic()
            with _spawning:
                self.process = subprocess.Popen(command, cwd=PROJECT_DIR, stdin=subprocess.DEVNULL)  # nosec B603
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
