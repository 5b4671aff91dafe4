"""The local engine process on its own: its line, prefix reuse, one engine per address, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.base import ChatRequest, Finish, Message, QueueFull, QueueTimeout, TextDelta
from backends.demo_model import write_demo_model
from backends.engine.client import EngineClient
from backends.engine.line import ClientGone, Line
from backends.engine.model import PATCHED
from tests.conftest import ROOT, engine_socket


def start_engine(model: Path, *args: str) -> tuple[subprocess.Popen, EngineClient]:
    address = engine_socket()
    process = subprocess.Popen([sys.executable, "-m", "backends.engine.server", "--address", address,
                                "--model", str(model), *args], cwd=ROOT)
    client = EngineClient(address, None, wait_seconds=30)
    deadline = time.monotonic() + 60
    while not ((status := client.status()) and status["loaded"]):
        assert process.poll() is None and time.monotonic() < deadline, "the engine did not load"
        time.sleep(0.05)
    return process, client


@pytest.fixture(scope="module")
def engine(demo_model) -> Iterator[EngineClient]:
    process, client = start_engine(demo_model)
    yield client
    process.terminate()
    process.wait()


def ask(client: EngineClient, *messages: Message, **fields) -> tuple[str, Finish]:
    events = list(client.generate(ChatRequest(model="demo", messages=messages, temperature=0, **fields)))
    finish = events[-1]
    assert isinstance(finish, Finish)
    return "".join(e.text for e in events if isinstance(e, TextDelta)), finish


HISTORY = (Message("system", "You answer briefly."),
           Message("user", "Tell me about the river and the old town, the market and the bridge. " * 6))


def test_the_next_turn_reuses_the_cached_history_and_answers_the_same(engine, demo_model):
    answer, first = ask(engine, *HISTORY, max_tokens=24)
    turn2 = (*HISTORY, Message("assistant", answer), Message("user", "And the bakery?"))
    again, second = ask(engine, *turn2, max_tokens=24)
    assert first.usage.cached_tokens == 0 or first.usage.cached_tokens < 5  # nothing of it was cached
    if PATCHED:  # the stock build reuses only where one token a step beats a cold prefill
        assert second.usage.cached_tokens >= first.usage.prompt_tokens
    assert second.usage.prompt_tokens > second.usage.cached_tokens
    # Greedy: the same text with the history from the cache as evaluated cold on a fresh engine.
    process, cold = start_engine(demo_model)
    try:
        assert ask(cold, *turn2, max_tokens=24)[0] == again
    finally:
        process.terminate()
        process.wait()


def test_a_lone_surrogate_is_replaced_not_a_crash(engine):
    text, finish = ask(engine, Message("user", "broken \ud800 text"), max_tokens=4)
    assert finish.usage.prompt_tokens > 0
    assert ask(engine, Message("user", "still alive?"), max_tokens=2)[1].usage.completion_tokens >= 1


def test_one_engine_per_address(demo_model):
    process, client = start_engine(demo_model)
    try:
        second = subprocess.run([sys.executable, "-m", "backends.engine.server", "--address", client.address,
                                 "--model", str(demo_model)], cwd=ROOT, timeout=60)
        assert second.returncode == 3  # the address is taken: it exits at once, the first goes on
        assert client.status()["pid"] == process.pid
    finally:
        process.terminate()
        process.wait()


def test_a_long_generation_on_the_small_demo_architecture_does_not_corrupt_the_heap(models_dir):
    """chatglm.cpp aborted with `double free or corruption` after ~800 tokens on this shape; the
    engine's warm-up sizes the compute buffer first."""
    model = write_demo_model(models_dir / "demo-endless.bin", eos_every=0)
    process, client = start_engine(model)
    try:
        _, finish = ask(client, Message("user", "hi"), max_tokens=1000)
        assert finish.usage.completion_tokens == 1000 and process.poll() is None
    finally:
        process.terminate()
        process.wait()


# -- the line, on its own ------------------------------------------------------------------------


