"""Whatever a client sends, the answer is an OpenAI error or a success: never a 500. Every endpoint
(chat, completions, responses with its stored responses, embeddings, models) gets malformed, odd and
hostile input: a lone UTF-16 surrogate in every string and every key name of a full body, arbitrary
JSON in every place, broken bodies, odd ids and query strings. In-process against the fake backend
(milliseconds a request), then a short pass through a real gunicorn serving the demo model, where
the engine itself reads the hostile text."""

from __future__ import annotations

import copy
import json
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config.settings import ApiKey
from tests.fake_backend import fake_app

KEY = "sk-fuzz-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
STORED = "resp_stored_by_the_fixture"  # replaced by a real stored response's id (the `stored` fixture)

# -- what is sent ------------------------------------------------------------------------------------------

# Full bodies, each answered 200 as it is, so that a change anywhere in it is what the answer is about.
SEEDS: dict[str, list[dict[str, Any]]] = {
    "/v1/chat/completions": [
        {"model": "fake-controls", "max_tokens": 3, "temperature": 0.5, "top_p": 1, "stop": ["zz", "yy"], "seed": 7,
         "presence_penalty": 0, "frequency_penalty": 0, "user": "u", "n": 1, "logprobs": False,
         "stream_options": {"include_usage": True}, "parallel_tool_calls": True,
         "messages": [
             {"role": "system", "content": "be brief"},
             {"role": "developer", "content": [{"type": "text", "text": "dev"}]},
             {"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "me"},
             {"role": "assistant", "content": None, "tool_calls": [
                 {"id": "call_1", "type": "function", "function": {"name": "look", "arguments": "{\"q\": \"x\"}"}}]},
             {"role": "tool", "tool_call_id": "call_1", "name": "look", "content": "found"},
             {"role": "user", "content": "and then?"}],
         "tools": [{"type": "function", "function": {"name": "look", "description": "looks",
                                                     "parameters": {"type": "object", "properties": {
                                                         "q": {"type": "string", "enum": ["x"]}}}}}],
         "tool_choice": {"type": "function", "function": {"name": "look"}},
         "response_format": {"type": "text"}},
        {"model": "fake-echo", "max_completion_tokens": 2, "messages": [{"role": "user", "content": "hi"}],
         "functions": [{"name": "f", "parameters": {}}], "function_call": {"name": "f"}},
    ],
    "/v1/completions": [
        {"model": "fake-echo", "prompt": ["one", "two"], "max_tokens": 3, "echo": True, "stop": "zz",
         "suffix": "s", "temperature": 0, "top_p": 0.5, "best_of": 1, "n": 1, "user": "u",
         "stream_options": {"include_usage": True}},
    ],
    "/v1/responses": [
        {"model": "fake-echo", "instructions": "be brief", "max_output_tokens": 4, "temperature": 1, "top_p": 1,
         "store": False, "metadata": {"k": "v"}, "user": "u", "parallel_tool_calls": False,
         "reasoning": {"effort": "low"}, "include": ["x"], "prompt_cache_key": "p",
         "input": [
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}], "id": "m1"},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "yo"}]},
             {"type": "function_call", "call_id": "c1", "name": "look", "arguments": "{}", "id": "fc1"},
             {"type": "function_call_output", "call_id": "c1", "output": "found"},
             {"type": "reasoning", "summary": []},
             {"role": "developer", "content": "dev"}],
         "tools": [{"type": "function", "name": "look", "description": "d", "parameters": {"type": "object"},
                    "strict": False}, {"type": "web_search"}],
         "tool_choice": {"type": "function", "name": "look"},
         "text": {"format": {"type": "text"}}},
        {"model": "fake-echo", "input": "and then?", "previous_response_id": STORED},  # stored: SQLite's turn
    ],
    "/v1/embeddings": [
        {"model": "fake-echo", "input": ["ab", "cd"], "encoding_format": "base64", "dimensions": 2, "user": "u",
         "n": 1},
    ],
}
SURROGATES = ["\ud800", "\udfff", "x\udbff", "\ud83d"]  # lone, as a client cutting "🙂" in two sends
ODD_STRINGS = [*SURROGATES, "", " ", "\x00", "\u2028", "\ufeff", "🙂", "%s%n{0}", "../../etc/passwd", "a" * 3000,
               "resp_\ud800", "null", "\\", "\"", "\U0010ffff", "<script>", "1e999", "-0"]
