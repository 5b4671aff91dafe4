"""The Responses codec without a server: request items to messages, and every event and response
object checked strictly against openai-python's own types (the SDK itself only constructs them)."""

from __future__ import annotations

from itertools import islice

import pytest
from openai.types.responses import Response, ResponseItem, ResponseStreamEvent
from pydantic import TypeAdapter

from backends.base import Finish, Message, TextDelta, ToolCall, Usage
from compat.errors import APIError, internal_error
from compat.responses_api import ResponseStream, parse_responses

EVENTS = TypeAdapter(ResponseStreamEvent)
ITEMS = TypeAdapter(ResponseItem)


def test_items_become_the_chat():
    call = parse_responses({
        "model": "m", "instructions": "Be brief.", "store": False, "reasoning": {"summary": "auto"},
        "include": ["reasoning.encrypted_content"], "prompt_cache_key": "k", "client_metadata": {"x": "y"},
        "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}, {"type": "web_search"},
                  {"type": "namespace", "name": "mcp", "tools": []}],
        "input": [{"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Rules."}]},
                  {"role": "user", "content": "Hi"},
                  {"type": "reasoning", "id": "rs_1", "summary": []},
                  {"role": "assistant", "content": [{"type": "output_text", "text": "Calling."}]},
                  {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                  {"type": "function_call", "call_id": "c2", "name": "f", "arguments": "{\"a\": 1}"},
                  {"type": "function_call_output", "call_id": "c1", "output": "one"},
                  {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "two"}]}],
    })
    assert call.request.messages == (
        Message("system", "Be brief."), Message("system", "Rules."), Message("user", "Hi"),
        Message("assistant", "Calling.", (ToolCall("c1", "f", "{}"), ToolCall("c2", "f", '{"a": 1}'))),
        Message("tool", "one", tool_call_id="c1", name="f"), Message("tool", "two", tool_call_id="c2", name="f"))
    assert [t.name for t in call.request.tools] == ["f"] and not call.store and not call.stream
    assert [i["type"] for i in call.input_items] == ["message", "message", "message", "function_call",
                                                     "function_call", "function_call_output", "function_call_output"]
    for item in call.input_items:
        ITEMS.validate_python(item)  # what GET .../input_items lists
    assert len({i["id"] for i in call.input_items}) == 7


@pytest.mark.parametrize("body, param", [
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input[0].content[0].type"),
    ({"input": [{"type": "function_call", "name": "f"}]}, "input[0]"),
    ({"input": "x", "tools": [{"type": "function", "name": "bad name"}]}, "tools[0].name"),
    ({"input": "x", "tool_choice": {"type": "function", "name": "g"}}, "tool_choice"),
    ({"input": "x", "conversation": "conv_1"}, "conversation"),
    ({"input": "x", "background": True}, "background"),
    ({"input": []}, "input"),
])
def test_bad_requests_name_the_field(body, param):
    with pytest.raises(APIError) as err:
        parse_responses({"model": "m", **body})
    assert err.value.status == 400 and err.value.param == param


def test_every_event_and_the_response_match_the_sdks_types():
    call = parse_responses({"model": "m", "input": "hi", "tools": [{"type": "function", "name": "f"}],
                            "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}}})
    codec = ResponseStream("m", call.echo)
    events = list(codec.events(iter([TextDelta("Hel"), TextDelta("lo"), ToolCall("c1", "f", "{}"),
                                     ToolCall("c2", "f", "{}"), Finish("tool_calls", Usage(5, 3, cached_tokens=2))])))
    for event in events:
        EVENTS.validate_python(event)
    final = Response.model_validate(codec.final)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert final.output_text == "Hello" and [o.type for o in final.output] == ["message", "function_call",
                                                                                  "function_call"]
    assert final.usage.input_tokens_details.cached_tokens == 2 and final.usage.total_tokens == 8
    assert final.text.format.type == "json_schema"


def test_a_failure_after_the_first_byte_is_an_error_then_response_failed():
    codec = ResponseStream("m", {})
    started = list(islice(codec.events(iter([TextDelta("x"), TextDelta("y")])), 5))  # up to the first delta
    assert started[-1]["type"] == "response.output_text.delta"
    failed = list(codec.failed(internal_error()))
    assert [e["type"] for e in failed] == ["error", "response.failed"]
    for event in failed:
        EVENTS.validate_python(event)
    assert failed[0]["sequence_number"] == len(started)


def test_parallel_tool_calls_false_keeps_the_first_call():
    codec = ResponseStream("m", {}, parallel_tool_calls=False)
    list(codec.events(iter([ToolCall("c1", "f", "{}"), ToolCall("c2", "g", "{}"), Finish("tool_calls", Usage(1, 1))])))
    assert [o["call_id"] for o in codec.final["output"]] == ["c1"]
