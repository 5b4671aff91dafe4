"""Benchmark 13: a 6B-shaped q4_0 model (ChatGLM3-6B's shape) on chatglm.cpp and on llama.cpp's server, side by
side in one run, against the machine's memory bandwidth (issue 25).

The model is written by the project's demo writer (random weights, ChatGLM3-6B's shape: hidden 4096, 28 layers,
32 heads, 2 KV heads, ffn 13,696, vocabulary 65,024; q4_0 as chatglm.cpp's convert.py quantizes) and copied byte
for byte into a GGUF file for llama.cpp's `chatglm` architecture (bench/ggml_to_gguf.py): both run the very same
weights on the same token ids. Each contender is a server in its own process with 2 threads; this script is the
client (a lean socket reader, in its own process):

* chatglm.cpp: bench/chatglm_step_server.py (the model behind the leanest HTTP server; sequences running at once
  decode together in one `model.step`), for each `--chatglm LABEL=PYTHONPATH` (the chatglm_cpp to import; empty:
  this venv's);
* llama.cpp: `llama-server` (`--llama-server`, default /work/llama-server/build/bin/llama-server), 4 slots.

Measured in rotation, median of `--rounds`: decode of one chat (tokens after the first over the time after the
first), prompt evaluation of an ~800-token prompt (its length over the time to its first token) and the decode
that follows it (each step attends over 800-864 positions), and four chats at once (their tokens together over the
same span) against one alone. The bandwidth limit: the weights one decode
step reads (every matrix but the embedding table) over the best of several timed reads of a 2.7 GB buffer with
the same 2 threads (glibc's memchr through ctypes, which releases the GIL), read before the run and before each
contender's decode: this host's bandwidth switches between two states from minute to minute, so each decode is
also given as a share of the read just before it.

    .venv/bin/python bench/speed_6b.py [--rounds 5] [--chatglm 'aigate build=/path'] [--chatglm 'before=']
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from common import CACHE, RESULTS, ROOT, HostRecord, cpu_times, free_port, progress, wait_until_ready, watch_host

from backends.chatglm.demo_model import write_demo_model
from backends.chatglm.ggml_file import read_model_file, tensor_nbytes

SHAPE = dict(family="chatglm3", hidden_size=4096, num_layers=28, num_heads=32, num_kv_heads=2, ffn_size=13696,
             vocab_size=65024, max_length=4096, eos_every=0, dtype="q4_0")
THREADS = 2
PROMPT = 800
DECODE = 64
FOUR = 4
GOALS = "one chat >= 90% of the bandwidth limit and >= llama.cpp's decode; prompt >= llama.cpp's; four >= 1.5x one"


def model_files() -> tuple[Path, Path]:
    from ggml_to_gguf import convert

    ggml = CACHE / "bench-6b-q4_0.bin"
    gguf = CACHE / "bench-6b-q4_0.gguf"
    if not ggml.exists():
        started = time.perf_counter()
        write_demo_model(ggml, **SHAPE)  # type: ignore[arg-type]
        progress(f"wrote {ggml.name} ({ggml.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - started:.0f} s")
    if not gguf.exists() or gguf.stat().st_mtime < ggml.stat().st_mtime:
        convert(ggml, gguf)
        progress(f"wrote {gguf.name}")
    return ggml, gguf


def bytes_per_token(ggml: Path) -> int:
    """What one decode step reads of the weights: every tensor but the embedding table (one row of it)."""
    from ggml_to_gguf import tensors

    return sum(tensor_nbytes(shape, kind) for name, shape, kind, _ in tensors(read_model_file(ggml))
               if not name.endswith("word_embeddings.weight"))


def read_bandwidth(threads: int, size: int = 5 << 29, runs: int = 7) -> float:
    """Best GB/s of `runs` reads of a `size`-byte buffer (its pages written first, so they are real memory), split
    between `threads` threads each searching its part for a byte it does not hold."""
    buf = np.full(size, 1, np.uint8)
    libc = ctypes.CDLL(None)
    libc.memchr.restype = ctypes.c_void_p
    libc.memchr.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    base, part = buf.ctypes.data, size // threads
    best = 0.0
    for _ in range(runs):
        workers = [threading.Thread(target=libc.memchr, args=(base + i * part, 0, part)) for i in range(threads)]
        started = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, size / (time.perf_counter() - started) / 1e9)
    return best


@dataclass
class Stream:
    ttft: float  # seconds to the first token
    total: float
    tokens: int

    @property
    def decode_rate(self) -> float:
        return (self.tokens - 1) / (self.total - self.ttft)


def complete(port: int, prompt: list[int], n: int, llama: bool) -> Stream:
    """One streamed completion of token ids; each SSE event carries one token."""
    body = {"prompt": prompt, "n_predict": n, "stream": True}
    if llama:
        body |= {"temperature": 0, "top_k": 1, "ignore_eos": True, "cache_prompt": False, "return_tokens": True,
                 "samplers": ["top_k"]}
    data = json.dumps(body).encode()
    request = (f"POST /completion HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode() + data
    tokens, first, buffered = 0, 0.0, b""
    with socket.create_connection(("127.0.0.1", port), timeout=900) as sock:
        started = time.perf_counter()
        sock.sendall(request)
        while block := sock.recv(65536):
            buffered += block
            while b"\n\n" in buffered:
                event, buffered = buffered.split(b"\n\n", 1)
                start = event.find(b"data: {")
                if start < 0:
                    continue
                got = len(json.loads(event[start + 6:]).get("tokens") or [])
                if got and not tokens:
                    first = time.perf_counter() - started
                tokens += got
        total = time.perf_counter() - started
    if tokens != n:
        raise RuntimeError(f"asked for {n} tokens, got {tokens}")
    return Stream(first, total, tokens)


def at_once(port: int, prompts: list[list[int]], n: int, llama: bool) -> float:
    """Tokens/s together of several streams started at once: the sum of their decode rates (each over its own
    span after its first token; they decode side by side)."""
    results: list[Stream | None] = [None] * len(prompts)

    def run(i: int) -> None:
        results[i] = complete(port, prompts[i], n, llama)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = [r for r in results if r is not None]
    if len(done) != len(prompts):
        raise RuntimeError("a stream failed")
    return sum(r.decode_rate for r in done)


def prompts(count: int, length: int, seed: int, top: int = 900) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(10, top, size=length)] for _ in range(count)]


@dataclass
class Contender:
    label: str
    port: int
    llama: bool
    process: subprocess.Popen[bytes]


def start_chatglm(label: str, pythonpath: str, ggml: Path) -> Contender:
    port = free_port()
    env = dict(os.environ)  # chatglm.cpp takes 2 threads here itself (one per core up to 4)
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    process = subprocess.Popen([sys.executable, str(ROOT / "bench" / "chatglm_step_server.py"), str(port), str(ggml),
                                str(FOUR), str(SHAPE["max_length"])], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    wait_until_ready(f"http://127.0.0.1:{port}/", process, timeout=900)
    return Contender(label, port, False, process)


def start_llama(binary: Path, gguf: Path) -> Contender:
    port = free_port()
    process = subprocess.Popen([str(binary), "-m", str(gguf), "-t", str(THREADS), "-tb", str(THREADS),
                                "-c", str(FOUR * SHAPE["max_length"]), "-np", str(FOUR), "--port", str(port),
                                "--no-webui"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until_ready(f"http://127.0.0.1:{port}/health", process, timeout=900)
    return Contender("llama.cpp server", port, True, process)


def busy(seconds: float = 2.0) -> float:
    """The fraction of the machine's CPU time that was busy over `seconds` (between measurements our servers are
    idle, so this is everyone else)."""
    def sample() -> tuple[int, int]:
        fields = cpu_times()
        return fields[3] + fields[4], sum(fields)

    idle0, total0 = sample()
    time.sleep(seconds)
    idle1, total1 = sample()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def wait_quiet(limit: float = 0.10, patience: float = 1800) -> float:
    """Wait (at most `patience` seconds) until others use under `limit` of the CPU: ggml's spinning threads slow
    down many times when another process takes a core. Returns the seconds waited."""
    started = time.monotonic()
    while (share := busy()) > limit and time.monotonic() - started < patience:
        progress(f"others use {share:.0%} of the CPU: waiting")
        time.sleep(10)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chatglm", action="append", default=[],
                        help="LABEL=PYTHONPATH of a chatglm_cpp build to run (repeatable; empty path: this venv's)")
    parser.add_argument("--llama-server", type=Path, default=Path("/work/llama-server/build/bin/llama-server"))
    args = parser.parse_args()
    builds = [tuple(c.split("=", 1)) for c in args.chatglm] or [("chatglm.cpp", "")]
    ggml, gguf = model_files()
    per_token = bytes_per_token(ggml)
    progress(f"{per_token / 1e9:.2f} GB of weights read per token; measuring the read bandwidth")
    wait_quiet()
    bandwidth = {t: read_bandwidth(t) for t in (1, THREADS)}
    seen = [bandwidth[THREADS]]  # and before each decode: the host's bandwidth drifts with its neighbours
    progress(f"bandwidth {bandwidth}")

    host = watch_host()
    results: dict[str, dict[str, list[float]]] = {}
    contenders: list[Contender] = []
    try:
        for label, path in builds:
            contenders.append(start_chatglm(label, path, ggml))
            progress(f"{label} ready")
        contenders.append(start_llama(args.llama_server, gguf))
        progress("llama.cpp ready")
        for c in contenders:  # each one's first answer, untimed (page faults, first allocations)
            complete(c.port, prompts(1, 20, seed=1)[0], 4, c.llama)
        rng = np.random.default_rng(0)
        for r in range(args.rounds):
            for i in rng.permutation(len(contenders)):
                c = contenders[i]
                wait_quiet()
                got = results.setdefault(c.label, {"decode": [], "prompt": [], "deep": [], "four": [], "one": [],
                                                   "read": []})
                short = prompts(FOUR, 20, seed=100 + r)
                got["read"].append(read_bandwidth(THREADS, runs=3))  # the host's state just before this decode
                one = complete(c.port, short[0], DECODE, c.llama)
                got["decode"].append(one.decode_rate)
                long = complete(c.port, prompts(1, PROMPT, seed=200 + r)[0], DECODE, c.llama)
                got["prompt"].append(PROMPT / long.ttft)
                got["deep"].append(long.decode_rate)
                got["one"].append(complete(c.port, short[1], DECODE, c.llama).decode_rate)
                got["four"].append(at_once(c.port, short, DECODE, c.llama))
                progress(f"round {r + 1} {c.label}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in got.items()))
    finally:
        for c in contenders:
            c.process.terminate()
            c.process.wait()
    seen += [b for got in results.values() for b in got["read"]]
    bandwidth[THREADS] = max(seen)  # the limit the machine showed it can reach, the strictest
    report(results, bandwidth, seen, per_token, bandwidth[THREADS] * 1e9 / per_token, host(), args.rounds)


def report(results: dict[str, dict[str, list[float]]], bandwidth: dict[int, float], seen: list[float],
           per_token: int, limit: float, host: HostRecord, rounds: int) -> None:
    began, load_before, load_after, stolen = host
    med = {label: {k: statistics.median(v) for k, v in got.items()} for label, got in results.items()}
    llama = med["llama.cpp server"]
    lines = [
        "# A 6B-shaped q4_0 model: chatglm.cpp vs llama.cpp's server, against the memory bandwidth",
        "",
        f"ChatGLM3-6B's shape ({SHAPE['hidden_size']} hidden, {SHAPE['num_layers']} layers, {SHAPE['num_heads']} "
        f"heads, {SHAPE['num_kv_heads']} KV heads, ffn {SHAPE['ffn_size']:,}, vocabulary {SHAPE['vocab_size']:,}), "
        "random weights in q4_0 written by the demo writer, the same bytes in a GGUF file for llama.cpp; each "
        f"contender a server in its own process with {THREADS} threads, the client in another; greedy, token ids "
        f"in. Median of {rounds} rounds in rotation. Command: `.venv/bin/python bench/speed_6b.py`.",
        "",
        f"Memory read bandwidth (best of 7 reads of 2.7 GB, glibc memchr): {bandwidth[1]:.1f} GB/s with one thread "
        f"before the run; with {THREADS}, measured then and before each decode, {min(seen):.1f}-{max(seen):.1f} GB/s, "
        f"the best {bandwidth[THREADS]:.1f} GB/s taken for the limit. One decode step reads "
        f"{per_token / 1e9:.2f} GB of weights (all but the embedding table), so the limit is **{limit:.2f} "
        "tokens/s**.",
        "",
        "| contender | decode, one chat, tok/s | of the bandwidth limit | of the bandwidth read just before it | "
        f"vs llama.cpp | prompt ({PROMPT} tokens), tok/s | vs llama.cpp | decode after that prompt, tok/s | "
        "vs llama.cpp | four at once, tok/s together | vs one alone |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, m in med.items():
        paired = statistics.median(d * per_token / 1e9 / b for d, b in zip(results[label]["decode"],
                                                                          results[label]["read"], strict=True))
        lines.append(f"| {label} | {m['decode']:.2f} | {m['decode'] / limit:.0%} | {paired:.0%} | "
                     f"{m['decode'] / llama['decode']:.2f}x"
                     f" | {m['prompt']:.1f} | {m['prompt'] / llama['prompt']:.2f}x | {m['deep']:.2f} | "
                     f"{m['deep'] / llama['deep']:.2f}x | {m['four']:.2f} | "
                     f"{m['four'] / m['one']:.2f}x |")
    lines += [
        "",
        f"Goals (issue 25): {GOALS}.",
        "",
        f"Measured from {began}: load average (1 / 5 / 15 min) {load_before} before, {load_after} after; the "
        f"hypervisor took {stolen:.1%} of the CPU time (steal) meanwhile. Every round's numbers:",
        "",
        "| contender | bandwidth read before the decode, GB/s | decode | prompt | decode after it | one alone | "
        "four at once |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, got in results.items():
        lines.append(f"| {label} | " + " | ".join(", ".join(f"{x:.{1 if k == 'read' else 2}f}" for x in got[k])
                                                  for k in ("read", "decode", "prompt", "deep", "one", "four"))
                     + " |")
    (RESULTS / "speed_6b.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(med, limit)


def plot(med: dict[str, dict[str, float]], limit: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(13, 4.2))
    labels = list(med)
    at = np.arange(len(labels))
    left.bar(at - 0.2, [med[x]["decode"] for x in labels], width=0.4, color="tab:blue", label="a short prompt")
    left.bar(at + 0.2, [med[x]["deep"] for x in labels], width=0.4, color="tab:cyan",
             label=f"after {PROMPT} tokens")
    left.set_xticks(at, labels)
    left.axhline(limit, color="tab:red", linestyle="dashed", label="bandwidth limit")
    left.axhline(0.9 * limit, color="tab:orange", linestyle="dotted", label="90% of it")
    left.set_ylabel("tokens/s")
    left.set_title("Decode, one chat")
    left.legend(fontsize="small")
    mid.bar(labels, [med[x]["prompt"] for x in labels], color="tab:green")
    mid.set_title(f"Prompt evaluation ({PROMPT} tokens)")
    mid.set_ylabel("tokens/s")
    right.bar(labels, [med[x]["four"] / med[x]["one"] for x in labels], color="tab:purple")
    right.axhline(1.5, color="tab:red", linestyle="dashed", label="1.5x goal")
    right.set_title("Four at once vs one alone")
    right.set_ylabel("x")
    right.legend()
    for ax in (left, mid, right):
        ax.tick_params(axis="x", labelrotation=15)
    fig.tight_layout()
    fig.savefig(RESULTS / "speed_6b.png", dpi=100)


if __name__ == "__main__":
    main()