ODD_VALUES: list[Any] = [None, True, False, 0, -1, 2**63, 10**40, -(10**40), 1.5, -1e308, 1e308, 1e-320, [], {},
                         [None], {"": None}, [[[[[]]]]], {"\ud800": "\ud800"}, ["\ud800"]]
TEXT = st.text(st.characters() | st.characters(categories=["Cs"]), max_size=12)  # lone surrogates too
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT
                    | st.sampled_from(ODD_STRINGS),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                    max_leaves=8)
RAW_BODIES = [b"", b"{", b"[]", b"null", b'"\\ud800"', b"{\"model\": \"\\ud800\"", b"\xff\xfe{\x00}\x00",
              b"\xed\xa0\x80", b"{\"a\": NaN, \"b\": Infinity, \"c\": -Infinity}", b"{\"a\": 1e999}",
              b"{\"a\": " + b"9" * 5000 + b"}", b"[" * 100 + b"]" * 100, b"{\"a\":" * 70 + b"1" + b"}" * 70,
              b"\xef\xbb\xbf{\"model\": \"fake-echo\"}",
              "{\"model\": \"fake-echo\", \"input\": \"é\"}".encode("utf-16"),
              b"{\"model\": \"fake-echo\", \"model\": 1}", b"\x00" * 64, b"{}" * 1000]
ODD_IDS = ["\ud800", "resp_\udfff", "%ED%A0%80", "%00", "%FF%FE", "a" * 2000, "..%2F..%2Fetc", "resp_" + "0" * 32,
           "' OR 1=1 --", "%F0%9F%99%82"]
ODD_QUERIES = ["limit=0", "limit=101", "limit=-1", "limit=abc", "limit=1e3", "order=up", "order=%ED%A0%80",
               "after=%ED%A0%80", "before=nope", "after=&before=", "limit=" + "9" * 400, "order=asc&order=desc"]


def spots(value: Any, path: tuple = ()) -> Iterator[tuple[tuple, str]]:
    """Every place in ``value``: each value's path with "value", each key's path with "key"."""
    yield path, "value"
    if isinstance(value, dict):
        for k, v in value.items():
            yield (*path, k), "key"
            yield from spots(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from spots(v, (*path, i))


def changed(body: Any, path: tuple, kind: str, new: Any) -> Any:
    """``body`` with the value at ``path`` replaced by ``new``, or ("key") the key renamed to ``new``, or
    ("beside") a key ``new`` added beside it."""
    body = copy.deepcopy(body)
    if not path:
        return new if kind == "value" else body
    parent = body
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if kind == "value":
        parent[last] = new
    elif kind == "key":
        parent[new] = parent.pop(last)
    else:
        parent[new] = parent[last]
    return body


def surrogate_cases(seeds_by_path: dict[str, list[dict[str, Any]]], declared_fields: bool = True
                    ) -> Iterator[tuple[str, Any]]:
    """A lone surrogate in every string and key name of every seed, and (``declared_fields``) in every
    top-level field the request declarations name (those the seeds leave out too)."""
    for path, seeds in seeds_by_path.items():
        for seed in seeds:
            for where, kind in spots(seed):
                here = _at(seed, where)
                if kind == "value" and isinstance(here, str):
                    for s in (SURROGATES[0], here + SURROGATES[2]):
                        yield path, changed(seed, where, "value", s)
                elif kind == "key":
                    yield path, changed(seed, where, "key", SURROGATES[1])
                    yield path, changed(seed, where, "beside", where[-1] + SURROGATES[0])
        for field in declared(path).__struct_fields__ if declared_fields else ():
            yield path, {**seeds[0], field: SURROGATES[0]}
            yield path, {**seeds[0], field: [SURROGATES[0]]}


def declared(path: str) -> type:
    """The declaration of the path's request body (compat/wire.py)."""
    from compat import wire

    return {"/v1/chat/completions": wire.ChatCompletionRequest, "/v1/completions": wire.CompletionRequest,
            "/v1/embeddings": wire.EmbeddingRequest, "/v1/responses": wire.ResponseRequest}[path]


def _at(value: Any, path: tuple) -> Any:
    for step in path:
        value = value[step]
    return value


def with_stored(body: Any, stored: str) -> Any:
    return json.loads(json.dumps(body).replace(STORED, stored))


# -- what is checked ---------------------------------------------------------------------------------------

def check(status: int, data: bytes, content_type: str) -> None:
    """Below 500; an error has OpenAI's shape; a stream carries no server error in-band."""
    assert status < 500, data[:2000]
    if status >= 400:
        error = json.loads(data)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] != "server_error", error
    elif content_type.startswith("text/event-stream"):
        assert b"server_error" not in data, data[-2000:]


