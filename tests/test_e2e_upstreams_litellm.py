"""A second real OpenAI-compatible server as an upstream: LiteLLM's proxy (in front of the fake
Workers AI), when it is installed where benchmark 2 puts it (bench/.cache/litellm-venv)."""

from __future__ import annotations

import json
import subprocess
import time

import openai
import pytest
import requests

from tests.conftest import ROOT, start_server
from tests.fake_cloudflare import ACCOUNT, TOKEN
from tests.test_deploy import free_port

LITELLM = ROOT / "bench" / ".cache" / "litellm-venv" / "bin" / "litellm"
MODEL = "@cf/fake/chat"


@pytest.fixture(scope="module")
def litellm(fake, tmp_path_factory):
    if not LITELLM.exists():
        pytest.skip("LiteLLM is not installed in bench/.cache/litellm-venv (see bench/README.md)")
    tmp = tmp_path_factory.mktemp("litellm")
    (tmp / "config.yaml").write_text(
        f'model_list:\n  - model_name: "{MODEL}"\n    litellm_params:\n      model: "cloudflare/{MODEL}"\n'
        f'      api_base: "{fake.base}/accounts/{ACCOUNT}/ai/v1"\n      api_key: "{TOKEN}"\n')
    port = free_port()
    process = subprocess.Popen([str(LITELLM), "--config", str(tmp / "config.yaml"), "--host", "127.0.0.1", "--port",
                                str(port), "--num_workers", "1"], env={"LITELLM_LOG": "ERROR",
                                                                        "LITELLM_MASTER_KEY": "sk-litellm"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_liveliness(port, process)
    except BaseException:
        process.kill()
        raise
    yield f"http://127.0.0.1:{port}/v1"
    process.terminate()
    process.wait(timeout=20)


def wait_for_liveliness(port: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health/liveliness", timeout=5).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):  # not listening yet, or still starting
            time.sleep(0.3)
    pytest.fail("LiteLLM's proxy did not start")


def test_litellm_s_proxy_as_an_upstream(litellm, tmp_path):
    (tmp_path / "upstreams.toml").write_text(f'[upstreams.litellm]\nbase_url = "{litellm}"\napi_key = "sk-litellm"\n')
    server = start_server(tmp_path, {"UPSTREAMS_FILE": str(tmp_path / "upstreams.toml")})  # its models discovered
    try:
        sdk = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
        assert [m.id for m in sdk.models.list()] == [MODEL]
        messages = [{"role": "user", "content": "hello litellm"}]
        answer = sdk.chat.completions.create(model=MODEL, messages=messages)
        assert answer.choices[0].message.content == "You said: hello litellm" and answer.model == MODEL
        r = requests.post(server.v1 + "/chat/completions", json={"model": MODEL, "messages": messages, "stream": True,
                          "stream_options": {"include_usage": True}}, stream=True, timeout=30)
        events = [line[6:].decode() for line in r.iter_lines() if line.startswith(b"data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == \
            "You said: hello litellm"
        assert chunks[-1]["usage"]["completion_tokens"] > 0 and all(c["model"] == MODEL for c in chunks)
    finally:
        server.stop()
