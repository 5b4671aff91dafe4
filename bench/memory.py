"""Benchmark 4: memory of 1, 2 and 4 gunicorn workers serving the bench model.

    .venv/bin/python bench/memory.py

Each worker answers one local chat first (frozen in turn with SIGSTOP so the next request must go
to another worker). Memory is PSS from /proc/PID/smaps_rollup summed over the whole server: the
master, the engine (the only process that holds the model) and the workers, which only do I/O,
so N workers should cost little more than one.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import requests
from common import BIN, RESULTS, ROOT, bench_model, free_port

BODY = {"model": "bench", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}


def pss_kib(pid: int) -> int:
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    return int(re.search(r"^Pss:\s+(\d+) kB", text, re.M).group(1))


def children(pid: int) -> list[int]:
    """Children of every thread of ``pid`` (the master starts the engine from a thread of its own)."""
    return [int(p) for task in Path(f"/proc/{pid}/task").iterdir() for p in (task / "children").read_text().split()]


def is_engine(pid: int) -> bool:
    return b"backends.chatglm.engine.server" in Path(f"/proc/{pid}/cmdline").read_bytes()


def measure(workers: int, model) -> tuple[int, list[int]]:
    port = free_port()
    env = {**os.environ, "CHATGLM_MODEL": str(model), "CHATGLM_MODEL_ID": "bench", "PORT": str(port),
           "WORKERS": str(workers)}
    process = subprocess.Popen([str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:application"], cwd=ROOT,
                               env=env, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    ready = threading.Condition()

    def pump() -> None:
        for line in process.stderr:
            with ready:
                log.append(line)
                ready.notify_all()

    threading.Thread(target=pump, daemon=True).start()
    with ready:
        ready.wait_for(lambda: sum("aigate ready" in line for line in log) >= workers, 120)
    frozen: list[int] = []
    try:
        for n in range(workers):  # one request per worker: freeze whoever answered, ask again
            rid = f"mem-{workers}-{n}"
            requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=BODY, timeout=120,
                          headers={"X-Request-ID": rid}).raise_for_status()
            marker = f"id={rid} "
            with ready:
                ready.wait_for(lambda marker=marker: any(marker in line for line in log), 30)
                line = next(line for line in log if marker in line)
            pid = int(re.search(r"\[(\d+)\] \[INFO\]", line).group(1))
            os.kill(pid, signal.SIGSTOP)
            frozen.append(pid)
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        pids = [process.pid, *children(process.pid)]
        per_worker = [pss_kib(p) for p in children(process.pid) if not is_engine(p)]
        engine = sum(pss_kib(p) for p in children(process.pid) if is_engine(p))
        return sum(pss_kib(p) for p in pids), per_worker, engine
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        process.terminate()
        process.wait(30)


def main() -> None:
    model = bench_model()
    size_mib = model.stat().st_size / 2**20
    rows = []
    for workers in (1, 2, 4):
        total, per_worker, engine = measure(workers, model)
        rows.append((workers, total / 1024, [p / 1024 for p in per_worker], engine / 1024))
    base = rows[0][1]
    lines = ["# Memory of 1, 2 and 4 workers", "",
             f"Bench model file: {size_mib:.0f} MiB (f16, mapped read-only). PSS summed over the gunicorn "
             "master, the engine and the workers after every worker has answered a local chat. "
             "Command: `.venv/bin/python bench/memory.py`.", "",
             "| workers | total PSS MiB | vs 1 worker | engine PSS MiB | per-worker PSS MiB |", "|---|---|---|---|---|"]
    lines += [f"| {w} | {t:.0f} | {t / base:.2f}x | {e:.0f} | {', '.join(f'{p:.0f}' for p in per)} |"
              for w, t, per, e in rows]
    (RESULTS / "memory.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar([str(w) for w, *_ in rows], [t for _, t, *_ in rows])
    ax.axhline(base * 1.15, linestyle="--", color="gray", label="goal: 1.15x one worker")
    ax.set_xlabel("workers")
    ax.set_ylabel("total PSS (MiB)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "memory.png", dpi=100)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
