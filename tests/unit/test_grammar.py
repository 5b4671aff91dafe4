"""Constrained answers on each family's real tokenizer (the demo models' files, chatglm.cpp's own encoder):
random-logit walks under the grammar's mask (seeded) give text that the family's reply splitter turns into
JSON or a tool call that validates against the schema; bad schemas are clear 400s; whitespace and nesting
stay bounded."""

from __future__ import annotations

import json
import re
from datetime import date
from enum import Enum
from typing import Literal

import chatglm_cpp
import jsonschema
import numpy as np
import pytest
from openai.lib._pydantic import to_strict_json_schema
from pydantic import BaseModel, Field

from backends.base import ChatRequest, InvalidRequest, JsonFormat, Message, Tool, ToolCall, ToolsNotSupported
from backends.chatglm.chatglm3_tools import ReplySplitter
from backends.chatglm.engine.grammar import Constraint, Grammars, schema_error, tighten
from backends.chatglm.engine.model import Model
from backends.chatglm.engine.vocab import token_bytes
from backends.chatglm.ggml_file import read_model_file

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "ok": {"type": "boolean"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "owner": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                    "vip": {"type": "boolean"}},
                  "required": ["city", "vip"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "note": {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "null"}]},
    },
    "required": ["name", "kind", "ok", "age", "owner", "tags", "note"],
    "additionalProperties": False,
}
# Optional arguments (skippable, commas kept right), a JSON value beside Python's True/False/None
WEATHER = Tool("get_weather", "", {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 10}, "days": {"type": "integer", "minimum": 1, "maximum": 14},
    "metric": {"type": "boolean"}, "extra": {"type": "null"},
    "opts": {"type": "object", "properties": {"x": {"type": "boolean"}, "y": {"enum": [None, 1]}},
             "required": ["x"]}}, "required": ["city"]}, strict=True)
# Names Python cannot take as keywords: tool_call(**{...})
ROUTE = Tool("route", "", {"type": "object", "properties": {"from": {"enum": ["a", "b"]}, "to-do": {"type": "boolean"}},
                           "required": ["from", "to-do"], "additionalProperties": False}, strict=True)
ASK = (Message("user", "hi"),)


@pytest.fixture(scope="module", params=["chatglm2_model", "demo_model", "glm4_model"])
def family(request) -> tuple[Model, Grammars]:
    model = Model(read_model_file(request.getfixturevalue(request.param)), 256, slots=1)
    return model, grammars(model)


@pytest.fixture(scope="module")
def chatglm3(demo_model) -> Model:
    return Model(read_model_file(demo_model), 256, slots=1)


def grammars(model: Model, dummy_prefix: bool = False) -> Grammars:
    tokens = token_bytes(model.file)
    encode = model._encode
    if dummy_prefix:  # as real ChatGLM2/3 tokenizers do: a space in front of every encode
        space = tokens.index(b" ")
        encode = lambda text: [space, *model._encode(text)]  # noqa: E731
    return Grammars(model.file, model.family, tokens, encode, model._end_ids)


def walk(g: Grammars, c: Constraint, seed: int, limit: int = 600, favour: bytes = b"") -> bytes:
    """Random logits each step, masked, argmax: a uniform walk through what the grammar allows (tokens with
    a byte of ``favour`` preferred: free strings end only on a quote)."""
    rng = np.random.default_rng(seed)
    vocab = len(g.tokens)
    bias = np.array([4.0 if set(t) & set(favour) else 0.0 for t in g.tokens])
    mask = np.zeros((vocab + 31) // 32, np.int32)
    out = b""
    for _ in range(limit):
        c.fill(mask)
        allowed = np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab].astype(bool)
        logits = np.where(allowed, rng.standard_normal(vocab) + bias, -np.inf)
        token = int(np.argmax(logits))
        c.accept(token)
        if token in g.tokenizer.eos_tokens:
            return out
        out += g.tokens[token]
        if c.done:
            return out
    raise AssertionError(f"no end after {limit} tokens: {out!r}")


