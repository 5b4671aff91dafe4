"""End to end: the openai SDK -> gunicorn (-k gevent) -> the Cloudflare backend -> a fake Cloudflare."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta

import openai
import pytest
import requests

from config.settings import DEFAULT_CLOUDFLARE_EMBEDDING_MODELS, load_settings
from tests.conftest import peak_rise
from tests.fake_cloudflare import (
    ACCOUNT,
    BOUND_MODES,
    MODES,
    TEXT_MODELS,
    TOKEN,
    FakeCloudflare,
    reply_words,
    usage_for,
)
from tests.fake_cloudflare import cloudflare_env as shared_env
from tests.fake_http import MB

HELLO = [{"role": "user", "content": "hello there friend"}]


def cloudflare_env(fake: FakeCloudflare, **extra: str) -> dict[str, str]:
    defaults = {"CLOUDFLARE_MODELS": ",".join(f"@cf/fake/{m}" for m in MODES + BOUND_MODES),
                "CLOUDFLARE_TIMEOUT": "2,1",
                "CLOUDFLARE_RETRIES": "1"}
    return shared_env(fake, **{**defaults, **extra})


@pytest.fixture(scope="module")
def server(server_factory, fake):
    return server_factory(**cloudflare_env(fake, MODEL_ALIASES="gpt-4o-mini=@cf/fake/chat"))


def text_of(chunks) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_models_are_the_configured_cloudflare_ones(client):
    models = client.models.list().data
    assert [m.id for m in models][:len(MODES)] == [f"@cf/fake/{m}" for m in MODES]
    assert {m.owned_by for m in models} == {"cloudflare"}  # no demo model once Cloudflare is configured
    assert client.models.retrieve("@cf/fake/chat").id == "@cf/fake/chat"


def test_request_mapping(client, fake):
    client.chat.completions.create(
        model="@cf/fake/chat", max_tokens=50, temperature=0.3, top_p=0.9, seed=7, presence_penalty=-1,
        frequency_penalty=0.5,
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "you"}]},
                  {"role": "assistant", "content": "Hello."}, {"role": "tool", "content": "42", "tool_call_id": "c"}])
    sent = fake.runs("@cf/fake/chat")[-1]
    assert sent.path == f"/client/v4/accounts/{ACCOUNT}/ai/run/@cf/fake/chat"
    assert sent.headers["Authorization"] == f"Bearer {TOKEN}"
    assert sent.headers["Content-Type"] == "application/json"
    assert sent.body == {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi you"},
                     {"role": "assistant", "content": "Hello."},
                     {"role": "tool", "content": "42", "tool_call_id": "c"}],
        "stream": False, "max_tokens": 50, "temperature": 0.3, "top_p": 0.9, "seed": 7,
        "frequency_penalty": 0.5, "presence_penalty": 0.0}
    client.chat.completions.create(model="@cf/fake/chat", messages=HELLO)
    assert fake.runs("@cf/fake/chat")[-1].body["max_tokens"] == 2048  # never Cloudflare's default of 256


def test_non_stream_content_and_usage(client):
    r = client.chat.completions.create(model="@cf/fake/chat", messages=HELLO)
    assert r.choices[0].message.content == "You said: hello there friend"
    assert r.choices[0].finish_reason == "stop"
    expected = usage_for({"messages": HELLO}, 5)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == tuple(expected.values())
    assert r.model == "@cf/fake/chat"


@pytest.mark.parametrize("mode", ["chat", "openai", "json", "split"])
def test_stream_content_and_usage(client, mode):
    chunks = list(client.chat.completions.create(model=f"@cf/fake/{mode}", messages=HELLO, stream=True,
                                                 stream_options={"include_usage": True}))
    assert text_of(chunks) == "You said: hello there friend"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens == 5
    assert chunks[-1].usage.prompt_tokens == usage_for({"messages": HELLO}, 5)["prompt_tokens"]


def test_an_object_response_comes_back_as_json_text(client):
    r = client.chat.completions.create(model="@cf/fake/jsonobj", messages=HELLO)
    assert json.loads(r.choices[0].message.content) == {"said": "You said: hello there friend"}
    assert r.usage.completion_tokens == 7


def test_stream_is_token_by_token(client, fake):
    """The slow fake sends 20 frames 50 ms apart: the first reaches the client long before the last."""
    started = time.monotonic()
    arrivals = []
    for chunk in client.chat.completions.create(model="@cf/fake/slow", messages=HELLO, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - started)
    assert len(arrivals) == 20
    assert arrivals[0] < arrivals[-1] / 4


def test_max_tokens_reached_is_length(client):
    r = client.chat.completions.create(model="@cf/fake/chat", messages=HELLO, max_tokens=2)
    assert r.choices[0].message.content == "You said:"
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("length", 2)


def test_stop_is_applied(client):
    r = client.chat.completions.create(model="@cf/fake/chat", messages=HELLO, stop=" there")
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("You said: hello", "stop")
    chunks = list(client.chat.completions.create(model="@cf/fake/chat", messages=HELLO, stop=["fri"], stream=True))
    assert text_of(chunks) == "You said: hello there "


def test_alias_reaches_the_cloudflare_model(client, fake):
    r = client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert r.model == "@cf/fake/chat"
    assert fake.requests[-1].path.endswith("/ai/run/@cf/fake/chat")


@pytest.mark.parametrize("mode, status, code", [
    ("429", 429, "upstream_capacity"),
    ("4006", 429, "upstream_quota_exceeded"),
    ("5006", 400, "upstream_bad_request"),
    ("5007", 404, "model_not_found"),
    ("3006", 400, "context_length_exceeded"),
    ("500", 502, "upstream_error"),
    ("unauthorized", 502, "upstream_auth_failed"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_upstream_errors_map_to_openai_errors(server, fake, mode, status, code, stream):
    before = len(fake.runs(f"@cf/fake/{mode}"))
    r = requests.post(server.v1 + "/chat/completions", timeout=30,
                      json={"model": f"@cf/fake/{mode}", "messages": HELLO, "stream": stream})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["message"]
    assert TOKEN not in r.text and ACCOUNT not in r.text
    attempts = len(fake.runs(f"@cf/fake/{mode}")) - before
    if mode in ("429", "500"):
        assert attempts == 2  # retried once (CLOUDFLARE_RETRIES=1), then given up
        assert "Retry-After" in r.headers or mode == "500"
    else:
        assert attempts == 1  # not worth a retry
    if mode == "4006":  # the free allocation resets at 00:00 UTC
        now = datetime.now(UTC)
        midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
        assert abs(int(r.headers["Retry-After"]) - (midnight - now).total_seconds()) < 5
    if mode == "5006":
        assert "Bad input" in error["message"]
    if mode == "unauthorized":
        assert "CLOUDFLARE_API_TOKEN" in error["message"] and r.headers["x-should-retry"] == "false"


def test_a_transient_failure_is_retried(client, fake):
    before = len(fake.runs("@cf/fake/flaky"))
    r = client.chat.completions.create(model="@cf/fake/flaky", messages=HELLO)
    assert r.choices[0].message.content == "You said: hello there friend"
    assert len(fake.runs("@cf/fake/flaky")) - before == 2


@pytest.mark.parametrize("mode, words", [("drop", "broke"), ("stall", "read timeout"), ("malformed", "malformed"),
                                         ("nodone", "truncated")])
def test_failures_after_the_stream_began_go_in_band(client, server, mode, words):
    stream = client.chat.completions.create(model=f"@cf/fake/{mode}", messages=HELLO, stream=True)
    received = []
    with pytest.raises(openai.APIError) as err:
        for chunk in stream:
            received.append(chunk)
    assert words in err.value.message
    assert text_of(received).startswith("You said:")
    raw = requests.post(server.v1 + "/chat/completions", timeout=30,
                        json={"model": f"@cf/fake/{mode}", "messages": HELLO, "stream": True}).text
    assert raw.endswith('"}}\n\ndata: [DONE]\n\n') and TOKEN not in raw


@pytest.mark.parametrize("mode, status", [("drop", 502), ("stall", 504), ("malformed", 502), ("nodone", 502)])
def test_failures_of_a_non_stream_request_are_statuses(server, mode, status):
    r = requests.post(server.v1 + "/chat/completions", timeout=30,
                      json={"model": f"@cf/fake/{mode}", "messages": HELLO})
    assert r.status_code == status and r.json()["error"]["type"] == "server_error"


def test_an_endless_line_or_body_fails_and_memory_stays_bounded(server):
    events: list[bytes] = []
    rise = peak_rise(server, lambda: events.extend(requests.post(
        server.v1 + "/chat/completions", timeout=30, stream=True,
        json={"model": "@cf/fake/hugeline", "messages": HELLO, "stream": True}).iter_lines()))
    events = [e for e in events if e]
    chunks = [json.loads(e[6:]) for e in events if e.startswith(b"data: {")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices")) == "You said:"
    assert ("(UPSTREAM_MAX_EVENT_BYTES: 4194304 bytes)" in chunks[-1]["error"]["message"]
            and events[-1] == b"data: [DONE]")
    assert rise < 40 * MB, f"the worker's memory rose {rise / MB:.0f} MB"

    answers: list[requests.Response] = []
    rise = peak_rise(server, lambda: answers.append(requests.post(
        server.v1 + "/chat/completions", timeout=30, json={"model": "@cf/fake/hugebody", "messages": HELLO})))
    assert answers[0].status_code == 502
    assert "(UPSTREAM_MAX_BODY_BYTES: 16777216 bytes)" in answers[0].json()["error"]["message"]
    assert rise < 40 * MB, f"the worker's memory rose {rise / MB:.0f} MB"


@pytest.mark.parametrize("status", [301, 307])
def test_a_redirect_is_an_upstream_error_never_followed(server, fake, status):
    elsewhere = FakeCloudflare().start()
    fake.redirect_to = f"http://127.0.0.1:{elsewhere.port}"
    try:
        for stream in (False, True):
            r = requests.post(server.v1 + "/chat/completions", timeout=30,
                              json={"model": f"@cf/fake/{status}", "messages": HELLO, "stream": stream})
            assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_error"
            assert f"Cloudflare Workers AI answered with a redirect (HTTP {status})" in r.json()["error"]["message"]
        assert len(fake.runs(f"@cf/fake/{status}")) == 2  # not retried either
        assert elsewhere.requests == []
    finally:
        elsewhere.stop()


def test_client_disconnect_closes_the_upstream(server, fake):
    with requests.post(server.v1 + "/chat/completions", stream=True, timeout=30,
                       json={"model": "@cf/fake/slow", "messages": HELLO, "stream": True}) as r:
        lines = r.iter_lines()
        while b"You" not in next(lines):
            pass
    finished_before = fake.finished.count("@cf/fake/slow")
    assert fake.wait_for(lambda: "@cf/fake/slow" in fake.aborted), "the upstream stream was not closed"
    assert fake.finished.count("@cf/fake/slow") == finished_before


def test_many_concurrent_streams_in_one_worker(server):
    """100 one-second streams at once through one gevent worker: all complete, in parallel."""
    client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=60)
    results: list[str] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(text_of(client.chat.completions.create(model="@cf/fake/slow", messages=HELLO,
                                                                  stream=True)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    started = time.monotonic()
    threads = [threading.Thread(target=run) for _ in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    assert errors == []
    expected = "".join((reply_words({"messages": HELLO, "max_tokens": 2048}) * 20)[:20])
    assert results == [expected] * 100
    assert elapsed < 20, f"100 streams of 1 s took {elapsed:.1f}s: they did not run concurrently"


def test_bad_account_and_unreachable_upstream(server_factory, fake):
    wrong = server_factory(**cloudflare_env(fake, CLOUDFLARE_ACCOUNT_ID="wrong-account-id-42"))
    r = requests.post(wrong.v1 + "/chat/completions", json={"model": "@cf/fake/chat", "messages": HELLO}, timeout=30)
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_auth_failed"
    assert "wrong-account-id-42" not in r.text and TOKEN not in r.text

    with socket_closed_port() as port:
        down = server_factory(**cloudflare_env(fake, CLOUDFLARE_API_BASE=f"http://127.0.0.1:{port}/client/v4"))
        r = requests.post(down.v1 + "/chat/completions", json={"model": "@cf/fake/chat", "messages": HELLO},
                          timeout=30)
    assert r.status_code == 502 and "cannot reach" in r.json()["error"]["message"]


def test_models_auto_discovery_and_local_beside_cloudflare(server_factory, fake, demo_model):
    server = server_factory(**cloudflare_env(fake, CLOUDFLARE_MODELS="auto", CHATGLM_MODEL=str(demo_model),
                                             MODEL_ALIASES="gpt-4o=@cf/fake/openai"))
    models = {m["id"]: m["owned_by"] for m in requests.get(server.v1 + "/models", timeout=30).json()["data"]}
    media = (m for m, _ in load_settings({}, None).cloudflare_media_models)  # reranking, audio, images
    embedding = (*DEFAULT_CLOUDFLARE_EMBEDDING_MODELS, *media)
    assert models == {"demo": "local", **{m: "cloudflare" for m in (*TEXT_MODELS, *embedding)}, "gpt-4o": "cloudflare"}
    client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0)
    assert client.chat.completions.create(model="gpt-4o", messages=HELLO).choices[0].message.content.startswith("You")
    assert client.chat.completions.create(model="demo", messages=HELLO, max_tokens=2).usage.completion_tokens <= 2


class socket_closed_port:
    """A loopback port with nothing listening on it."""

    def __enter__(self) -> int:
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        return self.port

    def __exit__(self, *exc: object) -> None:
        pass
