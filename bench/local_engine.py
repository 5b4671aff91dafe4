"""Benchmark 1: the local model through aigate against the raw engine and chatglm.cpp's own
OpenAI server, on the same model file, alternated in one run.

Every long prompt starts with the run's number, so that no contender starts a "long" run from a
cache. Then "turn 2": the long prompt, the answer aigate gave to it and a short question. aigate's
engine and the raw engine (and the loop server) answer it from what their KV caches hold (prefix
reuse); the raw engine then answers it once more with the whole prompt evaluated, what every turn
cost before prefix reuse.

    .venv/bin/python bench/local_engine.py [--runs 24] [--tokens 384] [--family glm4]

384 new tokens because this host's speed wanders: the raw engine alone, measured over 90 s, ran
adjacent 2-second stretches within 96.7-103.9% of each other (quartiles) and 4-second ones within
97.8-101.4%, so an answer of ~5 s makes each run's ratio steadier than one of 128 tokens (~1.7 s).

``--family glm4``: the same on a GLM-4-shaped model (bench/common.py), engine and aigate only
(results in local_engine_glm4.md).

Contenders, each asked for the same greedy answer:
  engine   the raw engine (bench/raw_engine.py): chatglm.cpp's model stepped token by token in this
           process, reusing its cache as aigate does (the limit: no server at all)
  loop     the same loop in a process of its own, writing each chunk to the client's socket itself
           (bench/model_loop_server.py: what any server pays for a client in another process)
  aigate   gunicorn -k gevent, one worker, streaming
  chatglm  chatglm_cpp.openai_api under uvicorn (from the chatglm-cpp[api] extra)
Time to first token and decode speed (tokens after the first / time after the first) are the
medians over the runs; tokens are counted by re-encoding the received text with the model's
tokenizer, the same way for every contender. The servers are read by the same lean client
(common.stream_chat), in this process, which is idle while the engine row runs.
"""

from __future__ import annotations

import argparse
import statistics

from common import BIN, RESULTS, Timing, bench_model, free_port, median, start, start_aigate, stream_chat
from raw_engine import RawEngine

SHORT = "Tell me about the river and the old town."
WHOLE = "engine, whole prompt"  # turn 2 evaluated from nothing
LONG = "The river runs through the old town, past the market and the bridge. " * 64  # ~1,000 tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=384)
    parser.add_argument("--family", default="chatglm3", choices=("chatglm3", "glm4"))
    args = parser.parse_args()

    model = bench_model(args.family)
    raw = RawEngine(str(model))

    def prompt_ids(chat: str | list[dict[str, str]]) -> list[int]:
        return raw.prompt_ids([{"role": "user", "content": chat}] if isinstance(chat, str) else chat)

    def engine(text: str | list[dict[str, str]], reuse: bool = True) -> Timing:
        return raw.timed(prompt_ids(text), args.tokens, reuse)

    aigate_port, chatglm_port, loop_port = free_port(), free_port(), free_port()
    aigate = start_aigate(aigate_port, CHATGLM_MODEL=str(model), CHATGLM_MODEL_ID="bench")
    glm4 = args.family == "glm4"
    loop = None if glm4 else start([str(BIN / "python"), "bench/model_loop_server.py", str(loop_port), str(model)], {},
                                   f"http://127.0.0.1:{loop_port}/")
    chatglm = None if glm4 else start(
        [str(BIN / "uvicorn"), "chatglm_cpp.openai_api:app", "--host", "127.0.0.1", "--port", str(chatglm_port)],
        {"MODEL": str(model), "MAX_LENGTH": "2048"}, f"http://127.0.0.1:{chatglm_port}/v1/models")

    def aigate_run(text: str | list[dict[str, str]]) -> Timing:
        messages = [{"role": "user", "content": text}] if isinstance(text, str) else text
        return stream_chat(f"http://127.0.0.1:{aigate_port}/v1/chat/completions",
                           {"model": "bench", "messages": messages, "max_tokens": args.tokens, "temperature": 0})

    def chatglm_run(text: str) -> Timing:
        # Its max_tokens is the total length, and it keeps only the last 512 prompt tokens.
        kept = min(len(prompt_ids(text)), 512)
        return stream_chat(f"http://127.0.0.1:{chatglm_port}/v1/chat/completions",
                           {"model": "x", "messages": [{"role": "user", "content": text}],
                            "max_tokens": kept + args.tokens, "temperature": 0})

    def loop_run(text: str | list[dict[str, str]]) -> Timing:
        messages = [{"role": "user", "content": text}] if isinstance(text, str) else text
        return stream_chat(f"http://127.0.0.1:{loop_port}/v1/chat/completions",
                           {"model": "x", "messages": messages, "max_tokens": args.tokens})

    contenders = {"engine": engine, "aigate": aigate_run,
                  **({} if glm4 else {"loop": loop_run, "chatglm": chatglm_run})}
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}

    def note(prompt_name: str, name: str, t: Timing) -> None:
        results.setdefault((prompt_name, name), []).append((t.ttft, raw.decode_rate(t)))

    turn2_tokens = 0
    try:
        for run in contenders.values():  # warm-up: page the weights in for everyone
            run(SHORT)
        for i in range(args.runs):
            k = i % len(contenders)
            order = list(contenders)[k:] + list(contenders)[:k]  # alternate who goes first
            long = f"Run {i}. {LONG}"
            answers = {}
            for prompt_name, text in (("short", SHORT), ("long", long)):
                for name in order:
                    t = contenders[name](text)
                    answers[name] = t.text
                    note(prompt_name, name, t)
            # Turn 2 after each one's turn 1 on the same prompt (their caches hold that turn), who goes
            # first rotating as above; the raw engine's whole-prompt answer right after its own.
            turn2 = [{"role": "user", "content": long}, {"role": "assistant", "content": answers["aigate"]},
                     {"role": "user", "content": "And the bakery?"}]
            turn2_tokens = len(prompt_ids(turn2))
            for name in (n for n in order if n != "chatglm"):  # it keeps no cache, and only 512 prompt tokens
                note("turn 2", name, contenders[name](turn2))
                if name == "engine":
                    note("turn 2", WHOLE, engine(turn2, reuse=False))
    finally:
        aigate.terminate()
        for server in (loop, chatglm):
            if server is not None:
                server.terminate()
    report(results, args, len(prompt_ids(SHORT)), len(prompt_ids(LONG)), turn2_tokens)


