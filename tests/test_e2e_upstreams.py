"""OpenAI-compatible upstreams (UPSTREAMS_FILE) against a fake upstream's faults and quirks, through a
real gunicorn: pass-through fields, normalised streams, failover, health, errors, limits, reload."""

from __future__ import annotations

import json
import re
import signal
import time

import openai
import pytest
import requests

from tests.conftest import peak_rise, start_server
from tests.fake_http import MB
from tests.fake_upstream import KEY, FakeUpstream, chat_prompt_tokens

USER = [{"role": "user", "content": "hello there"}]
ALL = {"Authorization": "Bearer sk-all"}
NARROW = {"Authorization": "Bearer sk-narrow"}
KEYS = """
[keys.all]
key = "sk-all"

[keys.narrow]
key = "sk-narrow"
models = ["gpt-4o"]
tokens_per_minute = 60
"""


def upstreams_toml(faults: FakeUpstream, a: FakeUpstream, b: FakeUpstream, found: FakeUpstream, extra: str = "") -> str:
    return f"""
[upstreams.faults]
base_url = "{faults.base}"
api_key = "{KEY}"
models = {json.dumps(faults.models)}
timeout = 1.5
cooldown = 0.3

[upstreams.a]
base_url = "{a.base}"
api_key_env = "POOL_KEY"
models = ["pooled"]
cooldown = 0.5

[upstreams.b]
base_url = "{b.base}/"
api_key_env = "POOL_KEY"
models = ["pooled"]
cooldown = 0.5

[upstreams.found]
base_url = "{found.base}"
refresh = 0.3
""" + extra


@pytest.fixture(scope="module")
def fakes():
    made = {"faults": FakeUpstream().start(), "a": FakeUpstream().start(), "b": FakeUpstream().start(),
            "found": FakeUpstream(models=["found-1"]).start()}
    yield made
    for fake in made.values():
        fake.stop()


@pytest.fixture(scope="module")
def elsewhere():
    """Where the redirecting fakes point: it should never hear from aigate."""
    fake = FakeUpstream(models=[]).start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory, fakes):
    tmp = tmp_path_factory.mktemp("upstreams")
    (tmp / "upstreams.toml").write_text(upstreams_toml(**fakes))
    (tmp / "keys.toml").write_text(KEYS)
    (tmp / "keys.toml").chmod(0o600)
    server = start_server(tmp, {"UPSTREAMS_FILE": str(tmp / "upstreams.toml"), "API_KEYS_FILE": str(tmp / "keys.toml"),
                                "POOL_KEY": KEY, "MODEL_ALIASES": "gpt-4o=fake-ok",
                                "MAX_TOKENS_CEILING": "fake-ok=50", "MODEL_FALLBACKS": "fake-500=fake-ok",
                                "GRACEFUL_TIMEOUT": "2"})
    server.tmp = tmp  # type: ignore[attr-defined]
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sdk(server):
    return openai.OpenAI(base_url=server.v1, api_key="sk-all", max_retries=0)


def post(server, body, headers=ALL, stream=False, timeout=20):
    return requests.post(server.v1 + "/chat/completions", json=body, headers=headers, stream=stream, timeout=timeout)


def sse(response) -> list:
    """The data of each event; [DONE] as the string."""
    out = []
    for line in response.iter_lines():
        if line.startswith(b"data: "):
            data = line[6:].decode()
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_models_listed_with_discovered_ones_and_aliases(server):
    ids = {m["id"] for m in requests.get(server.v1 + "/models", headers=ALL, timeout=10).json()["data"]}
    assert {"fake-ok", "fake-quirks", "pooled", "found-1", "gpt-4o"} <= ids
    narrow = [m["id"] for m in requests.get(server.v1 + "/models", headers=NARROW, timeout=10).json()["data"]]
    assert narrow == ["gpt-4o"]


