"""Hardening (issue 12) against a real gunicorn: upstream error bodies cut short, token budgets that
hold, chunked and slow request bodies, and the smaller settings and route checks."""

from __future__ import annotations

import http.client
import json
import select
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import GUNICORN, ROOT
from tests.fake_cloudflare import MODES, cloudflare_env

USER = [{"role": "user", "content": "hello"}]


def raw_exchange(server, data: bytes, trickle: bytes = b"", *, pace: float = 0.2,
                 timeout: float = 20) -> tuple[bytes, float]:
    """Send ``data``, then ``trickle`` one byte every ``pace`` seconds, and return the answer's first
    bytes and how long it took; stops sending once an answer arrives."""
    host, port = server.base_url.removeprefix("http://").split(":")
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=timeout) as conn:
        conn.sendall(data)
        for i in range(len(trickle)):
            try:
                conn.sendall(trickle[i:i + 1])
            except OSError:
                break
            if select.select([conn], [], [], pace)[0]:
                break  # the server answered before the body was done
        conn.settimeout(timeout)
        answer = b""
        try:
            while b"\r\n\r\n" not in answer or len(answer) < answer.index(b"\r\n\r\n") + 40:
                piece = conn.recv(65536)
                if not piece:
                    break
                answer += piece
        except OSError:
            pass
    return answer, time.monotonic() - started


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def error_of(answer: bytes) -> dict:
    return json.loads(answer.partition(b"\r\n\r\n")[2])["error"]


# -- 5: Workers AI error bodies cut short, stalled, or nested absurdly deep ----------------------------

@pytest.fixture(scope="module")
def cloudflare_server(server_factory, fake):
    return server_factory(**cloudflare_env(
        fake, CLOUDFLARE_MODELS=",".join(f"@cf/fake/{m}" for m in MODES), CLOUDFLARE_TIMEOUT="2,1",
        CLOUDFLARE_RETRIES="1", MODEL_FALLBACKS="@cf/fake/cut400=@cf/fake/chat"))


@pytest.mark.parametrize("mode, stream, status, code, attempts", [
    ("cut429", False, 502, "upstream_broken_answer", 2),  # a broken body is resent once (CLOUDFLARE_RETRIES=1)
    ("cut429", True, 502, "upstream_broken_answer", 2),
    ("stall500", False, 504, "upstream_timeout", 1),  # a stall is not: each try would wait the read timeout
    ("deep", False, 502, "upstream_error", 1),
    ("deep", True, 502, "upstream_error", 1),
])
def test_upstream_bodies_cut_short_stalled_or_too_deep_are_502_or_504(cloudflare_server, fake, mode, stream,
                                                                       status, code, attempts):
    before = len(fake.runs(f"@cf/fake/{mode}"))
    r = requests.post(cloudflare_server.v1 + "/chat/completions", timeout=30,
                      json={"model": f"@cf/fake/{mode}", "messages": USER, "stream": stream})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", code)
    assert r.headers.get("x-should-retry") != "false"  # the SDKs may resend it
    assert len(fake.runs(f"@cf/fake/{mode}")) - before == attempts


def test_a_cut_error_body_falls_back_to_the_next_model(cloudflare_server, fake):
    r = requests.post(cloudflare_server.v1 + "/chat/completions", timeout=30,
                      json={"model": "@cf/fake/cut400", "messages": USER})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "@cf/fake/chat" and r.json()["choices"][0]["message"]["content"] == "You said: hello"


# -- 6: token budgets reserve what a request can spend, and refuse what does not fit --------------------

BUDGET_KEYS = """
[keys.chats]
key = "sk-chats"
tokens_per_minute = 300

[keys.open]
key = "sk-open"
tokens_per_minute = 50

[keys.batch]
key = "sk-batch"
tokens_per_minute = 150

[keys.many]
key = "sk-many"
tokens_per_minute = 300
"""


