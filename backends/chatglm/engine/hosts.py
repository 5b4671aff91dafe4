"""Several models in the one engine, loaded on demand (as Ollama's keep_alive and OLLAMA_MAX_LOADED_MODELS
and llama.cpp's router mode do).

Each configured id has a host: its file, its state (unloaded, loading, loaded, failed), when it was last
used and the requests holding it. A request holds its model (``Hosts.use``) from before its place in the
model's line to its last event, so a model is never unloaded under a request. A request for a model that
is not loaded waits for its load, within its time; the engine's default model is loaded at start.

One loader thread does every load and unload, one at a time (two at once would fight for the same cores
and memory). At most ``max_loaded`` models are loaded or loading: a load past that unloads the least
recently used idle model first; when every loaded model is busy, the least recently used one is drained
(it takes no new request; those it has finish) and unloaded once idle, so a waiting model gets its turn
and requests that alternate between models are all answered. A model idle for ``keep_alive`` seconds is
unloaded (0: never).

A failed load leaves the host failed, with the error: the requests waiting for that load hear it
(Unavailable); a later request tries again (the cause, memory short, may have passed).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Literal, TypeVar

from backends.base import ClientGone, QueueTimeout, Unavailable

log = logging.getLogger("aigate.engine")

State = Literal["unloaded", "loading", "loaded", "failed"]
L = TypeVar("L")  # what a load gives (the engine's: the model and its line)

_CHECK_SECONDS = 0.25  # how often a request waiting for a load looks whether its client is still there


@dataclass(eq=False)
class ModelHost(Generic[L]):
    id: str
    path: Path
    state: State = "unloaded"
    loaded: L | None = None
    error: str | None = None  # the last load's failure
    failures: int = 0  # loads that failed: a waiting request knows its own load failed when this grows
    last_used: float = 0.0
    users: int = 0  # requests holding the model (waiting in its line or generating)
    waiting: int = 0  # requests waiting for it to be loaded
    draining: str | None = None  # to be unloaded to make room for this model: it takes no new request


class Hosts(Generic[L]):
    def __init__(self, hosts: list[ModelHost[L]], load: Callable[[ModelHost[L]], L], unload: Callable[[L], None],
                 max_loaded: int, keep_alive: float, clock: Callable[[], float] = time.monotonic) -> None:
        """``hosts``, the default first (loaded at start, and the one a request for an unknown id gets);
        ``load`` makes a host's model (raising what a load may raise), ``unload`` lets it go."""
        if not hosts or len({h.id for h in hosts}) != len(hosts):
            raise ValueError("hosts need one id each, and at least one")
        self.hosts = {h.id: h for h in hosts}
        self.default = hosts[0]
        self.max_loaded = max(1, max_loaded)
        self.keep_alive = keep_alive
        self.started = threading.Event()  # the default model's first load is over (either way)
        self._load, self._unload, self._clock = load, unload, clock
        self._changed = threading.Condition()
        self._loads: deque[ModelHost[L]] = deque([self.default])  # models wanted, first come first loaded
        self._preload: ModelHost[L] | None = self.default  # wanted with nobody waiting: the start's load
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="models", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify_all()
        self._thread.join()

    def host(self, model_id: str) -> ModelHost[L]:
        """The host of ``model_id``; the default's for an id the engine does not know (a direct client's:
        the workers send only configured ids)."""
        return self.hosts.get(model_id, self.default)

    @contextmanager
    def use(self, model_id: str, timeout: float, gone: Callable[[], bool] = lambda: False,
            ) -> Iterator[ModelHost[L]]:
        """Hold ``model_id``'s model (loaded) for the with-block, waiting for its load for ``timeout``
        seconds at most. Raises QueueTimeout, Unavailable (its load failed), ClientGone."""
        host = self.host(model_id)
        started = self._clock()
        if self._acquire(host, started + timeout, timeout, gone):
            log.info("a request for %s waited %.2fs for its load", host.id, self._clock() - started)
        try:
            yield host
        finally:
            with self._changed:
                host.users -= 1
                host.last_used = self._clock()
                self._changed.notify_all()

    def _acquire(self, host: ModelHost[L], deadline: float, timeout: float, gone: Callable[[], bool]) -> bool:
        """Take ``host`` (users + 1) once it is loaded and not drained; whether that took a wait."""
        with self._changed:
            host.waiting += 1
            failures = host.failures
            waited = False
            try:
                while not (host.state == "loaded" and not host.draining):
                    if host.failures > failures:
                        raise Unavailable(host.error or f"loading {host.id} failed", retry_after=None)
                    if host.state in ("unloaded", "failed") and host not in self._loads:
                        self._loads.append(host)
                        self._changed.notify_all()
                    left = deadline - self._clock()
                    if left <= 0:
                        raise QueueTimeout(self._why_not_loaded(host, timeout), retry_after=2)
                    self._changed.wait(min(left, _CHECK_SECONDS))
                    waited = True
                    if gone():
                        raise ClientGone
                host.users += 1
                host.last_used = self._clock()
                return waited
            finally:
                host.waiting -= 1
                self._changed.notify_all()  # the loader may drop a load nobody waits for any more

    def _why_not_loaded(self, host: ModelHost[L], timeout: float) -> str:
        if host.state == "loading" or (host.state == "loaded" and not host.draining):
            return f"waited {timeout:g}s for model {host.id} to load"
        return (f"waited {timeout:g}s for model {host.id} to be loaded: the {self.max_loaded} model(s) that may "
                "be loaded at once (MAX_LOADED_MODELS) were busy")

    def states(self) -> list[ModelHost[L]]:
        with self._changed:
            return list(self.hosts.values())

    # The loader thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        with self._changed:
            while not self._stopped:
                job = self._next_job()
                if job is None:
                    self._changed.wait(self._until_next_expiry())
                    continue
                kind, host, why = job
                if kind == "unload":  # before the lock goes: no request may take it from here on
                    host.state, host.draining = "unloaded", None
                self._changed.release()
                try:
                    if kind == "load":
                        self._do_load(host)
                    else:
                        self._do_unload(host, why)
                finally:
                    self._changed.acquire()
                self._changed.notify_all()

    def _next_job(self) -> tuple[Literal["load", "unload"], ModelHost[L], str] | None:
        """What the loader does next (called holding the lock): unload a drained or expired model, else
        load the first model wanted, making room for it first."""
        now = self._clock()
        for host in self.hosts.values():
            if host.state == "loaded" and host.users == 0:
                if host.draining:
                    return "unload", host, f"drained, to make room for {host.draining}"
                if self.keep_alive > 0 and now - host.last_used >= self.keep_alive and not host.waiting:
                    return "unload", host, f"idle for {now - host.last_used:.1f}s"
        while self._loads and ((self._loads[0].waiting == 0 and self._loads[0] is not self._preload)
                               or self._loads[0].state in ("loaded", "loading")):
            self._loads.popleft()  # nobody waits for it any more, or it is there already
        if not self._loads:
            for host in self.hosts.values():  # the room is no longer wanted: a drained model serves again
                host.draining = None
            self._changed.notify_all()
            return None
        wanted = self._loads[0]
        taken = [h for h in self.hosts.values() if h.state in ("loaded", "loading")]
        if len(taken) < self.max_loaded:
            self._loads.popleft()
            self._preload = None
            wanted.state = "loading"
            return "load", wanted, ""
        if any(h.state == "loaded" and h.waiting and not h.draining for h in taken):
            return None  # just loaded for requests that have yet to take it: busy or idle only once they have
        idle = [h for h in taken if h.state == "loaded" and h.users == 0]
        if idle:
            victim = min(idle, key=lambda h: h.last_used)
            return "unload", victim, f"least recently used, to make room for {wanted.id}"
        busy = [h for h in taken if h.state == "loaded"]
        if busy and not any(h.draining for h in taken):
            victim = min(busy, key=lambda h: h.last_used)
            victim.draining = wanted.id
            self._changed.notify_all()  # its new requests now wait
            log.info("draining %s (%d request(s) on it) to make room for %s", victim.id, victim.users, wanted.id)
        return None

    def _until_next_expiry(self) -> float | None:
        if self.keep_alive <= 0:
            return None
        idle = [h.last_used + self.keep_alive for h in self.hosts.values() if h.state == "loaded" and h.users == 0]
        return max(0.0, min(idle) - self._clock()) if idle else None

    def _do_load(self, host: ModelHost[L]) -> None:
        began, before = self._clock(), resident_mb()
        log.info("loading %s (%s)", host.id, host.path)
        try:
            loaded = self._load(host)
        except Exception as exc:  # a model file chatglm.cpp refuses, memory short: this model fails, not the engine
            with self._changed:
                host.state, host.error, host.failures = "failed", f"loading {host.id} failed: {exc}", host.failures + 1
            log.error("%s", host.error)
        else:
            with self._changed:
                host.state, host.loaded, host.error, host.last_used = "loaded", loaded, None, self._clock()
            log.info("loaded %s in %.2fs (engine resident memory %s -> %s MB)", host.id, self._clock() - began,
                     before, resident_mb())
        if host is self.default:
            self.started.set()

    def _do_unload(self, host: ModelHost[L], why: str) -> None:
        before = resident_mb()
        with self._changed:
            loaded, host.loaded = host.loaded, None
        if loaded is not None:
            self._unload(loaded)
            del loaded
            gc.collect()  # a model's objects refer to each other: only the collector frees its Pipelines
        log.info("unloaded %s (%s; engine resident memory %s -> %s MB)", host.id, why, before, resident_mb())


def resident_mb() -> int | None:
    """This process's resident memory in MB (Linux), for the load and unload log lines."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    import resource

    return pages * resource.getpagesize() // (1024 * 1024)
