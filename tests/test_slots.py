"""Generation slots across processes: FIFO, bounded, and freed when a holder dies."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal

import pytest

from backends.base import QueueFull, QueueTimeout
from backends.slots import GenerationSlots

ctx = mp.get_context("fork")


def hold(slots: GenerationSlots, started, release, log=None, name="") -> None:
    with slots.acquire():
        if log is not None:
            log.put(name)
        started.set()
        release.wait(30)


def wait_for_line(slots: GenerationSlots, count: int) -> None:
    """Block until ``count`` requests are in line (a process joins asynchronously)."""
    import time

    deadline = time.monotonic() + 10
    while slots.in_line() < count:
        assert time.monotonic() < deadline, "process did not join the line"
        time.sleep(0.002)


def start_holder(slots: GenerationSlots):
    """A process that takes a slot and keeps it until the returned event is set."""
    started, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=hold, args=(slots, started, release))
    p.start()
    assert started.wait(10)
    return p, release


@pytest.fixture
def slots(tmp_path):
    return GenerationSlots(tmp_path / "slots", slots=1, max_queue=3, queue_timeout=10)


def test_full_line_is_refused_at_once(tmp_path):
    s = GenerationSlots(tmp_path, slots=1, max_queue=0, queue_timeout=10)
    p, release = start_holder(s)
    with pytest.raises(QueueFull) as err:
        with s.acquire():
            pass
    assert err.value.retry_after >= 1
    release.set()
    p.join(10)
    with s.acquire():
        assert s.in_line() == 1


def test_wait_times_out(tmp_path):
    s = GenerationSlots(tmp_path, slots=1, max_queue=1, queue_timeout=0.05)
    p, release = start_holder(s)
    with pytest.raises(QueueTimeout):
        with s.acquire():
            pass
    assert s.in_line() == 1  # the timed-out request left the line
    release.set()
    p.join(10)


def test_a_killed_holder_frees_its_slot(slots):
    p, _release = start_holder(slots)
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    with slots.acquire():
        assert slots.in_line() == 1


def test_first_come_first_served_across_processes(slots):
    holder, release = start_holder(slots)
    log = ctx.Queue()
    go = ctx.Event()
    go.set()
    waiters = []
    for i, name in enumerate(["first", "second", "third"]):
        w = ctx.Process(target=hold, args=(slots, ctx.Event(), go, log, name))
        w.start()
        wait_for_line(slots, i + 2)
        waiters.append(w)
    release.set()
    order = [log.get(timeout=10) for _ in waiters]
    for w in [holder, *waiters]:
        w.join(10)
    assert order == ["first", "second", "third"]
    assert slots.in_line() == 0


def test_two_slots_run_two_at_once(tmp_path):
    s = GenerationSlots(tmp_path, slots=2, max_queue=0, queue_timeout=1)
    p, release = start_holder(s)
    with s.acquire():  # the second slot is free
        with pytest.raises(QueueFull):
            with s.acquire():
                pass
    release.set()
    p.join(10)