def answer(model: Model, g: Grammars, request: ChatRequest, seed: int,
           favour: bytes = b"") -> tuple[str, ToolCall | None, bytes]:
    c = g.constraint(request)
    assert c is not None
    text = walk(g, c, seed, favour=favour)
    tools = model.family.tools
    splitter = ReplySplitter(bool(request.tools), raw=request.prompt is not None or not model.family.metadata_line,
                             **({"parse": tools.parse_call} if tools else {}))
    if g.dummy_prefix:
        splitter.drop_dummy_prefix()
    content = splitter.feed(text.decode())
    rest, call = splitter.finish()
    return content + rest, call, text


@pytest.mark.parametrize("strict", [True, False])
def test_json_answers_parse_and_validate(family, strict):
    model, g = family
    request = ChatRequest("m", ASK, response_format=JsonFormat(SCHEMA, strict=strict))
    for seed in range(6):
        content, call, _ = answer(model, g, request, seed)
        assert call is None
        jsonschema.validate(json.loads(content), SCHEMA)


def test_json_object_is_any_object_nested_at_most_seven_deep(family):
    model, g = family
    for seed in range(6):
        content, _, _ = answer(model, g, ChatRequest("m", ASK, response_format=JsonFormat()), seed, favour=b'"')
        value = json.loads(content)
        assert isinstance(value, dict)
        assert depth(value) <= 7


def depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    return 0


def test_whitespace_is_bounded(family):
    model, g = family
    request = ChatRequest("m", ASK, response_format=JsonFormat(SCHEMA, strict=True))
    for seed in range(6):
        content, _, _ = answer(model, g, request, seed)
        outside_strings = re.sub(r'"(\\.|[^"\\])*"', '""', content)
        assert all(run in (" ", "\n") for run in re.findall(r"\s+", outside_strings)), content


@pytest.mark.parametrize("seed", range(6))
def test_forced_tool_calls_parse_back_with_valid_arguments(family, seed):
    model, g = family
    request = ChatRequest("m", ASK, tools=(WEATHER, ROUTE), tool_choice="required",
                          forced_tool=(WEATHER, ROUTE)[seed % 2].name)
    if model.family.tools is None:
        with pytest.raises(ToolsNotSupported):
            g.constraint(request)
        return
    _, call, text = answer(model, g, request, seed)
    assert call is not None, text
    tool = (WEATHER, ROUTE)[seed % 2]
    assert call.name == tool.name
    jsonschema.validate(json.loads(call.arguments), tool.parameters)


def test_required_is_a_call_of_any_tool_and_chatglm3_writes_python_constants(family):
    model, g = family
    if model.family.tools is None:
        return
    request = ChatRequest("m", ASK, tools=(WEATHER, ROUTE), tool_choice="required")
    names, texts = set(), []
    for seed in range(12):
        _, call, text = answer(model, g, request, seed)
        assert call is not None, text
        names.add(call.name)
        texts.append(text.decode())
        jsonschema.validate(json.loads(call.arguments), {t.name: t for t in (WEATHER, ROUTE)}[call.name].parameters)
    assert names == {"get_weather", "route"}
    if not model.family.byte_level:  # ChatGLM3: keyword arguments, or **{...} for names Python cannot take
        assert any("tool_call(**{" in t for t in texts) and any("tool_call(city=" in t for t in texts)
        calls = " ".join(texts)
        assert re.search(r"metric=(True|False)", calls) and "extra=None" in calls
        assert not re.search(r"metric=(true|false)|extra=null", calls)


def test_a_tool_without_parameters_is_called_with_an_object(family):
    model, g = family
    if model.family.tools is None:
        return
    for seed in range(3):
        _, call, text = answer(model, g, ChatRequest("m", ASK, tools=(Tool("now"),), forced_tool="now",
                                                     tool_choice="required"), seed, favour=b'"}')
        assert call is not None and isinstance(json.loads(call.arguments), dict), text
    with pytest.raises(InvalidRequest):
        g.constraint(ChatRequest("m", ASK, tool_choice="required"))
    with pytest.raises(InvalidRequest):
        g.constraint(ChatRequest("m", ASK, tools=(WEATHER,), tool_choice="required", forced_tool="nope"))


