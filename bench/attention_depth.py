"""Benchmark 15: decode speed as the context grows, chatglm.cpp builds side by side in strict alternation.

Each decode step attends over every position of the sequence's cache, so a long conversation decodes slower than a
short one. Here each build (`--build LABEL=PYTHONPATH`, the chatglm_cpp to import; empty: this venv's) runs in a
process of its own with benchmark 13's 6B-shaped q4_0 model, 2 threads, one slot; it reads one prompt of
--context tokens once, then, asked for a depth, decodes 16 tokens from that position of its cache (writing over
16 positions of the prompt, which changes what later runs attend to, not how long they take). The processes take
turns: in each round every build decodes at every depth, the order of the builds alternating, so each ratio is
taken against a run seconds apart (this host's speed wanders by more than the differences measured here). 16 tokens
from a depth cover every remainder of the cache length modulo 16.

    .venv/bin/python bench/attention_depth.py --build '+aigate.9=' --build '+aigate.8=/path' [--rounds 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from common import RESULTS, HostRecord, progress, watch_host
from speed_6b import SHAPE, THREADS, model_files, wait_quiet

DEPTHS = (32, 500, 1000, 2000, 3000)
TOKENS = 16


def worker(path: str, context: int) -> None:
    """The model in this process: reads the prompt, then answers each "DEPTH" line with the seconds 16 tokens took."""
    import chatglm_cpp

    C = chatglm_cpp._C
    model = chatglm_cpp.Pipeline(path, max_length=int(SHAPE["max_length"]), num_slots=1).model
    greedy = C.GenerationConfig(do_sample=False)
    prompt = [10 + (i * 7) % 800 for i in range(context)]
    for start in range(0, context, 256):
        model.step([C.StepEntry(0, prompt[start:start + 256], start, start, None, False)])
    print(chatglm_cpp.__version__, flush=True)
    for line in sys.stdin:
        depth = int(line)
        token = prompt[depth]
        started = time.perf_counter()
        for i in range(TOKENS):
            token = model.step([C.StepEntry(0, [token], depth + i, depth + i, greedy)])[0]
        print(time.perf_counter() - started, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--build", action="append", default=[], help="LABEL=PYTHONPATH (repeatable)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--context", type=int, default=max(DEPTHS) + 64)
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "CONTEXT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]))
        return
    builds = [tuple(b.split("=", 1)) for b in args.build] or [("chatglm.cpp", "")]
    ggml, _ = model_files()
    processes: dict[str, subprocess.Popen[str]] = {}
    for label, path in builds:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | ({"PYTHONPATH": path} if path else {})
        processes[label] = process = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(ggml), str(args.context)], env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert process.stdout is not None
        progress(f"{label}: chatglm_cpp {process.stdout.readline().strip()}, {args.context}-token prompt read")

    def rate(label: str, depth: int) -> float:
        process = processes[label]
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(f"{depth}\n")
        process.stdin.flush()
        return TOKENS / float(process.stdout.readline())

    host = watch_host()
    rates: dict[tuple[str, int], list[float]] = {(label, d): [] for label, _ in builds for d in DEPTHS}
    try:
        for label in processes:  # untimed: first allocations
            rate(label, DEPTHS[0])
        for r in range(args.rounds):
            wait_quiet()
            order = list(processes) if r % 2 == 0 else list(processes)[::-1]
            for depth in DEPTHS:
                for label in order:
                    rates[(label, depth)].append(rate(label, depth))
            progress(f"round {r + 1}: " + ", ".join(f"{label} @{d} {rates[(label, d)][-1]:.2f}"
                                                   for d in DEPTHS for label in processes))
    finally:
        for process in processes.values():
            process.kill()
            process.wait()
    report(rates, [label for label, _ in builds], args, host())


def paired(rates: dict[tuple[str, int], list[float]], label: str, base: str, depth: int) -> tuple[float, float, float]:
    """``label``'s rate over ``base``'s in the same round at ``depth``: lower quartile, median, upper quartile."""
    low, mid, high = statistics.quantiles([a / b for a, b in zip(rates[(label, depth)], rates[(base, depth)],
                                                                  strict=True)], n=4)
    return low, mid, high


def report(rates: dict[tuple[str, int], list[float]], labels: list[str], args: argparse.Namespace,
           host: HostRecord) -> None:
    began, load_before, load_after, stolen = host
    base = labels[-1]
    lines = [
        "# Decode speed as the context grows",
        "",
        f"Benchmark 13's 6B-shaped q4_0 model (ChatGLM3-6B's shape), each build in a process of its own with "
        f"{THREADS} threads and one slot holding a {args.context}-token prompt; at each depth, {TOKENS} greedy "
        f"tokens decoded from that position of the cache. {args.rounds} rounds, the builds in alternating order at "
        "each depth. "
        "Command: `.venv/bin/python bench/attention_depth.py " + " ".join(f"--build '{label}=...'" for label in labels)
        + "`.",
        "",
        "| depth (positions attended) | " + " | ".join(f"{label}, tok/s" for label in labels) + " | "
        + " | ".join(f"{label} vs {base}: median of pairs (quartiles)" for label in labels[:-1]) + " |",
        "|---|" + "---|" * (2 * len(labels) - 1),
    ]
    for depth in DEPTHS:
        row = [f"{statistics.median(rates[(label, depth)]):.2f}" for label in labels]
        for label in labels[:-1]:
            low, mid, high = paired(rates, label, base, depth)
            row.append(f"{mid:.2f}x ({low:.2f}-{high:.2f})")
        lines.append(f"| {depth}-{depth + TOKENS} | " + " | ".join(row) + " |")
    lines += [
        "",
        f"Measured from {began}: load average (1 / 5 / 15 min) {load_before} before, {load_after} after; the "
        f"hypervisor took {stolen:.1%} of the CPU time (steal) meanwhile.",
    ]
    (RESULTS / "attention_depth.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rates, labels)


def plot(rates: dict[tuple[str, int], list[float]], labels: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    base = labels[-1]
    for label in labels:
        left.plot(DEPTHS, [statistics.median(rates[(label, d)]) for d in DEPTHS], marker="o", label=label)
    left.set_xlabel("positions in the cache")
    left.set_ylabel("decode tokens/s (median)")
    left.set_ylim(bottom=0)
    left.set_title("Decode speed (the host's speed wanders: see the pairs)")
    left.legend()
    for label in labels[:-1]:
        low, mid, high = zip(*(paired(rates, label, base, d) for d in DEPTHS), strict=True)
        right.errorbar(DEPTHS, mid, yerr=[[m - lo for m, lo in zip(mid, low, strict=True)],
                                          [hi - m for m, hi in zip(mid, high, strict=True)]],
                       marker="o", capsize=4, label=f"{label} / {base}")
    right.axhline(1.0, color="grey", linestyle="dashed")
    right.set_xlabel("positions in the cache")
    right.set_ylabel("ratio of paired runs (median, quartiles)")
    right.set_title("Builds against each other, run seconds apart")
    right.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "attention_depth.png", dpi=100)


if __name__ == "__main__":
    main()
