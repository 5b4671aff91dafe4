"""The local engine process on its own: its line, prefix reuse, one engine per address, bad input."""

from __future__ import annotations

import base64
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from backends.base import (
    ChatRequest,
    ClientGone,
    ClientStream,
    Finish,
    ImageInput,
    InvalidImage,
    Message,
    PieceFrame,
    QueueFull,
    QueueTimeout,
    TextDelta,
    Written,
)
from backends.chatglm.demo_model import write_demo_model
from backends.chatglm.engine import protocol
from backends.chatglm.engine.client import EngineClient, LaterImages, connect
from backends.chatglm.engine.line import Line
from backends.chatglm.engine.model import PATCHED
from tests.conftest import ROOT, engine_socket, unchunked


def start_engine(model: Path, *args: str) -> tuple[subprocess.Popen, EngineClient]:
    address = engine_socket()
    process = subprocess.Popen([sys.executable, "-m", "backends.chatglm.engine.server", "--address", address,
                                "--model", str(model), *args], cwd=ROOT)
    client = EngineClient(address, None, wait_seconds=30)
    deadline = time.monotonic() + 60
    while not ((status := client.status()) and status["loaded"]):
        assert process.poll() is None and time.monotonic() < deadline, "the engine did not load"
        time.sleep(0.05)
    return process, client


@contextmanager
def running_engine(model: Path) -> Iterator[EngineClient]:
    process, client = start_engine(model)
    try:
        yield client
    finally:
        process.terminate()
        process.wait()


@pytest.fixture(scope="module")
def engine(demo_model) -> Iterator[EngineClient]:
    with running_engine(demo_model) as client:
        yield client


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
    with running_engine(demo_model) as cold:  # greedy: the same text as evaluated cold on a fresh engine
        assert ask(cold, *turn2, max_tokens=24)[0] == again


def test_a_lone_surrogate_is_replaced_not_a_crash(engine):
    text, finish = ask(engine, Message("user", "broken \ud800 text"), max_tokens=4)
    assert finish.usage.prompt_tokens > 0
    assert ask(engine, Message("user", "still alive?"), max_tokens=2)[1].usage.completion_tokens >= 1