def test_auto_with_a_response_format_is_the_answer_or_a_call(family):
    """What the Agents SDK sends: strict tools beside output_type, tool_choice left to auto."""
    model, g = family
    request = ChatRequest("m", ASK, tools=(WEATHER,), response_format=JsonFormat(SCHEMA, strict=True))
    if model.family.tools is None:
        return
    kinds = set()
    for seed in range(10):
        content, call, _ = answer(model, g, request, seed)
        if call is None:
            jsonschema.validate(json.loads(content), SCHEMA)
        else:
            jsonschema.validate(json.loads(call.arguments), WEATHER.parameters)
        kinds.add(call is None)
    assert kinds == {True, False}


def test_auto_with_a_strict_tool_frees_the_text_branch(family):
    model, g = family
    if model.family.tools is None:
        return
    request = ChatRequest("m", ASK, tools=(WEATHER,))
    frees = set()
    for seed in range(16):
        c = g.constraint(request)
        assert c is not None
        if not_free_prefix(g, c, seed):
            walk(g, c, seed)
        frees.add(c.free)
    assert frees == {True, False}
    assert g.constraint(ChatRequest("m", ASK, tools=(Tool("f", "", {}),))) is None  # nothing strict: free text


def not_free_prefix(g: Grammars, c: Constraint, seed: int) -> bool:
    """Walk until the branch is known; True when it is a call (then finish the walk)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((len(g.tokens) + 31) // 32, np.int32)
    for _ in range(3):
        c.fill(mask)
        allowed = np.flatnonzero(np.unpackbits(mask.view(np.uint8), bitorder="little")[:len(g.tokens)])
        c.accept(int(rng.choice(allowed)))
        if c.free:
            return False
    return True


def test_a_dummy_prefix_model_may_start_its_turn_with_spaces_the_splitter_drops(chatglm3):
    model = chatglm3
    g = grammars(model, dummy_prefix=True)
    assert g.dummy_prefix
    starts = set()
    for seed in range(12):
        content, call, text = answer(model, g, ChatRequest("m", ASK, response_format=JsonFormat(SCHEMA)), seed)
        jsonschema.validate(json.loads(content), SCHEMA)
        starts.add(text[:3].decode(errors="replace").split("{")[0])
        _, call, _ = answer(model, g, ChatRequest("m", ASK, tools=(WEATHER,), forced_tool="get_weather",
                                                  tool_choice="required"), seed)
        assert call is not None and call.name == "get_weather"
    assert " \n" in {s[:2] for s in starts}


class Colour(Enum):
    RED = "red"
    BLUE = "blue"


class Address(BaseModel):
    city: str = Field(max_length=20)
    zip: str | None


class Person(BaseModel):
    name: str = Field(max_length=30)
    colour: Colour
    mood: Literal["happy", "sad"]
    born: date
    home: Address
    past: list[Address]


def test_a_pydantic_strict_schema_compiles_and_walks(chatglm3):
    schema = to_strict_json_schema(Person)
    assert schema_error(schema, strict=True) == ""
    model = chatglm3
    g = grammars(model)
    request = ChatRequest("m", ASK, response_format=JsonFormat(schema, strict=True))
    for seed in range(3):
        content, _, _ = answer(model, g, request, seed, favour=b'"')  # zip is a free string
        Person.model_validate_json(content)


def test_a_bad_schema_is_a_clear_invalid_request(chatglm3):
    model = chatglm3
    g = grammars(model)
    bad = {"type": "object", "properties": {"a": {"type": "string"}}, "unevaluatedProperties": False}
    with pytest.raises(InvalidRequest) as caught:
        g.constraint(ChatRequest("m", ASK, response_format=JsonFormat(bad, strict=True, param="text.format")))
    assert caught.value.param == "text.format"
    assert caught.value.message == 'The JSON schema cannot be enforced: Unimplemented keys: ["unevaluatedProperties"]'
    with pytest.raises(InvalidRequest) as caught:
        g.constraint(ChatRequest("m", ASK, tools=(WEATHER, Tool("g", "", bad, strict=True)), tool_choice="required"))
    assert caught.value.param == "tools[1].function.parameters"
    assert g.constraint(ChatRequest("m", ASK, response_format=JsonFormat(bad, strict=False))) is not None  # lenient


def test_raw_prompts_take_json_but_no_tools(chatglm3):
    model = chatglm3
    g = grammars(model)
    request = ChatRequest("m", (), prompt="Say:", response_format=JsonFormat(SCHEMA))
    content, _, _ = answer(model, g, request, 0)
    jsonschema.validate(json.loads(content), SCHEMA)
    with pytest.raises(ToolsNotSupported):
        g.constraint(ChatRequest("m", (), prompt="x", tools=(WEATHER,), tool_choice="required"))
    assert g.constraint(ChatRequest("m", ASK)) is None


def test_tighten_closes_objects_and_bounds_free_values():
    tight = tighten({"type": "object", "properties": {"a": {}, "b": {"type": "array"}}}, strict=True)
    assert tight["additionalProperties"] is False
    assert tight["properties"]["a"] == {"$ref": "#/$defs/aigate_any0"}
    assert tight["properties"]["b"]["items"] == {"$ref": "#/$defs/aigate_any0"}
    assert tight["x-guidance"]["lenient"] is False
    assert tighten({"type": "object"}, strict=False)["additionalProperties"] == {"$ref": "#/$defs/aigate_any0"}


@pytest.mark.parametrize("seed", range(4))
def test_unbounded_numbers_stay_finite_json(family, seed):
    """A number the schema leaves unbounded takes no exponent: 6e+85572 read back as inf, re-dumped Infinity."""
    model, g = family
    if model.family.tools is None:
        pytest.skip("the family has no tool calls")
    measure = Tool("measure", "", {"type": "object", "properties": {"x": {"type": "number"}, "n": {"type": "integer"}},
                                   "required": ["x", "n"], "additionalProperties": False}, strict=True)
    request = ChatRequest("m", ASK, tools=(measure,), tool_choice="required", forced_tool="measure")
    _, call, text = answer(model, g, request, seed, favour=b"eE")  # an exponent, were one allowed
    assert call is not None, text
    arguments = json.loads(call.arguments, parse_constant=lambda name: pytest.fail(f"{name} in {call.arguments}"))
    assert all(abs(v) <= 10**15 for v in arguments.values()), text


def test_compiled_grammars_are_cached_and_each_answer_gets_its_own_state(chatglm3):
    g = grammars(chatglm3)
    request = ChatRequest("m", ASK, response_format=JsonFormat(SCHEMA, strict=True))
    first, second = g.constraint(request), g.constraint(request)
    assert first is not None and second is not None and len(g.cache._compiled) == 1
    walk(g, first, 0)
    assert first.done and not second.done  # the second starts where the template does
    content = walk(g, second, 1).decode()
    jsonschema.validate(json.loads(content), SCHEMA)
    for i in range(70):  # least recently used out
        g.constraint(ChatRequest("m", ASK, response_format=JsonFormat({**SCHEMA, "title": str(i)})))
    assert len(g.cache._compiled) == 64


@pytest.mark.skipif(not hasattr(chatglm_cpp._C.BaseModelForCausalLM, "next_token_logits"),
                    reason="a chatglm-cpp build without next_token_logits (aigate's patch, 0.4.2+aigate.2)")
def test_greedy_on_the_models_own_logits_closes_the_structure_soon(chatglm3):
    """The whitespace bound at work: the random model's greedy choice under the mask ends the object in a
    few hundred tokens instead of spending them on indentation."""
    model = chatglm3
    g = grammars(model)
    req = ChatRequest("m", ASK, response_format=JsonFormat(SCHEMA, strict=True))
    constraint = g.constraint(req)
    assert constraint is not None
    ids = model.request_ids(req)
    logits = np.zeros(len(g.tokens), np.float32)
    mask = np.zeros((len(g.tokens) + 31) // 32, np.int32)
    text, past = b"", 0
    while not constraint.done:
        assert len(text) < 1200 and len(ids) < 250, text
        model.slots[0].runner.logits(ids, past, 0, logits)
        past = len(ids)
        constraint.fill(mask)
        allowed = np.unpackbits(mask.view(np.uint8), count=len(g.tokens), bitorder="little").view(bool)
        token = int(np.argmax(np.where(allowed, logits, -np.inf)))
        constraint.accept(token)
        ids.append(token)
        text += g.tokens[token]
    splitter = ReplySplitter(False, raw=not model.family.metadata_line)
    content = splitter.feed(text.decode())
    jsonschema.validate(json.loads(content + splitter.finish()[0]), SCHEMA)
