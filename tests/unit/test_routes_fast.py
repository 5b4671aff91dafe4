"""Route tests in-process: the real app through Flask's test client, over the fake backend
(tests/fake_backend.py). Each runs in milliseconds; the transport-level behaviour (sockets, slow
clients, gunicorn's workers) stays in the test_e2e_* files."""

from __future__ import annotations

import json
import time

from tests.fake_backend import fake_app

USER = [{"role": "user", "content": "hello there"}]


def test_a_whole_answer_in_milliseconds(client):
    started = time.perf_counter()
    r = client.post("/v1/chat/completions", json={"model": "fake-echo", "messages": USER})
    took = time.perf_counter() - started
    assert r.status_code == 200, r.json
    body = r.json
    assert body["object"] == "chat.completion" and body["model"] == "fake-echo"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "You said: hello there"}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 4
    assert r.headers["x-request-id"].startswith("req_")
    assert took < 0.5, f"{took:.3f} s for one in-process request"


def test_a_stream_is_the_same_answer_in_chunks(client):
    r = client.post("/v1/chat/completions", json={"model": "fake-echo", "messages": USER, "stream": True,
                                                  "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    frames = [line[6:] for line in r.get_data(as_text=True).split("\n") if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "You said: hello there"
    assert chunks[-1]["usage"]["completion_tokens"] == 4


def test_max_tokens_reaches_the_backend_and_says_length(app_and_backend):
    app, backend = app_and_backend
    r = app.test_client().post("/v1/chat/completions", json={"model": "fake-echo", "messages": USER, "max_tokens": 2})
    assert r.json["choices"][0]["finish_reason"] == "length"
    assert r.json["choices"][0]["message"]["content"] == "You said:"
    assert backend.requests[-1].max_tokens == 2 and backend.requests[-1].incremental is False


def test_a_failure_before_the_first_event_is_an_http_status(client):
    r = client.post("/v1/chat/completions", json={"model": "fake-busy", "messages": USER, "stream": True})
    assert r.status_code == 429
    assert r.json["error"]["code"] == "queue_full" and r.json["error"]["type"] == "rate_limit_error"
    assert r.headers["Retry-After"] == "2"


def test_a_failure_after_the_first_byte_is_in_band_and_closes_the_backend(app_and_backend):
    app, backend = app_and_backend
    r = app.test_client().post("/v1/chat/completions", json={"model": "fake-broken", "messages": USER, "stream": True})
    assert r.status_code == 200
    frames = [line[6:] for line in r.get_data(as_text=True).split("\n") if line.startswith("data: ")]
    assert json.loads(frames[-2])["error"]["code"] == "upstream_error" and frames[-1] == "[DONE]"
    assert backend.closed == 1


def test_bad_input_names_the_field(client):
    r = client.post("/v1/chat/completions", json={"model": "fake-echo", "messages": [{"role": "wizard"}]})
    assert r.status_code == 400 and r.json["error"]["param"] == "messages[0].role"
    r = client.post("/v1/chat/completions", data=b"{not json")
    assert r.status_code == 400 and r.json["error"]["code"] == "invalid_json"
    r = client.post("/v1/chat/completions", json={"model": "nobody", "messages": USER})
    assert r.status_code == 404 and r.json["error"]["code"] == "model_not_found"


def test_models_keys_and_cors(tmp_path):
    from config.settings import ApiKey

    app, _ = fake_app(tmp_path, api_keys=(ApiKey("alice", "sk-fast-test", models=("fake-echo",)),))
    client = app.test_client()
    assert client.get("/v1/models").json["error"]["code"] == "invalid_api_key"
    auth = {"Authorization": "Bearer sk-fast-test"}
    assert {m["id"] for m in client.get("/v1/models", headers=auth).json["data"]} == {"fake-echo"}
    r = client.post("/v1/chat/completions", headers=auth, json={"model": "fake-busy", "messages": USER})
    assert r.status_code == 404  # a model the key may not use does not exist for it
    preflight = client.options("/v1/chat/completions", headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"})
    assert preflight.status_code == 204 and preflight.headers["Access-Control-Allow-Origin"] == "*"
    assert preflight.headers["Access-Control-Allow-Headers"] == "authorization, content-type, x-stainless-os"
    assert "x-request-id" in preflight.headers["Access-Control-Expose-Headers"]


def test_embeddings(client):
    r = client.post("/v1/embeddings", json={"model": "fake-echo", "input": ["ab", "abcd"]})
    assert r.status_code == 200
    assert [d["embedding"] for d in r.json["data"]] == [[2.0, 1.0], [4.0, 1.0]]


def test_the_backend_is_handed_the_request_s_context(app_and_backend):
    """What an upstream needs of the request (its id, the fields aigate does not read) reaches the
    backend as an argument; the Responses API's body is not passed on (its fields are its own)."""
    app, backend = app_and_backend
    client = app.test_client()
    r = client.post("/v1/chat/completions", headers={"X-Request-ID": "req-ctx-1"},
                    json={"model": "fake-echo", "messages": USER, "top_k": 5})
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-ctx-1"
    caller = backend.callers[-1]
    assert caller is not None and caller.id == "req-ctx-1" and caller.body is not None and caller.body["top_k"] == 5
    r = client.post("/v1/embeddings", json={"model": "fake-echo", "input": "ab", "user": "u1"})
    caller = backend.callers[-1]
    assert r.status_code == 200 and caller is not None and caller.body == {"model": "fake-echo", "input": "ab",
                                                                           "user": "u1"}
    r = client.post("/v1/responses", json={"model": "fake-echo", "input": "hello", "store": False})
    caller = backend.callers[-1]
    assert r.status_code == 200 and caller is not None and caller.body is None
    assert caller.id == r.headers["x-request-id"]


def test_the_log_line_says_who_answered_and_what_it_cost(app_and_backend, caplog):
    import logging

    app, backend = app_and_backend
    caplog.set_level(logging.INFO, logger="aigate.requests")
    r = app.test_client().post("/v1/chat/completions", headers={"X-Request-ID": "req-log-1"},
                               json={"model": "fake-echo", "messages": USER})
    assert r.status_code == 200
    r.close()  # the line is written when the response is closed
    line = next(rec.getMessage() for rec in caplog.records if "id=req-log-1" in rec.getMessage())
    assert "status=200" in line and "model=fake-echo" in line and "backend=fake" in line
    assert "completion_tokens=4" in line and "stream=false" in line and "error=-" in line