@pytest.fixture(scope="module")
def budget_server(server_factory, demo_model, tmp_path_factory):
    keys = tmp_path_factory.mktemp("budget") / "keys.toml"
    keys.write_text(BUDGET_KEYS)
    keys.chmod(0o600)
    # A 64-token context: what an answer without max_tokens may take at most, prompt included.
    return server_factory(CHATGLM_MODEL=str(demo_model), API_KEYS_FILE=str(keys), CHATGLM_MAX_LENGTH="64")


def post(server, path: str, key: str, body: dict) -> requests.Response:
    return requests.post(server.v1 + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def test_parallel_chats_without_max_tokens_spend_no_more_than_the_budget(budget_server):
    """Each reserves the whole context (64): at most 4 run at once on 300 tokens a minute, and
    together they spend no more than 300 (before, each reserved nothing and all 40 ran)."""
    body = {"model": "demo", "messages": USER}
    with ThreadPoolExecutor(40) as pool:
        answers = list(pool.map(lambda _: post(budget_server, "/chat/completions", "sk-chats", body), range(40)))
    admitted = [r for r in answers if r.status_code == 200]
    assert 4 <= len(admitted) < 40, [r.status_code for r in answers]
    assert sum(r.json()["usage"]["total_tokens"] for r in admitted) <= 300
    assert all(r.status_code == 429 and r.json()["error"]["type"] == "tokens" for r in answers
               if r.status_code != 200)


def test_a_request_that_can_never_fit_is_refused_as_too_large(budget_server):
    r = post(budget_server, "/chat/completions", "sk-open", {"model": "demo", "messages": USER})
    assert r.status_code == 429, r.text  # without max_tokens it reserves the context (64): more than 50
    assert r.json()["error"]["type"] == "tokens" and "Request too large" in r.json()["error"]["message"]
    assert r.headers["x-should-retry"] == "false"  # waiting will not help
    ok = post(budget_server, "/chat/completions", "sk-open", {"model": "demo", "messages": USER, "max_tokens": 5})
    assert ok.status_code == 200  # nothing was kept from the refused one


def test_completions_reserve_every_prompt(budget_server):
    three = {"model": "demo", "prompt": ["a", "b", "c"], "max_tokens": 60}  # 3 x 61 > 150
    r = post(budget_server, "/completions", "sk-batch", three)
    assert r.status_code == 429 and r.json()["error"]["type"] == "tokens", r.text
    two = post(budget_server, "/completions", "sk-batch", {**three, "prompt": ["a", "b"]})  # 2 x 61 fit
    assert two.status_code == 200 and len(two.json()["choices"]) == 2
    many = post(budget_server, "/completions", "sk-many", {"model": "demo", "prompt": ["x"] * 300, "max_tokens": 256})
    assert many.status_code == 429 and "Request too large" in many.json()["error"]["message"]


# -- 7 and 8: request bodies: chunked over the limit, malformed, or sent slowly ---------------------------

@pytest.fixture(scope="module")
def body_server(server_factory, demo_model):
    return server_factory(CHATGLM_MODEL=str(demo_model), MAX_BODY_BYTES="4096", BODY_TIMEOUT="1.5",
                          WORKER_CONNECTIONS="20")


def chunked(body: bytes, size: int = 1000) -> bytes:
    pieces = [body[i:i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


def test_a_chunked_body_over_the_limit_is_413_never_cut(body_server):
    # Cut at 4096 bytes, this body is still valid JSON: it must not be answered as if it were whole.
    body = json.dumps({"model": "demo", "messages": USER, "max_tokens": 1}).encode() + b" " * 6000
    answer, _ = raw_exchange(body_server, HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(body))
    assert status_of(answer) == 413 and error_of(answer)["code"] == "request_too_large"
    small = json.dumps({"model": "demo", "messages": USER, "max_tokens": 1}).encode()
    answer, _ = raw_exchange(body_server, HEAD + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                             + chunked(small, 7))
    assert status_of(answer) == 200, answer


@pytest.mark.parametrize("size_line", [b"zz", b"-1", b"+5"])
def test_a_malformed_chunk_size_is_400(body_server, size_line):
    answer, _ = raw_exchange(body_server,
                             HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + size_line + b"\r\n{}\r\n0\r\n\r\n")
    assert status_of(answer) == 400, answer
    assert error_of(answer)["type"] == "invalid_request_error"
    assert "Traceback" not in "".join(body_server.log)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_slow_body_is_408_after_body_timeout(body_server, framing):
    body = json.dumps({"model": "demo", "messages": USER}).encode()
    head = HEAD + (b"Content-Length: %d\r\n\r\n" % len(body) if framing == "content-length"
                   else b"Transfer-Encoding: chunked\r\n\r\n")
    data = body if framing == "content-length" else chunked(body, 1)
    silent, seconds = raw_exchange(body_server, head, timeout=5)  # the headers, then nothing
    assert status_of(silent) == 408 and 1.2 < seconds < 5, silent
    answer, seconds = raw_exchange(body_server, head, data)  # a byte every 0.2 s
    assert status_of(answer) == 408 and error_of(answer)["code"] == "request_timeout", answer
    assert 1.2 < seconds < 5


def test_slow_bodies_cannot_starve_the_worker(body_server):
    """25 connections trickling a body into a worker that takes 20: each is answered 408 after
    BODY_TIMEOUT, and /health gets through meanwhile."""
    body = json.dumps({"model": "demo", "messages": USER}).encode()
    head = HEAD + b"Content-Length: %d\r\n\r\n" % len(body)
    results: list[int] = []

    def slow() -> None:
        results.append(status_of(raw_exchange(body_server, head, body, pace=0.3, timeout=30)[0]))

    threads = [threading.Thread(target=slow) for _ in range(25)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # let them take the connections
    started = time.monotonic()
    assert requests.get(body_server.base_url + "/health", timeout=15).status_code == 200
    waited = time.monotonic() - started
    for t in threads:
        t.join()
    assert results == [408] * 25
    assert waited < 10


@pytest.fixture(scope="module")
def header_server(server_factory, demo_model):
    return server_factory(CHATGLM_MODEL=str(demo_model), HEADER_TIMEOUT="1.5", WORKER_CONNECTIONS="20")


def test_slow_headers_are_408_and_cannot_starve_the_worker(header_server):
    """25 connections trickling their request headers into a worker that takes 20: each is answered
    408 after HEADER_TIMEOUT (gunicorn alone waited KEEPALIVE, 75 s, then closed without a word), and
    /health gets through meanwhile."""
    results: list[tuple[bytes, float]] = []
    first = HEAD.split(b"\r\n", 1)[0] + b"\r\n"

    def slow() -> None:
        results.append(raw_exchange(header_server, first, b"X-Slow: " + b"a" * 200, pace=0.3, timeout=30))

    threads = [threading.Thread(target=slow) for _ in range(25)]
    for t in threads:
        t.start()
    started = time.monotonic()
    assert requests.get(header_server.base_url + "/health", timeout=15).status_code == 200
    waited = time.monotonic() - started
    for t in threads:
        t.join()
    assert [status_of(answer) for answer, _ in results] == [408] * 25
    assert all(error_of(answer)["code"] == "request_timeout" for answer, _ in results)
    assert all(1.2 < seconds < 6 for _, seconds in results), [seconds for _, seconds in results]
    assert waited < 10


def test_a_connection_that_says_nothing_is_closed_after_header_timeout(header_server):
    answer, seconds = raw_exchange(header_server, b"", timeout=10)
    assert answer == b"" and 1.2 < seconds < 6


def test_keep_alive_requests_are_not_timed_from_the_connection(header_server):
    """The bound is per request: a keep-alive connection idle longer than HEADER_TIMEOUT between
    requests still serves the next one on the same socket."""
    host, port = header_server.base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        for _ in range(2):
            conn.request("GET", "/health")
            assert conn.getresponse().read() == b'{"status":"ok"}\n'  # RemoteDisconnected if closed
            time.sleep(2)  # longer than HEADER_TIMEOUT, shorter than KEEPALIVE: the wait under test
    finally:
        conn.close()


# -- 11: the smaller ones --------------------------------------------------------------------------------

@pytest.mark.parametrize("env, variable, secret", [
    ({"QUEUE_TIMEOUT": "nan"}, "QUEUE_TIMEOUT", None),
    ({"CLOUDFLARE_TIMEOUT": "nan"}, "CLOUDFLARE_TIMEOUT", None),
    ({"CLOUDFLARE_TIMEOUT": "10,inf"}, "CLOUDFLARE_TIMEOUT", None),
    ({"MODEL_ALIASES": "demo=demo"}, "MODEL_ALIASES", None),
    ({"MODEL_ALIASES": "gpt-4=demo,gpt-4=demo"}, "MODEL_ALIASES", None),
    ({"API_KEYS": "sk-good,sk-ключ-42"}, "API_KEYS", "ключ"),
    ({"API_KEYS": "sk-has space"}, "API_KEYS", "has space"),
])
def test_bad_settings_stop_startup_with_one_line(demo_model, env, variable, secret):
    full = {"CHATGLM_MODEL": str(demo_model), "PORT": "0", "PATH": "/usr/bin:/bin", **env}
    result = subprocess.run([GUNICORN, "-c", "gunicorn.conf.py", "wsgi:application"], cwd=ROOT, env=full,
                            capture_output=True, text=True, timeout=60)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"aigate: configuration error: {variable}"), lines
    assert secret is None or secret not in result.stderr


@pytest.fixture(scope="module")
def small_server(server_factory, demo_model):
    return server_factory(CHATGLM_MODEL=str(demo_model), MAX_INPUT_CHARS="1000")


def test_tools_and_tool_call_arguments_count_toward_max_input_chars(small_server):
    tool = {"type": "function", "function": {"name": "f", "description": "d" * 600,
                                             "parameters": {"type": "object", "description": "p" * 600}}}
    r = requests.post(small_server.v1 + "/chat/completions", timeout=30,
                      json={"model": "demo", "messages": USER, "tools": [tool]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "input_too_large", r.text
    history = [*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": json.dumps({"x": "y" * 1200})}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "ok"}]
    r = requests.post(small_server.v1 + "/chat/completions", timeout=30, json={"model": "demo", "messages": history})
    assert r.status_code == 400 and r.json()["error"]["code"] == "input_too_large", r.text


def test_the_playground_is_served_once_with_its_headers(small_server):
    assert requests.get(small_server.base_url + "/static/playground.html", timeout=10).status_code == 404
    page = requests.get(small_server.base_url + "/", timeout=10)
    assert page.status_code == 200 and "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    assert page.headers["X-Content-Type-Options"] == "nosniff"


def test_auto_discovery_that_fails_is_not_ready_until_it_works(server_factory, fake):
    fake.catalogue_down = True
    try:
        server = server_factory(**cloudflare_env(fake, CLOUDFLARE_MODELS="auto"))
        r = requests.get(server.base_url + "/ready", timeout=30)
        assert r.status_code == 503 and "catalogue" in r.json()["backends"]["cloudflare"], r.text
    finally:
        fake.catalogue_down = False
    deadline = time.monotonic() + 30
    while requests.get(server.base_url + "/ready", timeout=30).status_code != 200:  # retried every 5 s
        assert time.monotonic() < deadline, "never became ready once the catalogue answered"
        time.sleep(0.5)
    r = requests.post(server.v1 + "/chat/completions", json={"model": "@cf/fake/chat", "messages": USER}, timeout=30)
    assert r.status_code == 200