def test_fields_are_passed_on_usage_asked_for_and_the_answer_is_aigates(server, fakes):
    r = post(server, {"model": "fake-ok", "messages": USER, "stream": True, "top_k": 5, "user": "u1",
                      "stream_options": {"include_usage": True}, "max_tokens": 40}, stream=True)
    assert r.status_code == 200, r.text
    events = sse(r)
    sent = fakes["faults"].posts()[-1]
    assert sent["body"]["top_k"] == 5 and sent["body"]["user"] == "u1" and sent["body"]["max_tokens"] == 40
    assert sent["body"]["stream_options"] == {"include_usage": True}
    assert sent["headers"]["Authorization"] == f"Bearer {KEY}"
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and all(c["model"] == "fake-ok" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == \
        "You said: hello there"
    assert chunks[-1]["usage"]["completion_tokens"] == 4  # the upstream's count, not an estimate
    assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 3


def test_quirks_are_normalised(server, fakes):
    r = post(server, {"model": "fake-quirks", "messages": USER, "stream": True,
                      "stream_options": {"include_usage": True}}, stream=True)
    events = sse(r)
    assert events[-1] == "[DONE]"  # the upstream sent none
    chunks = events[:-1]
    assert all(c["id"].startswith("chatcmpl-") and c["created"] > 0 and c["model"] == "fake-quirks" for c in chunks)
    assert not any("reasoning_content" in c["choices"][0]["delta"] for c in chunks if c["choices"])
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1]["usage"]["completion_tokens"] == 4  # the last of its running counts


def test_a_json_body_to_a_stream_request_streams(server):
    events = sse(post(server, {"model": "fake-json", "messages": USER, "stream": True}, stream=True))
    assert events[-1] == "[DONE]"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in events[:-1]) == "You said: hello there"


def test_tool_call_pieces_arrive_whole(sdk):
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    answer = sdk.chat.completions.create(model="fake-tools", messages=USER, tools=tools)
    call = answer.choices[0].message.tool_calls[0]
    assert (call.function.name, json.loads(call.function.arguments)) == ("weather", {"city": "Paris"})
    assert answer.choices[0].finish_reason == "tool_calls"


def test_completions_and_embeddings(server, sdk, fakes):
    text = sdk.completions.create(model="fake-ok", prompt="once upon", max_tokens=10)
    assert text.choices[0].text == "You said: once upon" and text.model == "fake-ok"
    streamed = "".join(c.choices[0].text for c in sdk.completions.create(model="fake-ok", prompt="a b", stream=True)
                       if c.choices)
    assert streamed == "You said: a b"
    vectors = sdk.embeddings.create(model="fake-ok", input=["one", "two"])
    assert len(vectors.data) == 2 and len(vectors.data[0].embedding) == 8 and vectors.usage.prompt_tokens > 0
    assert fakes["faults"].posts()[-1]["path"] == "/v1/embeddings"


@pytest.mark.parametrize("model, status, code", [("fake-429", 429, "upstream_rate_limited"),
                                                 ("fake-stall", 504, "upstream_timeout"),
                                                 ("fake-malformed", 502, "upstream_error")])
def test_a_failure_before_the_answer_is_an_openai_error(server, model, status, code):
    started = time.monotonic()
    r = post(server, {"model": model, "messages": USER, "stream": True})
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["type"] in ("server_error", "rate_limit_error")
    assert time.monotonic() - started < 10
    if status == 429:
        assert r.headers["Retry-After"] == "7"


def test_neither_key_nor_address_leaks(server, fakes):
    r = post(server, {"model": "fake-500", "messages": USER, "max_tokens": 10})
    assert r.status_code == 200 and r.json()["model"] == "fake-ok"  # MODEL_FALLBACKS after the pool failed
    alone = requests.post(server.v1 + "/completions", json={"model": "fake-500", "prompt": "x"}, headers=NARROW,
                          timeout=10)
    assert alone.status_code == 404  # the narrow key may not use it
    r = post(server, {"model": "fake-500", "messages": USER, "max_tokens": 10, "stream": True}, stream=True)
    assert r.status_code == 200
    time.sleep(0.5)
    log = "".join(server.log)
    assert "engine crashed at ***" in log and KEY not in log and fakes["faults"].base not in log


