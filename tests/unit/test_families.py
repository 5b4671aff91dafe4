"""Each family's chat template, token for token against chatglm.cpp's own apply_chat_template, the
byte-level detokenizer, and GLM-4's tool format, with the generated models' real tokenizers."""

from __future__ import annotations

import json

import chatglm_cpp
import pytest

from backends.base import InvalidRequest, Message, Tool, ToolCall
from backends.chatglm.chatglm3_tools import ReplySplitter
from backends.chatglm.engine.model import ByteDetokenizer, Model
from backends.chatglm.ggml_file import read_model_file, read_tokenizer_vocab
from backends.chatglm.glm4_tools import parse_call, render_call, tools_system_prompt

HISTORY = (Message("system", "Be brief."), Message("user", "你好 hello"), Message("assistant", "Hi there."),
           Message("tool", '{"temp": 21}'), Message("user", "and tomorrow?  Ünïcødé 🚀\n\nok"))
WEATHER = Tool("get_weather", "Weather now", {"type": "object", "properties": {"city": {"type": "string"}}})


def native(messages) -> list:
    roles = {"tool": "observation"}
    return [chatglm_cpp.ChatMessage(role=roles.get(m.role, m.role), content=m.content) for m in messages]


@pytest.fixture(scope="module")
def glm4(glm4_model):
    return Model(read_model_file(glm4_model), 256, slots=1)


@pytest.fixture(scope="module")
def chatglm2(chatglm2_model):
    return Model(read_model_file(chatglm2_model), 256, slots=1)


def test_glm4_plain_chats_are_encoded_exactly_as_chatglm_cpp_does(glm4):
    for messages in (HISTORY, HISTORY[1:2], HISTORY[:2]):
        assert glm4.encode_chat(messages) == list(glm4._tokenizer.apply_chat_template(native(messages), 1 << 30))
    assert glm4.family.name == "GLM-4" and glm4.file.special_token_ids["<|endoftext|>"] == glm4.file.tokenizer_pieces


def test_chatglm2_plain_chats_are_encoded_exactly_as_chatglm_cpp_does(chatglm2):
    chats = [HISTORY[1:3] + (Message("user", "and tomorrow?"),), HISTORY[1:2],
             (Message("user", "a"), Message("assistant", "b"), Message("user", "c"), Message("assistant", "d"),
              Message("user", "e"))]
    for messages in chats:
        assert chatglm2.encode_chat(messages) == list(
            chatglm2._tokenizer.apply_chat_template(native(messages), 1 << 30))
    text = chatglm2._tokenizer.decode(chatglm2.encode_chat((Message("system", "S"), Message("user", "q"))))
    assert text == "[Round 1]\n\n问：S\n\nq\n\n答："  # ChatGLM2 has no system role: it joins the question


def test_chatglm2_refuses_tools(chatglm2):
    with pytest.raises(InvalidRequest) as err:
        chatglm2.encode_chat(HISTORY[1:2], (WEATHER,))
    assert err.value.param == "tools" and "ChatGLM2" in err.value.message
    with pytest.raises(InvalidRequest):
        chatglm2.encode_chat(HISTORY[1:4])  # a tool result in the history


def test_byte_level_pieces_that_split_a_character_wait_for_its_last_byte(glm4, glm4_model):
    vocab = read_tokenizer_vocab(read_model_file(glm4_model))
    text = "你好 hello 🚀 Ünïcødé 北京是中国的首都"
    ids = glm4._encode(text)
    split = [i for i in ids if not _whole(vocab[i])]
    assert split, "the text should need pieces that end inside a character"
    d = ByteDetokenizer(vocab)
    parts = [d.add(i) for i in ids]
    assert "".join(parts) + d.flush() == text == glm4._tokenizer.decode(ids)
    assert "\ufffd" not in "".join(parts)
    d = ByteDetokenizer(vocab)
    assert d.add(ord("a")) + d.add(0xE4) + d.flush() == "a\ufffd"  # a character cut off for good


def _whole(piece: bytes) -> bool:
    try:
        piece.decode()
        return True
    except UnicodeDecodeError:
        return False


def test_glm4_tools_go_in_a_system_turn_and_calls_come_back_with_their_name_as_metadata(glm4):
    with_tools = glm4.encode_chat(HISTORY[1:2], (WEATHER,))
    assert with_tools == glm4.encode_chat((Message("system", tools_system_prompt((WEATHER,))), HISTORY[1]))
    assert "## get_weather" in tools_system_prompt((WEATHER,))
    call = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
    ids = glm4.encode_chat((Message("user", "weather?"), Message("assistant", "", tool_calls=(call,)),
                            Message("tool", "21C", tool_call_id="call_1")))
    assert '<|assistant|>get_weather\n{"city": "Paris"}<|observation|>\n21C<|assistant|>' in glm4._tokenizer.decode(
        ids, False)


def test_glm4_parse_call():
    call = parse_call("get_weather", '{"city": "Paris", "days": 3}')
    assert call is not None and json.loads(call.arguments) == {"city": "Paris", "days": 3}
    assert parse_call("f", '```json\n{"x": [1]}\n```').arguments == '{"x": [1]}'
    for name, body in [("f", "[1, 2]"), ("f", "tool_call(x=1)"), ("two words", "{}"), ("f", '{"x":')]:
        assert parse_call(name, body) is None
    back = parse_call("s", render_call(ToolCall("c", "s", '{"q": "fox \\"quoted\\""}')))
    assert back is not None and json.loads(back.arguments) == {"q": 'fox "quoted"'}
    r = ReplySplitter(True, parse=parse_call)
    assert "".join(r.feed(p) for p in ["get_wea", 'ther\n{"city":', ' "Paris"}']) == ""
    rest, got = r.finish()
    assert rest == "" and got is not None and json.loads(got.arguments) == {"city": "Paris"}


def test_the_file_check_knows_each_family(tmp_path, glm4_model, glm4v_model, chatglm2_model):
    from backends.chatglm.ggml_file import ModelFileError

    assert [read_model_file(p).family_name for p in (glm4_model, glm4v_model, chatglm2_model)] == [
        "GLM-4", "GLM-4V", "ChatGLM2-6B"]
    vision = read_model_file(glm4v_model).vision
    assert vision is not None and vision.image_tokens == 6
    data = glm4_model.read_bytes()
    first_line = data.index(b" 0\n") - 4  # inside the first vocabulary line's base64
    for name, bad, match in [
            ("chatglm1", data[:4] + (1).to_bytes(4, "little") + data[8:], "ChatGLM-6B model; aigate serves"),
            ("vocab", data[:first_line] + b"!!!!" + data[first_line + 4:], "tokenizer is corrupt"),
            ("vision-cut", glm4v_model.read_bytes()[:12 + 52 + 20], "ends inside the vision config")]:
        path = tmp_path / f"{name}.bin"
        path.write_bytes(bad)
        with pytest.raises(ModelFileError, match=match):
            read_model_file(path)
