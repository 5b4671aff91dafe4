"""Benchmark 12: batched decoding inside chatglm.cpp (issue 25, item 2's core), in process, no server.

patches/chatglm-cpp-0.4.2-batch.patch gives one Pipeline S KV caches (`num_slots`) and
`model.step(entries)`: one forward pass over every entry's tokens (a decode token or a prompt
chunk), the weights read once, attention per sequence against its own slot. This script first
checks it (greedy tokens and logits batched == alone, on the bench-size model and the demo model of
each family; a prompt joining in chunks while others decode; bad input raising RuntimeError), then
measures on the bench-size f16 model with chatglm.cpp's own thread count (2 here):

* tokens/s together for 1, 2, 4, 8 sequences decoding at once, against one alone (`step` with one
  entry, and the old single-sequence `generate_next_token` the engine calls today);
* the step time while a 1,000-token prompt joins three decoding sequences in chunks of several sizes
  (a running stream's gap between tokens is one step).

Needs chatglm-cpp built with both patches (aigate's, then the batch one) importable, and numpy,
sentencepiece, requests and matplotlib beside it, e.g. a scratch venv:

    PYTHONPATH=/path/with/patched/chatglm_cpp python bench/batched_step.py [--rounds 7] [--steps 48]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import chatglm_cpp
import numpy as np
from common import BENCH_MODEL, RESULTS, HostRecord, bench_model, progress, watch_host

from backends.chatglm.demo_model import write_demo_model

C: Any = chatglm_cpp._C
COUNTS = (1, 2, 4, 8)
FAMILIES = ("chatglm2", "chatglm3", "glm4", "glm4v")
CHUNKS = (32, 64, 128, 256, 1000)
JOIN_PROMPT = 1000
GOALS = {2: 1.0, 4: 1.8, 8: 2.4}  # the "together vs one alone" goals for the server as a whole
GAP_GOAL_MS = 250


def greedy() -> Any:
    return C.GenerationConfig(do_sample=False)


def prompts(count: int, vocab: int, seed: int, lengths: tuple[int, int] = (8, 40)) -> list[list[int]]:
    """Distinct random prompts of ordinary token ids (the demo tokenizers' first ids are ordinary pieces)."""
    rng = np.random.default_rng(seed)
    top = min(vocab, 900)
    return [[int(t) for t in rng.integers(10, top, size=int(rng.integers(*lengths)))] for _ in range(count)]


@dataclass
class Run:
    """One sequence's greedy tokens and the logits each came from."""

    tokens: list[int] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)

    def take(self, row: np.ndarray) -> int:
        self.logits.append(row.copy())
        self.tokens.append(int(np.argmax(row)))
        return self.tokens[-1]


def logits_of(model: Any, entries: list[Any]) -> np.ndarray:
    """One step, returning the logits of each entry that samples (in order) instead of its sampled token."""
    for entry in entries:
        if entry.sample is not None:
            entry.sample, entry.logits = None, True
    out = np.empty((sum(e.logits for e in entries), model.config.vocab_size), np.float32)
    model.step(entries, out)
    return out


def alone(model: Any, prompt: list[int], n: int, chunk: int = 0) -> Run:
    """Slot 0 on its own: the prompt (whole, or in chunks of `chunk`), then n greedy tokens."""
    run, pos = Run(), 0
    pieces = [prompt[i:i + chunk] for i in range(0, len(prompt), chunk)] if chunk else [prompt]
    for piece in pieces[:-1]:
        model.step([C.StepEntry(0, piece, pos, pos, None)])
        pos += len(piece)
    rows = logits_of(model, [C.StepEntry(0, pieces[-1], pos, pos, greedy())])
    pos += len(pieces[-1])
    for _ in range(n):
        token = run.take(rows[0])
        rows = logits_of(model, [C.StepEntry(0, [token], pos, pos, greedy())])
        pos += 1
    return run


def together(model: Any, batch: list[list[int]], n: int) -> list[Run]:
    """Every prompt evaluated in one step (slot i), then n greedy tokens each, all in one step per token."""
    runs = [Run() for _ in batch]
    rows = logits_of(model, [C.StepEntry(s, p, 0, 0, greedy()) for s, p in enumerate(batch)])
    pos = [len(p) for p in batch]
    for _ in range(n):
        tokens = [run.take(row) for run, row in zip(runs, rows, strict=True)]
        rows = logits_of(model, [C.StepEntry(s, [t], pos[s], pos[s], greedy()) for s, t in enumerate(tokens)])
        pos = [p + 1 for p in pos]
    return runs


