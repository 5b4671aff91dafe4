"""Benchmark 5: fairness under the single generation slot.

    .venv/bin/python bench/fairness.py [--queued 8]

One gunicorn gevent worker serves the bench model and the fake Cloudflare. `--queued` local
requests arrive 50 ms apart and wait in the generation line; meanwhile a probe asks /v1/models
every 100 ms and a Cloudflare stream (50 frames, 100 ms apart) runs on the same worker.
Reported: /v1/models latency (p50, p99), the Cloudflare stream's largest gap between chunks, and
whether the queued requests started generating in the order they arrived.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import requests
from common import RESULTS, bench_model, free_port, start_aigate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queued", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()

    from tests.fake_cloudflare import FakeCloudflare, cloudflare_env

    fake = FakeCloudflare().start()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_aigate(port, CHATGLM_MODEL=str(bench_model()), CHATGLM_MODEL_ID="bench",
                          MAX_QUEUE=str(args.queued + 2), **cloudflare_env(fake, CLOUDFLARE_MODELS="@cf/fake/long"))
    first_token: dict[int, float] = {}
    probe_latencies: list[float] = []
    gaps: list[float] = []
    done = threading.Event()

    def local(i: int) -> None:
        body = {"model": "bench", "messages": [{"role": "user", "content": f"request {i}"}],
                "max_tokens": args.tokens, "temperature": 0, "stream": True}
        with requests.post(f"{base}/v1/chat/completions", json=body, stream=True, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith(b"data: {") and b'"content":"' in line and i not in first_token:
                    first_token[i] = time.perf_counter()

    def probe() -> None:
        while not done.is_set():
            t = time.perf_counter()
            requests.get(f"{base}/v1/models", timeout=30).raise_for_status()
            probe_latencies.append(time.perf_counter() - t)
            done.wait(0.1)

    def cloudflare() -> None:
        body = {"model": "@cf/fake/long", "messages": [{"role": "user", "content": "go"}], "max_tokens": 50,
                "stream": True}
        last = None
        with requests.post(f"{base}/v1/chat/completions", json=body, stream=True, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith(b"data: {") and b'"content":"' in line:
                    now = time.perf_counter()
                    if last is not None:
                        gaps.append(now - last)
                    last = now

    try:
        requests.post(f"{base}/v1/chat/completions", timeout=120,  # warm-up: page the weights in
                      json={"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        threads = [threading.Thread(target=probe), threading.Thread(target=cloudflare)]
        for t in threads:
            t.start()
        locals_ = []
        for i in range(args.queued):
            t = threading.Thread(target=local, args=(i,))
            t.start()
            locals_.append(t)
            time.sleep(0.05)  # arrival order is the point of the measurement
        for t in locals_:
            t.join()
        threads[1].join()
        done.set()
        threads[0].join()
    finally:
        server.terminate()
        server.wait(30)
        fake.stop()

    order = sorted(first_token, key=first_token.get)
    in_order = order == list(range(args.queued))
    p50 = statistics.median(probe_latencies) * 1000
    p99 = sorted(probe_latencies)[int(0.99 * (len(probe_latencies) - 1))] * 1000
    lines = ["# Fairness under the single generation slot", "",
             f"{args.queued} local requests ({args.tokens} tokens each on the bench model) arrive 50 ms apart; "
             "/v1/models is probed every 100 ms and a Cloudflare stream (50 frames, 100 ms apart) runs, all on "
             "one gevent worker. Command: `.venv/bin/python bench/fairness.py`.", "",
             "| queued | /v1/models p50 ms | /v1/models p99 ms | probes | Cloudflare max gap ms "
             "| served in arrival order |",
             "|---|---|---|---|---|---|",
             f"| {args.queued} | {p50:.1f} | {p99:.1f} | {len(probe_latencies)} | {max(gaps) * 1000:.0f} | "
             f"{'yes' if in_order else 'no: ' + json.dumps(order)} |"]
    (RESULTS / "fairness.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([x * 1000 for x in probe_latencies], marker=".", linestyle="none")
    ax.set_xlabel("probe (every 100 ms)")
    ax.set_ylabel("/v1/models latency (ms)")
    ax.set_title(f"while {args.queued} requests queue for the model")
    fig.tight_layout()
    fig.savefig(RESULTS / "fairness.png", dpi=100)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
