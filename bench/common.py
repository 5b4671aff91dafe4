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
from collections.abc import Callable
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
    from backends.chatglm.demo_model import write_demo_model

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
        except (requests.ConnectionError, requests.Timeout):  # not listening yet; busy loading a big model
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


def progress(text: str) -> None:
    """A line on stderr, with the time and the load: a long benchmark says where it is and how quiet it was."""
    print(f"{time.strftime('%H:%M:%S')} load {loadavg()}: {text}", file=sys.stderr, flush=True)


def loadavg() -> str:
    return "{:.2f} / {:.2f} / {:.2f}".format(*os.getloadavg())


def cpu_times() -> list[int]:
    """The machine's CPU time since boot by kind (user, nice, system, idle, iowait, irq, softirq, steal...), in
    jiffies, from /proc/stat."""
    return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]


HostRecord = tuple[str, str, str, float]  # when it began, the load average before and after, the share stolen


def watch_host() -> Callable[[], HostRecord]:
    """Start watching how quiet the host is; the function returned, called at the end, gives when it began, the
    load average (1 / 5 / 15 min) before and after, and the share of CPU time the hypervisor took meanwhile."""
    began, load_before, before = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), loadavg(), cpu_times()

    def done() -> HostRecord:
        after = cpu_times()
        return began, load_before, loadavg(), (after[7] - before[7]) / max(1, sum(after) - sum(before))
    return done


def median(values: list[float]) -> float:
    return statistics.median(values)


def load_report(name: str, intro: list[str], results: dict, ttft: dict[str, list[float]], names: tuple[str, ...],
                baseline: str, plotted: tuple[str, ...], ylabel: str) -> None:
    """A load benchmark's results (bench/results/<name>.md and .png): wrk's table at concurrency 1, 10
    and 50 (each contender's requests/s against ``baseline``'s, latency over the upstream's), the time
    to the first streamed token, and the requests/s of ``plotted`` as bars."""
    def m(contender: str, c: int, key: str) -> float:
        return median([r[key] for r in results[(contender, c)]])

    lines = [*intro,
             f"| contender | conc. | req/s | vs {baseline} | p50 ms | p99 ms | p50 over upstream ms | non-2xx |",
             "|---|---|---|---|---|---|---|---|"]
    for c in (1, 10, 50):
        for contender in [n for n in names if (n, c) in results]:
            rps = m(contender, c, "rps")
            lines.append(f"| {contender} | {c} | {rps:.0f} | {rps / m(baseline, c, 'rps'):.0%} | "
                         f"{m(contender, c, 'p50'):.2f} | {m(contender, c, 'p99'):.2f} | "
                         f"{m(contender, c, 'p50') - m('upstream', c, 'p50'):+.2f} | "
                         f"{sum(r['errors'] for r in results[(contender, c)])} |")
    lines += ["", "| contender | time to first streamed token, median ms | over the upstream's, ms |", "|---|---|---|"]
    base = median(ttft["upstream"]) * 1000
    lines += [f"| {contender} | {median(values) * 1000:.2f} | {median(values) * 1000 - base:+.2f} |"
              for contender, values in ttft.items()]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, contender in enumerate(n for n in plotted if (n, 1) in results):
        ax.bar([x + i * 0.27 for x in range(3)], [m(contender, c, "rps") for c in (1, 10, 50)], width=0.27,
               label=contender)
    ax.set_xticks([x + 0.27 for x in range(3)], ["1", "10", "50"])
    ax.set_xlabel("concurrent connections")
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=100)
    print("\n".join(lines))