def compare(runs: list[Run], refs: list[Run]) -> tuple[bool, bool, float]:
    """(same tokens, bit-identical logits, largest |difference| of a logit)."""
    same = all(r.tokens == f.tokens for r, f in zip(runs, refs, strict=True))
    diffs = [float(np.max(np.abs(a - b))) for r, f in zip(runs, refs, strict=True)
             for a, b in zip(r.logits, f.logits, strict=True)]
    return same, max(diffs) == 0.0, max(diffs)


def check_batched(name: str, path: Path, count: int, n: int) -> list[str]:
    model = chatglm_cpp.Pipeline(str(path), max_length=512, num_slots=count).model
    batch = prompts(count, model.config.vocab_size, seed=count)
    refs = [alone(model, p, n) for p in batch]
    same, exact, diff = compare(together(model, batch, n), refs)
    old = old_path(model, batch[0], n)
    return [f"| {name} | {count} together vs alone | {n} | {yes(same)} | {yes(exact)} ({diff:g}) |",
            f"| {name} | `step` alone vs `generate_next_token` | {n} | {yes(old == refs[0].tokens)} | |"]


def old_path(model: Any, prompt: list[int], n: int) -> list[int]:
    """The single-sequence path the engine uses today (slot 0)."""
    ids, past = list(prompt), 0
    for _ in range(n):
        token = model.generate_next_token(ids, None, greedy(), past, 512)
        past = len(ids)
        ids.append(token)
    return ids[len(prompt):]


def check_join(name: str, path: Path, n: int, chunk: int) -> list[str]:
    """Three sequences decode while a fourth prompt joins in chunks of `chunk`: all four as alone (the joiner
    alone in the same chunks; a prompt evaluated whole differs in the last bits: softmax and the V product run
    over the cache up to the chunk's end, so their SIMD sums group differently)."""
    model = chatglm_cpp.Pipeline(str(path), max_length=512, num_slots=4).model
    batch = prompts(3, model.config.vocab_size, seed=7)
    joiner = prompts(1, model.config.vocab_size, seed=8, lengths=(90, 120))[0]
    refs = [alone(model, p, n) for p in batch] + [alone(model, joiner, n, chunk)]
    runs = [Run() for _ in range(4)]
    out = logits_of(model, [C.StepEntry(s, p, 0, 0, greedy()) for s, p in enumerate(batch)])
    rows = dict(enumerate(out))  # slot -> the logits of its next token
    pos = [len(p) for p in batch] + [0]
    while any(len(r.tokens) < n for r in runs):
        entries = []
        for s, row in rows.items():
            entries.append(C.StepEntry(s, [runs[s].take(row)], pos[s], pos[s], greedy()))
            pos[s] += 1
        if pos[3] < len(joiner):
            piece = joiner[pos[3]:pos[3] + chunk]
            done = pos[3] + len(piece) == len(joiner)
            entries.append(C.StepEntry(3, piece, pos[3], pos[3], greedy() if done else None))
            pos[3] += len(piece)
        out = logits_of(model, entries)
        rows = dict(zip([e.slot for e in entries if e.logits], out, strict=True))
    # the decoding ones ran on while the prompt joined: compare their first n tokens
    same, exact, diff = compare([Run(r.tokens[:n], r.logits[:n]) for r in runs], refs)
    whole_same, whole_exact, whole_diff = compare(refs[3:], [alone(model, joiner, n)])
    return [f"| {name} | a {len(joiner)}-token prompt joins 3 decoding, chunks of {chunk} | {n} | {yes(same)} | "
            f"{yes(exact)} ({diff:g}) |",
            f"| {name} | that prompt alone: in chunks of {chunk} vs whole | {n} | {yes(whole_same)} | "
            f"{yes(whole_exact)} ({whole_diff:g}) |"]


def check_errors(path: Path) -> list[str]:
    """Each bad call raises RuntimeError before any compute, and the model answers as before after it."""
    model = chatglm_cpp.Pipeline(str(path), max_length=512, num_slots=2).model
    prompt = prompts(1, model.config.vocab_size, seed=3)[0]
    before = alone(model, prompt, 8).tokens
    bad = {
        "slot out of range": [C.StepEntry(2, [1], 0, 0, greedy())],
        "kv_pos past the context": [C.StepEntry(0, [1, 2], 511, 511, greedy())],
        "token id past the vocabulary": [C.StepEntry(0, [model.config.vocab_size], 0, 0, greedy())],
        "a slot twice in one step": [C.StepEntry(0, [1], 0, 0, None), C.StepEntry(0, [1], 0, 0, None)],
        "no entries": [],
    }
    lines = []
    for what, entries in bad.items():
        try:
            model.step(entries)
            raised = "nothing raised"
        except RuntimeError as e:
            raised = "RuntimeError: " + str(e).split(") ", 1)[-1]
        lines.append(f"| {what} | {raised} | {yes(alone(model, prompt, 8).tokens == before)} |")
    return lines


def yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


# ---- speed ----

