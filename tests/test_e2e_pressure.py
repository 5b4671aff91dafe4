"""What a client without a key can cost a worker (issue 23), against a real gunicorn: request bodies it
is never asked for (items 9), and idle connections that would fill WORKER_CONNECTIONS (item 5)."""

from __future__ import annotations

import re
import select
import socket
import threading
import time

import pytest
import requests

KEY = "sk-pressure-test"
MIB = 1024 * 1024


def address(server) -> tuple[str, int]:
    host, port = server.base_url.removeprefix("http://").split(":")
    return host, int(port)


def worker_pid(server) -> int:
    return int(re.search(r"Booting worker with pid: (\d+)", "".join(server.log)).group(1))


def peak_rss_mib(pid: int) -> float:
    """The process's resident memory at its highest so far (VmHWM)."""
    with open(f"/proc/{pid}/status") as status:
        return int(re.search(r"VmHWM:\s+(\d+) kB", status.read()).group(1)) / 1024


def read_all(conn: socket.socket) -> bytes:
    answer = b""
    try:
        while chunk := conn.recv(65536):
            answer += chunk
    except OSError:  # reset after the answer: what it sent is still read above
        pass
    return answer


# -- item 9: the key is checked before the body is read ----------------------------------------------------

@pytest.fixture(scope="module")
def keyed_server(server_factory, demo_model):
    # BODY_TIMEOUT short: a worker that waited for the bodies would answer 408 after it, not hang the test.
    return server_factory(CHATGLM_MODEL=str(demo_model), API_KEYS=KEY, WORKER_CONNECTIONS="200", BODY_TIMEOUT="3")


def test_bodies_without_a_valid_key_are_never_read(keyed_server):
    """40 connections each send a 4 MiB body (all but its last byte, so a worker that reads bodies first
    holds every one of them) without a key or with a wrong one: each is answered 401 at once, its
    connection closed, and the worker's peak memory does not move. Reading them first took it from
    46 to 212 MiB, and 208 MiB stayed after."""
    pid, size = worker_pid(keyed_server), 4 * MIB - 4096
    before = peak_rss_mib(pid)
    body = b"x" * (size - 1)
    answers: list[bytes] = []

    def send(i: int) -> None:
        key = b"Authorization: Bearer sk-wrong\r\n" if i % 2 else b""
        with socket.create_connection(address(keyed_server), timeout=20) as conn:
            conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + key + b"Content-Length: %d\r\n\r\n" % size)
            try:
                conn.sendall(body)
            except OSError:  # the server answered and closed without reading it: the point
                pass
            answers.append(read_all(conn))

    started = time.monotonic()
    threads = [threading.Thread(target=send, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took, grown = time.monotonic() - started, peak_rss_mib(pid) - before
    assert grown < 16, f"the worker's peak memory grew by {grown:.0f} MiB"
    assert [a[:12] for a in answers] == [b"HTTP/1.1 401"] * 40, {a[:60] for a in answers}
    assert all(b"Connection: close\r\n" in a and b'"invalid_api_key"' in a for a in answers)
    assert took < 3, f"{took:.1f} s: the answers waited for the bodies"


def test_a_401_that_leaves_a_body_unread_says_the_connection_closes(keyed_server):
    """The client learns from the answer that the connection will not serve another request, so one
    that reuses its connections (requests' Session) opens a new one instead of failing; the 401 is an
    ordinary error answer: request id, CORS headers. A request with no body keeps its connection."""
    session = requests.Session()
    for _ in range(3):
        r = session.post(keyed_server.v1 + "/chat/completions", data=b"x" * 100_000, timeout=10,
                         headers={"Origin": "http://localhost:3000"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["Connection"] == "close" and r.headers["x-request-id"].startswith("req_")
        assert r.headers["Access-Control-Allow-Origin"] == "*"
    r = session.get(keyed_server.v1 + "/models", timeout=10)
    assert r.status_code == 401 and r.headers["Connection"] == "keep-alive"
    r = session.post(keyed_server.v1 + "/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                     json={"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                     timeout=30)
    assert r.status_code == 200, r.text  # with the key, the body is read as before


# -- item 5: idle connections give way when the worker's connections run short --------------------------

@pytest.fixture(scope="module")
def small_pool_server(server_factory, demo_model):
    # KEEPALIVE and HEADER_TIMEOUT as shipped (75 s, 30 s): what the idle connections would otherwise hold.
    return server_factory(CHATGLM_MODEL=str(demo_model), API_KEYS=KEY, WORKER_CONNECTIONS="20")


def idle_keep_alive(server) -> socket.socket:
    """A connection that asks for something without a key (a 401 it reads whole), then stays open."""
    conn = socket.create_connection(address(server), timeout=5)
    conn.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = b""
    while b"\r\n\r\n" not in answer or len(answer) < answer.index(b"\r\n\r\n") + 4 + int(
            re.search(rb"Content-Length: (\d+)", answer).group(1)):
        chunk = conn.recv(65536)  # a timeout here: the worker took no more connections
        assert chunk, "closed before its answer"
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 401") and b"Connection: keep-alive" in answer
    return conn


def test_idle_keep_alives_give_way_to_a_new_client(small_pool_server):
    """30 keep-alive connections, each idle after a 401, in a worker of 20 connections: each new one is
    served (the longest idle ones are closed to make room), and then a new client is served at once.
    Without that, the 21st waited for KEEPALIVE (75 s) before anything was accepted."""
    idle = []
    try:
        for _ in range(30):
            idle.append(idle_keep_alive(small_pool_server))
        started = time.monotonic()
        assert requests.get(small_pool_server.base_url + "/health", timeout=5).status_code == 200
        assert time.monotonic() - started < 2
        ended = select.select(idle, [], [], 1)[0]  # their ends were sent before /health was answered
        assert all(conn.recv(1) == b"" for conn in ended)  # closed cleanly, without a word
        assert 10 <= len(ended) <= 20, len(ended)  # some gave way, and not more than made room
    finally:
        for conn in idle:
            conn.close()


def test_new_connections_that_say_nothing_give_way_after_a_grace(small_pool_server):
    """20 connections that send nothing fill the worker: past a second's grace (not HEADER_TIMEOUT's
    30 s), enough of them are closed that a new client is served."""
    silent = [socket.create_connection(address(small_pool_server), timeout=5) for _ in range(20)]
    try:
        started = time.monotonic()
        assert requests.get(small_pool_server.base_url + "/health", timeout=10).status_code == 200
        waited = time.monotonic() - started
        assert waited < 5, f"{waited:.1f} s"
    finally:
        for conn in silent:
            conn.close()
