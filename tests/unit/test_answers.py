"""What the builders make is what compat/answers.py declares (and so what /openapi.json describes):
every chunk and object of chat, legacy completions, the Responses API, embeddings, models, readiness
and errors, read strictly into its declaration, whose Structs refuse unknown fields."""

from __future__ import annotations

import copy
import json
from typing import Any

import msgspec
import pytest

from backends.base import Finish, QueueFull, TextDelta, ToolCall, UpstreamAuthFailed, Usage
from compat import answers
from compat.completion_objects import (
    Completion,
    fold,
    fold_text_completion,
    legacy_function_call,
    stream_chunks,
    text_completion_chunks,
)
from compat.errors import from_backend, invalid, model_not_found
from compat.responses_api import ResponseStream, parse_responses
from tests.fake_backend import fake_app

USAGE = Usage(5, 3, cached_tokens=2)
TEXT = [TextDelta("Hel"), TextDelta(""), TextDelta("lo"), Finish("stop", USAGE)]
CALLS = [ToolCall("call_1", "get_weather", '{"city": "Paris"}'), ToolCall("call_2", "now", "{}"),
         Finish("tool_calls", USAGE)]
BOTH = [TextDelta("Let me see."), *CALLS]


def holds(obj: dict[str, Any], declaration: Any) -> None:
    msgspec.convert(json.loads(json.dumps(obj)), declaration, strict=True)  # as a client reads it


@pytest.mark.parametrize("events", [TEXT, CALLS, BOTH, [Finish("length", USAGE)]],
                         ids=["text", "calls", "both", "empty"])
@pytest.mark.parametrize("legacy", [False, True], ids=["tools", "functions"])
def test_chat_answers_and_chunks(events, legacy):
    shape = legacy_function_call if legacy else (lambda obj: obj)
    completion = Completion("m")
    holds(shape(fold(completion, iter(events))), answers.ChatCompletion)
    chunks = [shape(c) for c in stream_chunks(completion, iter(events), include_usage=True)]
    assert chunks[-1]["choices"] == [] and "usage" in chunks[-1]
    for chunk in chunks:
        holds(chunk, answers.ChatCompletionChunk)


def test_text_completions_and_their_chunks():
    completion = Completion("m", id="cmpl-x")

    def answers_of() -> Any:
        return iter([("def f():", iter(TEXT)), ("", iter([TextDelta("x"), Finish("length", USAGE)]))])

    holds(fold_text_completion(completion, answers_of()), answers.TextCompletion)
    chunks = list(text_completion_chunks(completion, answers_of(), include_usage=True))
    assert chunks[-1]["choices"] == []
    for chunk in chunks:
        holds(chunk, answers.TextCompletionChunk)


def test_errors():
    for error in (invalid("bad", "messages[0].content", "invalid_type"), invalid("no JSON", code="invalid_json"),
                  model_not_found("x"), from_backend(QueueFull("busy", retry_after=1)),
                  from_backend(UpstreamAuthFailed("denied"))):
        holds(error.body(), answers.ErrorResponse)


def test_models_embeddings_and_readiness_from_the_routes(tmp_path):
    client = fake_app(tmp_path)[0].test_client()
    holds(client.get("/v1/models").json, answers.ModelList)
    holds(client.get("/v1/models/fake-echo").json, answers.Model)
    for encoding in ("float", "base64"):
        r = client.post("/v1/embeddings",
                        json={"model": "fake-echo", "input": ["a", "bc"], "encoding_format": encoding})
        assert r.status_code == 200, r.json
        holds(r.json, answers.EmbeddingList)
    holds(client.get("/ready").json, answers.Readiness)
    holds(client.post("/v1/chat/completions", json={"model": "nope", "messages": []}).json, answers.ErrorResponse)


def test_a_field_the_declarations_lack_fails():
    chunk = next(stream_chunks(Completion("m"), iter(TEXT), include_usage=False))
    holds(chunk, answers.ChatCompletionChunk)
    for broken in ({**chunk, "system_fingerprint": "x"}, {**chunk, "object": "chat.completion"}):
        with pytest.raises(msgspec.ValidationError):
            holds(broken, answers.ChatCompletionChunk)
    deeper = copy.deepcopy(chunk)
    deeper["choices"][0]["delta"]["reasoning"] = "hm"
    with pytest.raises(msgspec.ValidationError):
        holds(deeper, answers.ChatCompletionChunk)


