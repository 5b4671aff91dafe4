"""End to end: the official `anthropic` SDK's Messages API (create, stream, count_tokens, tools, errors)
against one gunicorn serving the local demo model (chatglm.cpp, through the engine), Workers AI (the
fake Cloudflare on loopback) and an OpenAI-compatible upstream (the fake upstream), behind API keys from
a keys file."""

from __future__ import annotations

import base64
import io
import json

import openai
import pytest
import requests
from PIL import Image

from backends.chatglm.engine.client import EngineClient
from tests.fake_cloudflare import cloudflare_env
from tests.fake_upstream import FakeUpstream

anthropic = pytest.importorskip("anthropic", reason="the anthropic SDK is not installed (requirements-dev.txt)")

LOCAL, CF, CF_TOOLS, CF_DROP = "chatglm3-demo", "@cf/fake/chat", "@cf/fake/tools", "@cf/fake/drop"
UP, UP_TOOLS = "fake-ok", "fake-tools"  # the fake upstream's
MODELS = [LOCAL, CF, UP]
KEY, LIMITED = "sk-messages", "sk-limited"
KEYS_FILE = f"""
[keys.main]
key = "{KEY}"

[keys.limited]
key = "{LIMITED}"
requests_per_minute = 1
"""
WEATHER = {"name": "get_weather", "description": "The weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
GREEDY = {"temperature": 0}  # the SDK sends temperature only in extra_body
STREAM_ORDER = ["message_start", "content_block_start", "ping", "content_block_delta", "content_block_stop",
                "message_delta", "message_stop"]


@pytest.fixture(scope="module")
def upstream():
    fake = FakeUpstream(models=[UP, UP_TOOLS]).start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def server(server_factory, fake, upstream, demo_model, tmp_path_factory):
    files = tmp_path_factory.mktemp("files")
    (files / "keys.toml").write_text(KEYS_FILE)
    (files / "keys.toml").chmod(0o600)
    (files / "upstreams.toml").write_text(f'[upstreams.up]\nbase_url = "{upstream.base}"\nmodels = ["{UP}", '
                                          f'"{UP_TOOLS}"]\n')
    return server_factory(CHATGLM_MODEL=str(demo_model), CHATGLM_MODEL_ID=LOCAL, API_KEYS_FILE=str(files / "keys.toml"),
                          UPSTREAMS_FILE=str(files / "upstreams.toml"), CLOUDFLARE_RETRIES="0",
                          **cloudflare_env(fake, CLOUDFLARE_MODELS=f"{CF},{CF_TOOLS},{CF_DROP}"))


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.base_url, api_key=KEY, max_retries=0)


def logged(server, request_id: str) -> str:
    """The request's log line (written once its answer has closed)."""
    return server.wait_for_log(f"id={request_id} ")


def kinds(types) -> list[str]:
    """The event types, a run of content_block_delta as one."""
    out: list[str] = []
    for kind in types:
        if not (kind == "content_block_delta" and out and out[-1] == kind):
            out.append(kind)
    return out


def raw_events(server, body: dict) -> list[tuple[str, dict]]:
    """A stream's events as sent: each `event:` name and its data."""
    r = requests.post(server.base_url + "/v1/messages", json=body, headers={"x-api-key": KEY}, timeout=60)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream"), r.text
    events = []
    for block in r.content.decode().split("\n\n"):
        if block:
            name, data = block.split("\n")
            events.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    assert all(name == data["type"] for name, data in events)
    return events


