"""Whatever a client sends, the answer is an OpenAI error or a success: never a 500."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from app import create_app, load_backends
from settings import load_settings
from tests.conftest import engine_socket

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                max_size=4), max_leaves=12)
FIELDS = ["model", "messages", "prompt", "input", "max_tokens", "temperature", "top_p", "stop", "stream", "n",
          "tools", "tool_choice", "stream_options", "echo", "encoding_format", "response_format", "logprobs"]
VALID = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "input": "hi",
         "max_tokens": 2}


@pytest.fixture(scope="module")
def client(demo_model, tmp_path_factory):
    s = dataclasses.replace(load_settings({}, dotenv=None), chatglm_model=demo_model,
                            engine_socket=engine_socket())
    app = create_app(s)
    load_backends(app)
    return app.test_client()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]),
       changes=st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=4))
def test_mutated_bodies_never_get_a_500(client, path, changes):
    body = {**VALID, **changes}
    r = client.post(path, data=json.dumps(body))
    assert r.status_code < 500, r.data
    if r.status_code >= 400:
        assert set(r.json["error"]) == {"message", "type", "param", "code"}
    else:
        r.close()  # a stream: reading it to the end is not the point here


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=JSON)
def test_any_json_never_gets_a_500(client, body):
    r = client.post("/v1/chat/completions", data=json.dumps(body))
    assert r.status_code < 500 and r.json["error"]["type"] == "invalid_request_error"
