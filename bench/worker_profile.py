"""Where a gunicorn worker's time goes under load, aigate's against the floor's: each served by one
gevent worker in front of the fake Workers AI, wrk at concurrency 10 on it while py-spy samples the
worker (`pip install py-spy`; needs ptrace, e.g. root). Prints the top functions by own samples and
the share of samples in aigate's own modules.

    .venv/bin/python bench/worker_profile.py [--seconds 8] [--top 30] [--out FILE]
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import tempfile
import threading
from pathlib import Path

from common import BIN, ROOT, free_port, start, start_aigate
from gateway import AUTH, BODY, KEY, wrk

OWN = ("app.py", "web/rate_limits.py", "web/request_log.py", "web/metrics.py", "web/streams.py", "/compat/",
       "/backends/")


def worker_pid(master: int) -> int:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return int(children[0])


def sample(pid: int, seconds: int, url: str) -> tuple[collections.Counter[str], collections.Counter[str]]:
    raw = Path(tempfile.mkstemp(suffix=".txt")[1])
    spy = subprocess.Popen([str(BIN / "py-spy"), "record", "--pid", str(pid), "--duration", str(seconds), "--rate",
                            "500", "--format", "raw", "--output", str(raw), "--nonblocking"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    load = threading.Thread(target=wrk, args=(url, BODY, 10, seconds, AUTH))
    load.start()
    spy.wait()
    load.join()
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():  # "frame;frame;...;leaf count"
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        own[frames[-1]] += int(count)
        own["(total)"] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
        if any(any(o in f for o in OWN) for f in frames if "site-packages" not in f):
            own["(in aigate's modules, inclusive)"] += int(count)
    raw.unlink()
    return own, inclusive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from tests.fake_cloudflare import ACCOUNT, TOKEN, FakeCloudflare, cloudflare_env

    fake = FakeCloudflare(frame_delay=0.0).start()
    ports = {"aigate": free_port(), "floor": free_port()}
    servers: list[subprocess.Popen] = []
    lines: list[str] = []
    try:
        servers.append(start_aigate(ports["aigate"], **cloudflare_env(fake, CLOUDFLARE_MODELS="@cf/fake/chat"),
                                    WORKERS="1", API_KEYS=KEY))
        servers.append(start([str(BIN / "gunicorn"), "-c", "/dev/null", "-k", "gevent", "-w", "1", "-b",
                              f"127.0.0.1:{ports['floor']}", "floor:app", "--chdir", str(ROOT / "bench")],
                             {"UPSTREAM": f"{fake.base}/accounts/{ACCOUNT}/ai/run/{BODY['model']}", "TOKEN": TOKEN},
                             f"http://127.0.0.1:{ports['floor']}/health"))
        for name, server in zip(ports, servers, strict=True):
            url = f"http://127.0.0.1:{ports[name]}/v1/chat/completions"
            wrk(url, BODY, 10, 2, AUTH)  # warm-up
            fake.requests.clear()
            counts, inclusive = sample(worker_pid(server.pid), args.seconds, url)
            total = counts.pop("(total)")
            lines += [f"{name}: {total} samples; own-time top {args.top} (% of samples):"]
            lines += [f"  {n / total:6.1%}  {frame}" for frame, n in counts.most_common(args.top)]
            lines += [f"{name}: inclusive top {args.top}:"]
            lines += [f"  {n / total:6.1%}  {frame}" for frame, n in inclusive.most_common(args.top)]
            lines.append("")
    finally:
        for s in servers:
            s.terminate()
        fake.stop()
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