@pytest.mark.parametrize("model", ["fake-drop", "fake-truncated"])
def test_a_stream_broken_mid_answer_ends_with_an_error_event(server, model):
    events = sse(post(server, {"model": model, "messages": USER, "stream": True}, stream=True))
    said = "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                   if isinstance(e, dict) and e.get("choices"))
    assert said.startswith("You said:")  # the start of the answer, then its failure
    assert events[-2]["error"]["type"] == "server_error" and events[-1] == "[DONE]"


def test_an_endless_line_ends_the_stream_with_an_error_and_memory_stays_bounded(server):
    """Two words, then one line of 100 MB in one HTTP chunk: the client has the words, then the error event;
    the worker read 4 MiB of it at most."""
    events: list = []
    rise = peak_rise(server, lambda: events.extend(
        sse(post(server, {"model": "fake-hugeline", "messages": USER, "stream": True}, stream=True))))
    said = "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                   if isinstance(e, dict) and e.get("choices"))
    assert said == "You said:"
    assert events[-2]["error"]["type"] == "server_error" and events[-1] == "[DONE]"
    assert "larger than aigate reads (UPSTREAM_MAX_EVENT_BYTES: 4194304 bytes)" in events[-2]["error"]["message"]
    assert rise < 40 * MB, f"the worker's memory rose {rise / MB:.0f} MB"


@pytest.mark.parametrize("model, said", [("fake-hugebody", "(UPSTREAM_MAX_BODY_BYTES: 16777216 bytes)"),
                                         ("fake-hugeerror", "failed (HTTP 500)")])
def test_a_huge_answer_or_error_is_a_502_and_memory_stays_bounded(server, model, said):
    answers: list = []
    rise = peak_rise(server, lambda: answers.append(post(server, {"model": model, "messages": USER})))
    assert answers[0].status_code == 502 and answers[0].json()["error"]["code"] == "upstream_error"
    assert said in answers[0].json()["error"]["message"]
    assert rise < 40 * MB, f"the worker's memory rose {rise / MB:.0f} MB"


@pytest.mark.parametrize("status", [301, 307])
def test_a_redirect_is_an_upstream_error_never_followed(server, fakes, elsewhere, status):
    fakes["faults"].redirect_to = f"http://127.0.0.1:{elsewhere.port}"
    for stream in (False, True):
        r = post(server, {"model": f"fake-{status}", "messages": USER, "stream": stream})
        assert r.status_code == 502, r.text
        assert f"upstream faults answered with a redirect (HTTP {status})" in r.json()["error"]["message"]
    embeddings = requests.post(server.v1 + "/embeddings", json={"model": f"fake-{status}", "input": "hi"},
                               headers=ALL, timeout=10)
    assert embeddings.status_code == 502 and f"HTTP {status}" in embeddings.json()["error"]["message"]
    assert elsewhere.requests == []  # the prompt went nowhere else


def test_a_model_list_that_redirects_is_not_followed(server, fakes, elsewhere):
    found = fakes["found"]
    found.redirect_to = f"http://127.0.0.1:{elsewhere.port}"
    seen = len(found.requests)
    found.models_moved = True
    try:
        with found.changed:  # asked twice more, in the background
            assert found.changed.wait_for(lambda: len(found.requests) > seen + 1, 10)
    finally:
        found.models_moved = False
    server.wait_for_log("cannot read the models of upstream found (upstream found answered with a redirect (HTTP 307)")
    assert elsewhere.requests == []
    ids = {m["id"] for m in requests.get(server.v1 + "/models", headers=ALL, timeout=10).json()["data"]}
    assert "found-1" in ids  # its last list keeps serving


