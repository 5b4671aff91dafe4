"""End to end: the official SDK's Responses API (create, stream, retrieve, delete, input_items),
structured outputs and the small compatibility fixes, against one gunicorn serving the local
(endless demo) model and Workers AI (the fake Cloudflare on loopback)."""

from __future__ import annotations

import json
import shutil
import sqlite3
import stat
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
from pydantic import BaseModel

from tests.fake_cloudflare import cloudflare_env

LOCAL = "endless"
CF = "@cf/fake/chat"
CF_TOOLS = "@cf/fake/tools"
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
KEYS = "sk-alice,sk-bob"


class City(BaseModel):
    name: str
    population: int
    rivers: list[str]


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("responses") / "state"


@pytest.fixture(scope="module")
def server(server_factory, fake, slow_model, state_dir):
    models = ",".join(f"@cf/fake/{m}" for m in ("chat", "tools", "jsonfail", "drop", "429", "bge"))
    return server_factory(CHATGLM_MODEL=str(slow_model), API_KEYS=KEYS, CLOUDFLARE_RETRIES="0",
                          STATE_DIR=str(state_dir), RESPONSES_MAX_MB="2",  # 1 MB a key
                          **cloudflare_env(fake, CLOUDFLARE_MODELS=models, CLOUDFLARE_EMBEDDING_MODELS="@cf/fake/bge",
                                           CLOUDFLARE_JSON_MODELS="@cf/fake/chat,@cf/fake/tools,@cf/fake/jsonfail"))


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="sk-alice", max_retries=0)


@pytest.fixture(scope="module")
def bob(server):
    return openai.OpenAI(base_url=server.v1, api_key="sk-bob", max_retries=0)


def test_create_on_the_local_model(client):
    r = client.responses.create(model=LOCAL, input="Tell me about the river.", instructions="Be brief.",
                                max_output_tokens=4, temperature=0, reasoning={"summary": "auto"},
                                include=["reasoning.encrypted_content"], prompt_cache_key="k", metadata={"a": "b"})
    assert r.id.startswith("resp_") and r.object == "response" and r.model == LOCAL
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 4 and r.usage.input_tokens > 5
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.input_tokens_details.cached_tokens == 0 and r.usage.output_tokens_details.reasoning_tokens == 0
    [message] = r.output
    assert message.type == "message" and message.role == "assistant" and message.status == "incomplete"
    assert r.output_text == message.content[0].text and r.output_text
    assert (r.instructions, r.max_output_tokens, r.metadata, r.temperature) == ("Be brief.", 4, {"a": "b"}, 0)


