"""The engine's logits path (aigate's build: next_token_logits) on the demo models: logprobs, seeds, n choices,
logit_bias, penalties, constrained answers (a test double, then real schemas and forced tool calls), the
guard of a build without it, and what travels on the engine's line."""

from __future__ import annotations

import json
import math
import socket
from collections.abc import Iterator

import jsonschema
import numpy as np
import pytest

from backends.base import (
    ChatRequest,
    Event,
    Finish,
    InvalidRequest,
    JsonFormat,
    Message,
    NotSupportedByModel,
    TextDelta,
    Tool,
    ToolCall,
)
from backends.chatglm.backend import ChatGLMBackend, LocalFile
from backends.chatglm.engine import model as engine_model
from backends.chatglm.engine import protocol, sampler
from backends.chatglm.engine.client import EngineClient, connect
from backends.chatglm.engine.model import Model
from backends.chatglm.ggml_file import read_model_file
from tests.test_engine import running_engine

pytestmark = pytest.mark.skipif(not engine_model.LOGITS, reason="chatglm-cpp without next_token_logits")

ASK = (Message("user", "Tell me about the river and the old town"),)
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "ok": {"type": "boolean"},
        "owner": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                    "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                  "required": ["city", "age"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "kind", "ok", "owner", "tags"],
    "additionalProperties": False,
}
WEATHER = Tool("get_weather", "the weather", {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 10}, "days": {"type": "integer", "minimum": 1, "maximum": 14},
    "metric": {"type": "boolean"}}, "required": ["city", "days"], "additionalProperties": False}, strict=True)


@pytest.fixture(scope="module", params=["demo_model", "glm4_model"])
def model(request) -> Model:
    return Model(read_model_file(request.getfixturevalue(request.param)), 1024, slots=1)


@pytest.fixture(scope="module")
def chatglm3(demo_model) -> Model:
    return Model(read_model_file(demo_model), 1024, slots=1)


def answer(model: Model, messages: tuple[Message, ...] = ASK, **fields) -> list[Event]:
    request = ChatRequest(model="demo", messages=messages, **fields)
    model.check(request)
    return list(model.slots[0].generate(request, model.prompt_ids(request), lambda: False))


def text(events: list[Event], choice: int = 0) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta) and e.choice == choice)


def finishes(events: list[Event]) -> list[Finish]:
    return [e for e in events if isinstance(e, Finish)]


def test_logprobs_top_one_is_the_greedy_token_and_the_probabilities_sum_to_at_most_one(model):
    plain = answer(model, temperature=0, max_tokens=16)
    events = answer(model, temperature=0, max_tokens=16, logprobs=True, top_logprobs=5)
    assert text(events) == text(plain)  # the same greedy answer by either path
    entries = [e for d in events if isinstance(d, TextDelta) for e in d.logprobs]
    assert len(entries) == finishes(events)[0].usage.completion_tokens - (finishes(events)[0].reason == "stop")
    assert b"".join(e.raw for e in entries).decode() == text(events)
    for entry in entries:
        assert entry.top[0].raw == entry.raw and entry.top[0].logprob == entry.logprob <= 0
        assert len(entry.top) == 5 and [t.logprob for t in entry.top] == sorted((t.logprob for t in entry.top),
                                                                               reverse=True)
        assert sum(math.exp(t.logprob) for t in entry.top) <= 1 + 1e-6


def test_a_seed_gives_the_same_answer_cold_or_cached_and_another_seed_another(chatglm3):
    answer(chatglm3, (Message("user", "something else entirely"),), max_tokens=1)
    first = answer(chatglm3, temperature=1, seed=7, max_tokens=24)
    again = answer(chatglm3, temperature=1, seed=7, max_tokens=24)
    other = answer(chatglm3, temperature=1, seed=8, max_tokens=24)
    assert finishes(first)[0].usage.cached_tokens < finishes(again)[0].usage.cached_tokens  # cold, then cached
    assert text(first) == text(again) and text(first) != text(other)


