"""Benchmark 14: many people on one local model (issue 25): aigate's batched engine against one chat alone, and
llama.cpp's server on the same weights when given one (--llama-server: the model copied into a GGUF file by
bench/ggml_to_gguf.py).

    .venv/bin/python bench/concurrency.py [--llama-server PATH] [--tokens 128] [--rounds 3]
    .venv/bin/python bench/concurrency.py --model demo   # the demo model `make run` serves (capacity table)
    .venv/bin/python bench/concurrency.py --model 6b --tokens 64   # benchmark 13's 6B-shaped q4_0 model

The bench-size model (bench/common.py: ChatGLM3-shaped f16, never ends an answer itself), one server with
GENERATION_SLOTS=8 (llama.cpp: --parallel 8, continuous batching), 2 threads each. Clients run in this process
(the server in its own), with the leanest streaming client (bench/common.py). For 1, 2, 4 and 8 chats at once,
each a distinct greedy prompt and the same number of tokens: tokens per second together (all tokens over the
wall time from the first request to the last token), against one chat alone; each chat's own rate (tokens after
its first over the time after it); the slowest first token. Then the gap test: one stream runs while a
long prompt joins (500 words, ~1,900 tokens); the running stream's largest gap between two chunks, against its
largest gap before.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from common import CACHE, RESULTS, bench_model, free_port, median, start, start_aigate, stream_chat

COUNTS = (1, 2, 4, 8)
SLOTS = 8
PROCESS = {"aigate": "backends.chatglm.engine.server", "llama.cpp": "llama-server"}  # whose memory is counted
THREADS = 2  # chatglm.cpp takes every core of this 2-core machine; llama.cpp is given the same


def resident_mb(program: str) -> float:
    """The resident memory of the process running ``program`` (its executable, or a Python module run with -m)."""
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            if proc.name.isdigit() and (argv[0].endswith("/" + program) or argv[1:3] == ["-m", program]):
                for line in (proc / "status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except (OSError, IndexError):
            continue
    return 0.0


def prompts(count: int, salt: int) -> list[str]:
    return [f"Request {salt}-{i}: tell me about the river and the old town, part {i}" for i in range(count)]


def together(url: str, model: str, count: int, tokens: int, salt: int) -> dict[str, float]:
    """``count`` chats at once; their rates."""
    results: list = [None] * count
    start_line = threading.Barrier(count + 1)

    def chat(i: int, content: str) -> None:
        start_line.wait()
        results[i] = stream_chat(url, {"model": model, "messages": [{"role": "user", "content": content}],
                                       "max_tokens": tokens, "temperature": 0})

    threads = [threading.Thread(target=chat, args=(i, p)) for i, p in enumerate(prompts(count, salt))]
    for t in threads:
        t.start()
    start_line.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    each = [(tokens - 1) / (r.total - r.ttft) for r in results]
    return {"together": count * tokens / wall, "each_min": min(each), "each_median": median(each),
            "ttft_max": max(r.ttft for r in results), "wall": wall}


def stream_times(url: str, body: dict, times: list[float]) -> None:
    """A streaming chat whose chunk arrival times go to ``times`` (each read is one or more events)."""
    parsed = urlsplit(url)
    data = json.dumps({**body, "stream": True}).encode()
    request = (f"POST {parsed.path} HTTP/1.1\r\nHost: {parsed.netloc}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode() + data
    with socket.create_connection((parsed.hostname, parsed.port or 80), timeout=600) as sock:
        sock.sendall(request)
        while sock.recv(65536):
            times.append(time.perf_counter())


def gap_test(url: str, model: str, words: int, salt: int) -> dict[str, float]:
    """One stream of 400 tokens; after its first second a prompt of ``words`` words joins.
    The running stream's largest gap before the join and while the prompt is read."""
    times: list[float] = []
    runner = threading.Thread(target=stream_times, args=(url, {
        "model": model, "messages": [{"role": "user", "content": "a long answer please"}], "max_tokens": 400,
        "temperature": 0}, times))
    runner.start()
    while len(times) < 20:
        time.sleep(0.01)
    joined_at = time.perf_counter()
    long_prompt = " ".join(f"w{i + salt}" for i in range(words))  # ~3.8 tokens each (ChatGLM3's); no two alike
    # (a prompt seen before would come from the cache)
    joiner = stream_chat(url, {"model": model, "messages": [{"role": "user", "content": long_prompt}],
                               "max_tokens": 4, "temperature": 0})
    read_at = joined_at + joiner.ttft
    runner.join()
    gaps_before = [b - a for a, b in zip(times[2:], times[3:], strict=False) if b < joined_at]
    gaps_during = [b - a for a, b in zip(times, times[1:], strict=False) if joined_at <= b <= read_at + 0.05]
    return {"before_max": max(gaps_before), "during_max": max(gaps_during, default=0.0),
            "prompt_ttft": joiner.ttft}


