"""Operations: readiness, Prometheus metrics across workers, request logs, proxies, graceful stop."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal

import openai
import pytest
import requests

from app import create_app, load_backends
from config.settings import load_settings
from tests.conftest import engine_socket

USER = [{"role": "user", "content": "SECRET-PROMPT-TEXT about the river"}]


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 if absent)."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"{name}{{(.*)}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            total += float(match.group(2))
    return total


def test_ready_is_503_until_the_engine_has_loaded_the_model(tmp_path, demo_model):
    """No gunicorn master here (as under Passenger): the first request starts the engine and waits
    for it instead of failing."""
    settings = dataclasses.replace(load_settings({}, dotenv=None), chatglm_model=demo_model,
                                   engine_socket=engine_socket())
    app = create_app(settings)
    client = app.test_client()
    r = client.get("/ready")
    assert r.status_code == 503 and "engine is not running" in r.json["backends"]["chatglm"]
    assert client.get("/health").status_code == 200
    early = client.post("/v1/chat/completions", json={"model": "demo", "messages": USER, "max_tokens": 1})
    assert early.status_code == 200 and early.json["usage"]["completion_tokens"] == 1
    load_backends(app)
    assert client.get("/ready").json == {"status": "ready", "backends": {"chatglm": "ready"}}


@pytest.fixture(scope="module")
def server(server_factory, slow_model):
    return server_factory(CHATGLM_MODEL=str(slow_model), WORKERS="2", API_KEYS="sk-SECRET-KEY-1",
                          GRACEFUL_TIMEOUT="30")


def served_by(server, request_id: str) -> str:
    """The pid of the worker that logged the request (the log format is "[time] [pid] [level] ...")."""
    line = server.wait_for_log(f"id={request_id} ")
    return re.search(r"\[(\d+)\] \[INFO\]", line).group(1)


def test_metrics_add_up_across_workers(server):
    before = requests.get(server.base_url + "/metrics", timeout=10).text
    headers = {"Authorization": "Bearer sk-SECRET-KEY-1"}
    completion, pids = 0, []

    def ask(n: int) -> None:
        nonlocal completion
        stream = n % 2 == 0
        body = {"model": "endless", "messages": USER, "max_tokens": 5 + n % 3, "stream": stream,
                "stream_options": {"include_usage": True}}
        r = requests.post(server.v1 + "/chat/completions", json=body, timeout=30,
                          headers={**headers, "X-Request-ID": f"m-{n}"})
        usage = r.json()["usage"] if not stream else [
            json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")][-1]["usage"]
        completion += usage["completion_tokens"]
        pids.append(served_by(server, f"m-{n}"))

    for n in range(3):
        ask(n)
    # Freeze the worker that took them: the next requests can only go to the other one.
    first = int(pids[0])
    os.kill(first, signal.SIGSTOP)
    try:
        for n in range(3, 6):
            ask(n)
    finally:
        os.kill(first, signal.SIGCONT)
    assert len(set(pids)) == 2, pids
    assert requests.post(server.v1 + "/chat/completions", json={"model": "nope", "messages": USER},
                         headers={**headers, "X-Request-ID": "m-404"}, timeout=30).status_code == 404
    # Counted when its response closed (which may come after the client read it), before its line was logged.
    served_by(server, "m-404")
    after = requests.get(server.base_url + "/metrics", timeout=10).text
    route = "/v1/chat/completions"
    served = metric(after, "aigate_requests_total", route=route, model="endless", status="200")
    assert served - metric(before, "aigate_requests_total", route=route, model="endless", status="200") == 6
    assert metric(after, "aigate_requests_total", route=route, model="", status="404") >= 1
    assert metric(after, "aigate_tokens_total", model="endless", kind="completion") - metric(
        before, "aigate_tokens_total", model="endless", kind="completion") == completion
    assert metric(after, "aigate_time_to_first_token_seconds_count", model="endless") >= 6
    assert metric(after, "aigate_completion_tokens_per_second_count", model="endless") >= 6
    assert 'aigate_requests_waiting{backend="chatglm"} 0.0' in after
    assert "aigate_active_streams 0.0" in after


def test_metrics_need_the_token_or_a_local_client(server_factory, demo_model):
    guarded = server_factory(CHATGLM_MODEL=str(demo_model), METRICS_TOKEN="m-token")
    assert requests.get(guarded.base_url + "/metrics", timeout=10).status_code == 401
    r = requests.get(guarded.base_url + "/metrics", headers={"Authorization": "Bearer m-token"}, timeout=10)
    assert r.status_code == 200 and "aigate_requests_total" in r.text
    # Behind one trusted proxy, the client is the one in X-Forwarded-For, not the proxy's 127.0.0.1.
    proxied = server_factory(CHATGLM_MODEL=str(demo_model), TRUSTED_PROXIES="1")
    remote = requests.get(proxied.base_url + "/metrics", headers={"X-Forwarded-For": "203.0.113.9"}, timeout=10)
    assert remote.status_code == 403 and remote.json()["error"]["code"] == "metrics_forbidden"
    assert requests.get(proxied.base_url + "/metrics", headers={"X-Forwarded-For": "127.0.0.1"},
                        timeout=10).status_code == 200
    requests.get(proxied.v1 + "/models", headers={"X-Forwarded-For": "198.51.100.7", "X-Request-ID": "via-proxy"},
                 timeout=10)
    assert "client=198.51.100.7" in proxied.wait_for_log("id=via-proxy")


def test_one_log_line_per_request_without_secrets(server):
    client = openai.OpenAI(base_url=server.v1, api_key="sk-SECRET-KEY-1", max_retries=0,
                           default_headers={"X-Request-ID": "trace-42"})
    r = client.chat.completions.with_raw_response.create(model="endless", messages=USER, max_tokens=9)
    assert r.headers["x-request-id"] == "trace-42"
    line = server.wait_for_log("id=trace-42")
    assert sum("id=trace-42" in line for line in server.log) == 1
    for part in ("status=200", "model=endless", "backend=chatglm", "stream=false", "completion_tokens=9",
                 "finish=length"):
        assert part in line
    assert re.search(r"prompt_tokens=\d+ ", line) and re.search(r"ttft_ms=[\d.]+ duration_ms=[\d.]+", line)
    text = "".join(server.log)
    assert "SECRET-PROMPT-TEXT" not in text and "sk-SECRET-KEY-1" not in text


def test_log_prompts_when_asked(server_factory, demo_model):
    server = server_factory(CHATGLM_MODEL=str(demo_model), LOG_PROMPTS="1")
    requests.post(server.v1 + "/chat/completions", json={"model": "demo", "messages": USER, "max_tokens": 3},
                  headers={"X-Request-ID": "logged-1"}, timeout=30)
    assert "SECRET-PROMPT-TEXT" in server.wait_for_log("logged-1 prompt=")


def test_sigterm_lets_a_running_stream_finish(server_factory, slow_model):
    server = server_factory(CHATGLM_MODEL=str(slow_model), GRACEFUL_TIMEOUT="30")
    client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0)
    stream = iter(client.chat.completions.create(model="endless", messages=USER, max_tokens=800, stream=True))
    next(stream)
    server.process.send_signal(signal.SIGTERM)
    rest = list(stream)
    assert rest[-1].choices[0].finish_reason == "length"
    assert sum(1 for c in rest if c.choices and c.choices[0].delta.content) > 700
    assert server.process.wait(timeout=30) == 0
    with pytest.raises(requests.ConnectionError):
        requests.get(server.base_url + "/health", timeout=5)