def test_n_choices_come_one_after_another_each_with_its_finish_and_usage(chatglm3):
    request = ChatRequest(model="demo", messages=ASK, temperature=1, seed=3, n=3, max_tokens=12)
    events = answer(chatglm3, temperature=1, seed=3, n=3, max_tokens=12)
    ends = finishes(events)
    assert [f.choice for f in ends] == [0, 1, 2]
    assert [e.choice for e in events] == sorted(e.choice for e in events)  # one choice after another
    assert ends[0].usage.prompt_tokens == len(chatglm3.prompt_ids(request))
    assert all(f.usage.prompt_tokens == 0 and f.usage.cached_tokens == 0 for f in ends[1:])
    assert all(0 < f.usage.completion_tokens <= 12 for f in ends)
    assert len({text(events, i) for i in range(3)}) > 1  # each choice its own draws


def test_logit_bias_makes_a_token_come_out_and_a_frequency_penalty_wears_it_down(chatglm3):
    token = chatglm3.request_ids(ChatRequest(model="demo", messages=(), prompt=" bakery"))[-1]
    word = chatglm3.tokens[token].decode()
    bias = ((token, 100.0),)
    assert text(answer(chatglm3, temperature=0, max_tokens=6, logit_bias=bias)) == word * 6
    assert text(answer(chatglm3, temperature=1, seed=1, max_tokens=6, logit_bias=bias)) == word * 6
    # each time it comes out, 2 less: after ~50 the bias of 100 is spent and the model's own choice comes back
    worn = answer(chatglm3, temperature=0, max_tokens=80, logit_bias=bias, frequency_penalty=2.0)
    assert 40 < text(worn).count(word) < 70
    greedy = answer(chatglm3, temperature=0, max_tokens=8)
    first = chatglm3.request_ids(ChatRequest(model="demo", messages=(), prompt=text(greedy)))[2]
    assert not text(answer(chatglm3, temperature=0, max_tokens=8, logit_bias=((first, -100.0),))).startswith(
        chatglm3.tokens[first].decode())


def test_penalties_count_the_generated_ids():
    logits = np.array([0.0, 1.0, 0.9, 0.0, -np.inf], np.float32)
    presence = sampler.Sampler(sampler.Params(0, presence_penalty=0.5), 5, 4, sampler.generator(None, 0))
    assert presence.pick(logits.copy()).token == 1
    presence.accept(1)
    assert presence.pick(logits.copy()).token == 2
    frequency = sampler.Sampler(sampler.Params(0, frequency_penalty=0.06), 5, 4, sampler.generator(None, 0))
    frequency.accept(1)
    assert frequency.pick(logits.copy()).token == 1  # once: 0.94 > 0.9
    frequency.accept(1)
    assert frequency.pick(logits.copy()).token == 2  # twice: 0.88 < 0.9
    padded = sampler.Sampler(sampler.Params(0, logit_bias=((4, 100.0),)), 5, 4, sampler.generator(None, 0))
    assert padded.pick(logits.copy()).token == 1  # a padding id never comes out, whatever its bias


def test_top_p_keeps_the_ids_up_to_the_one_that_reaches_it():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    draws = {sampler.Sampler(sampler.Params(1.0, top_p=0.7), 4, 4, sampler.generator(s, 0)).pick(logits.copy()).token
             for s in range(200)}
    assert draws == {0, 1}


def test_a_logit_bias_id_outside_the_vocabulary_is_a_clear_400(chatglm3):
    for token in (-1, chatglm3.real_tokens, chatglm3.vocab_size):
        with pytest.raises(InvalidRequest, match="not a token id of this model") as refused:
            chatglm3.check(ChatRequest(model="demo", messages=ASK, logit_bias=((token, 1.0),)))
        assert refused.value.param == "logit_bias"


