"""Benchmark 1b: decode speed against the raw engine, measured finely enough to tell 2% apart.

Benchmark 1 times whole answers in a rotation of four contenders, so each contender's runs are
~20 s apart, and this host's speed wanders by more than 5% over that (a run's ratio falls anywhere
in 86-110%). Here every contender answers the same prompt over and over from its KV cache (all
but the prompt's last token reused), so an answer is only its decode: 64 tokens, under a second.
Contenders go in strict rotation, each ratio is taken against the raw engine's answer in the same
round, and the table gives the median of many rounds at three context depths. The first token
then costs the model one step, so its delay over the raw engine's is the server's own work on a
prompt of that length (the request, the template, tokenizing, the prefix match). A contender's speed
also shifts by several percent from one start to the next, for the whole life of its process (at
the 1,029-token depth aigate ran at 94% of the raw engine through one run and at 105% through
the next), so the rounds come in blocks, each with all three contenders started afresh.

    .venv/bin/python bench/decode_pairs.py [--blocks 8] [--rounds 12] [--tokens 64]

Contenders as in benchmark 1: the raw engine (bench/raw_engine.py, in this process), the loop
server (bench/model_loop_server.py) and aigate (one gevent worker, streaming), read by the same
lean client (common.stream_chat).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from common import BIN, RESULTS, Timing, bench_model, free_port, start, start_aigate, stream_chat
from raw_engine import RawEngine

PROMPTS = {  # context depth at which the answers decode
    "short": "Tell me about the river and the old town.",
    "long": "The river runs through the old town, past the market and the bridge. " * 64,
    "deeper": "The river runs through the old town, past the market and the bridge. " * 90,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()

    ratios: dict[tuple[str, str], list[float]] = {}
    rates: dict[tuple[str, str], list[float]] = {}
    later: dict[tuple[str, str], list[float]] = {}  # first token, ms after the engine's in the same round
    blocks: dict[tuple[str, str], list[float]] = {}  # each block's median ratio
    tokens: dict[str, int] = {}
    for _ in range(args.blocks):
        with started(args.tokens) as (contenders, rate, prompt_tokens):
            for depth, text in PROMPTS.items():
                tokens[depth] = prompt_tokens(text)
                for run in contenders.values():  # fill each cache with the prompt
                    run(text)
                block: dict[str, list[float]] = {name: [] for name in contenders}
                for i in range(args.rounds):
                    names = list(contenders)
                    order = names[i % 3:] + names[:i % 3]
                    got = {name: contenders[name](text) for name in order}
                    for name, t in got.items():
                        rates.setdefault((depth, name), []).append(rate(t))
                        block[name].append(rate(t) / rate(got["engine"]))
                        later.setdefault((depth, name), []).append((t.ttft - got["engine"].ttft) * 1000)
                for name, values in block.items():
                    ratios.setdefault((depth, name), []).extend(values)
                    blocks.setdefault((depth, name), []).append(statistics.median(values))
    rows = [(depth, tokens[depth], name, statistics.median(rates[(depth, name)]),
             statistics.quantiles(ratios[(depth, name)], n=4), blocks[(depth, name)],
             statistics.median(later[(depth, name)])) for depth in PROMPTS for name in ("engine", "loop", "aigate")]
    report(rows, args)


@contextmanager
def started(max_tokens: int) -> Iterator[tuple[dict[str, Callable[[str], Timing]], Callable[[Timing], float],
                                                Callable[[str], int]]]:
    """Fresh contenders: the raw engine in this process, the loop server and aigate; with the decode
    rate of an answer and the number of tokens of a prompt."""
    model = bench_model()
    raw = RawEngine(str(model))

    def prompt(text: str) -> list[int]:
        return raw.prompt_ids([{"role": "user", "content": text}])

    def engine(text: str) -> Timing:
        return raw.timed(prompt(text), max_tokens)

    def served(port: int) -> Callable[[str], Timing]:
        return lambda text: stream_chat(f"http://127.0.0.1:{port}/v1/chat/completions",
                                        {"model": "bench", "messages": [{"role": "user", "content": text}],
                                         "max_tokens": max_tokens, "temperature": 0})

    aigate_port, loop_port = free_port(), free_port()
    aigate = start_aigate(aigate_port, CHATGLM_MODEL=str(model), CHATGLM_MODEL_ID="bench")
    loop = start([str(BIN / "python"), "bench/model_loop_server.py", str(loop_port), str(model)], {},
                 f"http://127.0.0.1:{loop_port}/")
    try:
        yield ({"engine": engine, "loop": served(loop_port), "aigate": served(aigate_port)},
               raw.decode_rate, lambda text: len(prompt(text)))
    finally:
        aigate.terminate()
        loop.terminate()
        aigate.wait()
        loop.wait()


def report(rows, args) -> None:
    lines = [
        "# Decode speed against the raw engine, in strict rotation",
        "",
        f"Benchmark 1's model, greedy, {args.tokens} new tokens from a prompt the caches hold (all but its last "
        f"token reused); {args.blocks} blocks, each with freshly started contenders, of {args.rounds} rounds of "
        "the three in rotation at each depth. Command: `.venv/bin/python bench/decode_pairs.py`.",
        "",
        "| context (prompt tokens) | contender | decode tok/s (median) | decode vs the engine in the same round: "
        "median (quartiles) | each block's median | first token after the engine's, ms (median) |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {d} ({n}) | {c} | {r:.1f} | {q[1]:.1%} ({q[0]:.1%}-{q[2]:.1%}) | "
              f"{' '.join(f'{b:.0%}' for b in sorted(bs))} | {ms:+.1f} |" for d, n, c, r, q, bs, ms in rows]
    (RESULTS / "decode_pairs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    depths = list(PROMPTS)
    for offset, name in enumerate(("loop", "aigate")):
        medians = [next(q[1] for d, _, c, _, q, _, _ in rows if d == depth and c == name) * 100 for depth in depths]
        ax.bar([i + offset * 0.4 for i in range(len(depths))], medians, width=0.4, label=name)
    ax.axhline(98, color="grey", linestyle="--", label="98%")
    ax.set_xticks([i + 0.2 for i in range(len(depths))], depths)
    ax.set_ylim(90, 105)
    ax.set_ylabel("decode vs the raw engine, % (median of rounds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "decode_pairs.png", dpi=100)


if __name__ == "__main__":
    main()
