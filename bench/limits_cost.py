"""Benchmark 6: what per-key rate limits cost on the Cloudflare path.

    .venv/bin/python bench/limits_cost.py [--seconds 5] [--rounds 3]

Contenders, one gevent worker each, the same bearer key, the fake Cloudflare answering at once:
  no limits  API_KEYS only (the baseline)
  memory     the key with requests and tokens per minute, counted in the worker (memory://)
  redis      the same limits counted in a redis-server on loopback (redis://127.0.0.1:port)
The limits are far above the load, so every request is counted and none is refused. Load: wrk at
concurrency 1 and 10, the contenders alternating within each round; medians of the rounds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from common import RESULTS, free_port, median, start_aigate
from gateway import AUTH, BODY, KEY, wrk

KEYS = f"""[keys.bench]
key = "{KEY}"
requests_per_minute = 100000000
tokens_per_minute = 1000000000
"""
CONTENDERS = ("no limits", "memory", "redis")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from tests.fake_cloudflare import FakeCloudflare, cloudflare_env

    fake = FakeCloudflare(frame_delay=0.0).start()
    keys = Path(tempfile.mkstemp(suffix=".toml")[1])
    keys.write_text(KEYS)
    redis_port = free_port()
    redis = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(redis_port), "--bind",
                              "127.0.0.1", "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    ports = {name: free_port() for name in CONTENDERS}
    upstream = cloudflare_env(fake, CLOUDFLARE_MODELS="@cf/fake/chat")
    limited = {"API_KEYS_FILE": str(keys)}
    servers = [
        start_aigate(ports["no limits"], **upstream, API_KEYS=KEY),
        start_aigate(ports["memory"], **upstream, **limited),
        start_aigate(ports["redis"], **upstream, **limited, RATELIMIT_STORAGE_URI=f"redis://127.0.0.1:{redis_port}"),
    ]
    results: dict[tuple[str, int], list[dict]] = {}
    try:
        for r in range(args.rounds):
            for connections in (1, 10):
                for name in CONTENDERS[r % 3:] + CONTENDERS[:r % 3]:
                    url = f"http://127.0.0.1:{ports[name]}/v1/chat/completions"
                    results.setdefault((name, connections), []).append(
                        wrk(url, BODY, connections, args.seconds, AUTH))
    finally:
        for s in servers:
            s.terminate()
        redis.terminate()
        fake.stop()
        keys.unlink()
    report(results, args)


def report(results: dict[tuple[str, int], list[dict]], args: argparse.Namespace) -> None:
    def m(name: str, c: int, key: str) -> float:
        return median([r[key] for r in results[(name, c)]])

    lines = ["# What per-key rate limits cost", "",
             "Fake Cloudflare on loopback answering at once; one gevent worker each; the key limited to "
             "10^8 requests and 10^9 tokens per minute (all counted, none refused); wrk, "
             f"{args.seconds} s per point, {args.rounds} alternated rounds (medians). "
             "Command: `.venv/bin/python bench/limits_cost.py`.", "",
             "| limits | conc. | req/s | vs no limits | p50 ms | p50 added ms | non-2xx |",
             "|---|---|---|---|---|---|---|"]
    for c in (1, 10):
        for name in CONTENDERS:
            rps, p50 = m(name, c, "rps"), m(name, c, "p50")
            lines.append(f"| {name} | {c} | {rps:.0f} | {rps / m('no limits', c, 'rps'):.0%} | {p50:.2f} | "
                         f"{p50 - m('no limits', c, 'p50'):+.2f} | {sum(r['errors'] for r in results[(name, c)])} |")
    (RESULTS / "limits_cost.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, name in enumerate(CONTENDERS):
        ax.bar([x + i * 0.27 for x in range(2)], [m(name, c, "rps") for c in (1, 10)], width=0.27, label=name)
    ax.set_xticks([x + 0.27 for x in range(2)], ["1", "10"])
    ax.set_xlabel("concurrent connections")
    ax.set_ylabel("requests/s")
    ax.set_title("Rate limits: off, counted in memory, in Redis")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "limits_cost.png", dpi=100)
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