@pytest.mark.parametrize("model", MODELS)
def test_create_with_a_system_prompt_and_earlier_turns(server, client, fake, upstream, model):
    message = client.messages.with_raw_response.create(
        model=model, max_tokens=12, system=[{"type": "text", "text": "Be brief."},
                                            {"type": "text", "text": "Be kind."}],
        messages=[{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hi!"},
                  {"role": "user", "content": [{"type": "text", "text": "hello there"}]}], extra_body=GREEDY)
    request_id = message.headers["request-id"]
    message = message.parse()
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == model and message._request_id == request_id
    [block] = message.content
    assert block.type == "text" and block.text
    assert message.stop_reason in ("end_turn", "max_tokens") and message.stop_sequence is None
    usage = message.usage
    assert usage.output_tokens <= 12 and usage.cache_creation_input_tokens == 0
    line = logged(server, request_id)  # the same log line and counts as chat's
    assert f"path=/v1/messages status=200 client=127.0.0.1 key=main model={model} backend=" in line
    assert f"prompt_tokens={usage.input_tokens + usage.cache_read_input_tokens} " in line
    assert f"completion_tokens={usage.output_tokens} " in line
    sent = fake.runs(CF)[-1].body if model == CF else upstream.requests[-1]["body"] if model == UP else None
    if sent is not None:
        assert block.text == "You said: hello there" and message.stop_reason == "end_turn"
        assert sent["messages"] == [
            {"role": "system", "content": "Be brief.\n\nBe kind."}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "hello there"}]
        assert sent["temperature"] == 0 and sent["max_tokens"] == 12
        assert not {"system", "extra_body"} & set(sent)  # Anthropic's fields are not passed on to an upstream


@pytest.mark.parametrize("model", MODELS)
def test_a_stream_is_anthropics_event_order_and_the_same_message(server, client, model):
    """On the local model the engine writes the text deltas itself (the handover), in the same frames."""
    ask = dict(model=model, max_tokens=10, messages=[{"role": "user", "content": "hello there"}], extra_body=GREEDY)
    whole = client.messages.create(**ask)
    engine = EngineClient(server.engine_socket, None, 0)
    handovers = engine.status()["handovers"]
    raw = raw_events(server, {**ask.pop("extra_body"), **ask, "stream": True})
    assert engine.status()["handovers"] == handovers + (model == LOCAL)
    assert kinds(name for name, _ in raw) == STREAM_ORDER
    assert "".join(d["delta"]["text"] for name, d in raw if name == "content_block_delta") == whole.content[0].text
    with client.messages.create(stream=True, extra_body=GREEDY, **ask) as stream:
        events = list(stream)
    assert kinds(e.type for e in events) == [k for k in STREAM_ORDER if k != "ping"]  # the SDK drops pings
    start, delta = events[0], events[-2]
    assert start.message.id.startswith("msg_") and start.message.content == [] and start.message.stop_reason is None
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert text == whole.content[0].text
    assert (delta.delta.stop_reason, delta.usage.output_tokens) == (whole.stop_reason, whole.usage.output_tokens)
    assert delta.usage.input_tokens + delta.usage.cache_read_input_tokens == (
        whole.usage.input_tokens + whole.usage.cache_read_input_tokens)
    with client.messages.stream(extra_body=GREEDY, **ask) as helper:  # the SDK's own accumulation
        final = helper.get_final_message()
    assert final.content[0].text == whole.content[0].text and final.usage.output_tokens == whole.usage.output_tokens


