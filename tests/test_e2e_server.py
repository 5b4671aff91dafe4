"""End to end: start-up, auth, CORS, the demo default, and the generation queue under gunicorn."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time

import openai
import pytest
import requests

from tests.conftest import GUNICORN, ROOT, start_server

USER = [{"role": "user", "content": "hello"}]


def test_default_server_serves_the_demo_model(server_factory):
    server = server_factory()
    models = requests.get(server.v1 + "/models", timeout=10).json()["data"]
    assert [m["id"] for m in models] == ["chatglm3-demo"]
    assert "random weights" in models[0]["owned_by"] and "CHATGLM_MODEL" in models[0]["owned_by"]
    assert any("CHATGLM_MODEL" in line and "demo" in line for line in server.log)
    client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0)
    r = client.chat.completions.create(model="chatglm3-demo", messages=USER, max_tokens=30)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1


def test_auth(server_factory, demo_model):
    server = server_factory(CHATGLM_MODEL=str(demo_model), API_KEYS="key-one, key-two")
    for key in ("key-one", "key-two"):
        client = openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0)
        assert client.chat.completions.create(model="demo", messages=USER, max_tokens=1).usage.completion_tokens == 1
    with pytest.raises(openai.AuthenticationError) as err:
        openai.OpenAI(base_url=server.v1, api_key="key-three", max_retries=0).models.list()
    assert err.value.code == "invalid_api_key"
    r = requests.get(server.v1 + "/models", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert requests.get(server.base_url + "/health", timeout=10).status_code == 200
    preflight = requests.options(server.v1 + "/chat/completions", timeout=10, headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"})
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Headers"] == "authorization, content-type, x-stainless-os"
    assert preflight.headers["Access-Control-Allow-Origin"] == "*"


def test_request_id_is_returned(server_factory, demo_model):
    server = server_factory(CHATGLM_MODEL=str(demo_model))
    assert requests.get(server.v1 + "/models", timeout=10).headers["x-request-id"].startswith("req_")
    echoed = requests.get(server.v1 + "/models", headers={"X-Request-ID": "abc-123"}, timeout=10)
    assert echoed.headers["x-request-id"] == "abc-123"


def test_full_queue_is_429_with_retry_after(server_factory, slow_model):
    server = server_factory(CHATGLM_MODEL=str(slow_model), MAX_QUEUE="0")
    client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0)
    stream = client.chat.completions.create(model="endless", messages=USER, max_tokens=900, stream=True)
    next(iter(stream))  # the only slot is taken
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="endless", messages=USER, max_tokens=1)
    assert err.value.code == "queue_full"
    assert int(err.value.response.headers["Retry-After"]) >= 1
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="endless", messages=USER, max_tokens=1, stream=True)
    stream.close()  # the engine lets go of the slot at its next token: a few milliseconds, not at once
    gauge = 'aigate_generations_running{backend="chatglm"} 0.0'
    deadline = time.monotonic() + 5
    while gauge not in requests.get(server.base_url + "/metrics", timeout=10).text:
        assert time.monotonic() < deadline, "the closed stream still holds the slot"
    assert client.chat.completions.create(model="endless", messages=USER, max_tokens=1).usage.completion_tokens == 1


def test_queue_timeout_is_503(server_factory, slow_model):
    server = server_factory(CHATGLM_MODEL=str(slow_model), MAX_QUEUE="2", QUEUE_TIMEOUT="0.2")
    client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0)
    stream = client.chat.completions.create(model="endless", messages=USER, max_tokens=900, stream=True)
    next(iter(stream))
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(model="endless", messages=USER, max_tokens=1)
    assert err.value.status_code == 503 and err.value.code == "queue_timeout"
    assert "Retry-After" in err.value.response.headers
    stream.close()


def test_queued_requests_wait_and_complete(server_factory, slow_model):
    """Two workers, one slot: the second request waits its turn instead of failing, and both
    get the same text they get alone."""
    server = server_factory(CHATGLM_MODEL=str(slow_model), WORKERS="2")
    client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0)
    prompts = [[{"role": "user", "content": "the fox"}], [{"role": "user", "content": "the bridge"}]]
    alone = [client.chat.completions.create(model="endless", messages=p, temperature=0, max_tokens=200)
             .choices[0].message.content for p in prompts]
    got: list[str | None] = [None, None]

    def run(i: int) -> None:
        own = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0)  # its own connection
        got[i] = own.chat.completions.create(model="endless", messages=prompts[i], temperature=0,
                                             max_tokens=200).choices[0].message.content

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == alone


def test_two_slots_stay_uncorrupted(server_factory, slow_q8_0_model):
    """GENERATION_SLOTS=2 in one worker: two generations run at once (in the same steps, on aigate's build) and
    each answer is what it is alone, to the letter: in q8_0 the logits are the same bits batched or alone (in f16
    they differ by ~0.01, and over 120 greedy tokens a near-tie may go either way)."""
    server = server_factory(CHATGLM_MODEL=str(slow_q8_0_model), GENERATION_SLOTS="2")
    client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0)
    prompts = [[{"role": "user", "content": "one two three"}], [{"role": "user", "content": "北京是中国的首都"}]]
    alone = [client.chat.completions.create(model="endless", messages=p, temperature=0, max_tokens=120)
             .choices[0].message.content for p in prompts]
    streams = [client.chat.completions.create(model="endless", messages=p, temperature=0, max_tokens=120,
                                              stream=True) for p in prompts]
    iters = [iter(s) for s in streams]
    texts = ["", ""]
    done = [False, False]
    while not all(done):  # read both streams in lockstep: both generations are running at once
        for i, it in enumerate(iters):
            if done[i]:
                continue
            chunk = next(it, None)
            if chunk is None:
                done[i] = True
            elif chunk.choices:
                texts[i] += chunk.choices[0].delta.content or ""
    assert texts == alone


@pytest.mark.parametrize("corruption", ["truncated", "not-a-model", "missing"])
def test_bad_model_file_stops_startup_with_one_line(tmp_path, demo_model, corruption):
    path = tmp_path / "model.bin"
    if corruption == "truncated":
        path.write_bytes(demo_model.read_bytes()[:-100])
    elif corruption == "not-a-model":
        path.write_text("hello")
    env = {"CHATGLM_MODEL": str(path), "PORT": "0", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([GUNICORN, "-c", "gunicorn.conf.py", "wsgi:application"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("aigate: configuration error: CHATGLM_MODEL:") and str(path) in lines[0]


def test_a_bad_configuration_leaves_no_demo_model_behind(tmp_path):
    """The master checks before it writes anything: a bad setting stops it, the demo model unwritten."""
    demo = tmp_path / "demo.bin"
    env = {"DEMO_MODEL_PATH": str(demo), "MODEL_ALIASES": "gpt-4o=nothing", "PORT": "0", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([GUNICORN, "-c", "gunicorn.conf.py", "wsgi:application"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert lines[0].startswith("aigate: configuration error: MODEL_ALIASES: alias gpt-4o=nothing"), lines
    assert not demo.exists() and list(tmp_path.iterdir()) == []


def test_bad_alias_stops_startup(tmp_path, demo_model):
    with pytest.raises(RuntimeError, match="MODEL_ALIASES"):
        start_server(tmp_path, {"CHATGLM_MODEL": str(demo_model), "MODEL_ALIASES": "gpt-4=nothing"})


def test_a_padding_token_ends_the_text_instead_of_crashing(server_factory, models_dir):
    """The model below ends its answers with a padding id: decoding one crashes sentencepiece
    (SIGSEGV), so the server must take it as the end of the text."""
    from backends.chatglm.demo_model import write_demo_model

    model = write_demo_model(models_dir / "pads.bin", end_with_padding=True)
    server = server_factory(CHATGLM_MODEL=str(model))
    client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0)
    for prompt in ("hello", "What is the capital of China?", "tell me a story"):
        r = client.chat.completions.create(model="pads", messages=[{"role": "user", "content": prompt}],
                                           temperature=0, max_tokens=300)
        assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 300
    assert client.models.list().data[0].id == "pads"  # the worker is alive


def test_request_limits(server_factory, demo_model):
    server = server_factory(CHATGLM_MODEL=str(demo_model), MAX_TOKENS_CEILING="10,demo=8", MAX_MESSAGES="2",
                            MAX_INPUT_CHARS="100", MODEL_ALIASES="gpt-4o=demo")
    client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0)
    assert client.chat.completions.create(model="demo", messages=USER, max_tokens=8).usage.completion_tokens <= 8
    for kwargs, code in [({"messages": USER, "max_tokens": 9}, "max_tokens_too_large"),
                         ({"messages": USER, "max_tokens": 9, "model": "gpt-4o"}, "max_tokens_too_large"),
                         ({"messages": USER * 3}, "too_many_messages"),
                         ({"messages": [{"role": "user", "content": "x" * 101}]}, "input_too_large")]:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(**{"model": "demo", **kwargs})
        assert err.value.code == code  # gpt-4o is an alias of demo: its ceiling is demo's 8, not the default 10


def test_oversized_and_malformed_requests_get_openai_errors(server_factory, demo_model):
    server = server_factory(CHATGLM_MODEL=str(demo_model), MAX_BODY_BYTES="4096")
    url = server.v1 + "/chat/completions"
    nested = {"model": "demo", "messages": USER, "metadata": json.loads("[" * 65 + "]" * 65)}
    cases = [
        (requests.post(url, data=b"x" * 5000, timeout=10), 413, "request_too_large"),
        (requests.post(url, json=nested, timeout=10), 400, "invalid_json"),
        (requests.post(url, data="[" * 2000 + "]" * 2000, timeout=10), 400, "invalid_json"),  # past the parser's
        (requests.get(server.v1 + "/models?q=" + "x" * 5000, timeout=10), 414, "uri_too_long"),
        (requests.get(server.v1 + "/models", headers={"X-Big": "x" * 9000}, timeout=10), 431,
         "request_header_fields_too_large"),
        (requests.get(server.v1 + "/models", headers={f"X-{n}": "1" for n in range(101)}, timeout=10), 431,
         "request_header_fields_too_large"),
    ]
    for response, status, code in cases:
        assert response.status_code == status, response.text
        assert response.headers["Content-Type"] == "application/json"
        assert response.json()["error"]["code"] == code and response.json()["error"]["message"]
    # A header line without a colon (a key in it): a 400, and the line never reaches the log.
    head, body = raw_request(server, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization Bearer sk-LEAK-42\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and json.loads(body)["error"]["code"] == "bad_request"
    # What gunicorn refuses as its own failing is a server error the SDKs must not resend.
    head, body = raw_request(server, b"POST /v1/models HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: brotli\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 501 ") and b"x-should-retry: false" in head
    assert json.loads(body)["error"]["type"] == "server_error"
    assert requests.get(server.v1 + "/models", headers={"X-Request-ID": "after-bad"}, timeout=10).status_code == 200
    server.wait_for_log("id=after-bad ")
    assert "Invalid HTTP Header (hidden)" in "".join(server.log) and "sk-LEAK-42" not in "".join(server.log)


def raw_request(server, data: bytes) -> tuple[bytes, bytes]:
    """Bytes no HTTP library would send; the answer's head and body (gunicorn closes after it)."""
    host, port = server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(data)
        answer = b"".join(iter(lambda: conn.recv(65536), b""))
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body

