"""The local engine under a real gunicorn: prompt evaluation freezes no worker, a chat's next turn
reuses the cache on any worker, a killed engine costs only its own generations, and no client
holds a slot by leaving or by not reading."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import threading
import time

import pytest
import requests

from backends.chatglm.engine.client import EngineClient
from tests.conftest import unchunked
from tests.fake_cloudflare import FakeCloudflare, cloudflare_env

LONG = "The river runs through the old town, past the market and the bridge. " * 60  # ~1,000 tokens
CF_WORDS = " ".join(f"w{i}" for i in range(60))  # the fake echoes one word a frame


@pytest.fixture(scope="module")
def fake():
    fake = FakeCloudflare().start()
    fake.frame_delay = 0.05  # a frame every 50 ms
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def server(server_factory, slow_model, fake):
    return server_factory(CHATGLM_MODEL=str(slow_model), WORKERS="1", CLIENT_WRITE_TIMEOUT="2",
                          **cloudflare_env(fake, CLOUDFLARE_MODELS="@cf/fake/chat"))


def engine_status(server) -> dict:
    status = EngineClient(server.engine_socket, None, 0).status()
    assert status is not None
    return status


def wait_until(predicate, timeout: float = 30, server=None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out" + (
            "; the server said:\n" + "".join(line for line in server.log
                                             if "path=/ready" not in line and "path=/health" not in line)
            if server else "")
        time.sleep(0.02)


def cloudflare_frames(server, arrivals: list[float], started: threading.Event) -> None:
    body = {"model": "@cf/fake/chat", "messages": [{"role": "user", "content": CF_WORDS}], "stream": True,
            "max_tokens": 60}
    with requests.post(server.v1 + "/chat/completions", json=body, stream=True, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith(b"data: {"):
                arrivals.append(time.monotonic())
                if len(arrivals) == 3:
                    started.set()


def local_stream(server, content: str, max_tokens: int, **extra) -> requests.Response:
    return requests.post(server.v1 + "/chat/completions", stream=True, timeout=120, **extra, json={
        "model": "endless", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})


def test_a_long_prompt_evaluation_freezes_nothing_in_the_worker(server):
    arrivals: list[float] = []
    health: list[float] = []
    streaming = threading.Event()
    cf = threading.Thread(target=cloudflare_frames, args=(server, arrivals, streaming))
    cf.start()
    streaming.wait(10)
    prefill = {}

    def local() -> None:
        prefill["start"] = time.monotonic()
        with local_stream(server, LONG, 4) as r:
            for line in r.iter_lines():
                if b'"content":"' in line and "first" not in prefill:
                    prefill["first"] = time.monotonic()

    generation = threading.Thread(target=local)
    generation.start()
    while generation.is_alive() or cf.is_alive():
        t = time.monotonic()
        assert requests.get(server.base_url + "/health", timeout=10).status_code == 200
        health.append(time.monotonic() - t)
        time.sleep(0.02)
    generation.join()
    cf.join()
    during = [b - a for a, b in zip(arrivals, arrivals[1:]) if b >= prefill["start"] and a <= prefill["first"]]
    assert prefill["first"] - prefill["start"] > 0.3, "the prompt evaluation was too quick to tell anything"
    assert during and max(during) < 0.05 + 0.1, during  # within 100 ms of the upstream's 50 ms
    assert max(health) < 0.15, max(health)
    assert len(arrivals) == 62  # the role chunk, 60 words, the finish chunk


def test_the_next_turn_on_another_connection_reuses_the_history(server_factory, slow_model):
    two = server_factory(CHATGLM_MODEL=str(slow_model), WORKERS="2")
    history = [{"role": "user", "content": LONG}]

    def turn(messages) -> tuple[float, dict, str]:
        started = time.monotonic()
        first, text, usage = None, [], None
        with requests.post(two.v1 + "/chat/completions", stream=True, timeout=120, headers={"Connection": "close"},
                           json={"model": "endless", "messages": messages, "max_tokens": 16, "temperature": 0,
                                 "stream": True, "stream_options": {"include_usage": True}}) as r:
            for line in r.iter_lines():
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = first or time.monotonic()
                    text.append(chunk["choices"][0]["delta"]["content"])
                if chunk.get("usage"):
                    usage = chunk["usage"]
        assert first is not None and usage is not None
        return first - started, usage, "".join(text)

    ttft1, usage1, answer = turn(history)
    ttft2, usage2, _ = turn([*history, {"role": "assistant", "content": answer},
                             {"role": "user", "content": "And the bakery?"}])
    assert usage1["prompt_tokens_details"]["cached_tokens"] < 10
    assert usage2["prompt_tokens_details"]["cached_tokens"] >= usage1["prompt_tokens"]
    assert ttft2 <= 0.5 * ttft1, (ttft1, ttft2)
    line = two.wait_for_log(f"cached_tokens={usage2['prompt_tokens_details']['cached_tokens']} ")
    assert "status=200" in line

    def reused() -> float:  # counted just after the log line is written
        metrics = requests.get(two.base_url + "/metrics", timeout=10).text
        found = re.search(r'aigate_prompt_tokens_total\{model="endless",source="reused"\} (\S+)', metrics)
        return float(found.group(1)) if found else 0.0

    wait_until(lambda: reused() >= usage1["prompt_tokens"], timeout=5)


def test_a_killed_engine_costs_only_its_own_generations(server):
    arrivals: list[float] = []
    streaming = threading.Event()
    cf = threading.Thread(target=cloudflare_frames, args=(server, arrivals, streaming))
    cf.start()
    streaming.wait(10)
    pid = engine_status(server)["pid"]
    with local_stream(server, "Tell me a long story.", 3000) as r:
        lines = r.iter_lines()
        assert next(lines).startswith(b"data: {")
        os.kill(pid, signal.SIGKILL)
        rest = [line for line in lines if line]
    assert rest[-1] == b"data: [DONE]"
    error = json.loads(rest[-2][6:])["error"]
    assert error["code"] == "model_not_ready" and "engine stopped" in error["message"]
    cf.join()
    assert len(arrivals) == 62  # the Cloudflare stream on the same worker went on to its end
    # The master starts the engine again; meanwhile /ready says why not, then the model answers.
    wait_until(lambda: requests.get(server.base_url + "/ready", timeout=10).status_code == 200, server=server)
    assert engine_status(server)["pid"] != pid
    r = requests.post(server.v1 + "/chat/completions", timeout=60,
                      json={"model": "endless", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_ready_says_503_while_the_engine_is_down(server):
    os.kill(engine_status(server)["pid"], signal.SIGKILL)
    ready = requests.get(server.base_url + "/ready", timeout=10)
    if ready.status_code == 503:  # the restart may already be done: both are fine, a 500 is not
        assert "engine" in ready.json()["backends"]["chatglm"] or "loading" in ready.json()["backends"]["chatglm"]
    else:
        assert ready.status_code == 200
    wait_until(lambda: requests.get(server.base_url + "/ready", timeout=10).status_code == 200)


def test_a_client_that_stops_reading_lets_go_of_the_slot(server):
    """It reads nothing (a tiny receive buffer): within CLIENT_WRITE_TIMEOUT (2 s) of its bytes
    going unread, its generation stops and the next request is served."""
    body = json.dumps({"model": "endless", "messages": [{"role": "user", "content": "go"}], "max_tokens": 20000,
                       "stream": True}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    host, port = server.base_url.removeprefix("http://").split(":")
    sock.connect((host, int(port)))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"X-Request-ID: never-reads\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    try:
        wait_until(lambda: engine_status(server)["running"] == 1)
        started = time.monotonic()
        line = server.wait_for_log("id=never-reads ", timeout=60)
        assert time.monotonic() - started < 30
        assert "error=client_too_slow" in line
        wait_until(lambda: engine_status(server)["running"] == 0, timeout=5)
        r = requests.post(server.v1 + "/chat/completions", timeout=30,
                          json={"model": "endless", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200
    finally:
        sock.close()


def test_a_whole_answer_stops_when_its_client_leaves(server):
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(server.v1 + "/chat/completions", timeout=(5, 1), headers={"X-Request-ID": "leaves-early"},
                      json={"model": "endless", "messages": [{"role": "user", "content": "go"}], "max_tokens": 20000})
    line = server.wait_for_log("id=leaves-early ", timeout=10)
    assert "error=client_gone" in line
    assert int(re.search(r"completion_tokens=(\d+)", line).group(1)) < 20000
    wait_until(lambda: engine_status(server)["running"] == 0, timeout=5)


def test_the_line_holds_when_a_tmp_cleaner_empties_tmp(server_factory, slow_model, tmp_path):
    """The line lives in the engine, not in files: emptying $TMPDIR under a running server (as a tmp
    cleaner does) still leaves one generation at a time with GENERATION_SLOTS=1."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    server = server_factory(CHATGLM_MODEL=str(slow_model), TMPDIR=str(tmp), WORKERS="2")
    for entry in tmp.iterdir():
        if not entry.name.startswith("aigate-metrics-"):  # the metrics directory is another story
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    first = local_stream(server, "Tell me a long story.", 3000)
    second = threading.Thread(target=lambda: local_stream(server, "And another.", 1).close())
    second.start()  # its headers come only once it has a slot
    try:
        wait_until(lambda: engine_status(server)["waiting"] == 1)
        status = engine_status(server)
        assert (status["running"], status["waiting"]) == (1, 1)
    finally:
        first.close()
        second.join()


