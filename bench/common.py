"""Shared by the benchmarks: the bench model, servers on loopback, a lean SSE client, medians."""

from __future__ import annotations

import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CACHE = ROOT / "bench" / ".cache"
RESULTS = ROOT / "bench" / "results"
BIN = Path(sys.executable).parent

# The "larger random-weight model": ChatGLM3-shaped, vocabulary padded like the real one,
# never writes end-of-text, so every run generates exactly what it is asked for.
BENCH_MODEL = dict(hidden_size=1024, num_layers=8, num_heads=16, num_kv_heads=2, ffn_size=2816,
                   vocab_size=65024, max_length=2048, eos_every=0)


# GLM-4-shaped: GLM-4-9B's proportions at a quarter of its width (its 2 KV heads, its ffn ratio, its
# padded 151,552-token vocabulary), with the project's own byte-level BPE tokenizer.
BENCH_GLM4_MODEL = dict(family="glm4", hidden_size=1024, num_layers=8, num_heads=16, num_kv_heads=2, ffn_size=3424,
                        vocab_size=151552, max_length=2048, eos_every=0)


def bench_model(family: str = "chatglm3") -> Path:
    from backends.demo_model import write_demo_model

    path = CACHE / f"bench-{family}.bin"
    if not path.exists():
        write_demo_model(path, **(BENCH_GLM4_MODEL if family == "glm4" else BENCH_MODEL))  # type: ignore[arg-type]
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} never answered")


def start(command: list[str], env: dict[str, str], ready_url: str) -> subprocess.Popen:
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    wait_until_ready(ready_url, process)
    return process


def start_aigate(port: int, **env: str) -> subprocess.Popen:
    """aigate under gunicorn (gevent workers) on loopback, returned once /ready answers."""
    env = {"PORT": str(port), "LOG_LEVEL": "warning", **env}
    return start([str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:application"], env,
                 f"http://127.0.0.1:{port}/ready")


@dataclass
class Timing:
    ttft: float  # seconds to the first content
    total: float
    text: str


_FIRST_CONTENT = re.compile(rb'"content":"[^"]')  # the role chunk's content is ""


def stream_chat(url: str, body: dict, headers: dict[str, str] | None = None) -> Timing:
    """POST a streaming chat request and time it with the leanest client we could write: on a
    small machine a client's own CPU is taken from the model's cores, and a real client runs
    elsewhere. During the stream it only receives and looks for the first content; the HTTP
    chunks and the SSE events are read after the last byte."""
    parsed = urlsplit(url)
    data = json.dumps({**body, "stream": True}).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    request = (f"POST {parsed.path} HTTP/1.1\r\nHost: {parsed.netloc}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(data)}\r\nConnection: close\r\n{head}\r\n").encode() + data
    received: list[bytes] = []
    first = None
    with socket.create_connection((parsed.hostname, parsed.port or 80), timeout=600) as sock:
        started = time.perf_counter()
        sock.sendall(request)
        tail = b""
        while block := sock.recv(65536):
            received.append(block)
            if first is None:
                if _FIRST_CONTENT.search(tail + block):
                    first = time.perf_counter() - started
                tail = block[-32:]
        total = time.perf_counter() - started
    return Timing(first or 0.0, total, _content(b"".join(received)))


def _content(response: bytes) -> str:
    """The streamed text of a whole HTTP/1.1 response (chunked or not)."""
    head, _, body = response.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1]
    if status != b"200":
        raise RuntimeError(f"HTTP {status.decode()}: {body[:300]!r}")
    if b"transfer-encoding: chunked" in head.lower():
        parts, rest = [], body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size.split(b";")[0], 16)
            if n == 0:
                break
            parts.append(rest[:n])
            rest = rest[n + 2:]
        body = b"".join(parts)
    text = []
    for line in body.split(b"\n"):
        if line.startswith(b"data: {"):
            choices = json.loads(line[6:]).get("choices") or [{}]
            text.append((choices[0].get("delta") or {}).get("content") or "")
    return "".join(text)


def median(values: list[float]) -> float:
    return statistics.median(values)
