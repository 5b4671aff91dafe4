"""End to end: the official openai SDK against a real gunicorn (-k gevent) serving demo models."""

from __future__ import annotations

import math
import threading
import time

import openai
import pytest
import requests

USER = [{"role": "user", "content": "Tell me about the river and the old town."}]


@pytest.fixture(scope="module")
def server(server_factory, demo_model, slow_model):
    # The endless model: every length is decided by max_tokens, never by chance.
    return server_factory(CHATGLM_MODEL=str(slow_model), MODEL_ALIASES="gpt-3.5-turbo=endless,local/glm=endless")


def test_models_list_and_retrieve(client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["endless", "gpt-3.5-turbo", "local/glm"]
    assert client.models.retrieve("local/glm").id == "local/glm"  # the SDK sends the / as %2F
    model = client.models.retrieve("endless")
    assert (model.id, model.object, model.owned_by) == ("endless", "model", "local")
    assert model.created > 1_600_000_000
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert err.value.code == "model_not_found"


def test_stream_headers_and_framing(server):
    r = requests.post(server.v1 + "/chat/completions", stream=True, timeout=30,
                      json={"model": "endless", "messages": USER, "max_tokens": 3, "stream": True})
    assert r.headers["Content-Type"] == "text/event-stream"
    assert r.headers["Cache-Control"] == "no-cache" and r.headers["X-Accel-Buffering"] == "no"
    assert "Content-Length" not in r.headers
    events = r.content.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    assert all(e.startswith(b"data: {") for e in events[:-2])


def test_tool_results_and_system_prompts_are_part_of_the_prompt(client):
    chat = [{"role": "system", "content": "You are terse."}, *USER,
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                                                                    "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    r = client.chat.completions.create(model="endless", messages=chat, max_tokens=2)
    assert r.usage.prompt_tokens > client.chat.completions.create(
        model="endless", messages=USER, max_tokens=1).usage.prompt_tokens + 5


def test_wrong_method_and_unknown_path_are_openai_errors(server):
    r = requests.get(server.v1 + "/chat/completions", timeout=10)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    r = requests.post(server.v1 + "/nothing", json={}, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


def test_stream_and_non_stream_agree_at_temperature_zero(client):
    full = client.chat.completions.create(model="endless", messages=USER, temperature=0, max_tokens=40)
    stream = client.chat.completions.create(model="endless", messages=USER, temperature=0, max_tokens=40,
                                            stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert full.choices[0].message.content == text
    assert len(full.choices[0].message.content) > 20
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    assert chunks[-1].choices[0].finish_reason == "length"
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert full.object == "chat.completion" and chunks[0].object == "chat.completion.chunk"


def test_max_tokens_gives_length_and_exact_counts(client):
    for n in (1, 7, 25):
        r = client.chat.completions.create(model="endless", messages=USER, temperature=0, max_tokens=n)
        assert r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == n
        assert r.usage.total_tokens == r.usage.prompt_tokens + n
    longer = USER + [{"role": "assistant", "content": "It is old."}, {"role": "user", "content": "More?"}]
    a = client.chat.completions.create(model="endless", messages=USER, max_tokens=1)
    b = client.chat.completions.create(model="endless", messages=longer, max_tokens=1)
    assert b.usage.prompt_tokens > a.usage.prompt_tokens
    c = client.chat.completions.create(model="endless", messages=USER, max_completion_tokens=3, max_tokens=9)
    assert c.usage.completion_tokens == 3  # max_completion_tokens wins, as at OpenAI


def test_include_usage_chunk(client):
    full = client.chat.completions.create(model="endless", messages=USER, temperature=0, max_tokens=12)
    chunks = list(client.chat.completions.create(model="endless", messages=USER, temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == []
    assert chunks[-1].usage.model_dump(exclude_none=True) == full.usage.model_dump(exclude_none=True)
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(client.chat.completions.create(model="endless", messages=USER, max_tokens=3, stream=True))
    assert all(c.choices for c in plain)  # no usage chunk unless asked for


def test_stop_string_cuts_the_text(client):
    reference = client.chat.completions.create(model="endless", messages=USER, temperature=0,
                                               max_tokens=60).choices[0].message.content
    stop = reference[20:23]
    expected = reference[:reference.index(stop)]
    r = client.chat.completions.create(model="endless", messages=USER, temperature=0, max_tokens=60, stop=stop)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (expected, "stop")
    assert r.usage.completion_tokens < 60
    chunks = list(client.chat.completions.create(model="endless", messages=USER, temperature=0, max_tokens=60,
                                                 stop=["\u2603never", stop], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_alias_answers_as_its_model(client):
    r = client.chat.completions.create(model="gpt-3.5-turbo", messages=USER, max_tokens=2)
    assert r.model == "endless"


@pytest.mark.parametrize("body, status, param", [
    ({"messages": USER}, 400, "model"),
    ({"model": "endless"}, 400, "messages"),
    ({"model": "endless", "messages": []}, 400, "messages"),
    ({"model": "endless", "messages": "hi"}, 400, "messages"),
    ({"model": "endless", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ({"model": "endless", "messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ({"model": "endless", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"model": "endless", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content[0].type"),
    ({"model": "endless", "messages": USER, "temperature": "hot"}, 400, "temperature"),
    ({"model": "endless", "messages": USER, "temperature": 2.5}, 400, "temperature"),
    ({"model": "endless", "messages": USER, "top_p": -0.1}, 400, "top_p"),
    ({"model": "endless", "messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "endless", "messages": USER, "max_tokens": True}, 400, "max_tokens"),
    ({"model": "endless", "messages": USER, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "endless", "messages": USER, "stream": "yes"}, 400, "stream"),
    ({"model": "endless", "messages": USER, "n": 0}, 400, "n"),
    ({"model": "endless", "messages": USER, "top_logprobs": 3}, 400, "top_logprobs"),  # needs logprobs
    ({"model": "endless", "messages": USER, "logit_bias": {"1000000": 5}}, 400, "logit_bias"),  # not an id of its
    ({"model": "endless", "messages": USER, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "strict": True, "schema": {"type": "object", "unevaluatedProperties": False}}}}, 400,
     "response_format"),  # a keyword the grammar cannot enforce, asked strictly
    ({"model": "no-such-model", "messages": USER}, 404, "model"),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    r = requests.post(server.v1 + "/chat/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


@pytest.mark.parametrize("data", [b"{not json", b"", b"[1, 2]", b"\xff\xfe\x00", b"[" * 100_000])
def test_malformed_bodies_get_400(server, data):
    r = requests.post(server.v1 + "/chat/completions", data=data, timeout=30,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_oversized_body_gets_413(server):
    r = requests.post(server.v1 + "/chat/completions", data=b"x" * (5 * 1024 * 1024), timeout=30)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"


def test_ignored_fields_are_accepted(client):
    # Zero penalties and a null seed ask for nothing, so a model without those controls takes them too.
    r = client.chat.completions.create(model="endless", messages=[{"role": "developer", "content": "Be brief."}] + USER,
                                       max_tokens=2, seed=None, user="u1", presence_penalty=0,
                                       frequency_penalty=0.0, parallel_tool_calls=False, n=1, logprobs=False,
                                       extra_body={"some_vendor_field": {"x": 1}, "logit_bias": {}})
    assert r.usage.completion_tokens == 2


def test_prompt_longer_than_context_is_400(client):
    huge = [{"role": "user", "content": "word " * 3000}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="endless", messages=huge, max_tokens=5)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="endless", messages=huge, max_tokens=5, stream=True)


def test_generation_never_runs_past_the_context(client):
    # About 1,000 prompt tokens in a 1,024 context: max_tokens is clamped to the room left.
    prompt = [{"role": "user", "content": "river town " * 330}]
    r = client.chat.completions.create(model="endless", messages=prompt, max_tokens=500)
    assert r.usage.total_tokens == 1024
    assert r.choices[0].finish_reason == "length"


def test_models_answer_while_a_long_generation_runs(server, client):
    stream = client.chat.completions.create(model="endless", messages=USER, max_tokens=900, stream=True)
    first = next(iter(stream))
    assert first.choices[0].delta.role == "assistant"
    started = time.monotonic()
    r = requests.get(server.v1 + "/models", timeout=5)
    health = requests.get(server.base_url + "/health", timeout=5)
    elapsed = time.monotonic() - started
    rest = list(stream)  # the generation was still running: it still had chunks to send
    assert r.status_code == 200 and health.status_code == 200
    assert elapsed < 1.0
    assert len(rest) > 100 and rest[-1].choices[0].finish_reason == "length"


def test_waiting_requests_do_not_block_the_worker(server, client):
    """While one request generates and another waits for the slot in the same worker, that
    worker still answers other requests."""
    from backends.chatglm.engine.client import EngineClient

    engine = EngineClient(server.engine_socket, None, 0)

    def in_line() -> int:
        status = engine.status()
        return status["running"] + status["waiting"]

    stream = client.chat.completions.create(model="endless", messages=USER, max_tokens=900, stream=True)
    next(iter(stream))
    waiter = threading.Thread(target=client.chat.completions.create,
                              kwargs=dict(model="endless", messages=USER, max_tokens=1))
    waiter.start()
    while in_line() < 2:  # the second request has joined the line
        assert waiter.is_alive()
    started = time.monotonic()
    assert requests.get(server.v1 + "/models", timeout=5).status_code == 200
    assert time.monotonic() - started < 1.0
    assert in_line() == 2  # both were still there while /v1/models answered
    stream.close()
    waiter.join()


def test_disconnect_mid_stream_frees_the_model(server, client):
    t0 = time.monotonic()
    client.chat.completions.create(model="endless", messages=USER, max_tokens=800)
    whole = time.monotonic() - t0

    with requests.post(server.v1 + "/chat/completions", stream=True, timeout=30,
                       json={"model": "endless", "messages": USER, "max_tokens": 800, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith(b"data: ")
    # The socket is closed: the worker notices at its next write and must stop generating.
    t1 = time.monotonic()
    r = client.chat.completions.create(model="endless", messages=USER, max_tokens=5)
    assert r.usage.completion_tokens == 5
    assert time.monotonic() - t1 < whole / 2, "the abandoned generation kept the model busy"


def test_concurrent_streams_get_uncorrupted_text(client):
    prompts = [[{"role": "user", "content": "The train leaves the station."}],
               [{"role": "user", "content": "你好，今天天气很好。"}]]
    alone = [client.chat.completions.create(model="endless", messages=p, temperature=0, max_tokens=150)
             .choices[0].message.content for p in prompts]
    assert alone[0] != alone[1]
    results: list[str | None] = [None, None]

    def run(i: int) -> None:
        chunks = client.chat.completions.create(model="endless", messages=prompts[i], temperature=0,
                                                max_tokens=150, stream=True)
        results[i] = "".join(c.choices[0].delta.content or "" for c in chunks)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone


@pytest.mark.parametrize("stream", [False, True])
def test_n_choices_with_logprobs_and_a_seed_on_the_local_model(client, stream):
    """Three choices, each its own answer (a seed per choice), usage counting the prompt once; each token's
    logprob with its top alternatives, best first, their probabilities summing to at most 1."""
    asked = dict(model="endless", messages=USER, max_tokens=6, n=3, seed=7, temperature=1.0, logprobs=True,
                 top_logprobs=3)
    if stream:
        chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **asked))
        texts, entries, usage = ["", "", ""], [[], [], []], chunks[-1].usage
        for chunk in chunks:
            for c in chunk.choices:
                texts[c.index] += c.delta.content or ""
                entries[c.index] += c.logprobs.content if c.logprobs and c.logprobs.content else []
    else:
        whole = client.chat.completions.create(**asked)
        assert [c.index for c in whole.choices] == [0, 1, 2]
        texts = [c.message.content for c in whole.choices]
        entries = [c.logprobs.content for c in whole.choices]
        usage = whole.usage
    assert usage.completion_tokens == 18 and usage.total_tokens == usage.prompt_tokens + 18
    assert len(set(texts)) == 3  # three draws, not one answer thrice
    again = client.chat.completions.create(**{**asked, "logprobs": False, "top_logprobs": None})
    assert [c.message.content for c in again.choices] == texts  # the seed: the same answers again
    for text, tokens in zip(texts, entries):
        assert b"".join(bytes(t.bytes) for t in tokens).decode() == text and len(tokens) == 6
        for t in tokens:
            best = [top.logprob for top in t.top_logprobs]
            assert len(best) == 3 and best == sorted(best, reverse=True) and t.logprob <= best[0] <= 0
            assert sum(math.exp(lp) for lp in best) <= 1 + 1e-6
