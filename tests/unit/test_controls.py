"""The sampling controls on the wire (issue 26): n, logprobs / top_logprobs, seed, logit_bias and the
penalties read from chat, completions and Responses bodies, honoured by a model that declares them
(tests/fake_backend.py's fake-controls) and refused with a 400 naming that model on one that does not
(fake-echo); the answers in OpenAI's shapes, read by the official SDK and by compat/answers.py's
declarations."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from backends.base import ModelInfo
from compat import answers
from compat.requests import parse_chat, parse_completion
from compat.responses_api import parse_responses
from tests.fake_backend import CONTROLS, MODELS, fake_app

USER = [{"role": "user", "content": "héllo there"}]
CHAT = {"model": "fake-controls", "messages": USER}


@pytest.fixture
def sdk(app_and_backend):
    """The official SDK, over the app in-process (no socket)."""
    transport = httpx.WSGITransport(app=app_and_backend[0])
    return openai.OpenAI(base_url="http://aigate/v1", api_key="unused", max_retries=0,
                         http_client=httpx.Client(transport=transport))


def holds(obj: Any, declaration: Any) -> None:
    import msgspec

    msgspec.convert(json.loads(json.dumps(obj)), declaration, strict=True)


def frames(response: Any) -> list[Any]:
    return [json.loads(line[6:]) for line in response.get_data(as_text=True).split("\n")
            if line.startswith("data: ") and line != "data: [DONE]"]


# -- reading ------------------------------------------------------------------------------------------------

def test_the_controls_are_read_into_the_request():
    request = parse_chat({**CHAT, "n": 3, "logprobs": True, "top_logprobs": 2, "seed": 7,
                          "logit_bias": {"50256": -100, "12": 2.5}, "presence_penalty": 0.5,
                          "tools": [{"type": "function", "function": {"name": "f", "parameters": {}, "strict": True}}],
                          "response_format": {"type": "json_schema",
                                              "json_schema": {"name": "x", "schema": {}, "strict": True}}}).request
    assert (request.n, request.logprobs, request.top_logprobs, request.seed) == (3, True, 2, 7)
    assert request.logit_bias == ((12, 2.5), (50256, -100.0)) and request.presence_penalty == 0.5
    assert request.tools[0].strict and request.response_format is not None and request.response_format.strict
    plain = parse_chat(CHAT).request
    assert (plain.n, plain.logprobs, plain.top_logprobs, plain.logit_bias) == (1, False, 0, ())
    assert not parse_chat({**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}).request.tools[0].strict

    legacy = parse_completion({"model": "m", "prompt": ["a", "b"], "n": 2, "best_of": 2, "logprobs": 3})
    assert [(r.n, r.logprobs, r.top_logprobs) for r in legacy.requests] == [(2, True, 3)] * 2
    assert parse_completion({"model": "m", "prompt": "a", "logprobs": 0}).requests[0].logprobs

    responses = parse_responses({"model": "m", "input": "hi", "include": ["message.output_text.logprobs"],
                                 "top_logprobs": 4, "tools": [{"type": "function", "name": "f", "strict": True}],
                                 "text": {"format": {"type": "json_schema", "name": "x", "schema": {},
                                                     "strict": True}}}).request
    assert responses.logprobs and responses.top_logprobs == 4 and responses.tools[0].strict
    assert responses.response_format is not None and responses.response_format.strict
    assert not parse_responses({"model": "m", "input": "hi", "include": ["reasoning.encrypted_content"]}
                               ).request.logprobs


@pytest.mark.parametrize(("path", "body", "param", "code"), [
    ("chat", {"n": 129}, "n", "invalid_value"),
    ("chat", {"n": 0}, "n", "invalid_value"),
    ("chat", {"top_logprobs": 21, "logprobs": True}, "top_logprobs", "invalid_value"),
    ("chat", {"top_logprobs": 2}, "top_logprobs", "invalid_value"),  # needs logprobs
    ("chat", {"logit_bias": {"a": 1}}, "logit_bias", "invalid_value"),
    ("chat", {"logit_bias": {"1": 101}}, "logit_bias", "invalid_value"),
    ("chat", {"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "invalid_value"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "strict": "yes"}}]},
     "tools[0].function.strict", "invalid_type"),
    ("completions", {"logprobs": 6}, "logprobs", "invalid_value"),
    ("completions", {"logprobs": 1, "echo": True}, "logprobs", "unsupported_value"),
    ("completions", {"n": 2, "best_of": 3}, "best_of", "unsupported_value"),
    ("completions", {"best_of": 2}, "best_of", "unsupported_value"),
    ("responses", {"top_logprobs": 21}, "top_logprobs", "invalid_value"),
    ("responses", {"text": {"format": {"type": "json_schema", "schema": {}, "strict": 1}}}, "text.format.strict",
     "invalid_type"),
    ("responses", {"tools": [{"type": "function", "name": "f", "strict": "no"}]}, "tools[0].strict", "invalid_type"),
])
def test_bad_controls_are_a_400_naming_the_field(client, path, body, param, code):
    base = {"chat": CHAT, "completions": {"model": "fake-controls", "prompt": "hi"},
            "responses": {"model": "fake-controls", "input": "hi"}}[path]
    r = client.post(f"/v1/{path.replace('chat', 'chat/completions')}", json={**base, **body})
    assert r.status_code == 400, r.json
    assert (r.json["error"]["param"], r.json["error"]["code"]) == (param, code), r.json


# -- refusals by capability -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "body", "param", "code"), [
    ("chat", {"logprobs": True}, "logprobs", "unsupported_parameter"),
    ("chat", {"seed": 0}, "seed", "unsupported_parameter"),
    ("chat", {"logit_bias": {"1": 5}}, "logit_bias", "unsupported_parameter"),
    ("chat", {"n": 2}, "n", "unsupported_value"),
    ("chat", {"presence_penalty": 0, "frequency_penalty": -0.5}, "frequency_penalty", "unsupported_parameter"),
    ("completions", {"logprobs": 0}, "logprobs", "unsupported_parameter"),
    ("completions", {"n": 3, "best_of": 3}, "n", "unsupported_value"),
    ("responses", {"include": ["message.output_text.logprobs"]}, "include", "unsupported_parameter"),
    ("responses", {"top_logprobs": 3}, "top_logprobs", "unsupported_parameter"),
])
def test_a_control_the_model_lacks_is_refused_naming_those_that_have_it(client, path, body, param, code):
    base = {"chat": {"messages": USER}, "completions": {"prompt": "hi"}, "responses": {"input": "hi"}}[path]
    r = client.post(f"/v1/{path.replace('chat', 'chat/completions')}",
                    json={"model": "fake-echo", **base, **body})
    assert r.status_code == 400, r.json
    error = r.json["error"]
    assert (error["param"], error["code"]) == (param, code)
    assert "'fake-echo'" in error["message"] and "support it: fake-controls." in error["message"]
    holds(r.json, answers.ErrorResponse)


def test_zeros_nulls_and_hints_ask_for_nothing(app_and_backend):
    app, backend = app_and_backend
    r = app.test_client().post("/v1/chat/completions", json={
        "model": "fake-echo", "messages": USER, "n": 1, "logprobs": False, "top_logprobs": 0, "seed": None,
        "logit_bias": {}, "presence_penalty": 0, "frequency_penalty": 0.0,
        "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"})
    assert r.status_code == 200, r.json
    assert r.json["choices"][0]["logprobs"] is None
    assert backend.requests[-1].tool_choice == "required"  # a hint where not enforced: passed, never refused


def test_a_fallback_must_have_the_control_too(tmp_path):
    app, backend = fake_app(tmp_path, model_fallbacks=(("fake-busy", "fake-echo"), ("fake-busy", "fake-controls")))
    # fake-busy honours everything but is always full: the request falls back past fake-echo, which lacks n.
    backend.models = lambda: [ModelInfo(m, "test", controls=CONTROLS if m != "fake-echo" else frozenset())  # type: ignore[method-assign]
                              for m in MODELS]
    r = app.test_client().post("/v1/chat/completions", json={"model": "fake-busy", "messages": USER, "n": 2})
    assert r.status_code == 200, r.json
    assert r.json["model"] == "fake-controls" and len(r.json["choices"]) == 2
    plain = app.test_client().post("/v1/chat/completions", json={"model": "fake-busy", "messages": USER})
    assert plain.json["model"] == "fake-echo"  # nothing asked: the first fallback, as before


def test_a_request_for_n_choices_reserves_n_answers(tmp_path):
    from backends.base import ChatRequest, Message
    from backends.registry import Route
    from web.generation import most_tokens

    info = ModelInfo("m", "x", open_ended_tokens=512, shared_context=True)
    request = ChatRequest(model="m", messages=(Message("user", "x" * 400),), max_tokens=50)
    route = Route(object(), "m", info)  # type: ignore[arg-type]
    prompt = request.estimated_prompt_tokens
    assert most_tokens(route, request) == prompt + 50
    assert most_tokens(route, ChatRequest(**{**request.__dict__, "n": 3})) == prompt + 150
    open_ended = ChatRequest(**{**request.__dict__, "n": 2, "max_tokens": None})
    assert most_tokens(route, open_ended) == prompt + 2 * (512 - prompt)


# -- answers -------------------------------------------------------------------------------------------------

def test_chat_with_n_choices_and_logprobs_through_the_sdk(sdk):
    answer = sdk.chat.completions.create(model="fake-controls", messages=USER, n=3, logprobs=True, top_logprobs=2,
                                         seed=1, presence_penalty=0.2)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert answer.choices[0].message.content == "You said: héllo there"
    assert answer.choices[2].message.content == "(2) You said: héllo there"
    content = answer.choices[0].logprobs.content
    assert [t.token for t in content] == ["You", " said:", " héllo", " there"]
    assert content[2].bytes == list(" héllo".encode()) and content[1].logprob == -0.25
    assert [a.token for a in content[1].top_logprobs] == [" said:", "alt1"]
    assert content[1].top_logprobs[0].logprob == content[1].logprob  # the chosen token is the most likely here
    # The prompt once, the three choices' tokens summed.
    assert answer.usage.completion_tokens == 4 + 5 + 5
    assert answer.usage.prompt_tokens == parse_chat(CHAT).request.estimated_prompt_tokens
    plain = sdk.chat.completions.create(model="fake-controls", messages=USER)
    assert plain.choices[0].logprobs is None and len(plain.choices) == 1


def test_a_chat_stream_of_n_choices_one_after_another(client, sdk):
    r = client.post("/v1/chat/completions", json={**CHAT, "n": 2, "logprobs": True, "stream": True,
                                                  "stream_options": {"include_usage": True}})
    chunks = frames(r)
    for chunk in chunks:
        holds(chunk, answers.ChatCompletionChunk)
    order = [c["choices"][0]["index"] for c in chunks if c["choices"]]
    assert order == sorted(order) and set(order) == {0, 1}  # every chunk of choice 0 before choice 1's
    roles = [c["choices"][0]["index"] for c in chunks if c["choices"] and "role" in c["choices"][0]["delta"]]
    finishes = [c["choices"][0]["index"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert roles == finishes == [0, 1]
    content = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert all(len(c["logprobs"]["content"]) == 1 and c["logprobs"]["refusal"] is None for c in content)
    assert chunks[-1]["usage"]["completion_tokens"] == 4 + 5

    texts = {0: "", 1: ""}
    entries: dict[int, list[str]] = {0: [], 1: []}
    with sdk.chat.completions.create(model="fake-controls", messages=USER, n=2, logprobs=True, stream=True) as stream:
        for chunk in stream:
            for choice in chunk.choices:
                texts[choice.index] += choice.delta.content or ""
                entries[choice.index] += [t.token for t in (choice.logprobs.content or [])] if choice.logprobs else []
    assert texts == {0: "You said: héllo there", 1: "(1) You said: héllo there"}
    assert "".join(entries[1]) == texts[1]


def test_chat_streams_with_logprobs_are_not_handed_to_the_engine(app_and_backend):
    app, backend = app_and_backend
    app.test_client().post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert backend.callers[-1].offer_client is not None  # type: ignore[union-attr]
    for asked in ({"n": 2}, {"logprobs": True}):
        app.test_client().post("/v1/chat/completions", json={**CHAT, "stream": True, **asked})
        assert backend.callers[-1].offer_client is None  # type: ignore[union-attr]


def test_text_completions_with_n_choices_and_logprobs(client, sdk):
    answer = sdk.completions.create(model="fake-controls", prompt=["a b", "c"], n=2, logprobs=2, max_tokens=5)
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    assert [c.text for c in answer.choices] == ["You said: a b", "(1) You said: a b", "You said: c",
                                                "(1) You said: c"]
    logprobs = answer.choices[0].logprobs
    assert logprobs.tokens == ["You", " said:", " a", " b"] and logprobs.text_offset == [0, 3, 9, 11]
    assert logprobs.token_logprobs == [0.0, -0.25, -0.5, -0.75]
    assert logprobs.top_logprobs[1] == {" said:": -0.25, "alt1": -1.25}
    assert answer.usage.completion_tokens == 4 + 5 + 3 + 4

    r = client.post("/v1/completions", json={"model": "fake-controls", "prompt": ["a b", "c"], "n": 2, "logprobs": 1,
                                             "stream": True, "stream_options": {"include_usage": True}})
    chunks = frames(r)
    for chunk in chunks:
        holds(chunk, answers.TextCompletionChunk)
    texts: dict[int, str] = {}
    offsets: dict[int, list[int]] = {}
    for chunk in chunks[:-1]:
        choice = chunk["choices"][0]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        if choice["logprobs"]:
            offsets.setdefault(choice["index"], []).extend(choice["logprobs"]["text_offset"])
    assert texts == {0: "You said: a b", 1: "(1) You said: a b", 2: "You said: c", 3: "(1) You said: c"}
    assert offsets[0] == [0, 3, 9, 11]
    holds(client.post("/v1/completions", json={"model": "fake-controls", "prompt": "x", "n": 2, "logprobs": 0}).json,
          answers.TextCompletion)


def test_echo_repeats_the_prompt_in_every_choice(client):
    r = client.post("/v1/completions", json={"model": "fake-controls", "prompt": "p", "n": 2, "echo": True})
    assert [c["text"] for c in r.json["choices"]] == ["pYou said: p", "p(1) You said: p"]
    streamed = frames(client.post("/v1/completions", json={"model": "fake-controls", "prompt": "p", "n": 2,
                                                           "echo": True, "stream": True}))
    texts: dict[int, str] = {}
    for chunk in streamed:
        texts[chunk["choices"][0]["index"]] = texts.get(chunk["choices"][0]["index"], "") + chunk["choices"][0]["text"]
    assert texts == {0: "pYou said: p", 1: "p(1) You said: p"}


def test_responses_output_text_logprobs(client, sdk):
    response = sdk.responses.create(model="fake-controls", input="a b", include=["message.output_text.logprobs"],
                                    top_logprobs=2)
    part = response.output[0].content[0]
    assert [t.token for t in part.logprobs] == ["You", " said:", " a", " b"]
    assert part.logprobs[1].bytes == list(b" said:") and [a.token for a in part.logprobs[1].top_logprobs] == [
        " said:", "alt1"]
    holds(client.post("/v1/responses", json={"model": "fake-controls", "input": "a"}).json, answers.ResponseObject)
    assert sdk.responses.create(model="fake-controls", input="a").output[0].content[0].logprobs == []

    r = client.post("/v1/responses", json={"model": "fake-controls", "input": "a b", "stream": True,
                                           "include": ["message.output_text.logprobs"]})
    events = [TypeAdapter(ResponseStreamEvent).validate_python(e) for e in frames(r)]
    for event in frames(r):
        holds(event, answers.ResponseStreamEvent)
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert [t.token for d in deltas for t in d.logprobs] == ["You", " said:", " a", " b"]
    done = next(e for e in events if e.type == "response.output_text.done")
    assert len(done.logprobs) == 4


def test_models_say_which_controls_they_honour(client):
    listed = {m["id"]: m["capabilities"]["controls"] for m in client.get("/v1/models").json["data"]}
    assert listed["fake-controls"] == sorted(CONTROLS) and listed["fake-echo"] == []
    holds(client.get("/v1/models").json, answers.ModelList)


def test_the_messages_api_is_unchanged(client):
    r = client.post("/v1/messages", json={"model": "fake-controls", "max_tokens": 20, "messages": USER})
    assert r.status_code == 200, r.json
    assert r.json["content"][0]["text"] == "You said: héllo there"


@pytest.mark.parametrize("stream", [False, True])
def test_the_log_line_of_n_choices(app_and_backend, caplog, stream):
    import logging

    app, _ = app_and_backend
    caplog.set_level(logging.INFO, logger="aigate.requests")
    r = app.test_client().post("/v1/chat/completions", headers={"X-Request-ID": "req-n-1"},
                               json={**CHAT, "n": 2, "max_tokens": 5, "stream": stream})
    r.get_data()
    r.close()  # the line is written when the response is closed
    line = next(rec.getMessage() for rec in caplog.records if "id=req-n-1" in rec.getMessage())
    prompt = parse_chat(CHAT).request.estimated_prompt_tokens
    # choice 0 ends by itself after 4 tokens, choice 1 is cut at 5; the prompt is counted once
    assert f"prompt_tokens={prompt} " in line and "completion_tokens=9 " in line, line
    assert "finish=stop,length " in line and "ttft_ms=-" not in line, line