# -- the engine writes a stream's text pieces to the client itself (handover) ---------------------------


def send_stream_request(server, version: str, body: dict, request_id: str = "raw",
                        path: str = "/v1/chat/completions") -> socket.socket:
    data = json.dumps({**body, "stream": True}).encode()
    host, port = server.base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(b"POST %s %s\r\nHost: x\r\nContent-Type: application/json\r\nX-Request-ID: %s\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (path.encode(), version.encode(),
                                                                         request_id.encode(), len(data), data))
    return sock


def stream_body(response: bytes) -> bytes:
    """A streamed answer's body from the whole response, every HTTP/1.1 chunk's size checked and nothing
    after the last chunk."""
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0], head
    return unchunked(body, ended=True) if b"transfer-encoding: chunked" in head.lower() else body


def read_to_end(sock: socket.socket, response: bytes = b"") -> bytes:
    with sock:
        while block := sock.recv(65536):
            response += block
    return response


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
def test_a_stream_written_by_the_engine_says_what_the_whole_answer_says(server, version):
    body = {"model": "endless", "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 60,
            "temperature": 0, "stream_options": {"include_usage": True}}
    whole = requests.post(server.v1 + "/chat/completions", json=body, timeout=60).json()
    handovers = engine_status(server)["handovers"]
    events = stream_body(read_to_end(send_stream_request(server, version, body))).split(b"\n\n")
    assert engine_status(server)["handovers"] == handovers + 1  # the engine wrote the pieces after the first
    assert events[-2:] == [b"data: [DONE]", b""]
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in events[:-2]]
    assert ({(c["id"], c["model"], c["object"]) for c in chunks}
            == {(chunks[0]["id"], "endless", "chat.completion.chunk")})
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert content == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"]["completion_tokens"] == 60 == whole["usage"]["completion_tokens"]
    assert len(chunks) >= 60  # a chunk a piece, as the worker writes them


