"""Tool calling end to end: the openai SDK and LangChain against gunicorn, with a chatglm model
scripted to call a tool and the fake Cloudflare's function-calling models."""

from __future__ import annotations

import json

import openai
import pytest

from backends.chatglm.demo_model import write_demo_model
from tests.fake_cloudflare import cloudflare_env

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# What the scripted model says after <|assistant|>, whatever it is asked: ChatGLM3's tool-call format.
TOOL_CALL = ("get_weather\n", "```python\n", "tool_call(", "city=", '"Paris"', ")\n```", "<|observation|>")
BAD_CALL = ("get_weather\n", "tool_call(city=Paris", "<|observation|>")


@pytest.fixture(scope="module")
def server(server_factory, models_dir, fake):
    model = write_demo_model(models_dir / "caller.bin", script=TOOL_CALL)
    return server_factory(CHATGLM_MODEL=str(model), **cloudflare_env(fake),
                          CLOUDFLARE_MODELS="@cf/fake/tools,@cf/fake/toolsflat")


MODELS = ["caller", "@cf/fake/tools", "@cf/fake/toolsflat"]


@pytest.mark.parametrize("model", MODELS)
def test_a_tool_call_comes_back_as_tool_calls(client, model):
    r = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert json.loads(call.function.arguments) == {"city": "Paris"}


@pytest.mark.parametrize("model", MODELS)
def test_streamed_tool_calls_follow_openai_deltas(client, model):
    chunks = list(client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER], stream=True))
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    first, *rest = [d[0] for d in deltas]
    assert (first.index, first.type, first.function.name, first.function.arguments) == (0, "function",
                                                                                        "get_weather", "")
    assert first.id and all(d.id is None and d.function.name is None and d.index == 0 for d in rest)
    assert json.loads("".join(d.function.arguments for d in rest)) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # The SDK's own stream helper merges the deltas into the same call.
    with client.chat.completions.stream(model=model, messages=ASK, tools=[WEATHER]) as stream:
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})


@pytest.mark.parametrize("model", MODELS)
def test_a_tool_result_goes_back_to_the_model(client, fake, model):
    first = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER]).choices[0].message
    history = ASK + [first.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": '{"temp_c": 21}'}]
    r = client.chat.completions.create(model=model, messages=history, tools=[WEATHER])
    assert r.usage.prompt_tokens > 0
    if model.startswith("@cf/"):
        assert r.choices[0].message.content == 'The tool said: {"temp_c": 21}'
        sent = fake.runs(model)[-1].body
        assert sent["tools"] == [WEATHER]
        call = first.tool_calls[0].function
        assert sent["messages"][1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": call.arguments}
        assert sent["messages"][2] == {"role": "tool", "content": '{"temp_c": 21}',
                                       "tool_call_id": first.tool_calls[0].id}


def test_without_tools_the_same_text_is_plain_content(client):
    for extra in ({}, {"tools": [WEATHER], "tool_choice": "none"}):
        r = client.chat.completions.create(model="caller", messages=ASK, **extra)
        assert r.choices[0].finish_reason == "stop" and r.choices[0].message.tool_calls is None
        assert r.choices[0].message.content.startswith("get_weather\n```python\ntool_call(")


def test_a_badly_written_call_is_plain_content(server_factory, models_dir):
    model = write_demo_model(models_dir / "clumsy.bin", script=BAD_CALL)
    server = server_factory(CHATGLM_MODEL=str(model))
    client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0)
    for stream in (False, True):
        if stream:
            chunks = list(client.chat.completions.create(model="clumsy", messages=ASK, tools=[WEATHER], stream=True))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            reason = chunks[-1].choices[0].finish_reason
        else:
            r = client.chat.completions.create(model="clumsy", messages=ASK, tools=[WEATHER])
            text, reason = r.choices[0].message.content, r.choices[0].finish_reason
        assert (text, reason) == ("get_weather\ntool_call(city=Paris", "stop")


@pytest.mark.parametrize("model", ["caller", "@cf/fake/tools"])
def test_langchain_bind_tools(server, model):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city now."""
        return "sunny"

    llm = ChatOpenAI(base_url=server.v1, api_key="x", model=model, max_retries=0).bind_tools([get_weather])
    message = llm.invoke("What is the weather in Paris?")
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("get_weather", {"city": "Paris"})]
    streamed = None
    for piece in llm.stream("What is the weather in Paris?"):
        streamed = piece if streamed is None else streamed + piece
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [("get_weather", {"city": "Paris"})]
