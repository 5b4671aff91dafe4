"""Unit tests of the wire layer: request parsing, chunk building, SSE framing."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backends.base import Finish, Message, TextDelta, Usage
from compat import sse
from compat.completion_objects import Completion, fold, stream_chunks
from compat.errors import APIError
from compat.requests import parse_chat

BASE = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def parse(**fields):
    return parse_chat({**BASE, **fields})


def test_minimal_request_defaults():
    call = parse()
    assert call.request.messages == (Message("user", "hi"),)
    assert (call.stream, call.include_usage, call.request.max_tokens, call.request.stop) == (False, False, None, ())


def test_roles_and_content_forms_are_normalised():
    call = parse(messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
        {"role": "function", "content": "x", "name": "f"},
    ])
    assert [(m.role, m.content) for m in call.request.messages] == [
        ("system", "be brief"), ("user", "ab"), ("assistant", ""), ("tool", "42"), ("tool", "x")]


def test_stream_options_and_token_limits():
    call = parse(stream=True, stream_options={"include_usage": True}, max_tokens=9, max_completion_tokens=4,
                 stop="\n", temperature=0, top_p=1, seed=3)
    assert (call.stream, call.include_usage, call.request.max_tokens, call.request.stop) == (True, True, 4, ("\n",))
    assert (call.request.temperature, call.request.top_p) == (0.0, 1.0)
    assert parse(stream_options={"include_usage": True}).include_usage is True  # harmless without stream
    assert parse(max_tokens=5.0).request.max_tokens == 5


@pytest.mark.parametrize("fields, param", [
    ({"model": None}, "model"),
    ({"model": 3}, "model"),
    ({"messages": [{"role": "user", "content": {"text": "x"}}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}, "messages[0].content[0].text"),
    ({"messages": [1]}, "messages[0]"),
    ({"messages": [{"role": {}, "content": "x"}]}, "messages[0].role"),  # unhashable: was a 500
    ({"messages": [{"role": ["user"], "content": "x"}]}, "messages[0].role"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_completion_tokens": 4, "max_tokens": "x"}, "max_tokens"),  # was ignored beside the newer name
    ({"stop": ""}, "stop"),
    ({"stop": [1]}, "stop"),
    ({"stream_options": []}, "stream_options"),
    ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
    ({"tools": {"f": 1}}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function",
                                                                                  "function": {"name": "g"}}},
     "tool_choice"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"function": {}}]}]},
     "messages[0].tool_calls[0].function.name"),
    ({"user": 5}, "user"),
    ({"response_format": {"type": "xml"}}, "response_format"),
])
def test_bad_fields_name_their_param(fields, param):
    with pytest.raises(APIError) as err:
        parse(**fields)
    assert err.value.status == 400 and err.value.param == param
    assert set(err.value.body()["error"]) == {"message", "type", "param", "code"}


def test_tools_and_tool_history():
    call = parse(
        tools=[{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                                  "parameters": {"type": "object", "properties": {}}}}],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        messages=[{"role": "user", "content": "weather?"},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": "call_1", "type": "function",
                       "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"}])
    r = call.request
    assert [t.name for t in r.tools] == ["get_weather"]
    assert (r.tool_choice, r.forced_tool) == ("required", "get_weather")
    assert r.messages[1].tool_calls[0].arguments == '{"city": "Paris"}'
    assert (r.messages[2].role, r.messages[2].tool_call_id) == ("tool", "call_1")
    assert parse(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="none").request.tools == ()


def test_unknown_and_ignored_fields_are_accepted():
    call = parse(user="u", metadata={"a": 1}, logit_bias={"5": 1}, tools=[], tool_choice="none",
                 parallel_tool_calls=True, response_format={"type": "text"}, logprobs=False, n=1, store=False)
    assert call.request.model == "m"


def events(*texts, reason="stop"):
    return iter([*(TextDelta(t) for t in texts), Finish(reason, Usage(3, 4))])


def test_stream_chunk_sequence():
    c = Completion("m", id="chatcmpl-x", created=5)
    chunks = list(stream_chunks(c, events("He", "", "llo"), include_usage=True))
    assert [ch["choices"][0]["delta"] if ch["choices"] else None for ch in chunks] == [
        {"role": "assistant", "content": ""}, {"content": "He"}, {"content": "llo"}, {}, None]
    assert chunks[3]["choices"][0]["finish_reason"] == "stop"
    assert all(ch["choices"][0]["finish_reason"] is None for ch in chunks[:3])
    assert chunks[4] == {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 5, "model": "m",
                         "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                                                    "prompt_tokens_details": {"cached_tokens": 0}}}
    assert {ch["id"] for ch in chunks} == {"chatcmpl-x"}
    assert len(list(stream_chunks(c, events("a"), include_usage=False))) == 3


def test_fold_equals_the_stream():
    c = Completion("m")
    body = fold(c, events("He", "llo", reason="length"))
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello"},
                                "logprobs": None, "finish_reason": "length"}]
    assert body["usage"]["total_tokens"] == 7 and body["object"] == "chat.completion"


def test_sse_frames():
    assert sse.encode({"a": "x\ny"}) == b'data: {"a":"x\\ny"}\n\n'
    assert sse.DONE == b"data: [DONE]\n\n"
    assert sse.encode({"a": "\ud800"}) .endswith(b"\n\n")  # a lone surrogate cannot break the stream


@given(st.text())
def test_sse_event_is_one_line_of_json_for_any_text(text):
    frame = sse.encode({"content": text})
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n")
    body = frame[6:-2]
    assert b"\n" not in body and b"\r" not in body
    assert json.loads(body)["content"] == text.encode("utf-8", "replace").decode("utf-8")


def test_failure_after_the_first_byte_goes_in_band():
    from backends.base import QueueTimeout
    from web.client_socket import ClientSocket
    from web.sse_writer import sse_stream

    closed = []

    def backend_events():
        try:
            yield TextDelta("partial")
            raise QueueTimeout("upstream went away")
        finally:
            closed.append(True)

    from web.record import RequestRecord

    events = backend_events()
    record = RequestRecord("req_1", "POST", "/v1/chat/completions", "127.0.0.1")
    no_socket = ClientSocket({}, 30)  # not under gunicorn: nothing to watch
    frames = list(sse_stream(stream_chunks(Completion("m"), events, False), events.close, record, no_socket))
    assert json.loads(frames[1][6:])["choices"][0]["delta"] == {"content": "partial"}
    assert json.loads(frames[-2][6:])["error"]["code"] == "queue_timeout"
    assert frames[-1] == sse.DONE and closed == [True]
    assert record.error == "queue_timeout"


def test_closing_the_stream_closes_the_backend():
    from web.client_socket import ClientSocket
    from web.sse_writer import sse_stream

    closed = []

    def backend_events():
        try:
            while True:
                yield TextDelta("x")
        finally:
            closed.append(True)

    from web.record import RequestRecord

    events = backend_events()
    body = sse_stream(stream_chunks(Completion("m"), events, False), events.close,
                      RequestRecord("req_1", "POST", "/v1/chat/completions", "127.0.0.1"), ClientSocket({}, 30))
    next(body), next(body)
    body.close()  # what the WSGI server does when the client goes away
    assert closed == [True]


def test_request_limits():
    from compat.requests import Limits, parse_completion

    limits = Limits(max_messages=2, max_input_chars=10, max_tokens=50)
    assert parse_chat({**BASE, "max_tokens": 50}, limits).request.max_tokens == 50
    for body, param, code in [
        ({**BASE, "messages": [{"role": "user", "content": "a"}] * 3}, "messages", "too_many_messages"),
        ({**BASE, "messages": [{"role": "user", "content": "x" * 11}]}, "messages", "input_too_large"),
        ({**BASE, "max_tokens": 51}, "max_tokens", "max_tokens_too_large"),
        ({**BASE, "max_completion_tokens": 51}, "max_completion_tokens", "max_tokens_too_large"),
        ({**BASE, "max_completion_tokens": None, "max_tokens": 51}, "max_tokens", "max_tokens_too_large"),
    ]:
        with pytest.raises(APIError) as err:
            parse_chat(body, limits)
        assert (err.value.status, err.value.param, err.value.code) == (400, param, code)
    with pytest.raises(APIError) as err:
        parse_completion({"model": "m", "prompt": ["12345", "678901"]}, limits)
    assert err.value.code == "input_too_large"


def test_max_tokens_ceilings_per_model_bound_every_answer():
    from compat.requests import Limits, parse_completion

    limits = Limits(max_tokens=50, max_tokens_by_model={"small": 8})
    assert parse_chat({**BASE, "model": "small", "max_tokens": 8}, limits).request.max_tokens == 8
    with pytest.raises(APIError, match="at most 8 for this model") as err:
        parse_chat({**BASE, "model": "small", "max_tokens": 9}, limits)
    assert err.value.code == "max_tokens_too_large"
    assert parse_chat({**BASE, "model": "other", "max_tokens": 50}, limits).request.max_tokens == 50
    # Asking for nothing gets the ceiling, not the whole context; completions keep their 16 under it.
    assert parse_chat({**BASE, "model": "small"}, limits).request.max_tokens == 8
    assert parse_chat(BASE, Limits()).request.max_tokens is None
    assert parse_completion({"model": "small", "prompt": "x"}, limits).requests[0].max_tokens == 8
    assert parse_completion({"model": "other", "prompt": "x"}, limits).requests[0].max_tokens == 16