RESPONSE_BODY = {"model": "m", "instructions": "be brief", "input": "hi", "metadata": {"k": "v"},
                 "max_output_tokens": 9,
                 "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}},
                           {"type": "web_search"}],
                 "text": {"format": {"type": "json_schema", "name": "n", "schema": {"type": "object"}}}}


@pytest.mark.parametrize("events", [TEXT, CALLS, BOTH, [Finish("length", USAGE)]], ids=["text", "calls", "both", "cut"])
@pytest.mark.parametrize("parallel", [True, False])
def test_responses_events_and_object(events, parallel):
    call = parse_responses(RESPONSE_BODY)
    codec = ResponseStream("m", call.echo, parallel)
    for event in codec.events(iter(events)):
        holds(event, answers.ResponseStreamEvent)
    assert codec.final is not None
    holds(codec.final, answers.ResponseObject)


def test_a_responses_stream_that_fails():
    codec = ResponseStream("m", parse_responses({"model": "m", "input": "hi"}).echo)
    started = codec.events(iter([TextDelta("He"), TextDelta("llo")]))
    for event in [next(started) for _ in range(4)]:
        holds(event, answers.ResponseStreamEvent)
    for event in codec.failed(from_backend(QueueFull("busy"))):
        holds(event, answers.ResponseStreamEvent)
    assert codec.final is not None and codec.final["status"] == "failed"


def test_responses_from_the_routes(tmp_path):
    client = fake_app(tmp_path)[0].test_client()
    body = {**RESPONSE_BODY, "model": "fake-echo", "text": None,
            "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
                      {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
                      {"type": "function_call_output", "call_id": "c1", "output": "21"},
                      {"role": "assistant", "content": "ok"}, {"role": "user", "content": "and now?"}]}
    made = client.post("/v1/responses", json=body)
    assert made.status_code == 200, made.json
    holds(made.json, answers.ResponseObject)
    holds(client.get(f"/v1/responses/{made.json['id']}").json, answers.ResponseObject)
    items = client.get(f"/v1/responses/{made.json['id']}/input_items").json
    assert len(items["data"]) == 5
    holds(items, answers.InputItemList)
    streamed = client.post("/v1/responses", json={**body, "stream": True}).get_data(as_text=True)
    frames = [json.loads(line[6:]) for line in streamed.split("\n") if line.startswith("data: ")]
    assert frames[-1]["type"] == "response.completed"
    for frame in frames:
        holds(frame, answers.ResponseStreamEvent)


def test_choices_with_logprobs_hold_to_the_declarations():
    from backends.base import TokenLogprob, TopLogprob

    def token(text: str) -> TokenLogprob:
        return TokenLogprob(text, -0.5, text.encode(), (TopLogprob(text, -0.5, text.encode()),))

    events = [TextDelta("Hel", (token("Hel"),)), TextDelta("lo", (token("lo"),)), Finish("stop", USAGE),
              TextDelta("Bye", (token("Bye"),), choice=1), Finish("length", Usage(0, 1), choice=1)]
    completion = Completion("m")
    folded = fold(completion, iter(events), choices=2, logprobs=True)
    holds(folded, answers.ChatCompletion)
    assert folded["usage"]["prompt_tokens"] == 5 and folded["usage"]["completion_tokens"] == 4
    for chunk in stream_chunks(completion, iter(events), include_usage=True, choices=2, logprobs=True):
        holds(chunk, answers.ChatCompletionChunk)
    legacy = Completion("m", id="cmpl-x")
    holds(fold_text_completion(legacy, iter([("", iter(events))]), choices=2, logprobs=True), answers.TextCompletion)
    for chunk in text_completion_chunks(legacy, iter([("", iter(events))]), True, choices=2, logprobs=True):
        holds(chunk, answers.TextCompletionChunk)
    codec = ResponseStream("m", parse_responses({"model": "m", "input": "hi"}).echo, logprobs=True)
    for event in codec.events(iter(events[:3])):
        holds(event, answers.ResponseStreamEvent)
    holds(codec.final, answers.ResponseObject)