def test_a_build_without_next_token_logits_refuses_what_needs_it(chatglm3, monkeypatch):
    monkeypatch.setattr(engine_model, "LOGITS", False)
    assert chatglm3.controls == frozenset()
    for fields, param in (({"logprobs": True}, "logprobs"), ({"seed": 1}, "seed"), ({"n": 2}, "n"),
                          ({"logit_bias": ((5, 1.0),)}, "logit_bias"), ({"presence_penalty": 0.5}, "presence_penalty"),
                          ({"response_format": JsonFormat()}, "response_format"),
                          ({"tools": (WEATHER,), "tool_choice": "required"}, "tool_choice")):
        with pytest.raises(NotSupportedByModel, match=r"aigate's build of chatglm-cpp \(0.4.2\+aigate.2") as refused:
            chatglm3.check(ChatRequest(model="demo", messages=ASK, **fields))
        assert refused.value.param == param
    plain = ChatRequest(model="demo", messages=ASK, presence_penalty=0.0, temperature=0)
    chatglm3.check(plain)  # zeros are what SDKs send by default: accepted
    assert not chatglm3.sampled(plain)


class Spell:
    """A test double of grammar.Constraint: only tokens that go on spelling ``target``."""

    free = False

    def __init__(self, tokens: list[bytes], target: bytes) -> None:
        self.tokens, self.rest = tokens, target
        self.masks = 0

    def fill(self, bitmask: np.ndarray) -> None:
        self.masks += 1
        bits = np.array([bool(t) and not t.startswith(b"\xff") and self.rest.startswith(t) for t in self.tokens])
        bitmask[:] = np.packbits(np.pad(bits, (0, 32 * len(bitmask) - len(bits))), bitorder="little").view(np.int32)

    def accept(self, token: int) -> None:
        assert self.rest.startswith(self.tokens[token])
        self.rest = self.rest[len(self.tokens[token]):]

    def forced(self) -> list[int]:
        return []  # every token sampled under its mask: the masks count the steps

    @property
    def done(self) -> bool:
        return not self.rest


class SpellGrammars:
    dummy_prefix = False

    def __init__(self, tokens: list[bytes], target: bytes) -> None:
        self.tokens, self.target = tokens, target
        self.made: list[Spell] = []

    def constraint(self, request: ChatRequest) -> Spell:
        self.made.append(Spell(self.tokens, self.target))
        return self.made[-1]


@pytest.mark.parametrize("fields", [{"temperature": 0}, {"temperature": 1, "seed": 5},
                                    {"temperature": 0, "logprobs": True, "top_logprobs": 20}])
def test_a_constraint_masks_every_step_and_ends_the_answer_when_done(chatglm3, monkeypatch, fields):
    grammars = SpellGrammars(chatglm3.tokens, "\n2026 年".encode())  # the metadata line, then the answer
    monkeypatch.setattr(chatglm3, "grammars", grammars)
    events = answer(chatglm3, response_format=JsonFormat(), max_tokens=50, n=2, **fields)
    assert len(grammars.made) == 3  # the request's check before it takes a slot, then one for each choice
    for choice, spell in enumerate(grammars.made[1:]):
        assert text(events, choice) == "2026 年"
        end = finishes(events)[choice]
        assert end.reason == "stop" and end.usage.completion_tokens == spell.masks  # no step after done
    entries = [e for d in events if isinstance(d, TextDelta) and d.choice == 0 for e in d.logprobs]
    rest = "2026 年".encode()
    for entry in entries:  # masked ids have no logprob: the alternatives go on spelling it too
        assert entry.top and all(rest.startswith(t.raw) for t in entry.top)
        rest = rest.removeprefix(entry.raw)
    assert rest == b"" if entries else not fields.get("logprobs")  # the metadata line's token has no entry


def quiet(model: Model) -> tuple[tuple[int, float], ...]:
    """logit_bias against whitespace: on random weights an answer takes the blank the grammar allows at many
    places, and the tests' time is short. Where only a blank is allowed, it still comes (the others are
    masked)."""
    return tuple((i, -100.0) for i, t in enumerate(model.tokens) if t and not t.strip())


@pytest.mark.parametrize("fields", [{"temperature": 0}, {"temperature": 0.9, "seed": 11}])
def test_a_schema_gives_json_that_validates(model, fields):
    events = answer(model, response_format=JsonFormat(SCHEMA, strict=True), max_tokens=300,
                    logit_bias=quiet(model), **fields)
    assert finishes(events)[0].reason == "stop"
    jsonschema.validate(json.loads(text(events)), SCHEMA)


