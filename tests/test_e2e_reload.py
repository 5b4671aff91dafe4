"""Reloads, shutdowns and a broken metrics directory, against a real gunicorn (issue 12, items 2, 3, 10)."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import start_server
from tests.fake_cloudflare import cloudflare_env

USER = [{"role": "user", "content": "Tell me a long story."}]
KEYS = '[keys.alice]\nkey = "sk-alice-1"\n'


def ready_workers(server) -> int:
    return sum("aigate ready" in line for line in server.log)


def wait_until(server, predicate, timeout: float = 60) -> None:
    with server.changed:
        assert server.changed.wait_for(predicate, timeout), "".join(server.log[-30:])


def poll(condition, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def models(server, key: str) -> int:
    return requests.get(server.v1 + "/models", headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code


def counted(server) -> float:
    text = requests.get(server.base_url + "/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(r'^aigate_requests_total\{[^}]*route="/v1/models"[^}]*\} (\S+)$',
                                            text, re.M))


def test_a_reload_with_a_broken_keys_file_keeps_serving_and_keeps_the_counts(tmp_path, demo_model):
    keys = tmp_path / "keys.toml"
    keys.write_text(KEYS)
    keys.chmod(0o600)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    server = start_server(tmp_path, {"CHATGLM_MODEL": str(demo_model), "API_KEYS_FILE": str(keys),
                                     "TMPDIR": str(scratch)})
    try:
        assert [models(server, "sk-alice-1") for _ in range(3)] == [200] * 3
        assert poll(lambda: counted(server) == 3)  # each is counted when its response closes
        assert len(list(scratch.glob("aigate-metrics-*"))) == 1

        keys.write_text(KEYS + "[keys.bob\nkey = 'sk-bob-2'\n")  # a typo: the table is not closed
        server.process.send_signal(signal.SIGHUP)
        server.wait_for_log("configuration error on reload, still serving the previous configuration: "
                            "API_KEYS_FILE")
        wait_until(server, lambda: ready_workers(server) >= 2)  # a new worker, on the old configuration
        server.wait_for_log("Worker exiting")  # and the old one gone: every answer is the new worker's
        assert server.process.poll() is None
        assert models(server, "sk-alice-1") == 200 and models(server, "sk-bob-2") == 401
        assert counted(server) >= 4  # the counts from before the reload are still there

        keys.write_text('[keys.bob]\nkey = "sk-bob-2"\n')  # fixed, and alice revoked
        server.process.send_signal(signal.SIGHUP)
        wait_until(server, lambda: ready_workers(server) >= 3)
        # Once the old worker has stopped taking connections, only the new keys are known.
        assert poll(lambda: (models(server, "sk-bob-2"), models(server, "sk-alice-1")) == (200, 401))
        assert counted(server) >= 6
        assert len(list(scratch.glob("aigate-metrics-*"))) == 1  # one directory however many reloads
    finally:
        server.stop()
    assert list(scratch.glob("aigate-metrics-*")) == []


@pytest.mark.parametrize("how", ["reload", "shutdown"])
def test_a_stream_cut_by_the_graceful_timeout_says_so(tmp_path, fake, how):
    # A stream that outlasts GRACEFUL_TIMEOUT however fast the machine: 300 frames 100 ms apart.
    server = start_server(tmp_path, {**cloudflare_env(fake, CLOUDFLARE_MODELS="@cf/fake/long"),
                                     "GRACEFUL_TIMEOUT": "8"})
    try:
        with requests.post(server.v1 + "/chat/completions", stream=True, timeout=60, headers={"X-Request-ID": "cut-1"},
                           json={"model": "@cf/fake/long", "messages": USER, "stream": True, "max_tokens": 300}) as r:
            lines = r.iter_lines()
            while b'"content":"' not in next(lines):  # the stream has begun
                pass
            started = time.monotonic()
            server.process.send_signal(signal.SIGHUP if how == "reload" else signal.SIGTERM)
            events = [line for line in lines if line]
        assert events[-1] == b"data: [DONE]", events[-3:]
        error = json.loads(events[-2].removeprefix(b"data: "))["error"]
        assert error["code"] == "server_shutting_down" and error["type"] == "server_error"
        assert time.monotonic() - started < 15
        line = server.wait_for_log("id=cut-1 ")
        assert "error=server_shutting_down" in line and "finish=-" in line, line
    finally:
        server.stop()


# -- a broken metrics directory ----------------------------------------------------------------------------

def stream_completes(server) -> bool:
    r = requests.post(server.v1 + "/chat/completions", timeout=60,
                      json={"model": "demo", "messages": USER, "max_tokens": 5, "stream": True})
    return r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")


def test_a_metrics_directory_that_cannot_be_recreated_costs_metrics_only(tmp_path, demo_model):
    parent = tmp_path / "m"
    metrics_dir = parent / "metrics"
    server = start_server(tmp_path, {"CHATGLM_MODEL": str(demo_model), "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
                                     "QUEUE_TIMEOUT": "3"})
    try:
        assert stream_completes(server)
        worker = int(re.findall(r"Booting worker with pid: (\d+)", "".join(server.log))[-1])
        file = tmp_path / "file"
        file.write_text("a file where the directory was: it cannot be made again")
        for n in itertools.count():  # a worker finishing its request may make the directory again: move it aside
            parent.rename(tmp_path / f"gone{n}")
            try:
                file.rename(parent)  # atomic, and refused while a directory is there again
                break
            except IsADirectoryError:
                continue
        os.kill(worker, signal.SIGKILL)  # its replacement finds no directory to write in
        wait_until(server, lambda: ready_workers(server) >= 2)
        for _ in range(3):  # each holds and frees the machine's only generation slot
            assert stream_completes(server)
        assert requests.post(server.v1 + "/chat/completions", timeout=30,
                             json={"model": "demo", "messages": USER, "max_tokens": 3}).status_code == 200
        ready = requests.get(server.base_url + "/ready", timeout=10)
        assert ready.status_code == 503 and "cannot be recreated" in ready.json()["metrics"], ready.text
        scrape = requests.get(server.base_url + "/metrics", timeout=10)
        assert scrape.status_code == 503 and scrape.json()["error"]["code"] == "metrics_unavailable"
        server.wait_for_log("metrics paused: the metrics directory")
        assert "Traceback" not in "".join(server.log)

        parent.unlink()  # the operator mends it: the next request makes the directory again
        assert stream_completes(server)
        assert requests.get(server.base_url + "/ready", timeout=10).status_code == 200
        assert requests.get(server.base_url + "/metrics", timeout=10).status_code == 200
    finally:
        server.stop()


@pytest.fixture
def tiny_filesystem(tmp_path) -> Path:
    """A 3 MiB tmpfs, filled up (needs root: mount)."""
    where = tmp_path / "tiny"
    where.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(where)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_metrics_file_system_does_not_kill_workers(tmp_path, demo_model, tiny_filesystem):
    metrics_dir = tiny_filesystem / "metrics"
    server = start_server(tmp_path, {"CHATGLM_MODEL": str(demo_model), "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
    try:
        filler = os.open(tiny_filesystem / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:  # what is left of the 3 MiB, taken
            while True:
                os.write(filler, b"\1" * 4096)
        except OSError:
            pass
        finally:
            os.close(filler)
        for _ in range(3):
            assert stream_completes(server)
        assert "was sent SIGBUS" not in "".join(server.log) and server.process.poll() is None
        assert sum("Booting worker" in line for line in server.log) == 1  # never replaced
        ready = requests.get(server.base_url + "/ready", timeout=10)
        assert ready.status_code == 503 and "MiB free" in ready.json()["metrics"], ready.text
    finally:
        server.stop()
