"""Benchmark 3: many concurrent Cloudflare streams through one gevent worker.

    .venv/bin/python bench/many_streams.py [--streams 1000] [--frames 50]

The upstream is the tests' fake Cloudflare (tests/fake_cloudflare.py, a thread per connection)
sending `--frames` frames 100 ms apart. The load comes from an asyncio client in a separate
process (raw HTTP/1.1 over asyncio streams: no SDK parsing), all streams opened at once. Reported:
errors, time to first token (p50, p99), wall time, and the worker's peak RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, free_port, start_aigate

CLIENT = r'''
import asyncio, json, sys, time
port, streams, frames = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
body = json.dumps({"model": "@cf/fake/long", "messages": [{"role": "user", "content": "go"}],
                   "max_tokens": frames, "stream": True}).encode()
request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
async def one():
    started = time.perf_counter()
    first, chunks = None, 0
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**20)
        writer.write(request)
        await writer.drain()
        status = await reader.readline()
        if b" 200 " not in status:
            return ("error", status.decode().strip())
        async for line in reader:
            if line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
                first = first or time.perf_counter() - started
                chunks += 1
            elif line.startswith(b"data: [DONE]"):
                break
        writer.close()
    except Exception as exc:
        return ("error", repr(exc))
    return ("ok", first, chunks, time.perf_counter() - started) if chunks == frames else ("error", f"{chunks} chunks")
async def main():
    results = await asyncio.gather(*(one() for _ in range(streams)))
    print(json.dumps(results))
asyncio.run(main())
'''


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--frames", type=int, default=50)
    args = parser.parse_args()

    from tests.fake_cloudflare import FakeCloudflare, cloudflare_env

    fake = FakeCloudflare().start()
    port = free_port()
    server = start_aigate(port, **cloudflare_env(fake, CLOUDFLARE_MODELS="@cf/fake/long"), WORKERS="1",
                          WORKER_CONNECTIONS=str(args.streams + 100))
    try:
        worker = int(Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()[0])
        started = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", CLIENT, str(port), str(args.streams), str(args.frames)],
                             capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - started
        results = json.loads(out.stdout)
        peak_rss = int(next(line.split()[1] for line in Path(f"/proc/{worker}/status").read_text().splitlines()
                            if line.startswith("VmHWM:"))) / 1024
    finally:
        server.terminate()
        server.wait(30)
        fake.stop()
    ok = [r for r in results if r[0] == "ok"]
    errors = [r[1] for r in results if r[0] == "error"]
    ttfts = [r[1] for r in ok]
    lines = ["# Many concurrent Cloudflare streams in one gevent worker", "",
             f"{args.streams} streams opened at once, each {args.frames} upstream frames 100 ms apart "
             f"(fake Cloudflare on loopback), one gunicorn gevent worker, asyncio client in another process. "
             "Command: `.venv/bin/python bench/many_streams.py`.", "",
             "| streams | errors | TTFT p50 ms | TTFT p99 ms | wall s (ideal ~" + f"{args.frames * 0.1:.1f})"
             " | worker peak RSS MB |", "|---|---|---|---|---|---|",
             f"| {args.streams} | {len(errors)} | {statistics.median(ttfts) * 1000:.0f} | "
             f"{percentile(ttfts, 0.99) * 1000:.0f} | {wall:.1f} | {peak_rss:.0f} |"]
    if errors:
        lines += ["", "First errors: " + "; ".join(sorted(set(map(str, errors)))[:5])]
    (RESULTS / "many_streams.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist([t * 1000 for t in ttfts], bins=40)
    ax.set_xlabel("time to first token (ms)")
    ax.set_ylabel("streams")
    ax.set_title(f"{args.streams} concurrent streams, one worker")
    fig.tight_layout()
    fig.savefig(RESULTS / "many_streams.png", dpi=100)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