def test_one_engine_per_address(demo_model):
    process, client = start_engine(demo_model)
    try:
        second = subprocess.run([sys.executable, "-m", "backends.chatglm.engine.server", "--address", client.address,
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


def test_a_request_fetching_its_images_holds_a_place_in_line():
    line: Line[str] = Line(["slot"], max_queue=1, queue_timeout=5)
    fetching, fetched, served = threading.Event(), threading.Event(), threading.Event()

    def prepare() -> None:
        fetching.set()
        fetched.wait()

    def wait() -> None:
        with line.slot(lambda s: 0, lambda: False, prepare):
            served.set()

    with line.slot(lambda s: 0, lambda: False):  # the slot is taken
        waiter = threading.Thread(target=wait)
        waiter.start()
        fetching.wait()
        assert line.counts() == (1, 1)  # it counts as waiting while it fetches
        with pytest.raises(QueueFull):  # and the line has no place for another, which fetches nothing
            with line.slot(lambda s: 0, lambda: False, lambda: pytest.fail("a refused request fetched")):
                pass
        fetched.set()
        assert not served.wait(0.1)  # then it waits for the slot
    waiter.join()
    assert served.is_set() and line.counts() == (0, 0)

    def bad_image() -> None:
        raise InvalidImage("bad")

    failing: Line[str] = Line(["slot"], max_queue=0, queue_timeout=5)
    with pytest.raises(InvalidImage):
        with failing.slot(lambda s: 0, lambda: False, bad_image):
            pass
    assert failing.counts() == (0, 0)  # a failed fetch gives its place back


def test_the_line_gives_the_slot_with_the_longest_cached_prefix():
    line: Line[str] = Line(["cold", "warm", "tepid"], max_queue=0, queue_timeout=1)
    score = {"cold": 0, "warm": 900, "tepid": 10}
    with line.slot(score.__getitem__, lambda: False) as slot:
        assert slot == "warm"


def test_on_a_stock_build_the_rest_goes_in_one_token_a_step_and_answers_the_same(demo_model, monkeypatch):
    """Stock chatglm-cpp evaluates one token a call once its cache holds anything: reuse still
    gives the greedy answer a cold prompt gives, and is taken only where it is cheaper."""
    from backends.chatglm.engine import model as engine_model
    from backends.chatglm.ggml_file import read_model_file

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


@pytest.mark.skipif(not PATCHED, reason="a stock chatglm-cpp evaluates a prompt in one graph")
def test_a_long_prompt_goes_in_by_pieces_and_answers_as_it_would_whole(demo_model):
    """A prompt of several pieces of prefill_rows: the model's keys and scores are those of one
    graph, so the greedy answer and the usage are the same; a prefix reused, the rest goes in by
    pieces too."""
    from backends.chatglm.engine import model as engine_model
    from backends.chatglm.ggml_file import read_model_file

    loaded = engine_model.Model(read_model_file(demo_model), 1024, slots=2)
    assert loaded.prefill_rows == 512  # at most 512 rows, fewer where the scores would pass 256 MB
    request = ChatRequest(model="demo", messages=(Message("user", "the river runs past the bakery " * 150),),
                          temperature=0, max_tokens=24)
    prompt = loaded.prompt_ids(request)
    assert len(prompt) > 800  # 9 pieces of 100

    def answer(slot, rows: int, reuse_from: ChatRequest | None = None) -> list:
        loaded.prefill_rows = rows
        if reuse_from is not None:
            list(slot.generate(reuse_from, loaded.prompt_ids(reuse_from), lambda: False))
        return list(slot.generate(request, prompt, lambda: False))

    whole = answer(loaded.slots[0], 1 << 20)
    assert answer(loaded.slots[1], 100) == whole
    shorter = ChatRequest(model="demo", messages=(Message("user", "the river runs past the bakery " * 30),),
                          max_tokens=1)
    reused = answer(loaded.slots[1], 100, reuse_from=shorter)
    assert reused[:-1] == whole[:-1] and reused[-1].usage.cached_tokens > 100


def test_a_fork_in_the_master_waits_for_the_engine_start_in_flight():
    """gunicorn's master forks workers while its keeper thread may be starting the engine: a worker
    forked during that Popen would inherit the pipe the Popen waits on and hold the keeper for its
    whole life (the engine then never came back after a crash). Forks wait for the Popen instead."""
    from backends.chatglm.engine import launcher

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
    from backends.chatglm.engine.server import at_most_every

    looks = []
    check = at_most_every(0.05, lambda: looks.append(time.monotonic()) or True)
    assert not any(check() for _ in range(1000))  # a token's step is far shorter than the interval
    assert looks == []
    time.sleep(0.06)  # the interval itself is what is tested
    assert check() and len(looks) == 1


# -- images later: asked for once the line has taken the request ----------------------------------


def test_an_image_is_asked_for_once_the_line_takes_the_request_and_within_a_bound(glm4v_model):
    process, client = start_engine(glm4v_model, "--images-timeout", "1")
    side = 56  # the demo vision tower's
    request = ChatRequest(model="x", messages=(Message("user", "what is it?", images=(ImageInput("raw file"),)),),
                          temperature=0, max_tokens=3)
    black = base64.b64encode(bytes(side * side * 3)).decode()
    try:
        events = list(client.generate(request, images=LaterImages(side, lambda: [black])))
        assert isinstance(events[-1], Finish) and events[-1].usage.completion_tokens == 3
        assert client.status()["images"] == 1
        with pytest.raises(InvalidImage):  # the pixels' length is checked as before
            list(client.generate(request, images=LaterImages(side, lambda: [black[:-4]])))
        with pytest.raises(InvalidImage):  # a worker that expects another size is refused before it is asked
            list(client.generate(request, images=LaterImages(side * 2, lambda: pytest.fail("asked"))))
        assert client.status()["images"] == 2
        with connect(client.address) as sock:  # a worker that never sends them
            later = protocol.ImagesLater(1, side)
            sock.sendall(protocol.encode(protocol.generate_request(protocol.without_images(request), False, later)))
            lines = sock.makefile("rb")
            assert protocol.decode(lines.readline()) == {"send_images": 1}
            assert client.status()["waiting"] == 1  # it holds its place meanwhile
            started = time.monotonic()
            with pytest.raises(QueueTimeout, match="images did not come within 1s"):
                protocol.event(protocol.decode(lines.readline()))
            assert 0.5 < time.monotonic() - started < 5
            assert lines.readline() == b""
        assert (client.status()["running"], client.status()["waiting"]) == (0, 0)  # its place is free
    finally:
        process.terminate()
        process.wait()


# -- handover: the engine writes a streamed answer's text pieces to the client itself -------------

PREFIX, SUFFIX = b'data: {"piece":', b"}\n\n"


@pytest.fixture(scope="module")
def endless(slow_model) -> Iterator[EngineClient]:
    """An engine whose model never ends an answer by itself (a decode step of a few ms)."""
    with running_engine(slow_model) as client:
        yield client


@contextmanager
def tcp_connection(receive_buffer: int = 0) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A loopback TCP connection: the server's end (what a worker hands over) and the client's."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.socket()
        if receive_buffer:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        client.connect(listener.getsockname())
        server_end, _ = listener.accept()
    with client, server_end:
        yield server_end, client


def received(client: socket.socket) -> bytes:
    data = b""
    while block := client.recv(65536):
        data += block
    return data


def pieces(body: bytes) -> list[str]:
    frames = body.split(b"\n\n")
    assert frames[-1] == b""  # nothing cut short
    return [json.loads(f.removeprefix(b"data: "))["piece"] for f in frames[:-1]]


@pytest.mark.parametrize("chunked", [True, False], ids=["http/1.1", "http/1.0"])
def test_a_handed_over_stream_is_written_by_the_engine_in_the_workers_frames(endless, chunked):
    request = ChatRequest(model="endless", messages=(Message("user", "Tell me a story."),), temperature=0,
                          max_tokens=40)
    whole = "".join(e.text for e in endless.generate(request) if isinstance(e, TextDelta))
    with tcp_connection() as (server_end, client):
        stream = ClientStream(server_end.fileno(), PieceFrame(PREFIX, SUFFIX), chunked, 5.0)
        events = list(endless.generate(request, lambda: stream))
        server_end.close()  # the engine closed its own descriptor: the client sees the end only now
        data = received(client)
    first, written, finish = events
    assert isinstance(first, TextDelta) and isinstance(written, Written) and isinstance(finish, Finish)
    assert finish.usage.completion_tokens == 40 and written.deltas >= 30
    written_pieces = pieces(unchunked(data, ended=False) if chunked else data)
    assert all(written_pieces) and "".join(written_pieces) == written.text and len(written_pieces) == written.deltas
    assert first.text + written.text == whole  # the same answer as through the worker


def test_a_client_that_leaves_while_the_engine_writes_ends_its_generation(endless):
    request = ChatRequest(model="endless", messages=(Message("user", "go"),), temperature=0, max_tokens=900)
    with tcp_connection() as (server_end, client):
        events = endless.generate(request,
                                  lambda: ClientStream(server_end.fileno(), PieceFrame(PREFIX, SUFFIX), True, 5.0))
        assert isinstance(next(events), TextDelta)
        reader = threading.Thread(target=lambda: (client.recv(1), client.close()))  # leaves after its first bytes
        reader.start()
        left = time.monotonic()
        with pytest.raises(ClientGone) as gone:
            for event in events:
                assert isinstance(event, Written) and 0 < event.deltas < 800
        reader.join()
    assert gone.value.reason == "client_gone" and time.monotonic() - left < 3
    assert endless.status()["running"] == 0


def test_a_client_that_stops_reading_is_let_go_after_the_write_timeout(endless):
    request = ChatRequest(model="endless", messages=(Message("user", "go"),), temperature=0, max_tokens=900)
    padded = PREFIX + b" " * 2000  # a few frames fill the (small) buffers
    with tcp_connection(receive_buffer=4096) as (server_end, client):
        server_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        events = endless.generate(request,
                                  lambda: ClientStream(server_end.fileno(), PieceFrame(padded, SUFFIX), True, 0.5))
        assert isinstance(next(events), TextDelta)
        started = time.monotonic()
        with pytest.raises(ClientGone) as gone:
            list(events)
    assert gone.value.reason == "client_too_slow" and time.monotonic() - started < 5
    assert endless.status()["running"] == 0


def test_a_worker_takes_the_connection_back_and_nothing_is_written_after(endless):
    """The worker's side of a graceful stop, spoken by hand: it shuts down its sending side while the
    engine writes; the engine stops, says what it wrote and closes, and writes no byte after that."""
    request = ChatRequest(model="endless", messages=(Message("user", "go"),), temperature=0, max_tokens=900)
    with tcp_connection() as (server_end, client), connect(endless.address) as sock:
        sock.sendall(protocol.encode(protocol.generate_request(request, handover=True)))
        lines = sock.makefile("rb")
        assert protocol.decode(lines.readline())["handover"] is True
        frame = protocol.HANDOVER + protocol.encode(protocol.handover_message(
            ClientStream(server_end.fileno(), PieceFrame(PREFIX, SUFFIX), True, 5.0)))
        socket.send_fds(sock, [frame], [server_end.fileno()])
        assert select.select([client], [], [], 5)[0]  # the engine is writing
        sock.shutdown(socket.SHUT_WR)
        stopped = time.monotonic()
        rest = lines.read()  # until the engine closes the connection
        assert time.monotonic() - stopped < 2
        summary = protocol.decode(rest)
        server_end.close()
        data = received(client)
    assert summary["deltas"] >= 1 and summary["client"] is None
    written_pieces = pieces(unchunked(data, ended=False))  # every frame whole, and none after what the summary says
    assert "".join(written_pieces) == summary["written"] and len(written_pieces) == summary["deltas"]


@pytest.mark.parametrize("family", ["demo_model", "glm4_model"])
def test_detokenize_gives_back_the_text_and_names_the_special_tokens(family, request):
    """sentencepiece (ChatGLM3) and byte-level BPE (GLM-4): ids back to the text, the prefix by its names."""
    from backends.base import InvalidRequest
    from backends.chatglm.engine import model as engine_model
    from backends.chatglm.ggml_file import read_model_file

    file = read_model_file(request.getfixturevalue(family))
    loaded = engine_model.Model(file, 1024, slots=1)
    text = "The river runs past the bakery. 你好，世界！"
    ids = loaded.request_ids(ChatRequest(model="demo", messages=(), prompt=text))
    prefix = "".join(loaded.family.prefix)
    assert loaded.detokenize(ids) == prefix + text
    with pytest.raises(InvalidRequest, match=r"tokens\[1\]"):
        loaded.detokenize([ids[-1], file.config.vocab_size - 1])  # a padding id
