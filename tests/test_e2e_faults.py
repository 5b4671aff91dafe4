"""Faults on the local model: clients that walk away, a worker killed mid-generation."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
import requests

USER = [{"role": "user", "content": "Tell me a long story."}]


@pytest.fixture(scope="module")
def server(server_factory, slow_model):
    return server_factory(CHATGLM_MODEL=str(slow_model), WORKERS="2", GRACEFUL_TIMEOUT="5")


def worker_pids(server) -> list[int]:
    return [int(p) for p in re.findall(r"Booting worker with pid: (\d+)", "".join(server.log))]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def chat(server, max_tokens: int, **extra) -> requests.Response:
    return requests.post(server.v1 + "/chat/completions", timeout=60, **extra,
                         json={"model": "endless", "messages": USER, "max_tokens": max_tokens})


def first_chunk_then_leave(server, request_id: str, max_tokens: int = 2000) -> None:
    with requests.post(server.v1 + "/chat/completions", stream=True, timeout=30, headers={"X-Request-ID": request_id},
                       json={"model": "endless", "messages": USER, "max_tokens": max_tokens, "stream": True}) as r:
        assert r.status_code == 200 and next(r.iter_lines()).startswith(b"data: ")


def gauges(server) -> dict[str, float]:
    text = requests.get(server.base_url + "/metrics", timeout=10).text
    return {name: float(value) for name, value in re.findall(
        r"^(aigate_(?:generations_running|requests_waiting|active_streams)\S*) (\S+)$", text, re.M)}


def test_a_hundred_clients_leave_after_the_first_chunk(server):
    t0 = time.monotonic()
    assert chat(server, 400).json()["usage"]["completion_tokens"] == 400
    whole = time.monotonic() - t0  # what one abandoned generation would cost if it ran on

    for i in range(100):
        first_chunk_then_leave(server, f"leave-{i}")  # each would run 2,000 tokens: 5x `whole`
        if i == 19:  # by now each worker has opened its pool of slot files and metric files
            fds = {pid: open_fds(pid) for pid in worker_pids(server)}
    server.wait_for_log("id=leave-99 ")  # the last abandoned generation has stopped and been logged
    stopped = [line for line in server.log if "id=leave-" in line]
    assert len(stopped) == 100 and all(int(re.search(r"completion_tokens=(\d+)", line).group(1)) < 100
                                       for line in stopped)  # each stopped within a few tokens

    t1 = time.monotonic()
    answer = chat(server, 5)
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 5
    assert time.monotonic() - t1 < whole / 2, "abandoned generations kept the model busy"
    assert gauges(server) == {'aigate_generations_running{backend="chatglm"}': 0,
                              'aigate_requests_waiting{backend="chatglm"}': 0, "aigate_active_streams": 0}
    # No socket or file left open per client. The last requests' connections may still be closing in
    # the worker (the client has gone; the worker has yet to read the end): await that, boundedly.
    deadline = time.monotonic() + 10
    while any(open_fds(pid) > before + 1 for pid, before in fds.items()) and time.monotonic() < deadline:
        time.sleep(0.05)  # polling /proc: there is no event to wait on
    for pid, before in fds.items():
        assert open_fds(pid) <= before + 1, (pid, before, open_fds(pid))


def test_a_killed_worker_is_replaced_and_frees_its_slot(server):
    first, second = worker_pids(server)[:2]
    os.kill(second, signal.SIGSTOP)  # the stream can only go to `first`
    try:
        r = requests.post(server.v1 + "/chat/completions", stream=True, timeout=30,
                          json={"model": "endless", "messages": USER, "max_tokens": 3000, "stream": True})
        lines = r.iter_lines()
        assert next(lines).startswith(b"data: ")
    finally:
        os.kill(second, signal.SIGCONT)
    os.kill(first, signal.SIGKILL)  # mid-generation, holding the machine's only slot

    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for _ in lines:  # the stream breaks off, without [DONE]; it does not hang
            pass
    # The survivor answers at once: the dead worker's slot went with it.
    assert chat(server, 5).json()["usage"]["completion_tokens"] == 5
    server.wait_for_log(f"Worker (pid:{first}) was sent SIGKILL")
    with server.changed:  # gunicorn boots a replacement, which loads the model
        assert server.changed.wait_for(lambda: sum("aigate ready" in line for line in server.log) >= 3, 60)
    replacement = worker_pids(server)[-1]
    assert replacement not in (first, second) and Path(f"/proc/{replacement}").exists()
    os.kill(second, signal.SIGSTOP)  # now only the replacement can answer
    try:
        assert chat(server, 5).json()["usage"]["completion_tokens"] == 5
    finally:
        os.kill(second, signal.SIGCONT)