def test_a_responses_stream_written_by_the_engine_is_numbered_without_a_gap(server):
    body = {"model": "endless", "input": "Tell me a story.", "max_output_tokens": 60, "temperature": 0}
    whole = requests.post(server.v1 + "/responses", json=body, timeout=60).json()
    handovers = engine_status(server)["handovers"]
    frames = stream_body(read_to_end(send_stream_request(server, "HTTP/1.1", body, path="/v1/responses")))
    assert engine_status(server)["handovers"] == handovers + 1  # the engine wrote the deltas after the first
    events = []
    for frame in frames.split(b"\n\n")[:-1]:
        kind, data = frame.split(b"\n")
        events.append(json.loads(data.removeprefix(b"data: ")))
        assert kind == b"event: " + events[-1]["type"].encode()
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert len(deltas) >= 40 and len({e["item_id"] for e in deltas}) == 1
    text = "".join(e["delta"] for e in deltas)
    done = next(e for e in events if e["type"] == "response.output_text.done")
    assert text == done["text"] == whole["output_text"] and done["item_id"] == deltas[0]["item_id"]
    assert events[-1]["type"] == "response.incomplete" and events[-1]["response"]["usage"]["output_tokens"] == 60


def test_a_completions_stream_of_two_prompts_is_written_by_the_engine_choice_by_choice(server):
    body = {"model": "endless", "prompt": ["Once upon a time", "The river"], "max_tokens": 30, "temperature": 0}
    whole = requests.post(server.v1 + "/completions", json=body, timeout=60).json()
    handovers = engine_status(server)["handovers"]
    events = stream_body(read_to_end(send_stream_request(server, "HTTP/1.1", body, path="/v1/completions")))
    assert engine_status(server)["handovers"] == handovers + 2  # each prompt's answer after its first piece
    events = events.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in events[:-2]]
    assert {(c["id"], c["object"]) for c in chunks} == {(chunks[0]["id"], "text_completion")}
    indexes = [c["choices"][0]["index"] for c in chunks]
    assert indexes == sorted(indexes) and len(chunks) >= 50  # one choice after the other, a chunk a piece
    for choice in whole["choices"]:
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == choice["index"])
        assert text == choice["text"] and text
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == ["length"] * 2


def test_a_local_stream_cut_by_the_graceful_timeout_ends_in_whole_frames(server_factory, slow_model):
    """The engine is writing the pieces when the graceful timeout runs out: the worker takes the
    connection back, then says why the answer stops, and no frame is cut, mixed with another or sent
    after the end."""
    server = server_factory(CHATGLM_MODEL=str(slow_model), WORKERS="1", GRACEFUL_TIMEOUT="2")
    body = {"model": "endless", "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 3000, "temperature": 0}
    sock = send_stream_request(server, "HTTP/1.1", body, "cut-local")
    response = b""
    while b'"content":"' not in response:  # the stream has begun
        response += sock.recv(65536)
    server.process.send_signal(signal.SIGTERM)
    events = [e for e in stream_body(read_to_end(sock, response)).split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]", events[-3:]
    assert json.loads(events[-2].removeprefix(b"data: "))["error"]["code"] == "server_shutting_down"
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in events[:-2]]  # every one whole
    assert 3 < len(chunks) < 1000 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "error=server_shutting_down" in server.wait_for_log("id=cut-local ")