def start_llama(server: Path, gguf: Path, port: int) -> subprocess.Popen:
    return start([str(server), "-m", str(gguf), "--port", str(port), "-t", str(THREADS), "-tb", str(THREADS),
                  "-c", str(2048 * SLOTS), "-np", str(SLOTS), "-cb", "--no-warmup"], {},
                 f"http://127.0.0.1:{port}/health")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--llama-server", type=Path, help="llama.cpp's server, run on the same weights as a GGUF")
    parser.add_argument("--model", choices=("bench", "demo", "6b"), default="bench")
    args = parser.parse_args()

    if args.model == "demo":
        from backends.chatglm.demo_model import write_demo_model

        path = CACHE / "demo-endless.bin"
        if not path.exists():
            write_demo_model(path, eos_every=0)  # as `make run` writes it, but answers as long as asked
    elif args.model == "6b":
        from speed_6b import model_files

        path = model_files()[0]
    else:
        path = bench_model()
    contenders = {"aigate": lambda port: start_aigate(port, CHATGLM_MODEL=str(path), CHATGLM_MODEL_ID="bench",
                                                      GENERATION_SLOTS=str(SLOTS), MAX_QUEUE=str(SLOTS))}
    if args.llama_server:
        from ggml_to_gguf import convert

        gguf = path.with_suffix(".gguf")
        if not gguf.exists() or gguf.stat().st_mtime < path.stat().st_mtime:
            convert(path, gguf)  # the very weights aigate runs, under llama.cpp's names
        contenders["llama.cpp"] = lambda port: start_llama(args.llama_server, gguf, port)
    load = Path("/proc/loadavg").read_text().split()[:3]
    rows: dict[tuple[str, int], list[dict[str, float]]] = {}
    gaps: dict[str, list[dict[str, float]]] = {}
    for name, launch in contenders.items():
        port = free_port()
        server = launch(port)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        try:
            together(url, "bench", 2, 8, salt=-1)  # warm: the first graphs, the connections
            for r in range(args.rounds):  # counts interleaved within a round, rounds repeated
                for count in COUNTS:
                    row = together(url, "bench", count, args.tokens, r * 10)
                    row["rss_mb"] = resident_mb(PROCESS[name])
                    rows.setdefault((name, count), []).append(row)
                    print(name, count, rows[(name, count)][-1], flush=True)
            gaps[name] = [gap_test(url, "bench", 500, salt=7 * r) for r in range(args.rounds)]
            print(name, "gaps", gaps[name], flush=True)
        finally:
            server.terminate()
            server.wait()
    report(rows, gaps, contenders, args, load)


def report(rows: dict, gaps: dict, contenders: dict, args: argparse.Namespace, load: list[str]) -> None:
    def m(name: str, count: int, key: str) -> float:
        return median([r[key] for r in rows[(name, count)]])

    model = {"bench": "Bench-size model (ChatGLM3-shaped f16, hidden 1024, 8 layers, vocabulary 65,024)",
             "demo": "The demo model `make run` serves (ChatGLM3-shaped, tiny, random weights)",
             "6b": "Benchmark 13's model (ChatGLM3-6B's shape in q4_0, random weights, 3.5 GB)"}[args.model]
    lines = ["# Benchmark 14: many people on one local model", "",
             f"{model}, one server with "
             f"{SLOTS} slots, {THREADS} threads per contender, greedy, {args.tokens} tokens per chat, distinct "
             f"prompts; median of {args.rounds} rounds (counts interleaved within each). Load average at the "
             f"start: {' '.join(load)}.", "",
             "| contender | chats at once | tok/s together | vs one alone | each chat, slowest (tok/s) | "
             "vs one alone | slowest first token, s | resident memory, MB |", "|---|---|---|---|---|---|---|---|"]
    for name in contenders:
        alone = m(name, 1, "together")
        for count in COUNTS:
            lines.append(f"| {name} | {count} | {m(name, count, 'together'):.1f} | "
                         f"{m(name, count, 'together') / alone:.2f}x | {m(name, count, 'each_min'):.1f} | "
                         f"{m(name, count, 'each_min') / m(name, 1, 'each_min'):.2f}x | "
                         f"{m(name, count, 'ttft_max'):.2f} | {m(name, count, 'rss_mb'):.0f} |")
    lines += ["", "A stream running while a prompt of 500 words (~1,900 tokens) joins (largest gap between two "
              "chunks, ms):", "",
              "| contender | before the join | while the prompt is read | the prompt's first token, s |",
              "|---|---|---|---|"]
    for name, runs in gaps.items():
        lines.append(f"| {name} | {median([g['before_max'] for g in runs]) * 1000:.0f} | "
                     f"{max(g['during_max'] for g in runs) * 1000:.0f} (worst of {len(runs)}) | "
                     f"{median([g['prompt_ttft'] for g in runs]):.2f} |")
    (RESULTS / f"{name_of(args)}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in contenders:
        ax.plot(COUNTS, [m(name, c, "together") for c in COUNTS], marker="o", label=f"{name}: together")
        ax.plot(COUNTS, [m(name, c, "each_min") for c in COUNTS], marker="x", linestyle="--",
                label=f"{name}: slowest chat")
    ax.set_xlabel("chats at once")
    ax.set_ylabel("tokens/s")
    ax.set_xticks(COUNTS)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name_of(args)}.png", dpi=100)


def name_of(args: argparse.Namespace) -> str:
    return "concurrency" if args.model == "bench" else f"concurrency_{args.model}"


if __name__ == "__main__":
    main()
