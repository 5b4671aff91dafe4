"""Rate limits shared through a real redis-server by two gunicorn workers; no secret in any answer or log."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading

import pytest
import requests

from tests.fake_cloudflare import ACCOUNT, MODES, TOKEN, cloudflare_env

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
USER = [{"role": "user", "content": "hello"}]
KEYS = """
[keys.team]
key = "sk-team-SECRET-1"
requests_per_minute = 6

[keys.batch]
key = "sk-batch-SECRET-2"
tokens_per_minute = 13

[keys.ops]
key = "sk-ops-SECRET-3"
"""


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    if not os.access(REDIS, os.X_OK):
        pytest.skip("redis-server is not installed (make test installs it when run as root)")
    workdir = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen([REDIS, "--port", "0", "--unixsocket", str(workdir / "sock"), "--bind", "127.0.0.1",
                                "--save", "", "--appendonly", "no", "--dir", str(workdir)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    for line in process.stdout:  # port 0: TCP off, the unix socket only; ready when it says so
        if "ready to accept connections" in line.lower():
            break
    else:
        pytest.fail("redis-server exited before it was ready")
    threading.Thread(target=process.stdout.read, daemon=True).start()  # keep its log pipe from filling
    yield f"redis+unix://{workdir / 'sock'}"
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(scope="module")
def server(server_factory, demo_model, redis_url, fake, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.toml"
    keys.write_text(KEYS)
    keys.chmod(0o600)
    return server_factory(CHATGLM_MODEL=str(demo_model), CHATGLM_MODEL_ID="demo", WORKERS="2",
                          API_KEYS_FILE=str(keys), RATELIMIT_STORAGE_URI=redis_url, CLOUDFLARE_RETRIES="0",
                          CLOUDFLARE_TIMEOUT="2,1",
                          CLOUDFLARE_MODELS=",".join(f"@cf/fake/{m}" for m in MODES), **cloudflare_env(fake))


def ask(server, key: str, request_id: str, model: str = "demo") -> requests.Response:
    return requests.post(server.v1 + "/chat/completions", timeout=30,
                         headers={"Authorization": f"Bearer {key}", "X-Request-ID": request_id},
                         json={"model": model, "messages": USER, "max_tokens": 4, "temperature": 0})


def served_by(server, request_id: str) -> int:
    line = server.wait_for_log(f"id={request_id} ")
    return int(re.search(r"\[(\d+)\] \[INFO\]", line).group(1))


def on_the_other_worker(server, busy: int, send):
    """Freeze the worker ``busy``: whatever ``send`` sends meanwhile can only reach the other one."""
    os.kill(busy, signal.SIGSTOP)
    try:
        return send()
    finally:
        os.kill(busy, signal.SIGCONT)


def test_two_workers_share_one_request_count(server):
    first = [ask(server, "sk-team-SECRET-1", f"rpm-{n}") for n in range(3)]
    pid = served_by(server, "rpm-0")
    rest = on_the_other_worker(server, pid, lambda: [ask(server, "sk-team-SECRET-1", f"rpm-{n}") for n in range(3, 7)])
    codes = [r.status_code for r in first + rest]
    assert codes == [200] * 6 + [429], codes  # counted per worker, the 7th would have passed
    assert served_by(server, "rpm-6") != pid  # the refusal came from the worker that had served none of them
    refused = rest[-1]
    assert refused.json()["error"]["code"] == "rate_limit_exceeded" and refused.json()["error"]["type"] == "requests"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60


def test_two_workers_share_one_token_budget(server):
    # It reserves all 13 (the prompt as estimated, with its chat template's tokens: 9; max_tokens: 4)...
    spent = ask(server, "sk-batch-SECRET-2", "tpm-0")
    assert spent.status_code == 200 and spent.json()["usage"]["total_tokens"] > 0  # ...and what it spent stays charged
    pid = served_by(server, "tpm-0")  # logged once the answer closed, so once it was charged
    refused = on_the_other_worker(server, pid, lambda: ask(server, "sk-batch-SECRET-2", "tpm-1"))
    assert served_by(server, "tpm-1") != pid
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "tokens"


def test_metrics_count_requests_and_tokens_by_key_name(server):
    assert ask(server, "sk-ops-SECRET-3", "metrics-0", model="@cf/fake/chat").status_code == 200
    server.wait_for_log("id=metrics-0 ")  # counted when the response closed
    text = requests.get(server.base_url + "/metrics", timeout=10).text
    assert re.search(r'aigate_tokens_total\{key="ops",kind="completion",model="@cf/fake/chat"\} [1-9]', text)
    assert re.search(r'aigate_requests_total\{key="ops",model="@cf/fake/chat",route="/v1/chat/completions",'
                     r'status="200"\} [1-9]', text)
    assert "SECRET" not in text


def test_no_secret_in_any_answer_or_log_line(server, fake):
    answers = [ask(server, "sk-team-SECRET-1-wrong", "s-0"), requests.get(server.v1 + "/models", timeout=10)]
    for mode in MODES:  # every upstream behaviour, errors included, through the unlimited key
        before = len(fake.runs(f"@cf/fake/{mode}"))
        answers.append(ask(server, "sk-ops-SECRET-3", f"s-{mode}", model=f"@cf/fake/{mode}"))
        assert len(fake.runs(f"@cf/fake/{mode}")) > before, mode  # it reached the upstream
    server.wait_for_log(f"id=s-{MODES[-1]} ")
    seen = "".join(server.log) + "".join(r.text + str(r.headers) for r in answers)
    assert {r.status_code for r in answers[:2]} == {401}
    assert {r.status_code for r in answers[2:]} >= {200, 400, 404, 429, 502}  # errors among them
    for secret in ("sk-team-SECRET-1", "sk-batch-SECRET-2", "sk-ops-SECRET-3", TOKEN, ACCOUNT):
        assert secret not in seen
    assert "key=ops" in seen and "key=-" in seen  # keys appear by name; a refused one as "-"


def test_keys_change_on_reload_without_dropping_the_server(server_factory, demo_model, tmp_path):
    keys = tmp_path / "keys.toml"
    keys.write_text('[keys.old]\nkey = "sk-old"\n')
    keys.chmod(0o600)
    server = server_factory(CHATGLM_MODEL=str(demo_model), API_KEYS_FILE=str(keys))
    models = server.v1 + "/models"
    assert requests.get(models, headers={"Authorization": "Bearer sk-old"}, timeout=10).status_code == 200
    keys.write_text('[keys.new]\nkey = "sk-new"\n')
    old = re.search(r"Booting worker with pid: (\d+)", "".join(server.log)).group(1)
    server.process.send_signal(signal.SIGHUP)  # what `systemctl reload aigate` sends
    with server.changed:  # a new worker, with the new file, loaded; the old one gone
        assert server.changed.wait_for(lambda: sum("aigate ready" in line for line in server.log) >= 2, 60)
    server.wait_for_log(f"Worker exiting (pid: {old})")
    assert requests.get(models, headers={"Authorization": "Bearer sk-new"}, timeout=10).status_code == 200
    assert requests.get(models, headers={"Authorization": "Bearer sk-old"}, timeout=10).status_code == 401
