"""Benchmark 11: what constrained decoding costs on the local model (issue 26), on bench-size models whose
tokenizers have a real vocabulary's distinct tokens (demo_model's vocab_pieces: a padded ~1,000-piece
tokenizer would show the grammar only ~1,000 tokens).

    .venv/bin/python bench/structured.py [--runs 12] [--tokens 256] [--family chatglm3|glm4|both]

In this process, on each family's bench-size tokenizer (ChatGLM3 65,024 ids, GLM-4 151,552):
  compile   a typical schema seen for the first time: its grammar built, compiled and its first mask
            (llguidance compiles lazily, so the first mask carries the compile); cached: the same again
  mask      one step inside a free string field: the grammar's mask, then what a sampler does with it
            (bits to a -inf mask over the logits, argmax), and the token accepted
  step      the raw engine's greedy step on the same model (bench/raw_engine.py), for the ratio
            step / (step + grammar's share) the decode can keep at most
Through aigate (when its engine constrains answers; otherwise said and skipped), alternated runs, greedy:
  plain     a streamed answer of --tokens tokens, no format
  string    the same inside a free string field ({"text": "..."}, the demo model never closes it)
  schema    a typical schema, its first token cached (asked before) and new (a schema never seen)
Results: bench/results/structured.md and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import requests
from common import BENCH_GLM4_MODEL, BENCH_MODEL, CACHE, RESULTS, Timing, free_port, median, start_aigate, stream_chat
from raw_engine import RawEngine

from backends.base import ChatRequest, JsonFormat, Message
from backends.chatglm.demo_model import write_demo_model
from backends.chatglm.engine.grammar import Grammars
from backends.chatglm.engine.model import Model
from backends.chatglm.engine.vocab import token_bytes
from backends.chatglm.ggml_file import read_model_file

PIECES = {"chatglm3": 64_789, "glm4": 151_329}  # the real tokenizers' ordinary pieces
FREE_STRING = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"],
               "additionalProperties": False}
TYPICAL = {  # what a client's pydantic model sends: enums, a bounded string, a nested list of objects
    "type": "object", "additionalProperties": False,
    "required": ["name", "kind", "ok", "age", "items"],
    "properties": {
        "name": {"type": "string", "maxLength": 40}, "kind": {"enum": ["a", "b", "c"]}, "ok": {"type": "boolean"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "items": {"type": "array", "maxItems": 5, "items": {
            "type": "object", "additionalProperties": False, "required": ["id", "note"],
            "properties": {"id": {"type": "integer"}, "note": {"anyOf": [{"type": "string"}, {"type": "null"}]}}}}}}
PROMPT = "Tell me about the river and the old town."
# The raw engine's greedy step on these shapes on a quiet host (benchmark 1: 75.9 and 55.0 tok/s), for the ratio
# when this run's host is busy: ggml's spinning threads make a loaded host's step many times slower.
QUIET_STEP_MS = {"chatglm3": 1000 / 75.9, "glm4": 1000 / 55.0}


def structured_model(family: str) -> Path:
    path = CACHE / f"bench-structured-{family}.bin"
    if not path.exists():
        shape = BENCH_GLM4_MODEL if family == "glm4" else BENCH_MODEL
        write_demo_model(path, **shape, vocab_pieces=PIECES[family])  # type: ignore[arg-type]
    return path


def schema_named(schema: dict, i: int) -> dict:
    return {**schema, "title": f"run {i}"}  # another text: another grammar, compiled anew


def grammar_costs(family: str, path: Path, runs: int) -> dict[str, object]:
    file = read_model_file(path)
    model = Model(file, 256, slots=1)
    tokens = token_bytes(file)
    started = time.perf_counter()
    grammars = Grammars(file, model.family, tokens, model._encode, model._end_ids)
    tokenizer_ms = (time.perf_counter() - started) * 1000
    vocab = len(tokens)
    mask = np.zeros((vocab + 31) // 32, np.int32)
    ask = (Message("user", "hi"),)

    def first_mask(schema: dict) -> float:
        started = time.perf_counter()
        constraint = grammars.constraint(ChatRequest("m", ask, response_format=JsonFormat(schema, strict=True)))
        assert constraint is not None
        constraint.fill(mask)
        return (time.perf_counter() - started) * 1000

    cold = [first_mask(schema_named(TYPICAL, i)) for i in range(runs)]
    cached = [first_mask(schema_named(TYPICAL, 0)) for _ in range(runs)]

    # Inside a free string: the prefix forced, then random logits, tokens with a quote or backslash never picked.
    constraint = grammars.constraint(ChatRequest("m", ask, response_format=JsonFormat(FREE_STRING, strict=True)))
    assert constraint is not None
    prefix = b'\n{"text": "' if model.family.metadata_line else b'{"text": "'
    for token in grammars.tokenizer.tokenize_bytes(prefix):
        constraint.accept(token)
    closing = np.array([b'"' in t or b"\\" in t for t in tokens])
    rng = np.random.default_rng(0)
    fill, apply, accept = [], [], []
    for _ in range(max(200, runs * 20)):
        logits = rng.standard_normal(vocab).astype(np.float32)
        logits[closing] = -np.inf
        t0 = time.perf_counter()
        constraint.fill(mask)
        t1 = time.perf_counter()
        allowed = np.unpackbits(mask.view(np.uint8), count=vocab, bitorder="little").view(bool)
        token = int(np.argmax(np.where(allowed, logits, -np.inf)))
        t2 = time.perf_counter()
        constraint.accept(token)
        t3 = time.perf_counter()
        fill.append((t1 - t0) * 1e6)
        apply.append((t2 - t1) * 1e6)
        accept.append((t3 - t2) * 1e6)
    return {"vocab": vocab, "pieces": file.tokenizer_pieces, "tokenizer_ms": tokenizer_ms, "cold_ms": cold,
            "cached_ms": cached, "fill_us": fill, "apply_us": apply, "accept_us": accept}


def raw_step_ms(path: Path, tokens: int) -> float:
    raw = RawEngine(str(path))
    ids = raw.prompt_ids([{"role": "user", "content": PROMPT}])
    raw.timed(ids, 16)
    times = [raw.timed(ids, tokens) for _ in range(3)]
    return median([(t.total - t.ttft) / (tokens - 1) * 1000 for t in times])


def through_aigate(path: Path, runs: int, tokens: int) -> dict[str, list[float]] | str:
    """Alternated runs through aigate, or why they could not run."""
    port = free_port()
    server = start_aigate(port, CHATGLM_MODEL=str(path), CHATGLM_MODEL_ID="bench")
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    raw = RawEngine(str(path))

    def ask(fmt: dict | None, max_tokens: int = tokens) -> Timing:
        body = {"model": "bench", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
                "temperature": 0, **({"response_format": fmt} if fmt else {})}
        return stream_chat(url, body)

    def fmt(schema: dict) -> dict:
        return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}

    try:
        probe = requests.post(url, json={"model": "bench", "messages": [{"role": "user", "content": "hi"}],
                                         "max_tokens": 4, "response_format": fmt(FREE_STRING)}, timeout=120)
        if probe.status_code != 200:
            return f"aigate answered {probe.status_code}: {probe.text[:200]}"
        out: dict[str, list[float]] = {}
        ask(None, 8), ask(fmt(FREE_STRING), 8), ask(fmt(schema_named(TYPICAL, -1)), 8)  # warm up
        for i in range(runs):
            contenders = {"plain": None, "string": fmt(FREE_STRING), "schema, cached": fmt(schema_named(TYPICAL, -1)),
                          "schema, new": fmt(schema_named(TYPICAL, i))}
            names = list(contenders)
            for name in names[i % len(names):] + names[:i % len(names)]:
                t = ask(contenders[name], tokens if name in ("plain", "string") else 8)
                out.setdefault(f"{name} ttft", []).append(t.ttft * 1000)
                if name in ("plain", "string"):
                    out.setdefault(f"{name} rate", []).append(raw.decode_rate(t))
        return out
    finally:
        server.terminate()


def report(rows: dict[str, dict], e2e: dict[str, dict[str, list[float]] | str], args: argparse.Namespace) -> None:
    def q(values: list[float]) -> str:
        p90 = statistics.quantiles(values, n=10)[-1] if len(values) > 1 else values[0]
        return f"{median(values):.1f} (p90 {p90:.1f})"

    lines = ["# Constrained decoding on the local model: what the grammar costs",
             "", f"Command: `.venv/bin/python bench/structured.py --family {args.family} --runs {args.runs} "
             f"--tokens {args.tokens}`. Bench-size random-weight models (bench/common.py's shapes) whose tokenizers "
             "have a real vocabulary's distinct tokens (demo_model's vocab_pieces).", "",
             "## In process: llguidance on the model's token bytes", "",
             "| family | ids (pieces) | LLTokenizer built, ms | new typical schema to first mask, ms | cached, ms "
             "| mask in a free string, µs | bits to -inf + argmax, µs | accept, µs | raw step here, ms "
             "| decode kept at most: vs that step, vs a quiet one (bench 1) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for family, r in rows.items():
        share = (median(r["fill_us"]) + median(r["apply_us"]) + median(r["accept_us"])) / 1000
        lines.append(f"| {family} | {r['vocab']:,} ({r['pieces']:,}) | {r['tokenizer_ms']:.0f} | {q(r['cold_ms'])} "
                     f"| {q(r['cached_ms'])} | {q(r['fill_us'])} | {q(r['apply_us'])} | {q(r['accept_us'])} "
                     f"| {r['step_ms']:.2f} | {r['step_ms'] / (r['step_ms'] + share):.1%}, "
                     f"{QUIET_STEP_MS[family] / (QUIET_STEP_MS[family] + share):.1%} |")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines += ["", f"Load average at the end of the run: {load} (2 cores). Each step's share is the medians of mask, "
              "bits to -inf + argmax and accept; the ratio is the most decode can keep with that work added to a "
              "step, not a measured decode."]
    lines += ["", "## Through aigate (greedy, streamed, alternated runs)", ""]
    if not e2e:
        lines.append("- not run (`--no-aigate`)")
    for family, result in e2e.items():
        if isinstance(result, str):
            lines.append(f"- {family}: not run: {result}")
            continue
        rate = median(result["string rate"]) / median(result["plain rate"])
        lines.append(f"- {family}: decode inside a free string {median(result['string rate']):.1f} tok/s vs plain "
                     f"{median(result['plain rate']):.1f} tok/s: **{rate:.1%}** (goal >= 85%). First token: plain "
                     f"{median(result['plain ttft']):.1f} ms, typical schema cached "
                     f"{median(result['schema, cached ttft']):.1f} ms, new {median(result['schema, new ttft']):.1f} ms "
                     f"(goal: within 20 ms of plain).")
    (RESULTS / "structured.md").write_text("\n".join(lines) + "\n")
    plot(rows)
    print("\n".join(lines))


def plot(rows: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    names = list(rows)
    for offset, (key, label) in enumerate((("fill_us", "mask"), ("apply_us", "bits to -inf + argmax"),
                                           ("accept_us", "accept"))):
        axes[0].bar([i + offset * 0.27 for i in range(len(names))], [median(rows[n][key]) for n in names],
                    width=0.27, label=label)
    axes[0].set_xticks([i + 0.27 for i in range(len(names))], names)
    axes[0].set_title("one step in a free string (µs, median)")
    axes[0].legend()
    for offset, (key, label) in enumerate((("cold_ms", "new schema"), ("cached_ms", "cached"))):
        axes[1].bar([i + offset * 0.4 for i in range(len(names))], [median(rows[n][key]) for n in names],
                    width=0.4, label=label)
    axes[1].set_xticks([i + 0.2 for i in range(len(names))], names)
    axes[1].set_title("typical schema to its first mask (ms, median)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "structured.png", dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--family", default="both", choices=("chatglm3", "glm4", "both"))
    parser.add_argument("--no-aigate", action="store_true", help="the in-process part only")
    args = parser.parse_args()
    families = ("chatglm3", "glm4") if args.family == "both" else (args.family,)
    rows, e2e = {}, {}
    for family in families:
        path = structured_model(family)
        rows[family] = grammar_costs(family, path, args.runs)
        rows[family]["step_ms"] = raw_step_ms(path, 24)
        if not args.no_aigate:
            e2e[family] = through_aigate(path, args.runs, args.tokens)
    print(json.dumps({f: {k: v for k, v in r.items() if not isinstance(v, list)} for f, r in rows.items()}))
    report(rows, e2e, args)


if __name__ == "__main__":
    main()
