"""An upstream's answer read into aigate's events, whatever shape the server gave it."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from backends.base import (
    ChatRequest,
    Finish,
    Message,
    TextDelta,
    Tool,
    ToolCall,
    UpstreamError,
)
from backends.upstream.normalise import Normaliser

EVENT = 4 * 1024 * 1024  # UPSTREAM_MAX_EVENT_BYTES
REQUEST = ChatRequest(model="m", messages=(Message("user", "hello there"),), max_tokens=5)


def frames(*objects) -> list[bytes]:
    """SSE bytes, split mid-event to show the reader buffers across network chunks."""
    raw = b"".join(b"data: " + (o if isinstance(o, bytes) else json.dumps(o).encode()) + b"\n\n" for o in objects)
    return [raw[i:i + 7] for i in range(0, len(raw), 7)]


def chunk(**delta) -> dict:
    return {"choices": [{"delta": delta, "finish_reason": None}]}


def test_nulls_reasoning_and_running_usage_become_text_and_the_last_count():
    reader = Normaliser(REQUEST, "chat", "up", EVENT)
    events = list(reader.stream(frames(
        {"choices": None, "usage": None},
        {"choices": [{"delta": {"role": "assistant", "content": None, "reasoning_content": "hmm", "tool_calls": None}}],
         "usage": {"prompt_tokens": 9, "completion_tokens": 0}},
        {"choices": [{"delta": {"content": "Hi"}}], "usage": {"prompt_tokens": 9, "completion_tokens": 1}},
        {"choices": [{"delta": {}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 9, "completion_tokens": 2}})))
    assert events[:-1] == [TextDelta("Hi")]
    assert events[-1].reason == "stop" and events[-1].usage.prompt_tokens == 9
    assert events[-1].usage.completion_tokens == 2 and not reader.estimated


def test_no_usage_is_estimated_and_said_so():
    reader = Normaliser(REQUEST, "chat", "up", EVENT)
    events = list(reader.stream(frames(chunk(content="abcdefgh"),
                                       {"choices": [{"delta": {}, "finish_reason": "stop"}]})))
    assert isinstance(events[-1], Finish) and events[-1].usage.completion_tokens == 2 and reader.estimated
    # "hello there": 3 tokens of text, 4 of its message's framing and role, 3 priming the reply
    assert events[-1].usage.prompt_tokens == 10


def test_the_prompt_estimate_counts_what_a_chat_template_adds():
    tool = Tool("weather", "The weather", {"type": "object"})
    call = ToolCall("call_1", "weather", '{"city": "Paris"}')  # 7 + 17 characters: 6 tokens
    chat = ChatRequest(model="m", messages=(
        Message("system", "Be brief."), Message("user", "hello there"), Message("assistant", "", (call,)),
        Message("tool", "18C", tool_call_id="call_1", name="weather")))
    # The tool's definition as sent: {"name":"weather","description":"The weather","parameters":{"type":"object"}}
    assert chat.estimated_prompt_tokens == 3 + (4 + 3) + (4 + 3) + (4 + 6) + (4 + 1 + 1 + 2)
    assert replace(chat, tools=(tool,)).estimated_prompt_tokens == chat.estimated_prompt_tokens + 20
    assert ChatRequest(model="m", messages=(), prompt="once upon a time").estimated_prompt_tokens == 4  # no template


def test_a_stream_that_stops_without_finish_or_done_is_truncated_but_done_alone_is_enough():
    with pytest.raises(UpstreamError, match="truncated"):
        list(Normaliser(REQUEST, "chat", "up", EVENT).stream(frames(chunk(content="a"))))
    events = list(Normaliser(REQUEST, "chat", "up", EVENT).stream(frames(chunk(content="a"), b"[DONE]")))
    assert events[0] == TextDelta("a") and isinstance(events[-1], Finish)


def test_an_error_frame_and_a_malformed_one_fail():
    with pytest.raises(UpstreamError, match="failed mid-answer: out of memory"):
        list(Normaliser(REQUEST, "chat", "up", EVENT).stream(frames({"error": {"message": "out of memory"}})))
    with pytest.raises(UpstreamError, match="malformed"):
        list(Normaliser(REQUEST, "chat", "up", EVENT).stream(frames(b"[1, 2")))


def test_stop_sequences_hold_even_where_the_upstream_ignores_them():
    request = ChatRequest(model="m", messages=REQUEST.messages, stop=("END",))
    events = list(Normaliser(request, "chat", "up", EVENT).stream(frames(chunk(content="one E"),
                                                                         chunk(content="ND two"), b"[DONE]")))
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "one " and events[-1].reason == "stop"
    assert events[-1].stop_sequence == "END"


def test_the_stop_string_an_upstream_says_ended_it_is_kept():
    """vLLM cuts the stop string itself and names it in `stop_reason` (null for an end of text)."""
    request = ChatRequest(model="m", messages=REQUEST.messages, stop=("END", "STOP"))
    for said, kept in (("STOP", "STOP"), (None, None), ("never asked for", None)):
        events = list(Normaliser(request, "chat", "up", EVENT).stream(frames(
            chunk(content="one"), {"choices": [{"delta": {}, "finish_reason": "stop", "stop_reason": said}]},
            b"[DONE]")))
        assert events[-1].reason == "stop" and events[-1].stop_sequence == kept


def test_a_whole_answer_with_chatglm_cpp_s_tool_calls_and_legacy_text():
    body = {"model": "default-model", "choices": [{"message": {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
        "finish_reason": "function_call"}], "usage": {"prompt_tokens": 5, "completion_tokens": 7}}
    events = list(Normaliser(REQUEST, "chat", "up", EVENT).whole(body))
    call = events[0]
    assert isinstance(call, ToolCall) and call.name == "weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_") and events[-1].reason == "tool_calls"
    text = list(Normaliser(REQUEST, "text", "up", EVENT).whole({"choices": [{"text": "once",
                                                                              "finish_reason": "length"}]}))
    assert text[0] == TextDelta("once") and text[-1].reason == "length"
