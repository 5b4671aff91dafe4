"""Several models in the engine (backends/chatglm/engine/hosts.py): load on demand and eviction, with stand-in
models (the loader's decisions, not chatglm.cpp: tests/test_engine_models.py runs the real engine)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from backends.base import QueueTimeout, Unavailable
from backends.chatglm.engine.hosts import Hosts, ModelHost


class Loads:
    """What the loader did, in order ("+a": loaded a, "-a": unloaded a), with a condition to await it."""

    def __init__(self, failing: set[str] | None = None, gates: dict[str, threading.Event] | None = None) -> None:
        self.done: list[str] = []
        self.changed = threading.Condition()
        self.failing = failing or set()
        self.gates = gates or {}  # a load of this id waits for its event

    def load(self, host: ModelHost[str]) -> str:
        if host.id in self.gates:
            assert self.gates[host.id].wait(5)
        if host.id in self.failing:
            self.failing.discard(host.id)  # once
            raise RuntimeError("out of memory")
        self._note("+" + host.id)
        return host.id

    def unload(self, loaded: str) -> None:
        self._note("-" + loaded)

    def _note(self, what: str) -> None:
        with self.changed:
            self.done.append(what)
            self.changed.notify_all()

    def wait_for(self, *done: str) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: self.done[-len(done):] == list(done), 5), self.done


@contextmanager
def hosts(*ids: str, max_loaded: int = 1, keep_alive: float = 0.0, loads: Loads | None = None,
          ) -> Iterator[tuple[Hosts[str], Loads]]:
    loads = loads or Loads()
    h = Hosts([ModelHost[str](i, Path(f"/models/{i}.bin")) for i in ids], loads.load, loads.unload, max_loaded,
              keep_alive)
    h.start()
    assert h.started.wait(5)
    try:
        yield h, loads
    finally:
        h.stop()


def ask(h: Hosts[str], model: str, timeout: float = 5) -> str | None:
    with h.use(model, timeout) as host:
        return host.loaded


def states(h: Hosts[str]) -> dict[str, str]:
    return {host.id: host.state for host in h.states()}


class Holder:
    """A request that holds its model until released, in a thread of its own."""

    def __init__(self, h: Hosts[str], model: str, timeout: float = 5) -> None:
        self.holding, self.release = threading.Event(), threading.Event()
        self.error: Exception | None = None
        self.got: str | None = None
        self.thread = threading.Thread(target=self._run, args=(h, model, timeout))
        self.thread.start()

    def _run(self, h: Hosts[str], model: str, timeout: float) -> None:
        try:
            with h.use(model, timeout) as host:
                self.got = host.loaded
                self.holding.set()
                self.release.wait(5)
        except Exception as exc:  # noqa: BLE001  # what the test asserts
            self.error = exc

    def done(self) -> Holder:
        self.release.set()
        self.thread.join(5)
        return self


def test_the_default_model_loads_at_start_and_another_on_its_first_request():
    with hosts("a", "b") as (h, loads):
        assert loads.done == ["+a"] and states(h) == {"a": "loaded", "b": "unloaded"}
        assert ask(h, "b") == "b"
        assert loads.done == ["+a", "-a", "+b"]  # one at a time (MAX_LOADED_MODELS=1): a made room
        assert ask(h, "a") == "a" and ask(h, "b") == "b"  # alternating: each answered, each time loaded again
        assert loads.done == ["+a", "-a", "+b", "-b", "+a", "-a", "+b"]
        assert ask(h, "no-such-model") == "a"  # an id the engine does not know: its default's


def test_the_least_recently_used_idle_model_makes_room():
    with hosts("a", "b", "c", max_loaded=2) as (h, loads):
        ask(h, "b")
        ask(h, "a")  # b is now the least recently used
        ask(h, "c")
        assert loads.done == ["+a", "+b", "-b", "+c"] and states(h) == {"a": "loaded", "b": "unloaded", "c": "loaded"}


def test_a_busy_model_is_drained_for_a_waiting_one_and_its_next_request_waits_its_turn():
    b_loads = threading.Event()
    with hosts("a", "b", loads=Loads(gates={"b": b_loads})) as (h, loads):
        first = Holder(h, "a")
        assert first.holding.wait(5)
        second = Holder(h, "b")  # waits: a is busy and the limit is reached
        with h._changed:
            assert h._changed.wait_for(lambda: h.hosts["a"].draining == "b", 5)
        third = Holder(h, "a")  # a takes no new request while it drains: this one waits behind b
        assert not second.holding.is_set() and not third.holding.is_set()
        first.done()
        with h._changed:  # a is unloaded and third asks for it again while b loads
            assert h._changed.wait_for(lambda: h.hosts["a"] in h._loads and h.hosts["b"].state == "loading", 5)
        b_loads.set()  # b, just loaded and not yet taken, is not "idle" to be unloaded for a
        assert second.holding.wait(5) and second.got == "b" and not third.holding.is_set()
        second.done()
        assert third.holding.wait(5) and third.got == "a"
        third.done()
        assert loads.done == ["+a", "-a", "+b", "-b", "+a"]
        assert all(r.error is None for r in (first, second, third))


def test_a_model_just_loaded_for_waiting_requests_is_theirs_before_it_counts_as_idle():
    # The loader decides its next job right after a load, holding the lock: the requests it loaded for may
    # not have run yet. Another model wanted then must not unload this one as "idle" under them.
    with hosts("a", "b") as (h, loads):
        a, b = h.hosts["a"], h.hosts["b"]
        with h._changed:
            a.waiting, b.waiting = 1, 1  # woken for a, not yet scheduled; and one asking for b
            h._loads.append(b)
            try:
                assert h._next_job() is None
            finally:
                a.waiting, b.waiting = 0, 0
                h._loads.clear()


def test_a_request_waits_for_room_at_most_its_time_then_the_busy_model_serves_on():
    with hosts("a", "b") as (h, loads):
        first = Holder(h, "a")
        assert first.holding.wait(5)
        started = time.monotonic()
        with pytest.raises(QueueTimeout, match="waited 0.3s for model b to be loaded: the 1 model"):
            ask(h, "b", timeout=0.3)
        assert time.monotonic() - started >= 0.3
        assert ask(h, "a", timeout=1) == "a"  # nobody waits for room any more: a is no longer drained
        first.done()
        assert loads.done == ["+a"]


def test_an_idle_model_is_unloaded_after_its_keep_alive():
    with hosts("a", "b", max_loaded=2, keep_alive=0.3) as (h, loads):
        ask(h, "b")
        used = time.monotonic()
        loads.wait_for("-b")  # and a too, earlier: idle since start
        assert time.monotonic() - used >= 0.3
        assert sorted(loads.done) == ["+a", "+b", "-a", "-b"] and set(states(h).values()) == {"unloaded"}
        assert ask(h, "a") == "a"  # loaded again by its next request


def test_a_model_in_use_is_not_unloaded_by_its_keep_alive():
    with hosts("a", keep_alive=0.1) as (h, loads):
        holder = Holder(h, "a")
        assert holder.holding.wait(5)
        with h._changed:  # the loader looks again at least every keep-alive; nothing changes while a is held
            h._changed.wait(0.3)
        assert states(h) == {"a": "loaded"}
        holder.done()
        loads.wait_for("-a")


def test_a_failed_load_is_told_to_its_waiters_and_the_next_request_tries_again():
    with hosts("a", "b", loads=Loads(failing={"b"})) as (h, loads):
        with pytest.raises(Unavailable, match="loading b failed: out of memory"):
            ask(h, "b")
        assert states(h) == {"a": "unloaded", "b": "failed"}
        assert ask(h, "b") == "b" and states(h)["b"] == "loaded"
        assert h.hosts["b"].error is None


def test_the_default_model_failing_at_start_is_told_and_tried_again():
    with hosts("a", "b", loads=Loads(failing={"a"})) as (h, loads):
        assert states(h)["a"] == "failed" and h.hosts["a"].error == "loading a failed: out of memory"
        assert ask(h, "a") == "a"
