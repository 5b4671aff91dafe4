"""ChatGLM3's chat template and tool-call format, with the demo model's real tokenizer."""

from __future__ import annotations

import json

import pytest

from backends.base import Message, Tool, ToolCall
from backends.chatglm.chatglm3_tools import ReplySplitter, parse_call, render_call, tools_system_prompt
from backends.chatglm.engine.model import Model
from backends.chatglm.ggml_file import read_model_file


@pytest.fixture(scope="module")
def backend(demo_model):
    return Model(read_model_file(demo_model), 1024, slots=1)


def test_plain_chats_are_encoded_exactly_as_chatglm_cpp_does(backend):
    import chatglm_cpp

    history = [Message("system", "Be brief."), Message("user", "你好 hello"), Message("assistant", "Hi there."),
               Message("tool", '{"temp": 21}'), Message("user", "and tomorrow?")]
    roles = {"tool": "observation"}
    native = [chatglm_cpp.ChatMessage(role=roles.get(m.role, m.role), content=m.content) for m in history]
    assert backend.encode_chat(tuple(history)) == list(backend._tokenizer.apply_chat_template(native, 1 << 30))


def test_tools_go_first_as_a_system_turn(backend):
    tools = (Tool("get_weather", "Weather now", {"type": "object", "properties": {"city": {"type": "string"}}}),)
    with_tools = backend.encode_chat((Message("user", "weather?"),), tools)
    system = backend.encode_chat((Message("system", tools_system_prompt(tools)), Message("user", "weather?")))
    assert with_tools == system
    assert '"name": "get_weather"' in tools_system_prompt(tools)


def test_an_earlier_call_is_written_back_with_its_name_as_metadata(backend):
    call = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
    ids = backend.encode_chat((Message("user", "weather?"), Message("assistant", "", tool_calls=(call,)),
                           Message("tool", "21C", tool_call_id="call_1")))
    text = backend._tokenizer.decode(ids, False)
    assert "get_weather\n```python\ntool_call(city='Paris')\n```" in text


def test_parse_call():
    call = parse_call("get_weather", "```python\ntool_call(city='Paris', days=3, units=None)\n```")
    assert call is not None and call.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.arguments) == {"city": "Paris", "days": 3, "units": None}
    assert parse_call("f", "tool_call(x=[1, {'a': 2}])").arguments == '{"x": [1, {"a": 2}]}'
    # JSON's words inside a value, as models write them beside Python's (literal_eval alone refused them).
    call = parse_call("f", 'tool_call(city="Paris", opts={"x": false, "y": null, "z": [true, False]})')
    assert call is not None and json.loads(call.arguments) == {"city": "Paris",
                                                               "opts": {"x": False, "y": None, "z": [True, False]}}
    assert json.loads(parse_call("f", 'tool_call(**{"from": 1, "class": true})').arguments) == {"from": 1,
                                                                                                  "class": True}
    for name, body in [("f", "tool_call(__import__('os').system('true'))"), ("f", "tool_call(1, 2)"),
                       ("f", "print('x')"), ("f", "```python\ntool_call(x=\n```"), ("two words", "tool_call()"),
                       ("f", "tool_call(x=open('/etc/passwd'))"), ("f", "tool_call(x=undefined)"),
                       ("f", "tool_call(**[1])"), ("f", "tool_call(**{1: 2})"), ("f", "tool_call(a=1, **{'b': 2})")]:
        assert parse_call(name, body) is None


def test_render_and_parse_round_trip():
    call = ToolCall("c", "search", '{"q": "fox \\"quoted\\"", "n": 2, "exact": true}')
    back = parse_call("search", render_call(call))
    assert back is not None and json.loads(back.arguments) == json.loads(call.arguments)


def split(tools_offered: bool, pieces: list[str]):
    r = ReplySplitter(tools_offered)
    shown = "".join(r.feed(p) for p in pieces)
    rest, call = r.finish()
    return shown + rest, call


def test_reply_splitter():
    assert split(True, ["\n", "Hel", "lo"]) == ("Hello", None)
    text, call = split(True, ["get_wea", "ther\n```python\ntool_", "call(city='Paris')\n```"])
    assert text == "" and call is not None and json.loads(call.arguments) == {"city": "Paris"}
    assert split(True, ["get_weather\n", "I think it is sunny"]) == ("get_weather\nI think it is sunny", None)
    assert split(False, ["\nHi", " there"]) == ("Hi there", None)
    assert split(False, ["no metadata here\n", "x"]) == ("no metadata here\nx", None)


@pytest.mark.parametrize("tools_offered,raw", [(False, False), (True, False), (False, True)])
def test_a_dummy_prefix_turn_start_is_dropped_however_the_text_is_split(tools_offered, raw):
    """A constrained answer of a real ChatGLM2/3 model, decoded byte for byte: " \\n {...}" (raw: " {...}")."""
    text = ' {"a": 1}' if raw else ' \n {"a": 1}'
    for cut in range(1, len(text)):
        splitter = ReplySplitter(tools_offered, raw=raw).drop_dummy_prefix()
        shown = splitter.feed(text[:cut]) + splitter.feed(text[cut:])
        rest, call = splitter.finish()
        assert (shown + rest, call) == ('{"a": 1}', None)


def test_a_dummy_prefix_call_is_read():
    splitter = ReplySplitter(True).drop_dummy_prefix()
    assert splitter.feed(' get_weather\n ```python\ntool_call(city="P", **{}) ') == ""
    splitter = ReplySplitter(True).drop_dummy_prefix()
    splitter.feed(' get_weather\n ```python\ntool_call(city="P", ok=True, x={"y": false, "z": null})\n```')
    _, call = splitter.finish()
    assert call is not None and json.loads(call.arguments) == {"city": "P", "ok": True, "x": {"y": False, "z": None}}