def test_the_line_is_first_come_first_served_and_bounded():
    line: Line[str] = Line(["slot"], max_queue=2, queue_timeout=5)
    order: list[int] = []
    release = threading.Event()

    def hold() -> None:
        with line.slot(lambda s: 0, lambda: False):
            release.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    while line.counts() != (1, 0):
        time.sleep(0.001)

    def wait(i: int) -> None:
        with line.slot(lambda s: 0, lambda: False):
            order.append(i)

    waiters = []
    for i in range(2):
        waiters.append(threading.Thread(target=wait, args=(i,)))
        waiters[-1].start()
        while line.counts() != (1, i + 1):
            time.sleep(0.001)
    with pytest.raises(QueueFull):
        with line.slot(lambda s: 0, lambda: False):
            pass
    release.set()
    for t in (holder, *waiters):
        t.join()
    assert order == [0, 1] and line.counts() == (0, 0)


def test_the_line_times_out_and_lets_a_departed_client_go():
    line: Line[str] = Line(["slot"], max_queue=4, queue_timeout=0.3)
    with line.slot(lambda s: 0, lambda: False):
        started = time.monotonic()
        with pytest.raises(QueueTimeout):
            with line.slot(lambda s: 0, lambda: False):
                pass
        assert 0.3 <= time.monotonic() - started < 2
        with pytest.raises(ClientGone):
            with line.slot(lambda s: 0, lambda: True):
                pass
        assert line.counts() == (1, 0)


def test_the_line_gives_the_slot_with_the_longest_cached_prefix():
    line: Line[str] = Line(["cold", "warm", "tepid"], max_queue=0, queue_timeout=1)
    score = {"cold": 0, "warm": 900, "tepid": 10}
    with line.slot(score.__getitem__, lambda: False) as slot:
        assert slot == "warm"


def test_on_a_stock_build_the_rest_goes_in_one_token_a_step_and_answers_the_same(demo_model, monkeypatch):
    """Stock chatglm-cpp evaluates one token a call once its cache holds anything: reuse still
    gives the greedy answer a cold prompt gives, and is taken only where it is cheaper."""
    from backends.engine import model as engine_model
    from backends.ggml_file import read_model_file

    monkeypatch.setattr(engine_model, "PATCHED", False)
    loaded = engine_model.Model(read_model_file(demo_model), 1024, slots=2)
    warm, cold = loaded.slots

    def answer(slot, *messages: Message) -> tuple[str, Finish]:
        request = ChatRequest(model="demo", messages=messages, temperature=0, max_tokens=24)
        events = list(slot.generate(request, loaded.prompt_ids(request), lambda: False))
        return "".join(e.text for e in events if isinstance(e, TextDelta)), events[-1]

    text, _ = answer(warm, *HISTORY)
    turn2 = (*HISTORY, Message("assistant", text), Message("user", "And the bakery?"))
    loaded.costs.prefill, loaded.costs.decode = 1.0, 0.01  # a cold prefill costs far more: reuse
    reused, finish = answer(warm, *turn2)
    assert finish.usage.cached_tokens > 100
    assert answer(cold, *turn2)[0] == reused
    loaded.costs.prefill, loaded.costs.decode = 0.001, 1.0  # one token a step costs more: start cold
    assert warm.reusable(loaded.prompt_ids(ChatRequest(model="demo", messages=turn2))) == 0


def test_a_fork_in_the_master_waits_for_the_engine_start_in_flight():
    """gunicorn's master forks workers while its keeper thread may be starting the engine: a worker
    forked during that Popen would inherit the pipe the Popen waits on and hold the keeper for its
    whole life (the engine then never came back after a crash). Forks wait for the Popen instead."""
    from backends.engine import launcher

    forked = threading.Event()

    def fork() -> None:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        forked.set()

    with launcher._spawning:
        thread = threading.Thread(target=fork)
        thread.start()
        assert not forked.wait(0.5)
    assert forked.wait(10)
    thread.join()


def test_between_tokens_the_worker_socket_is_looked_at_only_every_so_often():
    from backends.engine.server import at_most_every

    looks = []
    check = at_most_every(0.05, lambda: looks.append(time.monotonic()) or True)
    assert not any(check() for _ in range(1000))  # a token's step is far shorter than the interval
    assert looks == []
    time.sleep(0.06)  # the interval itself is what is tested
    assert check() and len(looks) == 1