# -- in-process, over the fake backend ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def app(tmp_path_factory):
    app, _ = fake_app(tmp_path_factory.mktemp("fuzz"), api_keys=(ApiKey("fuzz", KEY),))
    return app


@pytest.fixture(scope="module")
def client(app):
    return app.test_client()


@pytest.fixture(scope="module")
def stored(client) -> str:
    r = client.post("/v1/responses", headers=AUTH, json={"model": "fake-echo", "input": "remember this"})
    assert r.status_code == 200, r.json
    return r.json["id"]


def post(client, path: str, body: Any, stream: bool | None = None) -> None:
    if stream is not None and isinstance(body, dict) and path != "/v1/embeddings":
        body = {**body, "stream": stream}
    r = client.post(path, headers=AUTH, data=json.dumps(body))
    check(r.status_code, r.get_data(), r.content_type or "")


def test_every_seed_is_answered(client, stored):
    for path, seeds in SEEDS.items():
        for seed in seeds:
            r = client.post(path, headers=AUTH, json=with_stored(seed, stored))
            assert r.status_code == 200, (path, r.json)


def test_a_lone_surrogate_in_any_string_or_key_is_never_a_500(client, stored):
    cases = list(surrogate_cases(SEEDS))
    assert len(cases) > 300  # every string and key of the seeds, every declared field
    refused = 0
    for i, (path, body) in enumerate(cases):
        body = with_stored(body, stored)
        r = client.post(path, headers=AUTH, data=json.dumps(body, ensure_ascii=True),
                        content_type="application/json")
        check(r.status_code, r.get_data(), r.content_type or "")
        refused += r.status_code == 400
        if i % 7 == 0 and path != "/v1/embeddings":  # a share of them streamed too
            post(client, path, body, stream=True)
    assert refused > len(cases) // 3  # most are refused, each with a 400 naming the field


@pytest.mark.parametrize("path, field, param", [
    ("/v1/chat/completions", "messages[0].role", "messages[0].role"),
    ("/v1/chat/completions", "temperature", "temperature"),
    ("/v1/chat/completions", "response_format.type", "response_format"),  # as wire.EXCEPTIONS names it
    ("/v1/completions", "temperature", "temperature"),
    ("/v1/responses", "temperature", "temperature"),
    ("/v1/responses", "previous_response_id", "previous_response_id"),
    ("/v1/embeddings", "encoding_format", "encoding_format"),
])
def test_the_fields_the_issue_found_are_400s_naming_them(client, path, field, param):
    valid: dict[str, Any] = {"model": "fake-echo", "messages": [{"role": "user", "content": "hi"}], "prompt": "p",
                             "input": "i"}
    body = copy.deepcopy(valid)
    *parents, last = field.replace("[0]", ".0").split(".")
    place: Any = body
    for step in parents:
        place = place[int(step)] if step.isdigit() else place.setdefault(step, {})
    place[last] = "\ud800"
    r = client.post(path, headers=AUTH, data=json.dumps(body))
    assert r.status_code == 400 and r.json["error"]["param"] == param, r.json
    r = client.post(path, headers=AUTH, data=json.dumps({**valid, "\ud800": 1}))  # a key name
    assert r.status_code == 400 and r.json["error"]["param"] == "\\ud800", r.json