def test_stream_sends_openais_events_in_order_and_agrees_with_create(client):
    asked = dict(model=LOCAL, input=[{"role": "user", "content": [{"type": "input_text", "text": "Hello"}]}],
                 max_output_tokens=6, temperature=0)
    with client.responses.stream(**asked) as stream:
        events = list(stream)
    final = events[-1].response  # the SDK's get_final_response() wants response.completed, as OpenAI's would
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) == 6 and kinds[4:10] == ["response.output_text.delta"] * 6
    assert kinds[10:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(d.delta for d in deltas) == final.output_text == events[-1].response.output_text
    assert final.id == events[0].response.id and events[0].response.status == "in_progress"
    assert final.status == "incomplete" and final.usage.output_tokens == 6
    assert client.responses.create(**asked).output_text == final.output_text  # the same road


def test_stored_responses_belong_to_their_key(client, bob):
    r = client.responses.create(model=CF, input="keep me")
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text == "You said: keep me"
    items = client.responses.input_items.list(r.id)
    assert [(i.type, i.role, i.content[0].text) for i in items.data] == [("message", "user", "keep me")]
    with pytest.raises(openai.NotFoundError):
        bob.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        bob.responses.delete(r.id)
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    unstored = client.responses.create(model=CF, input="forget me", store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(model=CF, input="more", previous_response_id=unstored.id)
    assert err.value.code == "previous_response_not_found"


def test_previous_response_id_continues_the_conversation(client, fake):
    first = client.responses.create(model=CF, input="one", instructions="Be terse.")
    second = client.responses.create(model=CF, input="two", previous_response_id=first.id)
    assert second.previous_response_id == first.id and second.output_text == "You said: two"
    sent = fake.runs(CF)[-1].body["messages"]
    # the earlier turn, not its instructions (OpenAI does not carry them over)
    assert sent == [{"role": "user", "content": "one"}, {"role": "assistant", "content": "You said: one"},
                    {"role": "user", "content": "two"}]
    items = client.responses.input_items.list(second.id, order="asc")
    assert [i.type for i in items.data] == ["message", "message", "message"]
    assert [i.role for i in items.data] == ["user", "assistant", "user"]
    page = client.responses.input_items.list(second.id, limit=1)
    assert page.has_more and page.data[0].content[0].text == "two"  # newest first by default


@pytest.mark.parametrize("stream", [False, True])
def test_tool_results_on_the_local_model(client, stream):
    turns = [{"role": "user", "content": "Weather in Paris?"},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": "18C and sunny"}]
    asked = dict(model=LOCAL, tools=[WEATHER, {"type": "web_search"}], max_output_tokens=3, temperature=0)
    bare = client.responses.create(input=turns[:1], **asked)
    if stream:
        r = list(client.responses.create(input=turns, stream=True, **asked))[-1].response
    else:
        r = client.responses.create(input=turns, **asked)
    assert r.status in ("incomplete", "completed") and 0 < r.usage.output_tokens <= 3
    assert r.usage.input_tokens > bare.usage.input_tokens + 5  # the call and its result are in the prompt
    later = client.responses.create(previous_response_id=r.id, input="Thanks!", **asked)
    assert later.usage.input_tokens > r.usage.input_tokens  # and, stored, in the next turn's


@pytest.mark.parametrize("stream", [False, True])
def test_tools_and_a_tool_result_round_trip(client, fake, stream):
    tools = [WEATHER, {"type": "web_search"}, {"type": "namespace", "name": "codex", "tools": []},
             {"type": "image_generation"}]
    asked = dict(model=CF_TOOLS, input="Weather in Paris?", tools=tools, tool_choice="auto",
                 parallel_tool_calls=True)
    if stream:
        with client.responses.stream(**asked) as s:
            events = list(s)
            r = s.get_final_response()
        kinds = [e.type for e in events]
        assert kinds[2:6] == ["response.output_item.added", "response.function_call_arguments.delta",
                              "response.function_call_arguments.done", "response.output_item.done"]
        assert kinds[-1] == "response.completed"
    else:
        r = client.responses.create(**asked)
    [call] = r.output
    assert (call.type, call.name, json.loads(call.arguments)) == ("function_call", "get_weather", {"city": "Paris"})
    assert [t["function"]["name"] for t in fake.runs(CF_TOOLS)[-1].body["tools"]] == ["get_weather"]
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "18C and sunny"}
    # as the Agents SDK and Codex do: the whole conversation again, the call and its output
    again = client.responses.create(model=CF_TOOLS, tools=[WEATHER], stream=False, input=[
        {"role": "user", "content": "Weather in Paris?"}, call.model_dump(exclude_none=True), result])
    assert again.output_text == "The tool said: 18C and sunny"
    sent = fake.runs(CF_TOOLS)[-1].body["messages"]
    assert sent[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert sent[2] == {"role": "tool", "content": "18C and sunny", "tool_call_id": call.call_id, "name": "get_weather"}
    # or, stored, by previous_response_id and the output alone
    chained = client.responses.create(model=CF_TOOLS, tools=[WEATHER], previous_response_id=r.id, input=[result])
    assert chained.output_text == "The tool said: 18C and sunny"


@pytest.mark.parametrize("stream", [False, True])
def test_text_format_json_schema_on_a_json_mode_model(client, fake, stream):
    if stream:
        with client.responses.stream(model=CF, input="Paris?", text_format=City) as s:
            kinds = [e.type for e in s]
            parsed = s.get_final_response().output_parsed
        assert "response.output_text.delta" in kinds
    else:
        parsed = client.responses.parse(model=CF, input="Paris?", text_format=City).output_parsed
    assert parsed == City(name="Paris", population=3, rivers=["Paris"])
    sent = fake.runs(CF)[-1].body
    assert sent["stream"] is False  # Workers AI's JSON mode does not stream: the answer comes whole
    assert sent["response_format"]["type"] == "json_schema"
    assert sent["response_format"]["json_schema"]["properties"]["rivers"]["type"] == "array"  # the bare schema


def test_json_modes_in_chat_completions(client, fake):
    r = client.chat.completions.parse(model=CF, messages=[{"role": "user", "content": "Paris?"}], response_format=City)
    assert r.choices[0].message.parsed == City(name="Paris", population=3, rivers=["Paris"])
    chunks = list(client.chat.completions.create(model=CF, messages=[{"role": "user", "content": "hi"}],
                                                 response_format={"type": "json_object"}, stream=True))
    assert json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)) == {
        "said": "You said: hi"}
    assert fake.runs(CF)[-1].body["response_format"] == {"type": "json_object"}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="@cf/fake/jsonfail", messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_object"})
    assert err.value.code == "json_schema_not_met" and "JSON Mode couldn't be met" in err.value.message


def test_json_formats_on_a_model_that_cannot_honour_them_are_a_clear_400(client):
    cannot = "@cf/fake/drop"  # a Workers AI model outside CLOUDFLARE_JSON_MODELS
    for call in (lambda: client.responses.parse(model=cannot, input="x", text_format=City),
                 lambda: client.chat.completions.create(model=cannot, messages=[{"role": "user", "content": "x"}],
                                                        response_format={"type": "json_object"})):
        with pytest.raises(openai.BadRequestError) as err:
            call()
        assert err.value.code == "unsupported_value"
        assert "@cf/fake/chat, @cf/fake/jsonfail, @cf/fake/tools, endless." in err.value.message
    models = {m.id: m for m in client.models.list()}
    assert models[CF].capabilities == {"controls": ["penalties", "seed"], "structured_outputs": True, "images": False,
                                       "tasks": ["chat"]}
    assert models[LOCAL].capabilities == {  # the local engine (aigate's build) constrains and samples itself
        "controls": ["logit_bias", "logprobs", "n", "penalties", "seed", "tool_choice"], "structured_outputs": True,
        "images": False, "tasks": ["chat"]}


def test_errors_before_the_first_byte_are_statuses_and_after_it_events(client, server):
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="no-such-model", input="x")
    with pytest.raises(openai.RateLimitError):
        client.responses.create(model="@cf/fake/429", input="x", stream=True)
    for bad, param in (({"input": [{"role": "wizard", "content": "x"}]}, "input[0].role"),
                       ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
                        "input[0].content[0].type"),
                       ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
                       ({"input": "x", "text": {"format": {"type": "xml"}}}, "text.format"),
                       ({"input": 5}, "input")):
        r = requests.post(server.v1 + "/responses", json={"model": CF, **bad}, timeout=10,
                          headers={"Authorization": "Bearer sk-alice"})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    events = list(client.responses.create(model="@cf/fake/drop", input="hello there my friend", stream=True))
    assert [e.type for e in events[-2:]] == ["error", "response.failed"]
    assert events[-1].response.status == "failed" and events[-1].response.error.code == "server_error"
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_paths_without_v1_and_with_a_trailing_slash(server):
    auth = {"Authorization": "Bearer sk-alice"}
    for base in (server.base_url, server.base_url + "/v1/"):
        c = openai.OpenAI(base_url=base, api_key="sk-alice", max_retries=0)
        assert c.responses.create(model=CF, input="hi").output_text == "You said: hi"
        assert c.chat.completions.create(model=CF, messages=[{"role": "user", "content": "hi"}]).choices
    r = requests.post(server.base_url + "/v1/chat/completions/", headers=auth, timeout=10,
                      json={"model": CF, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    r = requests.get(server.base_url + "/models", timeout=10)
    assert r.status_code == 401  # the same key check as under /v1
    exposed = {h.strip().lower() for h in r.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"retry-after", "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"} <= exposed


def test_deprecated_functions_become_tools(client, fake):
    asked = dict(model=CF_TOOLS, messages=[{"role": "user", "content": "Weather?"}], function_call="auto",
                 functions=[{"name": "get_weather", "parameters": WEATHER["parameters"]}])
    r = client.chat.completions.create(**asked)
    assert fake.runs(CF_TOOLS)[-1].body["tools"][0]["function"]["name"] == "get_weather"
    # answered as such clients read it: function_call, not tool_calls
    message = r.choices[0].message
    assert message.tool_calls is None and r.choices[0].finish_reason == "function_call"
    assert (message.function_call.name, json.loads(message.function_call.arguments)) == ("get_weather",
                                                                                         {"city": "Paris"})
    chunks = [c for c in client.chat.completions.create(**asked, stream=True) if c.choices]
    assert "".join(c.choices[0].delta.function_call.arguments for c in chunks
                   if c.choices[0].delta.function_call) == '{"city": "Paris"}'
    assert chunks[-1].choices[0].finish_reason == "function_call"
    assert not any(c.choices[0].delta.tool_calls for c in chunks)


def test_embedding_dimensions_and_token_ids(client, fake):
    assert len(client.embeddings.create(model="@cf/fake/bge", input="x", dimensions=8).data[0].embedding) == 8
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="@cf/fake/bge", input="x", dimensions=4)
    assert err.value.param == "dimensions" and "8 dimensions" in err.value.message
    # Token ids of cl100k_base: read as the text they stand for ("hello world", and '"#$'), which the model takes.
    r = client.embeddings.create(model="@cf/fake/bge", input=[[15339, 1917], [1, 2, 3]])
    assert len(r.data) == 2 and fake.runs("@cf/fake/bge")[-1].body == {"text": ["hello world", '"#$']}
    assert client.completions.create(model=CF, prompt=[15339, 1917], max_tokens=5).choices[0].text
    assert fake.runs(CF)[-1].body["prompt"] == "hello world"
    for ids, where, bad in (([[15339], [100261]], "input[1][0]", "100261"), ([15339, -1], "input[1]", "-1"),
                            ([[]], "input[0]", "empty")):
        with pytest.raises(openai.BadRequestError) as err:
            client.embeddings.create(model="@cf/fake/bge", input=ids)
        assert (err.value.param, err.value.code) == ("input", "invalid_value")
        assert f"'{where}'" in err.value.message and bad in err.value.message


def test_a_deleted_response_in_the_middle_leaves_the_conversation_whole(client, fake, state_dir):
    first = client.responses.create(model=CF, input="one")
    second = client.responses.create(model=CF, input="two", previous_response_id=first.id)
    third = client.responses.create(model=CF, input="three", previous_response_id=second.id)
    with sqlite3.connect(state_dir / "responses.sqlite3") as db:  # a link and its own input, not the history
        row = db.execute("SELECT previous, input_items FROM responses WHERE id = ?", (third.id,)).fetchone()
    assert row[0] == second.id and [i["content"][0]["text"] for i in json.loads(row[1])] == ["three"]
    client.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(model=CF, input="more", previous_response_id=second.id)
    assert err.value.code == "previous_response_not_found"
    client.responses.create(model=CF, input="four", previous_response_id=third.id)
    assert [m["content"] for m in fake.runs(CF)[-1].body["messages"]] == [
        "one", "You said: one", "two", "You said: two", "three", "You said: three", "four"]
    listed = client.responses.input_items.list(third.id, order="asc")
    assert [i.content[0].text for i in listed.data] == ["one", "You said: one", "two", "You said: two", "three"]


def test_one_key_cannot_push_out_anothers_responses(client, bob):
    """Issue 23, 3: one key's large responses pushed every other key's out of the store."""
    kept = bob.responses.create(model=CF, input="mine")
    big = " ".join(["word"] * 20_000)  # 100 KB a response: 24 of them take more than the whole store (2 MB)
    ids = [client.responses.create(model=CF, input=big).id for _ in range(24)]
    assert bob.responses.retrieve(kept.id).output_text == "You said: mine"
    gone = []
    for response_id in ids:
        try:
            client.responses.retrieve(response_id)
        except openai.NotFoundError:
            gone.append(response_id)
    assert gone == ids[:len(gone)] and 13 <= len(gone) <= 16  # alice's own oldest went: 1 MB is her share


def test_state_dir_removed_while_running(client, server, state_dir):
    """Issue 23, 8: responses silently not stored while answers said store: true, 500s, /ready ready."""
    before = client.responses.create(model=CF, input="before")
    shutil.rmtree(state_dir)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(before.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=CF, input="more", previous_response_id=before.id)
    after = client.responses.create(model=CF, input="after")  # the store made again
    assert after.store is True and client.responses.retrieve(after.id).output_text == "You said: after"
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((state_dir / "responses.sqlite3").stat().st_mode) == 0o600
    assert requests.get(server.base_url + "/ready", timeout=10).status_code == 200
    auth = {"Authorization": "Bearer sk-alice"}
    shutil.rmtree(state_dir)
    state_dir.write_text("in the way")  # cannot be made again
    try:
        unstored = client.responses.create(model=CF, input="lost")
        assert unstored.store is False
        events = list(client.responses.create(model=CF, input="lost", stream=True))
        assert events[-1].type == "response.completed" and events[-1].response.store is False
        for method, path, body in (("GET", f"/responses/{after.id}", None), ("DELETE", f"/responses/{after.id}", None),
                                   ("GET", f"/responses/{after.id}/input_items", None),
                                   ("POST", "/responses", {"model": CF, "input": "x",
                                                           "previous_response_id": after.id})):
            r = requests.request(method, server.v1 + path, json=body, headers=auth, timeout=10)
            assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable", (path, r.text)
        r = requests.get(server.base_url + "/ready", timeout=10)
        assert r.status_code == 503 and "responses cannot be stored" in r.json()["responses"]
    finally:
        state_dir.unlink()
    assert requests.get(server.base_url + "/ready", timeout=10).status_code == 200
    assert client.responses.create(model=CF, input="again").store is True


def test_storing_responses_does_not_hold_up_the_event_loop(server, fake, state_dir):
    """Issue 23, 10: SQLite ran on the event loop (200 parallel stored responses made /health take
    seconds): a write waiting for the file's lock, held here as another worker's write would, held
    up every request of the worker."""
    auth = {"Authorization": "Bearer sk-alice"}
    db = sqlite3.connect(state_dir / "responses.sqlite3", isolation_level=None)
    db.execute("BEGIN IMMEDIATE")  # each store waits for it (SQLite's busy timeout: 5 s)
    sent = len(fake.runs(CF))

    def store(n: int) -> dict:
        r = requests.post(server.v1 + "/responses", json={"model": CF, "input": f"number {n}"}, headers=auth,
                          timeout=60)
        return r.json()

    try:
        with ThreadPoolExecutor(200) as pool:
            answers = pool.map(store, range(200))
            fake.wait_for(lambda: len(fake.runs(CF)) >= sent + 20)  # answered, so storing
            latencies = []
            for _ in range(5):
                start = time.monotonic()
                assert requests.get(server.base_url + "/health", timeout=10).status_code == 200
                latencies.append(time.monotonic() - start)
            db.execute("ROLLBACK")
            stored = [answer["store"] for answer in answers]
    finally:
        db.close()
    assert max(latencies) < 2, latencies  # while 200 requests arrive at once; the lock alone held it for seconds
    assert stored == [True] * 200  # once the lock was free


def test_input_tokens_count_what_the_local_model_reads_and_estimate_elsewhere(client):
    """client.responses.input_tokens.count: on the local model, what usage.input_tokens says for the same
    request (its chat template, tools, a previous response's turns); elsewhere cl100k_base's estimate."""
    asked = dict(model=LOCAL, input="Weather in Paris?", instructions="Be brief.", tools=[WEATHER])
    counted = client.responses.input_tokens.count(**asked)
    assert counted.object == "response.input_tokens"
    first = client.responses.create(**asked, max_output_tokens=3)
    assert counted.input_tokens == first.usage.input_tokens > 20
    later = dict(model=LOCAL, input="And Rome?", previous_response_id=first.id)
    assert client.responses.input_tokens.count(**later).input_tokens == client.responses.create(
        **later, max_output_tokens=1).usage.input_tokens
    # "Be brief." and "hello world": 3 and 2 tokens, 3 a message, 3 to start the answer
    assert client.responses.input_tokens.count(model=CF, input="hello world", instructions="Be brief.",
                                               ).input_tokens == 3 + 2 + 2 * 3 + 3
    with pytest.raises(openai.NotFoundError):
        client.responses.input_tokens.count(model="nothing", input="x")


def test_tokenize_and_detokenize_with_the_local_models_own_tokenizer(server, client):
    """vLLM's /tokenize and /detokenize: the ids the model reads (what usage counts), and back to text."""
    def post(path: str, body: dict) -> requests.Response:
        return requests.post(server.v1 + path, json=body, headers={"Authorization": "Bearer sk-alice"}, timeout=30)

    prompt = post("/tokenize", {"model": LOCAL, "prompt": "The river runs past the bakery."}).json()
    assert prompt["count"] == len(prompt["tokens"]) and prompt["max_model_len"] == 1024
    assert prompt["count"] == client.completions.create(model=LOCAL, prompt="The river runs past the bakery.",
                                                        max_tokens=1).usage.prompt_tokens
    assert post("/detokenize", {"model": LOCAL, "tokens": prompt["tokens"]}).json() == {
        "prompt": "[gMASK]sopThe river runs past the bakery."}  # the model's prefix, by its names
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    counted = post("/tokenize", {"model": LOCAL, "messages": chat, "add_generation_prompt": True}).json()
    assert counted["count"] == client.chat.completions.create(model=LOCAL, messages=chat,
                                                              max_tokens=1).usage.prompt_tokens
    long = post("/tokenize", {"model": LOCAL, "prompt": "river town " * 600}).json()  # past the context: counted
    assert long["count"] > 1024
    for path, body, status, code in [
            ("/tokenize", {"model": CF, "prompt": "x"}, 400, "model_not_supported"),
            ("/detokenize", {"model": CF, "tokens": [1]}, 400, "model_not_supported"),
            ("/tokenize", {"model": LOCAL, "prompt": "x", "messages": chat}, 400, "invalid_value"),
            ("/tokenize", {"model": LOCAL}, 400, "invalid_value"),
            ("/tokenize", {"model": LOCAL, "prompt": "x", "add_special_tokens": False}, 400, "unsupported_value"),
            ("/detokenize", {"model": LOCAL, "tokens": [5, 10 ** 6]}, 400, "invalid_request"),
            ("/detokenize", {"model": LOCAL, "tokens": "abc"}, 400, "invalid_type"),
            ("/tokenize", {"model": "nothing", "prompt": "x"}, 404, "model_not_found")]:
        r = post(path, body)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (path, body, r.text)
    refused = post("/tokenize", {"model": CF, "prompt": "x"}).json()["error"]
    assert refused["param"] == "model" and "models that have one: endless" in refused["message"]
    assert "tokens[1]" in post("/detokenize", {"model": LOCAL, "tokens": [5, 10 ** 6]}).json()["error"]["message"]
