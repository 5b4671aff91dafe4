"""Shared fixtures: models written by the project's own demo generator, and real gunicorn servers."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from backends.chatglm.demo_model import write_demo_model

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = str(Path(sys.executable).with_name("gunicorn"))
# A model big enough that a long answer takes seconds (about 400 tokens/s here) and that never
# writes end-of-text, so max_tokens decides every length.
SLOW_MODEL = dict(hidden_size=1024, num_layers=4, num_heads=16, num_kv_heads=2, ffn_size=2816, eos_every=0)
# Every server and app of this run gets an engine address of its own (ENGINE_SOCKET), under one
# prefix, so that the engines left by in-process apps are found and stopped at the end: a path, as by
# default, in a directory of this run's own (the first engine makes it, 0700).
ENGINE_DIR = Path(tempfile.gettempdir()) / f"aigate-test-{os.getpid()}"
ENGINE_PREFIX = f"{ENGINE_DIR}/engine-"


def engine_socket() -> str:
    # Random, not counted: this file may be imported twice (as pytest's conftest and as tests.conftest).
    return ENGINE_PREFIX + secrets.token_hex(6)


@pytest.fixture(scope="session", autouse=True)
def stop_test_engines() -> Iterator[None]:
    yield
    subprocess.run(["pkill", "-f", "--", f"--address {ENGINE_PREFIX}"], check=False)
    shutil.rmtree(ENGINE_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


# The tests' models keep a small context (the demo model aigate writes has 32,768 tokens): a prompt too
# long for it is quick to send, and generated requests (tests/test_openapi.py, test_fuzz.py) never wait
# for the evaluation of a 20,000-token prompt.
TEST_CONTEXT = 1024


@pytest.fixture(scope="session")
def demo_model(models_dir: Path) -> Path:
    return write_demo_model(models_dir / "demo.bin", max_length=TEST_CONTEXT)


@pytest.fixture(scope="session")
def slow_model(models_dir: Path) -> Path:
    return write_demo_model(models_dir / "endless.bin", **SLOW_MODEL, max_length=TEST_CONTEXT)


@pytest.fixture(scope="session")
def slow_q8_0_model(models_dir: Path) -> Path:
    """The slow model in q8_0, whose logits aigate's build gives bit for bit batched or alone (f16 matrices of
    several columns go through ggml's tiled GEMM, one column through the dot product: ~0.01 apart)."""
    (models_dir / "q8_0").mkdir(exist_ok=True)  # the same name, so the same model id: "endless"
    return write_demo_model(models_dir / "q8_0" / "endless.bin", **SLOW_MODEL, dtype="q8_0", max_length=TEST_CONTEXT)


# The other families, as small as the demo model; they never write end-of-text, so max_tokens
# decides every length (GLM-4's tokens are short: a few hundred make a long answer).
@pytest.fixture(scope="session")
def glm4_model(models_dir: Path) -> Path:
    return write_demo_model(models_dir / "glm4.bin", family="glm4", eos_every=0, max_length=TEST_CONTEXT)


@pytest.fixture(scope="session")
def chatglm2_model(models_dir: Path) -> Path:
    return write_demo_model(models_dir / "chatglm2.bin", family="chatglm2", eos_every=0, max_length=TEST_CONTEXT)


@pytest.fixture(scope="session")
def glm4v_model(models_dir: Path) -> Path:
    return write_demo_model(models_dir / "glm4v.bin", family="glm4v", eos_every=0, max_length=TEST_CONTEXT)


@dataclass
class Server:
    process: subprocess.Popen
    base_url: str
    log: list[str] = field(default_factory=list)
    exited: bool = False
    engine_socket: str = ""
    changed: threading.Condition = field(default_factory=threading.Condition)

    def wait_for_log(self, text: str, timeout: float = 10) -> str:
        """The first log line containing ``text``, once the server has written it."""
        with self.changed:
            self.changed.wait_for(lambda: any(text in line for line in self.log), timeout)
            return next(line for line in self.log if text in line)

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # quick shutdown: idle keep-alives hold SIGTERM
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(tmp: Path, env: dict[str, str], *, ready_timeout: float = 60) -> Server:
    """gunicorn -k gevent on an ephemeral loopback port; returns once a worker answers /health."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATGLM_", "MODEL", "API_KEYS"))}
    full_env.update({"HOST": "127.0.0.1", "PORT": "0", "ENGINE_SOCKET": engine_socket(),
                     "DEMO_MODEL_PATH": str(tmp / "demo-default.bin"), "PYTHONUNBUFFERED": "1",
                     "STATE_DIR": str(tmp / "state"),
                     # one slot unless a test asks for more: many tests need a request that waits its turn
                     "GENERATION_SLOTS": "1"})
    full_env.update(env)
    process = subprocess.Popen([GUNICORN, "-c", "gunicorn.conf.py", "wsgi:application"], cwd=ROOT, env=full_env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = Server(process, "", engine_socket=full_env["ENGINE_SOCKET"])
    workers = int(env.get("WORKERS", "1"))
    ready = server.changed

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            with ready:
                server.log.append(line)
                found = re.search(r"Listening at: (http://[\d.]+:\d+)", line)
                if found:
                    server.base_url = found.group(1)
                ready.notify_all()
        with ready:
            server.exited = True
            ready.notify_all()

    threading.Thread(target=pump, daemon=True).start()
    with ready:  # each worker logs "aigate ready" once its model is loaded
        ok = ready.wait_for(lambda: server.exited or (
            server.base_url and sum("aigate ready" in line for line in server.log) >= workers), ready_timeout)
    if not ok or server.exited:
        server.stop()
        raise RuntimeError("gunicorn did not become ready:\n" + "".join(server.log))
    return server


@pytest.fixture(scope="module")
def fake():
    """The fake Cloudflare API on loopback, one per test module."""
    from tests.fake_cloudflare import FakeCloudflare

    fake = FakeCloudflare().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def client(server):
    """The official SDK pointed at the module's `server`, retries off so every status is seen."""
    import openai

    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    servers: list[Server] = []

    def make(**env: str) -> Server:
        server = start_server(tmp_path_factory.mktemp("server"), env)
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.stop()


def unchunked(data: bytes, ended: bool) -> bytes:
    """The body carried by HTTP/1.1 chunks, each chunk's size checked against its bytes; ``ended``: the
    last (zero) chunk must close the data, with nothing after it."""
    body = b""
    while data or ended:
        size, _, data = data.partition(b"\r\n")
        n = int(size, 16)
        if ended and n == 0:
            assert data == b"\r\n", data[:200]  # the end, and nothing after it
            return body
        assert data[n:n + 2] == b"\r\n", "a chunk's size does not match its bytes"
        body, data = body + data[:n], data[n + 2:]
    return body


def peak_rise(server: Server, action: Callable[[], object]) -> int:
    """How far the serving worker's (the last booted) peak resident memory went above where it was
    during ``action``, in bytes: the kernel's peak (VmHWM) is reset first."""
    pid = re.findall(r"Booting worker with pid: (\d+)", "".join(server.log))[-1]

    def status(field: str) -> int:
        found = re.search(rf"^{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
        assert found is not None
        return int(found.group(1)) * 1024

    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = status("VmRSS")
    action()
    return status("VmHWM") - before