def test_an_error_quoting_a_lone_surrogate_encodes_as_utf8():
    """An error's message and param may quote the client's text: written with the surrogate escaped,
    any encoder can write them (an SSE frame, a log line, msgspec), not only an ASCII-escaping one."""
    import msgspec

    from compat.errors import invalid

    error = invalid("The model `\ud800x` does not exist.", "messages[0].\ud800")
    assert msgspec.json.decode(msgspec.json.encode(error.body()))["error"] == {
        "message": "The model `\\ud800x` does not exist.", "type": "invalid_request_error",
        "param": "messages[0].\\ud800", "code": None}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(data=st.data(), stream=st.sampled_from([None, False, True]))
def test_anything_anywhere_in_a_body_is_never_a_500(client, stored, data, stream):
    path = data.draw(st.sampled_from(sorted(SEEDS)))
    body = with_stored(data.draw(st.sampled_from(SEEDS[path])), stored)
    fields = st.sampled_from(sorted(declared(path).__struct_fields__))  # those the seed leaves out too
    body.update(data.draw(st.dictionaries(fields, JSON | st.sampled_from(ODD_VALUES), max_size=2)))
    for _ in range(data.draw(st.integers(1, 3))):
        where, kind = data.draw(st.sampled_from(list(spots(body))))
        if kind == "key":
            body = changed(body, where, data.draw(st.sampled_from(["key", "beside"])),
                           data.draw(TEXT | st.sampled_from(ODD_STRINGS)))
        else:
            body = changed(body, where, "value", data.draw(JSON | st.sampled_from(ODD_VALUES)))
    post(client, path, body, stream)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=JSON, path=st.sampled_from(sorted(SEEDS)))
def test_any_json_never_gets_a_500(client, body, path):
    r = client.post(path, headers=AUTH, data=json.dumps(body))
    check(r.status_code, r.get_data(), r.content_type or "")


@pytest.mark.parametrize("raw", RAW_BODIES, ids=range(len(RAW_BODIES)))
def test_broken_bodies_are_never_a_500(client, raw):
    for path in SEEDS:
        r = client.post(path, headers=AUTH, data=raw, content_type="application/json")
        check(r.status_code, r.get_data(), r.content_type or "")


def test_odd_ids_and_queries_on_stored_responses_and_models(client, stored):
    for odd in ODD_IDS:
        odd = quote(odd, safe="%/", errors="surrogatepass")  # as a client writes a request line
        for method, path in (("GET", f"/v1/responses/{odd}"), ("GET", f"/v1/responses/{odd}/input_items"),
                             ("DELETE", f"/v1/responses/{odd}"), ("GET", f"/v1/models/{odd}")):
            r = client.open(path, method=method, headers=AUTH)
            check(r.status_code, r.get_data(), r.content_type or "")
            assert r.status_code in (400, 404, 405), (method, path, r.status_code)
    for query in ODD_QUERIES:
        r = client.get(f"/v1/responses/{stored}/input_items?{query}", headers=AUTH)
        check(r.status_code, r.get_data(), r.content_type or "")
    for odd in ODD_STRINGS[:8]:  # a cursor that is no item, as a query string can carry it
        r = client.get(f"/v1/responses/{stored}/input_items?after={quote(odd, errors='surrogatepass')}", headers=AUTH)
        check(r.status_code, r.get_data(), r.content_type or "")
    assert client.get("/v1/models", headers=AUTH).status_code == 200
    assert client.get(f"/v1/responses/{stored}", headers=AUTH).status_code == 200  # still there
    assert client.delete(f"/v1/responses/{stored}x", headers=AUTH).status_code == 404


@pytest.mark.parametrize("authorization", ["", "Bearer", "Bearer ", "bearer " + KEY + "x", "Basic " + KEY,
                                           "Bearer " + "\xe9" * 300, "Bearer \x7f", KEY])