@pytest.mark.parametrize("model", MODELS)
def test_count_tokens_is_the_prompt_a_message_reports(client, model):
    ask = dict(model=model, system="Answer with the weather.", tools=[WEATHER],
               messages=[{"role": "user", "content": "Weather in Paris?"}])
    count = client.messages.count_tokens(**ask).input_tokens
    usage = client.messages.create(max_tokens=4, **ask).usage
    assert count > 0 and count == usage.input_tokens + usage.cache_read_input_tokens
    assert client.messages.count_tokens(model=model, messages=[{"role": "user", "content": "hi"}]).input_tokens < count


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_call_and_its_result_round_trip(client, fake, stream):
    ask = dict(model=CF_TOOLS, max_tokens=64, tools=[WEATHER], messages=[{"role": "user", "content": "Weather?"}])
    if stream:
        with client.messages.stream(**ask) as s:
            events = list(s)
            first = s.get_final_message()
        deltas = [e.delta for e in events if e.type == "content_block_delta"]
        assert [d.type for d in deltas] == ["input_json_delta"] and json.loads(deltas[0].partial_json) == {
            "city": "Paris"}
    else:
        first = client.messages.create(**ask)
    assert first.stop_reason == "tool_use"
    [call] = first.content
    assert (call.type, call.name, call.input) == ("tool_use", "get_weather", {"city": "Paris"})
    answer = client.messages.create(model=CF_TOOLS, max_tokens=64, tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather?"}, {"role": "assistant", "content": first.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18C and sunny"}]}])
    assert answer.stop_reason == "end_turn" and answer.content[0].text == "The tool said: 18C and sunny"
    sent = fake.runs(CF_TOOLS)[-1].body["messages"]
    assert sent[-2]["tool_calls"][0]["id"] == call.id and json.loads(
        sent[-2]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert sent[-1] == {"role": "tool", "content": "18C and sunny", "tool_call_id": call.id, "name": "get_weather"}


def test_an_upstream_s_tool_call_streams_as_input_json_and_its_result_goes_back(client, upstream):
    with client.messages.stream(model=UP_TOOLS, max_tokens=64, tools=[WEATHER],
                                messages=[{"role": "user", "content": "Weather?"}]) as stream:
        first = stream.get_final_message()
    [call] = first.content
    assert (first.stop_reason, call.name, call.input) == ("tool_use", "get_weather", {"city": "Paris"})
    client.messages.create(model=UP_TOOLS, max_tokens=64, tools=[WEATHER], stream=True, messages=[
        {"role": "user", "content": "Weather?"}, {"role": "assistant", "content": first.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18C"}]}]).close()
    sent = upstream.requests[-1]["body"]
    assert sent["messages"][-1] == {"role": "tool", "content": "18C", "tool_call_id": call.id, "name": "get_weather"}
    assert sent["tools"][0]["function"]["name"] == "get_weather" and sent["tool_choice"] == "auto"


def test_the_local_model_takes_tools_and_a_tool_result(client):
    """ChatGLM3's own tool format: the definitions, the earlier call and its result all reach its prompt."""
    call = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
    history = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": [call]}]
    ask = dict(model=LOCAL, tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"})
    without = client.messages.count_tokens(**ask, messages=history[:1]).input_tokens
    message = client.messages.create(**ask, max_tokens=4, messages=[*history, {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18C and sunny"}]}]}])
    assert message.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens > without + 10


@pytest.mark.parametrize("model", MODELS)
def test_stop_sequences_and_max_tokens_say_why_the_answer_ended(client, model):
    ask = dict(model=model, messages=[{"role": "user", "content": "hello there"}], extra_body=GREEDY)
    text = client.messages.create(max_tokens=12, **ask).content[0].text
    at = next(i for i in range(2, len(text) - 1) if not text[i].isspace() and text.find(text[i:i + 2]) == i)
    stop = text[at:at + 2]
    for stream in (False, True):
        if stream:
            with client.messages.stream(max_tokens=12, stop_sequences=["never said", stop], **ask) as s:
                message = s.get_final_message()
        else:
            message = client.messages.create(max_tokens=12, stop_sequences=["never said", stop], **ask)
        assert (message.content[0].text, message.stop_reason, message.stop_sequence) == (text[:at], "stop_sequence",
                                                                                          stop)
    with client.messages.stream(max_tokens=1, **ask) as s:  # streamed: the fake upstream's whole answers say "stop"
        short = s.get_final_message()
    assert (short.stop_reason, short.usage.output_tokens) == ("max_tokens", 1)


def error_of(server, path: str, body: dict, headers: dict) -> requests.Response:
    return requests.post(server.base_url + path, json=body, headers={"anthropic-version": "2023-06-01", **headers},
                         timeout=30)


def test_errors_have_anthropics_shape_and_status(server, client):
    hello = [{"role": "user", "content": "hello"}]
    with pytest.raises(anthropic.AuthenticationError) as denied:
        anthropic.Anthropic(base_url=server.base_url, api_key="sk-wrong", max_retries=0).messages.create(
            model=CF, max_tokens=4, messages=hello)
    assert denied.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError) as unknown:
        client.messages.create(model="claude-no-such-model", max_tokens=4, messages=hello)
    assert unknown.value.type == "not_found_error" and "claude-no-such-model" in unknown.value.api_message
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model=CF, max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}])
    assert bad.value.type == "invalid_request_error" and "take text only" in bad.value.api_message
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        r = error_of(server, path, {"model": CF, "messages": []}, {"x-api-key": KEY})
        assert r.status_code == 400 and r.json() == {"type": "error", "error": {
            "type": "invalid_request_error", "message": "Invalid 'messages': empty array. Expected an array with at "
                                                        "least one item."}, "request_id": r.headers["request-id"]}
    r = requests.post(server.v1 + "/messages", data=b" " * (4 * 1024 * 1024 + 1), headers={"x-api-key": KEY},
                      timeout=30)  # over MAX_BODY_BYTES: refused by the body reader, before the app
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
    limited = anthropic.Anthropic(base_url=server.base_url, api_key=LIMITED, max_retries=0)
    assert limited.messages.count_tokens(model=CF, messages=hello).input_tokens > 0
    with pytest.raises(anthropic.RateLimitError) as limit:
        limited.messages.create(model=CF, max_tokens=4, messages=hello)
    assert limit.value.type == "rate_limit_error" and int(limit.value.response.headers["Retry-After"]) >= 1
    assert requests.post(server.v1 + "/chat/completions", json={}, headers={"x-api-key": KEY}, timeout=30).json()[
        "error"]["code"] == "missing_required_parameter"  # OpenAI's shape on OpenAI's routes


def test_a_failure_after_the_stream_began_is_an_error_event(client):
    with pytest.raises(anthropic.APIStatusError) as failed:
        with client.messages.stream(model=CF_DROP, max_tokens=12, messages=[{"role": "user", "content": "a b c d e"}
                                                                            ]) as stream:
            for _ in stream:
                pass
    assert failed.value.body["type"] == "error" and failed.value.body["error"]["type"] == "api_error"


def test_the_key_from_x_api_key_or_a_bearer_token(server):
    """The SDK sends `api_key` as x-api-key and `auth_token` as a bearer header (Claude Code: ANTHROPIC_API_KEY or
    ANTHROPIC_AUTH_TOKEN); `anthropic-version` is accepted, not required."""
    for sdk in (anthropic.Anthropic(base_url=server.base_url, api_key=KEY, max_retries=0),
                anthropic.Anthropic(base_url=server.base_url, auth_token=KEY, max_retries=0)):
        assert sdk.messages.create(model=CF, max_tokens=4, messages=[{"role": "user", "content": "hi"}]).content
    r = requests.post(server.base_url + "/messages",
                      json={"model": CF, "messages": [{"role": "user", "content": "hi"}]},
                      headers={"x-api-key": KEY}, timeout=30)  # no /v1, no anthropic-version, no max_tokens
    assert r.status_code == 200 and r.json()["content"][0]["text"] == "You said: hi"


def test_an_image_block_reaches_a_model_that_reads_images_as_chat_s_image_part_does(server_factory, glm4v_model):
    """GLM-4V (a small generated one): the same picture and words, greedy, answer the same through both APIs."""
    vision = server_factory(CHATGLM_MODEL=str(glm4v_model))
    picture = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(picture, "PNG")
    data = base64.b64encode(picture.getvalue()).decode()
    chat = openai.OpenAI(base_url=vision.v1, api_key="unused", max_retries=0).chat.completions.create(
        model="glm4v", temperature=0, max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is in the picture?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + data}}]}])
    message = anthropic.Anthropic(base_url=vision.base_url, api_key="unused", max_retries=0).messages.create(
        model="glm4v", max_tokens=8, extra_body=GREEDY, messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is in the picture?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}]}])
    assert message.content[0].text == chat.choices[0].message.content
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == chat.usage.prompt_tokens
