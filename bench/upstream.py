"""Benchmark 8: what aigate adds in front of an OpenAI-compatible upstream (UPSTREAMS_FILE),
against calling the upstream directly and against LiteLLM's proxy in front of the same upstream.

    .venv/bin/python bench/upstream.py [--seconds 4] [--rounds 2]

Upstream: the tests' fake OpenAI-compatible server (tests/fake_upstream.py) on loopback, answering
at once. Contenders, one worker each:
  aigate   gunicorn -k gevent, UPSTREAMS_FILE with the fake as its one upstream
  litellm  LiteLLM's proxy (litellm[proxy], in its own venv: bench/.cache/litellm-venv), its
           openai/ provider with api_base at the fake
Load: wrk (C) with a POST body (non-stream chat), concurrency 1, 10 and 50, alternating
contenders; latency p50/p99 from wrk. Time to the first streamed token from a light Python
client (median of 30). The machine's load (uptime) before and after goes into the results.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from pathlib import Path

from common import CACHE, RESULTS, free_port, median, start, start_aigate, stream_chat
from gateway import wrk

LITELLM = CACHE / "litellm-venv" / "bin" / "litellm"
MODEL = "fake-ok"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hello there friend"}], "max_tokens": 32}
KEY = "sk-bench-0123456789abcdef"  # every gateway gets (and checks) the same bearer key
AUTH = {"Authorization": f"Bearer {KEY}"}
NAMES = ("upstream", "aigate", "litellm")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from tests.fake_upstream import KEY as UPSTREAM_KEY
    from tests.fake_upstream import FakeUpstream

    load_before = uptime()
    fake = FakeUpstream(models=[MODEL]).start()
    ports = {name: free_port() for name in ("aigate", "litellm")}
    tmp = Path(tempfile.mkdtemp(prefix="aigate-bench-upstream-"))
    (tmp / "upstreams.toml").write_text(f'[upstreams.fake]\nbase_url = "{fake.base}"\napi_key = "{UPSTREAM_KEY}"\n'
                                        f'models = ["{MODEL}"]\n')
    (tmp / "litellm.yaml").write_text(
        f"model_list:\n  - model_name: \"{MODEL}\"\n    litellm_params:\n      model: \"openai/{MODEL}\"\n"
        f"      api_base: \"{fake.base}\"\n      api_key: \"{UPSTREAM_KEY}\"\n")
    servers = [
        start_aigate(ports["aigate"], UPSTREAMS_FILE=str(tmp / "upstreams.toml"), WORKERS="1", API_KEYS=KEY,
                     STATE_DIR=str(tmp / "state")),
        start([str(LITELLM), "--config", str(tmp / "litellm.yaml"), "--host", "127.0.0.1", "--port",
               str(ports["litellm"]), "--num_workers", "1"], {"LITELLM_LOG": "ERROR", "LITELLM_MASTER_KEY": KEY},
              f"http://127.0.0.1:{ports['litellm']}/health/liveliness"),
    ]
    urls = {"upstream": fake.base + "/chat/completions",
            **{name: f"http://127.0.0.1:{port}/v1/chat/completions" for name, port in ports.items()}}
    headers = {"upstream": {"Authorization": f"Bearer {UPSTREAM_KEY}"}, "aigate": AUTH, "litellm": AUTH}
    results: dict[tuple[str, int], list[dict]] = {}
    ttft: dict[str, list[float]] = {}
    try:
        for name in NAMES:  # warm-up, and a check that each answers the same words
            assert stream_chat(urls[name], BODY, headers[name]).text == "You said: hello there friend", name
        for r in range(args.rounds):
            for connections in (1, 10, 50):
                order = NAMES[r % 3:] + NAMES[:r % 3]
                for name in order:
                    results.setdefault((name, connections), []).append(
                        wrk(urls[name], BODY, connections, args.seconds, headers[name]))
        for _ in range(30):
            for name in NAMES:
                ttft.setdefault(name, []).append(stream_chat(urls[name], BODY, headers[name]).ttft)
    finally:
        for s in servers:
            s.terminate()
        fake.stop()
    report(results, ttft, args, load_before, uptime())


def report(results, ttft, args, load_before: str, load_after: str) -> None:
    def m(name: str, c: int, key: str) -> float:
        return median([r[key] for r in results[(name, c)]])

    lines = ["# aigate in front of an OpenAI-compatible upstream", "",
             ("A fake OpenAI-compatible upstream on loopback answering at once (tests/fake_upstream.py); one worker "
              f"per gateway; wrk, non-stream chat, {args.seconds} s per point, {args.rounds} alternated rounds "
              "(medians). Command: `.venv/bin/python bench/upstream.py`."), "",
             f"Machine load before: `{load_before}`; after: `{load_after}` (2 cores, shared with other work).", "",
             "| contender | conc. | req/s | vs upstream | p50 ms | p99 ms | p50 over upstream ms | non-2xx |",
             "|---|---|---|---|---|---|---|---|"]
    for c in (1, 10, 50):
        for name in NAMES:
            rps = m(name, c, "rps")
            lines.append(f"| {name} | {c} | {rps:.0f} | {rps / m('upstream', c, 'rps'):.0%} | {m(name, c, 'p50'):.2f} | "
                         f"{m(name, c, 'p99'):.2f} | {m(name, c, 'p50') - m('upstream', c, 'p50'):+.2f} | "
                         f"{sum(r['errors'] for r in results[(name, c)])} |")
    lines += ["", "| contender | time to first streamed token, median ms | over the upstream's, ms |", "|---|---|---|"]
    base = median(ttft["upstream"]) * 1000
    lines += [f"| {name} | {median(values) * 1000:.2f} | {median(values) * 1000 - base:+.2f} |"
              for name, values in ttft.items()]
    (RESULTS / "upstream.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, name in enumerate(NAMES):
        ax.bar([x + i * 0.27 for x in range(3)], [m(name, c, "rps") for c in (1, 10, 50)], width=0.27, label=name)
    ax.set_xticks([x + 0.27 for x in range(3)], ["1", "10", "50"])
    ax.set_xlabel("concurrent connections")
    ax.set_ylabel("requests/s (non-stream chat)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "upstream.png", dpi=100)
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