def decode_rates(path: Path, rounds: int, steps: int) -> dict[str, list[float]]:
    """Tokens/s together of 1, 2, 4, 8 sequences decoding in one step each, and of the old path alone, in
    rotation (every round measures each once, in a shuffled order)."""
    pipeline = chatglm_cpp.Pipeline(str(path), max_length=2048, num_slots=max(COUNTS))
    model = pipeline.model
    batch = prompts(max(COUNTS), model.config.vocab_size, seed=11, lengths=(20, 21))
    rates: dict[str, list[float]] = {"old": [], **{str(c): [] for c in COUNTS}}
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        for key in rng.permutation(list(rates)):
            if key == "old":
                ids = list(batch[0])
                ids.append(model.generate_next_token(ids, None, greedy(), 0, 2048))
                start = time.perf_counter()
                for _ in range(steps):  # each call evaluates the last token after the cached ones
                    ids.append(model.generate_next_token(ids, None, greedy(), len(ids) - 1, 2048))
                rates[key].append(steps / (time.perf_counter() - start))
                continue
            count = int(key)
            tokens = model.step([C.StepEntry(s, batch[s], 0, 0, greedy()) for s in range(count)])
            pos = [len(batch[s]) for s in range(count)]
            start = time.perf_counter()
            for _ in range(steps):
                tokens = model.step([C.StepEntry(s, [tokens[s]], pos[s], pos[s], greedy()) for s in range(count)])
                pos = [p + 1 for p in pos]
            rates[key].append(count * steps / (time.perf_counter() - start))
    return rates