def test_usage_estimated_for_a_stream_without_any_counts_the_chat_template(server, fakes):
    """fake-bare streams without usage (as chatglm.cpp's server does): aigate's estimate comes within a token of
    what the server counts for the same request answered whole, template and tools included."""
    tools = [{"type": "function", "function": {"name": "weather", "description": "The weather in a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is the weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "name": "weather", "content": "18C and sunny"},
                {"role": "user", "content": "hello there"}]
    whole = post(server, {"model": "fake-bare", "messages": messages, "tools": tools}).json()["usage"]["prompt_tokens"]
    assert whole == chat_prompt_tokens(fakes["faults"].posts()[-1]["body"])  # the server's own count
    chunks = sse(post(server, {"model": "fake-bare", "messages": messages, "tools": tools, "stream": True,
                               "stream_options": {"include_usage": True}}, stream=True))
    estimated = chunks[-2]["usage"]["prompt_tokens"]
    assert abs(estimated - whole) <= 1, (estimated, whole)
    server.wait_for_log("usage estimated (upstream faults sent none)")


def test_the_pool_spreads_and_fails_over(server, fakes):
    a, b = fakes["a"], fakes["b"]
    before = len(a.posts()), len(b.posts())
    for _ in range(6):
        assert post(server, {"model": "pooled", "messages": USER}).status_code == 200
    assert (len(a.posts()) - before[0], len(b.posts()) - before[1]) == (3, 3)
    a.mode = "500"
    try:
        for _ in range(6):
            r = post(server, {"model": "pooled", "messages": USER, "stream": True}, stream=True)
            assert r.status_code == 200 and sse(r)[-1] == "[DONE]"
        ready = requests.get(server.base_url + "/ready", timeout=10).json()
        assert ready["upstreams"]["a"]["errors"] >= 1 and ready["upstreams"]["b"]["state"] == "up"
        assert ready["upstreams"]["a"]["state"] in ("cooling down", "retrying")
        metrics = requests.get(server.base_url + "/metrics", timeout=10).text
        assert re.search(r'aigate_upstream_requests_total\{outcome="error",upstream="a"\} [1-9]', metrics), metrics
        assert 'aigate_upstream_first_event_seconds_count{upstream="b"}' in metrics
        assert 'aigate_upstream_up{upstream="a"} 0.0' in metrics
    finally:
        a.mode = None
    time.sleep(1.2)  # past a's cool-down: tried again, and back in service
    for _ in range(4):
        assert post(server, {"model": "pooled", "messages": USER}).status_code == 200
    assert requests.get(server.base_url + "/ready", timeout=10).json()["upstreams"]["a"]["state"] == "up"


def test_aliases_keys_and_limits_hold(server):
    r = post(server, {"model": "gpt-4o", "messages": USER, "max_tokens": 10}, headers=NARROW)
    assert r.status_code == 200 and r.json()["model"] == "fake-ok"
    assert post(server, {"model": "fake-ok", "messages": USER}, headers=NARROW).status_code == 404
    too_many = post(server, {"model": "fake-ok", "messages": USER, "max_tokens": 51})
    assert too_many.status_code == 400 and too_many.json()["error"]["code"] == "max_tokens_too_large"
    for _ in range(4):  # 60 tokens a minute: spent within a few calls
        last = post(server, {"model": "gpt-4o", "messages": USER, "max_tokens": 10}, headers=NARROW)
    assert last.status_code == 429 and "tokens per minute" in last.json()["error"]["message"]


def test_discovered_models_are_kept_while_the_upstream_is_down_and_reload(server, fakes):
    found = fakes["found"]
    found.models_down = True
    seen = len(found.requests)
    with found.changed:
        assert found.changed.wait_for(lambda: len(found.requests) > seen + 1, 10)  # asked again, in the background
    ids = {m["id"] for m in requests.get(server.v1 + "/models", headers=ALL, timeout=10).json()["data"]}
    assert "found-1" in ids
    found.models_down = False

    path = server.tmp / "upstreams.toml"
    good = path.read_text()
    path.write_text(good + '\n[upstreams.bad]\nbase_url = "ftp://nowhere"\n')
    server.process.send_signal(signal.SIGHUP)
    server.wait_for_log("still serving the previous configuration: UPSTREAMS_FILE: [upstreams.bad]: base_url")
    with server.changed:  # the new worker up and the old one gone before the next reload
        assert server.changed.wait_for(lambda: sum("aigate ready" in line for line in server.log) >= 2, 30)
    server.wait_for_log("Worker exiting", timeout=30)
    path.write_text(good + f'\n[upstreams.more]\nbase_url = "{fakes["b"].base}"\nmodels = ["added"]\n')
    server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if post(server, {"model": "added", "messages": USER}).status_code == 200:
            break
        time.sleep(0.3)
    else:
        pytest.fail("the reloaded upstream never served:\n"
                    + "".join(line for line in server.log if "request id" not in line))