def test_odd_keys_are_401s(client, authorization):
    for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/v1/responses/x"),
                         ("DELETE", "/v1/responses/x"), ("POST", "/v1/embeddings")):
        r = client.open(path, method=method, headers={"Authorization": authorization}, data=b"{\"model\": 1}")
        assert r.status_code == 401 and r.json["error"]["code"] == "invalid_api_key", (method, path, r.json)


# -- a short pass through a real gunicorn and the demo model -----------------------------------------------

@pytest.fixture(scope="module")
def server(server_factory, demo_model):
    return server_factory(CHATGLM_MODEL=str(demo_model), CHATGLM_MODEL_ID="fake-echo", API_KEYS=KEY,
                          MAX_TOKENS_CEILING="2")


# Short prompts: each answered request here is a generation (the demo model stands in for fake-echo).
SMALL_SEEDS: dict[str, list[dict[str, Any]]] = {
    "/v1/chat/completions": [{"model": "fake-echo", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}]}], "stop": "zz", "temperature": 0.5}],
    "/v1/completions": [{"model": "fake-echo", "prompt": ["hi"], "stop": ["zz"], "echo": True}],
    "/v1/responses": [{"model": "fake-echo", "instructions": "be", "metadata": {"k": "v"}, "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "hi"}]}]}],
    "/v1/embeddings": [{"model": "fake-echo", "input": ["hi"]}],  # the local model makes none: a 400
    # The engine's tokenizer itself reads the hostile text (no generation: every case is cheap).
    "/v1/tokenize": [{"model": "fake-echo", "prompt": "hi"},
                     {"model": "fake-echo", "messages": [{"role": "user", "content": "hi"}]}],
    "/v1/detokenize": [{"model": "fake-echo", "tokens": [1, 2, 3]}],
    "/v1/responses/input_tokens": [{"model": "fake-echo", "instructions": "be", "input": "hi"}],
}


def test_through_gunicorn_and_the_engine(server):
    """Hostile bodies through a real worker, where the chatglm.cpp engine tokenizes the hostile text
    and writes streams itself; then framing no client library would send."""
    session = requests.Session()
    session.headers.update(AUTH)
    cases = list(surrogate_cases(SMALL_SEEDS, declared_fields=False))[::2]  # every other: each 200 is a generation
    cases += [("/v1/chat/completions", {**SMALL_SEEDS["/v1/chat/completions"][0],
                                        "messages": [{"role": "user", "content": odd}]})
              for odd in ODD_STRINGS if len(odd) < 100]
    for i, (path, body) in enumerate(cases):
        if path != "/v1/embeddings" and isinstance(body, dict):
            body["stream"] = i % 2 == 0
        r = session.post(server.v1 + path.removeprefix("/v1"), data=json.dumps(body), timeout=30)
        check(r.status_code, r.content, r.headers.get("Content-Type", ""))
    for raw in RAW_BODIES:
        r = session.post(server.v1 + "/chat/completions", data=raw, timeout=30)
        check(r.status_code, r.content, r.headers.get("Content-Type", ""))
    for odd in ODD_IDS:
        for method in ("GET", "DELETE"):
            r = session.request(method, f"{server.v1}/responses/{quote(odd, safe='%/', errors='surrogatepass')}",
                                timeout=30)
            check(r.status_code, r.content, r.headers.get("Content-Type", ""))
    host, port = server.base_url.removeprefix("http://").split(":")
    body = b'{"model": "fake-echo", "messages": [{"role": "\\ud800", "content": "x"}]}'
    key = b"\r\nAuthorization: Bearer " + KEY.encode()
    for raw, expected in (
            # a chunked body carrying a lone surrogate
            (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x" + key + b"\r\nTransfer-Encoding: chunked\r\n"
             b"Connection: close\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body), 400),
            # a request line that is not ASCII (gunicorn refuses it), a key that is not UTF-8
            (b"GET /v1/responses/\xed\xa0\x80 HTTP/1.1\r\nHost: x" + key + b"\r\nConnection: close\r\n\r\n", 400),
            (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n"
             b"Connection: close\r\n\r\n", 401)):
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(raw)
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 %d " % expected), answer[:500]
    assert not [line for line in server.log if "unhandled error" in line], server.log[-40:]