def join_times(path: Path, chunk: int, decoding: int = 3) -> tuple[list[float], list[float], float]:
    """Step times (ms) of `decoding` sequences alone, then while a 1,000-token prompt joins in chunks; and
    the time from the prompt's first chunk to its first token."""
    model = chatglm_cpp.Pipeline(str(path), max_length=2048, num_slots=decoding + 1).model
    batch = prompts(decoding, model.config.vocab_size, seed=5, lengths=(20, 21))
    joiner = prompts(1, model.config.vocab_size, seed=6, lengths=(JOIN_PROMPT, JOIN_PROMPT + 1))[0]
    tokens = model.step([C.StepEntry(s, p, 0, 0, greedy()) for s, p in enumerate(batch)])
    pos = [len(p) for p in batch]

    def step(extra: list[Any]) -> float:
        nonlocal tokens, pos
        entries = [C.StepEntry(s, [tokens[s]], pos[s], pos[s], greedy()) for s in range(decoding)]
        start = time.perf_counter()
        out = model.step(entries + extra)
        took = (time.perf_counter() - start) * 1000
        tokens, pos = out[:decoding], [p + 1 for p in pos]
        return took

    plain = [step([]) for _ in range(16)]
    joined, with_chunk, first = 0, [], time.perf_counter()
    while joined < len(joiner):
        piece = joiner[joined:joined + chunk]
        done = joined + len(piece) == len(joiner)
        with_chunk.append(step([C.StepEntry(decoding, piece, joined, joined, greedy() if done else None)]))
        joined += len(piece)
    return plain, with_chunk, time.perf_counter() - first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=48, help="decode steps timed per measurement")
    parser.add_argument("--tokens", type=int, default=24, help="greedy tokens per sequence in the checks")
    parser.add_argument("--bench-tokens", type=int, default=12, help="the same on the bench-size model")
    parser.add_argument("--speed-only", action="store_true", help="keep the last run's correctness tables")
    args = parser.parse_args()
    bench = bench_model()
    if args.speed_only:
        last = (RESULTS / "batched_step.md").read_text().split("\n")
        tables = last[last.index("## Correctness: batched == alone") + 2:next(
            i for i, line in enumerate(last) if line.startswith("## Decode"))]
        blank = tables.index("")
        speed(args, bench, tables[:blank], tables[blank + 1:-1])
        return

    checks = ["| model | case | tokens each | same tokens | logits bit-identical (max abs diff) |",
              "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        demos = {f: write_demo_model(Path(tmp) / f"{f}.bin", family=f) for f in FAMILIES}
        for count in (4, 8):
            checks += check_batched("bench (f16, 1024x8)", bench, count, args.bench_tokens)
            for family, path in demos.items():
                checks += check_batched(f"demo {family}", path, count, args.tokens)
            progress(f"checked {count} together")
        for chunk in (7, 32):
            checks += check_join("bench (f16, 1024x8)", bench, args.bench_tokens, chunk)
            checks += check_join("demo chatglm3", demos["chatglm3"], args.tokens, chunk)
            checks += check_join("demo glm4", demos["glm4"], args.tokens, chunk)
        progress("checked prompts joining")
        errors = ["| bad call | what it did | the model's next answer as before |", "|---|---|---|",
                  *check_errors(demos["chatglm3"])]
    progress("\n".join(checks + [""] + errors))
    speed(args, bench, checks, errors)


def speed(args: argparse.Namespace, bench: Path, checks: list[str], errors: list[str]) -> None:
    host = watch_host()
    rates = decode_rates(bench, args.rounds, args.steps)
    progress(f"decode rates {dict((k, round(statistics.median(v), 1)) for k, v in rates.items())}")
    joins = {chunk: join_times(bench, chunk) for chunk in CHUNKS}
    report(args, checks, errors, rates, joins, host())


def report(args: argparse.Namespace, checks: list[str], errors: list[str], rates: dict[str, list[float]],
           joins: dict[int, tuple[list[float], list[float], float]], host: HostRecord) -> None:
    began, load_before, load_after, stolen = host
    one = statistics.median(rates["1"])
    old = statistics.median(rates["old"])
    lines = [
        "# Batched decoding inside chatglm.cpp: one step over many sequences",
        "",
        f"The bench-size f16 model ({BENCH_MODEL['hidden_size']} hidden, {BENCH_MODEL['num_layers']} layers, "
        f"vocabulary {BENCH_MODEL['vocab_size']:,}), chatglm.cpp 0.4.2 with aigate's patch and "
        "patches/chatglm-cpp-0.4.2-batch.patch, in process (no server), chatglm.cpp's own thread count "
        "(2 on this host), greedy. Command: `PYTHONPATH=<patched chatglm_cpp> python bench/batched_step.py`.",
        "",
        "## Correctness: batched == alone",
        "",
        *checks,
        "",
        *errors,
        "",
        f"## Decode: sequences at once, {args.steps} steps from ~20-token prompts, median of {args.rounds} rounds",
        "",
        "| sequences decoding | tokens/s together | each | vs one alone (`step`) | goal (server) |",
        "|---|---|---|---|---|",
        f"| 1, old path (`generate_next_token`) | {old:.1f} | {old:.1f} | {old / one:.2f}x | |",
    ]
    for count in COUNTS:
        together_rate = statistics.median(rates[str(count)])
        goal = f">= {GOALS[count]}x" if count in GOALS else ""
        lines.append(f"| {count} | {together_rate:.1f} | {together_rate / count:.1f} | {together_rate / one:.2f}x | "
                     f"{goal} |")
    lines += [
        "",
        f"## A {JOIN_PROMPT:,}-token prompt joins three decoding sequences in chunks",
        "",
        "| chunk (tokens) | step without the chunk, ms (median) | step with a chunk, ms: median / largest | "
        f"steps | prompt's first token after, s | largest gap <= {GAP_GOAL_MS} ms |",
        "|---|---|---|---|---|---|",
    ]
    for chunk, (plain, with_chunk, total) in joins.items():
        gap = max(with_chunk)
        lines.append(f"| {chunk} | {statistics.median(plain):.1f} | {statistics.median(with_chunk):.1f} / {gap:.1f} | "
                     f"{len(with_chunk)} | {total:.2f} | {yes(gap <= GAP_GOAL_MS)} |")
    lines += [
        "",
        f"Speed measured from {began}: load average (1 / 5 / 15 min) {load_before} before, {load_after} after; the "
        f"hypervisor took {stolen:.1%} of the CPU time (steal) meanwhile.",
    ]
    (RESULTS / "batched_step.md").write_text("\n".join(lines) + "\n")
    plot(rates, joins, one)


def plot(rates: dict[str, list[float]], joins: dict[int, tuple[list[float], list[float], float]], one: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    together_rates = [statistics.median(rates[str(c)]) for c in COUNTS]
    left.bar([str(c) for c in COUNTS], together_rates, color="tab:blue")
    for c, goal in GOALS.items():
        i = COUNTS.index(c)
        left.hlines(goal * one, i - 0.4, i + 0.4, colors="tab:red", linestyles="dashed")
    left.set_xlabel("sequences decoding at once")
    left.set_ylabel("tokens/s together")
    left.set_title("Decode, one step for all (red: the issue's goal)")
    chunks = list(joins)
    right.plot([str(c) for c in chunks], [max(joins[c][1]) for c in chunks], "o-", label="largest step")
    right.plot([str(c) for c in chunks], [statistics.median(joins[c][1]) for c in chunks], "s-",
               label="median step with a chunk")
    right.axhline(GAP_GOAL_MS, color="tab:red", linestyle="dashed", label=f"{GAP_GOAL_MS} ms goal")
    right.set_yscale("log")
    right.set_xlabel("prompt chunk (tokens)")
    right.set_ylabel("ms")
    right.set_title(f"3 decoding while a {JOIN_PROMPT:,}-token prompt joins")
    right.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "batched_step.png", dpi=100)


if __name__ == "__main__":
    main()
