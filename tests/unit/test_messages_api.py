"""The Anthropic Messages API in-process: bodies read into ChatRequests (compat/messages_request.py),
events written as Anthropic's message and stream events and held to their declarations
(compat/messages_answers.py), and the routes' errors in Anthropic's shape, through the real app over the
fake backend (tests/fake_backend.py). Milliseconds each; the SDK and gunicorn are in test_e2e_messages.py."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.base import Finish, ImageInput, Message, TextDelta, Tool, ToolCall, Usage, Written
from compat import messages_answers as answers
from compat.errors import APIError
from compat.messages_codec import MessageStream, frame, tool_input
from compat.messages_request import parse_count_tokens, parse_messages
from compat.requests import Limits
from tests.fake_backend import fake_app

USAGE = Usage(9, 3, cached_tokens=4)
TEXT = [TextDelta("Hel"), TextDelta(""), TextDelta("lo"), Finish("stop", USAGE)]
CALLS = [ToolCall("call_1", "get_weather", '{"city": "Paris"}'), ToolCall("call_2", "now", ""),
         Finish("tool_calls", USAGE)]
BOTH = [TextDelta("Let me see."), *CALLS]
STOPPED = [TextDelta("one"), Finish("stop", USAGE, stop_sequence="END")]
CUT = [TextDelta("one"), Written("two three", 2), Finish("length", USAGE)]
WEATHER = {"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
PNG = "iVBORw0KGgo="


def holds(obj: dict[str, Any], declaration: Any) -> None:
    msgspec.convert(json.loads(json.dumps(obj)), declaration, strict=True)  # as a client reads it


def run(events: list, first_only: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    codec = MessageStream("m", first_only)
    out = list(codec.events(iter(events)))
    assert codec.final is not None
    return out, codec.final


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}], **fields}


# -- events -> Anthropic's objects ---------------------------------------------------------------------

@pytest.mark.parametrize("events", [TEXT, CALLS, BOTH, STOPPED, CUT, [Finish("stop", USAGE)]],
                         ids=["text", "calls", "both", "stop_sequence", "written", "empty"])
def test_every_event_and_the_message_hold_their_declarations(events):
    out, final = run(events)
    holds(final, answers.AnthropicMessage)
    for event in out:
        holds(event, answers.AnthropicStreamEvent)
    kinds = [e["type"] for e in out]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds.count("ping") == 1 and kinds.count("content_block_start") == kinds.count("content_block_stop")
    assert out[-2]["usage"] == final["usage"] == {"input_tokens": 5, "cache_creation_input_tokens": 0,
                                                  "cache_read_input_tokens": 4, "output_tokens": 3}


def test_text_then_tool_calls_as_blocks_in_order():
    out, final = run(BOTH)
    assert [e["type"] for e in out] == [
        "message_start", "content_block_start", "ping", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert final["content"] == [{"type": "text", "text": "Let me see."},
                                {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
                                {"type": "tool_use", "id": "call_2", "name": "now", "input": {}}]
    assert out[5]["content_block"]["input"] == {}  # the input comes as input_json_delta
    assert [e["delta"] for e in out if e["type"] == "content_block_delta"][1:] == [
        {"type": "input_json_delta", "partial_json": '{"city": "Paris"}'},
        {"type": "input_json_delta", "partial_json": "{}"}]
    assert (final["stop_reason"], final["stop_sequence"]) == ("tool_use", None)
    assert run(BOTH, first_only=True)[1]["content"][1:] == final["content"][1:2]  # disable_parallel_tool_use


def test_stop_reasons_and_written_text():
    assert [run(e)[1]["stop_reason"] for e in (TEXT, STOPPED, CUT)] == ["end_turn", "stop_sequence", "max_tokens"]
    assert run(STOPPED)[1]["stop_sequence"] == "END" and run(TEXT)[1]["stop_sequence"] is None
    out, final = run(CUT)  # the engine wrote "two three" itself: counted in the message, not sent again
    assert final["content"] == [{"type": "text", "text": "onetwo three"}]
    assert sum(e["type"] == "content_block_delta" for e in out) == 1


def test_a_text_piece_frame_for_the_engine_is_the_delta_s_frame():
    codec = MessageStream("m")
    events = codec.events(iter([TextDelta("a"), TextDelta("b"), Finish("stop", USAGE)]))
    assert codec.piece_frame() is None  # no text block yet
    out = [next(events) for _ in range(4)]  # start, block start, ping, the first delta
    piece = codec.piece_frame()
    assert piece is not None
    written = piece.prefix + json.dumps("b").encode() + piece.suffix
    assert written == frame({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "b"}})
    assert out[-1]["delta"]["text"] == "a"


def test_arguments_that_are_not_an_object_are_kept_where_they_can_be_seen():
    assert tool_input('{"a": 1}') == {"a": 1} and tool_input("") == {}
    assert tool_input("[1, 2]") == {"arguments": [1, 2]} and tool_input("{broken") == {"arguments": "{broken"}


def test_a_failure_in_the_stream_is_an_error_event():
    [event] = MessageStream("m").failed(APIError(503, "busy", type="server_error", code="queue_timeout"))
    holds(event, answers.AnthropicStreamEvent)
    assert event == {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}


# -- bodies -> ChatRequests ----------------------------------------------------------------------------

def test_system_turns_blocks_and_tool_results_map_onto_chat():
    call = parse_messages(body(
        system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind.", "cache_control": {}}],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "in Paris?"}]},
            {"role": "system", "content": "Now: noon."},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "s"},
                                              {"type": "text", "text": "Looking."},
                                              {"type": "tool_use", "id": "t1", "name": "get_weather",
                                               "input": {"city": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "18C"},
                                         {"type": "text", "text": "Thanks."}]},
            {"role": "user", "content": [{"type": "document", "source": {"type": "text", "data": "A note."}}]}],
        tools=[WEATHER, {"type": "web_search_20250305", "name": "web_search"}], stop_sequences=["END"],
        temperature=0.5, top_p=0.9, top_k=5, stream=True, metadata={"user_id": "u"}, thinking={"type": "adaptive"},
        context_management={"edits": []}))
    r = call.request
    assert r.messages == (
        Message("system", "Be brief.\n\nBe kind."), Message("user", "Weather in Paris?"),
        Message("system", "Now: noon."),
        Message("assistant", "Looking.", (ToolCall("t1", "get_weather", '{"city": "Paris"}'),)),
        Message("tool", "18C", tool_call_id="t1", name="get_weather"),
        Message("user", "Thanks.\n\nA note."))  # consecutive user turns are one, as Anthropic joins them
    assert r.tools == (Tool("get_weather", "", WEATHER["input_schema"]),)  # the server tool is skipped
    assert (r.stop, r.temperature, r.top_p, r.max_tokens, r.tool_choice) == (("END",), 0.5, 0.9, 16, "auto")
    assert call.stream and r.incremental and not call.first_tool_call_only


@pytest.mark.parametrize(("choice", "expected", "first_only"), [
    ({"type": "auto"}, "auto", False), ({"type": "any", "disable_parallel_tool_use": True}, "required", True),
    ({"type": "tool", "name": "get_weather"}, "required", False), ({"type": "none"}, "none", False)])
def test_tool_choice_maps_like_chat_s(choice, expected, first_only):
    call = parse_messages(body(tools=[WEATHER], tool_choice=choice))
    assert (call.request.tool_choice, call.first_tool_call_only) == (expected, first_only)
    assert call.request.forced_tool == (choice.get("name"))
    assert len(call.request.tools) == (0 if expected == "none" else 1)


def test_count_tokens_reads_the_same_prompt_answered_with_one_token():
    fields = dict(model="m", system="Be brief.", tools=[WEATHER], messages=[{"role": "user", "content": "hi"}])
    counted, asked = parse_count_tokens(fields), parse_messages({**fields, "max_tokens": 99}).request
    assert counted.max_tokens == 1 and (counted.messages, counted.tools) == (asked.messages, asked.tools)


def test_images_are_read_where_the_model_reads_them():
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
    sees = Limits(image_models=frozenset({"m"}))
    r = parse_messages(body(messages=[{"role": "user", "content": [image, {"type": "text", "text": "What?"}]}]),
                       sees).request
    assert r.messages == (Message("user", "What?", images=(ImageInput(PNG),)),)
    refusals = [
        (body(messages=[{"role": "user", "content": [image]}]), Limits(), "unsupported_content"),
        (body(messages=[{"role": "user", "content": [{**image, "source": {"type": "url", "url": "https://x/y.png"}}]}]),
         sees, "image_url_not_supported"),
        (body(messages=[{"role": "user", "content": [image, image]}]), sees, "too_many_images"),
        (body(messages=[{"role": "user",
                         "content": [{"type": "tool_result", "tool_use_id": "t", "content": [image]}]}]),
         sees, "unsupported_content"),
        (body(messages=[{"role": "user", "content": [{**image, "source": {**image["source"], "data": "%%%"}}]}]), sees,
         "invalid_image"),
    ]
    for fields, limits, code in refusals:
        with pytest.raises(APIError) as refused:
            parse_messages(fields, limits)
        assert (refused.value.status, refused.value.code) == (400, code), refused.value


@pytest.mark.parametrize(("fields", "param", "code"), [
    (dict(messages=[{"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "t"}]}]),
     "messages[0].content[0].type", "invalid_value"),
    (dict(messages=[{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "x", "input": {}}]}]),
     "messages[0].content[0].type", "invalid_value"),
    (dict(messages=[{"role": "user", "content": [{"type": "server_tool_use", "id": "t"}]}]),
     "messages[0].content[0].type", "invalid_value"),
    (dict(messages=[{"role": "user", "content": [{"type": "document", "source": {
        "type": "base64", "media_type": "application/pdf", "data": "JVBE"}}]}]),
     "messages[0].content[0].source.type", "unsupported_content"),
    (dict(system=[{"text": "no type"}]), "system[0].type", "missing_required_parameter"),
    (dict(tools=[{"name": "get_weather"}]), "tools[0].input_schema", "missing_required_parameter"),
    (dict(tools=[{**WEATHER, "name": "no spaces"}]), "tools[0].name", "invalid_value"),
    (dict(tool_choice={"type": "any"}), "tool_choice", "invalid_value"),
    (dict(tools=[WEATHER], tool_choice={"type": "tool", "name": "other"}), "tool_choice.name", "invalid_value"),
    (dict(max_tokens=0), "max_tokens", "invalid_value"),
    (dict(stop_sequences=[""]), "stop_sequences[0]", "invalid_value"),
    (dict(messages=[]), "messages", "empty_array"),
])
def test_bad_bodies_are_400s_naming_the_field(fields, param, code):
    with pytest.raises(APIError) as refused:
        parse_messages(body(**fields))
    assert (refused.value.status, refused.value.param, refused.value.code) == (400, param, code), refused.value


# -- the routes: Anthropic's objects and errors, OpenAI's elsewhere -------------------------------------

def test_the_routes_answer_and_fail_in_anthropic_s_shape(tmp_path):
    client = fake_app(tmp_path)[0].test_client()
    hello = {"messages": [{"role": "user", "content": "hello there"}]}
    r = client.post("/v1/messages", json={"model": "fake-echo", "max_tokens": 9, **hello})
    holds(r.json, answers.AnthropicMessage)
    assert r.json["content"] == [{"type": "text", "text": "You said: hello there"}]
    assert r.headers["request-id"] == r.headers["x-request-id"]
    holds(client.post("/v1/messages/count_tokens", json={"model": "fake-echo", **hello}).json,
          answers.AnthropicTokenCount)
    failures = [(client.post("/v1/messages", json={"model": "nope", **hello}), 404, "not_found_error"),
                (client.post("/v1/messages", json={"model": "fake-echo"}), 400, "invalid_request_error"),
                (client.post("/messages/count_tokens", data="{not json"), 400, "invalid_request_error"),
                (client.post("/v1/messages", json={"model": "fake-busy", **hello}), 429, "rate_limit_error"),
                (client.get("/v1/messages"), 405, "invalid_request_error"),
                (client.post("/v1/messages/batches", json={}), 404, "not_found_error")]
    for r, status, kind in failures:
        assert r.status_code == status, r.json
        holds(r.json, answers.AnthropicErrorResponse)
        assert r.json["error"]["type"] == kind and r.json["request_id"] == r.headers["x-request-id"]
    assert failures[3][0].headers["Retry-After"] == "2"  # the headers of the error are kept
    assert client.post("/v1/chat/completions", json={"model": "nope", **hello}).json["error"]["code"] == (
        "model_not_found")  # OpenAI's shape on OpenAI's paths


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                max_size=4), max_leaves=12)
IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
BLOCKS = [{"type": "text", "text": "hi"}, IMAGE, {"type": "image", "source": {"type": "url", "url": "https://x"}},
          {"type": "document", "source": {"type": "text", "data": "a note"}},
          {"type": "document", "source": {"type": "content", "content": [{"type": "text", "text": "a"}, IMAGE]}},
          {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Paris"}},
          {"type": "tool_result", "tool_use_id": "t1", "content": "18C"},
          {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "18C"}, IMAGE]},
          {"type": "thinking", "thinking": "hmm"}, {"type": "redacted_thinking", "data": "x"},
          {"type": "server_tool_use", "id": "s1"}]
# Valid blocks, in any role, each perhaps with one field changed to anything.
BLOCK = st.builds(lambda block, changes: {**block, **changes}, st.sampled_from(BLOCKS), st.dictionaries(
    st.sampled_from(["type", "text", "source", "id", "name", "input", "tool_use_id", "content", "data"]), JSON,
    max_size=1))
TURN = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool"]),
                              "content": st.text(max_size=10) | st.lists(BLOCK, max_size=3)})
TOOL_CHOICES = st.sampled_from([{"type": t} for t in ("auto", "any", "none")]
                               + [{"type": "tool", "name": "get_weather"}])
EXTRAS = {"system": st.text(max_size=5) | st.lists(BLOCK, max_size=2), "tools": st.just([WEATHER]),
          "tool_choice": TOOL_CHOICES, "stream": st.booleans(), "stop_sequences": st.just(["aid"])}
ANY_FIELD = st.sampled_from(["model", "messages", "system", "tools", "tool_choice", "max_tokens", "stop_sequences",
                             "stream", "temperature", "top_p"])


@pytest.fixture(scope="module")
def fake_client(tmp_path_factory):
    return fake_app(tmp_path_factory.mktemp("fuzz"))[0].test_client()


@settings(max_examples=100, deadline=None)
@given(path=st.sampled_from(["/v1/messages", "/v1/messages/count_tokens"]),
       turns=st.lists(TURN, min_size=1, max_size=3),
       extras=st.fixed_dictionaries({}, optional=EXTRAS), garbage=st.dictionaries(ANY_FIELD, JSON, max_size=1))
def test_mutated_bodies_never_get_a_500_and_errors_keep_anthropic_s_shape(fake_client, path, turns, extras, garbage):
    """Valid blocks in any role and order, each perhaps with a field changed to anything, and at most one
    top-level field changed to anything."""
    r = fake_client.post(path, data=json.dumps({**body(model="fake-echo", max_tokens=4, messages=turns), **extras,
                                                **garbage}))
    assert r.status_code < 500, r.data
    if r.status_code >= 400:
        holds(r.json, answers.AnthropicErrorResponse)
    r.close()
