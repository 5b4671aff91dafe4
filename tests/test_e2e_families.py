"""GLM-4 and ChatGLM2 end to end: the official SDK against gunicorn serving generated models of each
family on the real chatglm.cpp (ChatGLM3 has its own modules: test_e2e_chat, test_e2e_tools)."""

from __future__ import annotations

import json

import chatglm_cpp
import openai
import pytest

from backends.chatglm.demo_model import write_demo_model

USER = [{"role": "user", "content": "Tell me about the river and the old town. 你好"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
# What the scripted GLM-4 model says after <|assistant|>: GLM-4's tool-call format.
GLM4_CALL = ("get_weather", "\n", '{"city": "Paris"}', "<|observation|>")


@pytest.fixture(scope="module", params=["glm4", "chatglm2"])
def family(request, server_factory, glm4_model, chatglm2_model):
    path = {"glm4": glm4_model, "chatglm2": chatglm2_model}[request.param]
    server = server_factory(CHATGLM_MODEL=str(path))
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    return request.param, path, client


def prompt_tokens(path, messages) -> int:
    """What chatglm.cpp's own template makes of a plain chat."""
    tokenizer = chatglm_cpp.Pipeline(str(path)).tokenizer
    native = [chatglm_cpp.ChatMessage(role=m["role"], content=m["content"]) for m in messages]
    return len(tokenizer.apply_chat_template(native, 1 << 30))


def test_chat_stream_and_usage(family):
    name, path, client = family
    full = client.chat.completions.create(model=path.stem, messages=USER, temperature=0, max_tokens=30)
    chunks = list(client.chat.completions.create(model=path.stem, messages=USER, temperature=0, max_tokens=30,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert full.choices[0].message.content == text and len(text) > 10
    assert (full.choices[0].finish_reason, chunks[-2].choices[0].finish_reason) == ("length", "length")
    assert full.usage.completion_tokens == 30 and chunks[-1].usage.completion_tokens == 30
    assert full.usage.prompt_tokens == chunks[-1].usage.prompt_tokens == prompt_tokens(path, USER)
    for n in (1, 7):
        r = client.chat.completions.create(model=path.stem, messages=USER, temperature=0, max_tokens=n)
        assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (n, "length")


def test_stop_strings(family):
    _, path, client = family
    reference = client.chat.completions.create(model=path.stem, messages=USER, temperature=0,
                                               max_tokens=60).choices[0].message.content
    stop = reference[20:23]
    expected = reference[:reference.index(stop)]
    r = client.chat.completions.create(model=path.stem, messages=USER, temperature=0, max_tokens=60, stop=stop)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (expected, "stop")
    chunks = list(client.chat.completions.create(model=path.stem, messages=USER, temperature=0, max_tokens=60,
                                                 stop=[stop], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected


def test_the_next_turn_reuses_the_history(family):
    _, path, client = family
    first = client.chat.completions.create(model=path.stem, messages=USER, temperature=0, max_tokens=8)
    history = USER + [{"role": "assistant", "content": first.choices[0].message.content},
                      {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(model=path.stem, messages=history, temperature=0, max_tokens=4)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens - 1 <= cached < second.usage.prompt_tokens
    assert second.usage.prompt_tokens == prompt_tokens(path, history)


def test_tools(family):
    name, path, client = family
    if name == "chatglm2":
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=path.stem, messages=USER, tools=[WEATHER], max_tokens=4)
        assert err.value.param == "tools" and "cannot call tools" in err.value.message
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=path.stem, messages=USER, tools=[WEATHER], max_tokens=4,
                                           stream=True)
    else:  # an unscripted model answers in plain text when offered tools
        r = client.chat.completions.create(model=path.stem, messages=USER, tools=[WEATHER], max_tokens=8)
        assert r.choices[0].finish_reason in ("length", "stop")


@pytest.fixture(scope="module")
def caller(server_factory, models_dir):
    model = write_demo_model(models_dir / "glm4-caller.bin", family="glm4", script=GLM4_CALL)
    return openai.OpenAI(base_url=server_factory(CHATGLM_MODEL=str(model)).v1, api_key="unused", max_retries=0)


def test_glm4_tool_calls_and_their_results(caller):
    r = caller.chat.completions.create(model="glm4-caller", messages=USER, tools=[WEATHER])
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    chunks = list(caller.chat.completions.create(model="glm4-caller", messages=USER, tools=[WEATHER], stream=True))
    deltas = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert deltas[0].function.name == "get_weather"
    assert json.loads("".join(d.function.arguments for d in deltas[1:])) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    history = USER + [r.choices[0].message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]
    again = caller.chat.completions.create(model="glm4-caller", messages=history, tools=[WEATHER], max_tokens=5)
    assert again.usage.prompt_tokens > r.usage.prompt_tokens  # the call and its result are in the prompt
