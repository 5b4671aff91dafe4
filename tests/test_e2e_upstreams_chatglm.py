"""Two real chatglm.cpp API servers (chatglm_cpp.openai_api under uvicorn, on the demo model) behind aigate,
declared the way a user would: one model, exact shapes, spread, failover, and both gone."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
import requests

from tests.conftest import start_server

pytest.importorskip("uvicorn")
pytest.importorskip("sse_starlette")
USER = [{"role": "user", "content": "hi"}]
# chatglm.cpp's server takes max_tokens as the whole length, prompt included: leave room for "hi"'s.
MAX_TOKENS = 10
# Greedy: the stock server sometimes segfaults while sampling the demo model's random weights.
GREEDY = 0.0


class Uvicorn:
    def __init__(self, model: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "chatglm_cpp.openai_api:app", "--host", "127.0.0.1", "--port", "0"],
            env={"MODEL": str(model), "MAX_LENGTH": "1024", "PATH": "/usr/bin:/bin"},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert self.process.stdout is not None
        for line in self.process.stdout:
            found = re.search(r"Uvicorn running on (http://[\d.]+:\d+)", line)
            if found:
                self.base = found.group(1) + "/v1"
                break
        else:
            raise RuntimeError("chatglm.cpp's API server did not start")
        threading.Thread(target=self.process.stdout.read, daemon=True).start()

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def glm_servers(demo_model):
    servers = [Uvicorn(demo_model), Uvicorn(demo_model)]
    yield servers
    for s in servers:
        if s.process.poll() is None:
            s.kill()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, glm_servers):
    tmp = tmp_path_factory.mktemp("glm-gateway")
    one, two = glm_servers
    (tmp / "upstreams.toml").write_text(f"""
[upstreams.glm-one]
base_url = "{one.base}"
models = ["chatglm3-6b"]

[upstreams.glm-two]
base_url = "{two.base}"
models = ["chatglm3-6b"]
""")
    server = start_server(tmp, {"UPSTREAMS_FILE": str(tmp / "upstreams.toml")})
    yield server
    server.stop()


def served(gateway) -> dict[str, int]:
    upstreams = requests.get(gateway.base_url + "/ready", timeout=10).json()["upstreams"]
    return {name: state["requests"] for name, state in upstreams.items()}


def test_two_chatglm_cpp_servers_make_one_model_that_survives_one_of_them(gateway, glm_servers):
    models = requests.get(gateway.v1 + "/models", timeout=10).json()["data"]
    assert [m["id"] for m in models] == ["chatglm3-6b"]  # not chatglm.cpp's gpt-3.5-turbo, nor a demo model

    sdk = openai.OpenAI(base_url=gateway.v1, api_key="unused", max_retries=0)
    answer = sdk.chat.completions.create(model="chatglm3-6b", messages=USER, max_tokens=MAX_TOKENS, temperature=GREEDY)
    assert answer.id.startswith("chatcmpl-") and answer.id != "chatcmpl" and answer.model == "chatglm3-6b"
    assert answer.object == "chat.completion" and answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.prompt_tokens > 0 and answer.usage.total_tokens == (answer.usage.prompt_tokens +
                                                                            answer.usage.completion_tokens)

    # chatglm.cpp's stream: chunks without id or created, and no [DONE]; aigate's has both.
    r = requests.post(gateway.v1 + "/chat/completions", json={"model": "chatglm3-6b", "messages": USER, "stream": True,
                      "max_tokens": MAX_TOKENS, "temperature": GREEDY, "stream_options": {"include_usage": True}},
                      stream=True, timeout=60)
    events = [line[6:].decode() for line in r.iter_lines() if line.startswith(b"data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("error" not in c for c in chunks), chunks[-2:]
    assert len({c["id"] for c in chunks}) == 1 and all(c["created"] > 0 and c["model"] == "chatglm3-6b"
                                                       for c in chunks)
    assert chunks[-1]["usage"]["total_tokens"] > 0 and chunks[-2]["choices"][0]["finish_reason"] == "stop"

    before = served(gateway)
    slowest = 0.0
    for _ in range(12):
        t0 = time.monotonic()
        assert sdk.chat.completions.create(model="chatglm3-6b", messages=USER, max_tokens=MAX_TOKENS,
                                           temperature=GREEDY).choices
        slowest = max(slowest, time.monotonic() - t0)
    after = served(gateway)
    assert {name: after[name] - before[name] for name in after} == {"glm-one": 6, "glm-two": 6}

    glm_servers[0].kill()
    for _ in range(6):
        started = time.monotonic()
        assert sdk.chat.completions.create(model="chatglm3-6b", messages=USER, max_tokens=MAX_TOKENS,
                                           temperature=GREEDY).choices
        # Within a few seconds of what an answer took before (this shared machine makes that vary).
        assert time.monotonic() - started < 5 + slowest

    glm_servers[1].kill()
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as failed:
        sdk.chat.completions.create(model="chatglm3-6b", messages=USER, max_tokens=MAX_TOKENS, temperature=GREEDY)
    assert time.monotonic() - started < 20
    assert failed.value.status_code in (502, 503, 504)
    assert failed.value.body["type"] == "server_error" and "every upstream" in failed.value.body["message"]
    assert "127.0.0.1" not in failed.value.body["message"]