def test_tokens_the_grammar_forces_are_not_sampled_and_go_in_one_pass(chatglm3, monkeypatch):
    """A key's name and `": "` have no alternative: taken without logits, evaluated together; the first
    content (the metadata line and `{`, both forced) comes right after the prompt's pass."""
    schema = {"type": "object", "properties": {"a_rather_long_property_name": {"type": "boolean"},
                                               "another_long_property_name": {"enum": ["first", "second"]}},
              "required": ["a_rather_long_property_name", "another_long_property_name"], "additionalProperties": False}
    passes: list[int] = []
    evaluate = engine_model.Sampled.evaluate
    monkeypatch.setattr(engine_model.Sampled, "evaluate", lambda self, ids, *rest, **named: (
        passes.append(len(ids)), evaluate(self, ids, *rest, **named))[1])
    request = ChatRequest(model="demo", messages=ASK, response_format=JsonFormat(schema, strict=True), max_tokens=200,
                          temperature=0, logit_bias=quiet(chatglm3))
    events = list(chatglm3.slots[0].generate(request, chatglm3.prompt_ids(request), lambda: False))
    end = finishes(events)[0]
    assert end.reason == "stop" and json.loads(text(events)).keys() == schema["properties"].keys()
    assert len(passes) - 1 < end.usage.completion_tokens / 2  # the prompt's pass, then far fewer than a token each
    first = next(e for e in events if isinstance(e, TextDelta) and e.text.strip())
    assert first.text.startswith("{")


def test_whitespace_bounded_by_the_grammar_ends_a_greedy_answer_without_help(chatglm3):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    events = answer(chatglm3, response_format=JsonFormat(schema, strict=True), max_tokens=400, temperature=0)
    assert finishes(events)[0].reason == "stop"
    jsonschema.validate(json.loads(text(events)), schema)


def test_a_forced_tool_call_has_arguments_that_validate(model):
    events = answer(model, tools=(WEATHER,), tool_choice="required", forced_tool="get_weather", temperature=0,
                    max_tokens=200, logit_bias=quiet(model))
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert len(calls) == 1 and calls[0].name == "get_weather" and finishes(events)[0].reason == "tool_calls"
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER.parameters)


@pytest.fixture(scope="module")
def engine(demo_model) -> Iterator[EngineClient]:
    with running_engine(demo_model) as client:
        yield client


def test_logprobs_and_choices_travel_on_the_line_and_no_handover_is_offered(engine):
    def never() -> None:
        raise AssertionError("a handover asked for an answer with logprobs")

    request = ChatRequest(model="demo", messages=ASK, temperature=1, seed=2, n=2, max_tokens=8, logprobs=True,
                          top_logprobs=2)
    events = list(engine.generate(request, stream=never))  # type: ignore[arg-type]
    assert [f.choice for f in finishes(events)] == [0, 1]
    entries = [e for d in events if isinstance(d, TextDelta) for e in d.logprobs]
    assert entries and all(isinstance(e.raw, bytes) and len(e.top) == 2 for e in entries)
    assert any(isinstance(e, TextDelta) and e.choice == 1 and e.logprobs for e in events)
    with connect(engine.address) as sock:  # the engine's own guard: a handover asked for is not offered
        sock.sendall(protocol.encode(protocol.generate_request(request, handover=True)))
        assert "handover" not in protocol.decode(sock.makefile("rb").readline())
        sock.shutdown(socket.SHUT_WR)


def test_the_engine_says_its_controls_and_the_backend_shows_them_once_loaded(engine, demo_model):
    status = engine.status()
    assert status is not None and status["constrains"] is True
    assert status["controls"] == ["logit_bias", "logprobs", "n", "penalties", "seed", "tool_choice"]
    backend = ChatGLMBackend([LocalFile("demo", read_model_file(demo_model), 1024)], owned_by="me", engine=engine)
    assert backend.models()[0].controls == frozenset() and not backend.models()[0].structured_outputs
    backend.load()
    info = backend.models()[0]
    assert info.controls == frozenset(status["controls"]) and info.structured_outputs