def report(results, args, short_tokens: int, long_tokens: int, turn2_tokens: int) -> None:
    rows = []
    for prompt_name, tokens in (("short", short_tokens), ("long", long_tokens), ("turn 2", turn2_tokens)):
        base_rate = median([r[1] for r in results[(prompt_name, "engine")]])
        engine_runs = results[(prompt_name, "engine")]
        for name in ("engine", WHOLE, "loop", "aigate", "chatglm"):
            if (prompt_name, name) not in results:
                continue
            runs = results[(prompt_name, name)]
            ttft = median([r[0] for r in runs])
            rate = median([r[1] for r in runs])
            paired = sorted(r[1] / e[1] for r, e in zip(runs, engine_runs))  # each run against the engine's beside it
            quartiles = statistics.quantiles(paired, n=4) if len(paired) > 1 else paired * 3
            ttft_paired = median([r[0] - e[0] for r, e in zip(runs, engine_runs)])
            rows.append((prompt_name, tokens, name, ttft * 1000, ttft_paired * 1000, rate, rate / base_rate,
                         quartiles))
    glm4 = args.family == "glm4"
    shape = ("GLM-4 model (hidden 1024, 8 layers, 16/2 heads, ffn 3424, vocab 151552, f16, byte-level BPE)" if glm4
             else "ChatGLM3 model (hidden 1024, 8 layers, 16/2 heads, ffn 2816, vocab 65024, f16)")
    lines = [
        "# Local model: aigate against the engine" + ("" if glm4 else " and chatglm.cpp's own server"),
        "",
        f"Random-weight {shape}, greedy, {args.tokens} new tokens, median of {args.runs} alternated runs. "
        f"Command: `.venv/bin/python bench/local_engine.py{' --family glm4' if glm4 else ''}`.",
        "",
        "| prompt | prompt tokens | contender | TTFT ms | TTFT over engine, ms (run by run, median) | decode tok/s "
        "| decode vs engine | same, run by run: median (quartiles) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {p} | {n} | {c} | {t:.1f} | {d:+.1f} | {r:.1f} | {x:.1%} | {q[1]:.1%} ({q[0]:.1%}-{q[2]:.1%}) |"
              for p, n, c, t, d, r, x, q in rows]
    note = ("" if glm4 else "`loop` is the engine's own loop in a process of its own writing each chunk to the "
            "client's socket (bench/model_loop_server.py): what any server pays for a client in another process. "
            "chatglm.cpp's server keeps only the last 512 prompt tokens, so its long-prompt TTFT "
            "covers a shorter prompt than the others'. ")
    lines += ["", note + "On turn 2 aigate's engine, the raw engine and the loop server take the history from "
                         "their KV caches and evaluate only the answer and the question; the whole-prompt row is the "
                         "raw engine evaluating all of it (what every turn cost before prefix reuse)."]
    name = "local_engine_glm4" if glm4 else "local_engine"
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    plot(rows, name)
    print("\n".join(lines))


def plot(rows, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    names = [n for n in ("engine", WHOLE, "loop", "aigate", "chatglm") if any(r[2] == n for r in rows)]
    width = 0.27
    for ax, (title, index) in zip(axes, (("time to first token (ms)", 3), ("decode tokens/s", 5))):
        for offset, prompt_name in enumerate(("short", "long", "turn 2")):
            values = [next((r[index] for r in rows if r[0] == prompt_name and r[2] == n), 0.0) for n in names]
            ax.bar([i + offset * width for i in range(len(names))], values, width=width, label=prompt_name)
        ax.set_xticks([i + width for i in range(len(names))], names)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=100)


if __name__ == "__main__":
    main()
