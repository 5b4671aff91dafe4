"""Benchmark 2: what a gateway costs on the Cloudflare path, against the upstream called directly.

    .venv/bin/python bench/gateway.py [--seconds 5]

Upstream: the tests' fake Cloudflare on loopback, answering at once. Contenders, one worker each:
  aigate   gunicorn -k gevent, its Cloudflare backend (POST /ai/run/{model})
  litellm  LiteLLM's proxy (litellm[proxy], in its own venv: bench/.cache/litellm-venv), its
           Cloudflare provider (POST /ai/v1/chat/completions on the same fake)
  floor    bench/floor.py: Flask under gunicorn -k gevent, the request's bytes to the upstream
           and its bytes back (no JSON parsing), one requests call
Load: wrk (C) with a POST body, concurrency 1, 10 and 50, alternating contenders; latency p50/p99
from wrk; the upstream's own latency from wrk against the fake directly. Time to the first
streamed token from a light Python client (median of 30).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

from common import BIN, CACHE, ROOT, free_port, load_report, start, start_aigate, stream_chat

LITELLM = CACHE / "litellm-venv" / "bin" / "litellm"
BODY = {"model": "@cf/fake/chat", "messages": [{"role": "user", "content": "hello there friend"}]}
KEY = "sk-bench-0123456789abcdef"  # every gateway gets (and checks, where it can) the same bearer key
AUTH = {"Authorization": f"Bearer {KEY}"}


def wrk(url: str, body: dict, connections: int, seconds: int, headers: dict[str, str] | None = None) -> dict:
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    extra = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in (headers or {}).items())
    script.write_text(f'wrk.method = "POST"\nwrk.body = {json.dumps(json.dumps(body))}\n'
                      f'wrk.headers["Content-Type"] = "application/json"\n{extra}')
    out = subprocess.run(["wrk", "-t", "1" if connections == 1 else "2", "-c", str(connections), "-d",
                          f"{seconds}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    script.unlink()

    def ms(label: str) -> float:
        found = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        if found is None:
            raise RuntimeError(f"wrk output without {label} latency:\n{out}")
        value, unit = found.groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]

    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50": ms("50%"), "p99": ms("99%"),
            "errors": int(non2xx.group(1)) if non2xx else 0}


def first_frame(url: str, body: dict, headers: dict[str, str]) -> float:
    """Seconds to the first native Workers AI frame with text (the upstream called directly)."""
    import time

    import requests

    started = time.perf_counter()
    with requests.post(url, json={**body, "stream": True}, headers=headers, stream=True, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith(b"data: {") and json.loads(line[6:]).get("response"):
                return time.perf_counter() - started
    raise RuntimeError("no frame with text")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-litellm", action="store_true", help="aigate and the floor only")
    args = parser.parse_args()
    with_litellm = LITELLM.exists() and not args.no_litellm
    from tests.fake_cloudflare import ACCOUNT, TOKEN, FakeCloudflare, cloudflare_env

    fake = FakeCloudflare(frame_delay=0.0).start()
    ports = {name: free_port() for name in ("aigate", "litellm", "floor")}
    config = Path(tempfile.mkstemp(suffix=".yaml")[1])
    config.write_text(
        "model_list:\n  - model_name: \"@cf/fake/chat\"\n    litellm_params:\n"
        "      model: \"cloudflare/@cf/fake/chat\"\n"
        f"      api_base: \"{fake.base}/accounts/{ACCOUNT}/ai/v1\"\n      api_key: \"{TOKEN}\"\n")
    if not with_litellm:
        del ports["litellm"]
    urls = {name: f"http://127.0.0.1:{port}/v1/chat/completions" for name, port in ports.items()}
    upstream = f"{fake.base}/accounts/{ACCOUNT}/ai/run/@cf/fake/chat"
    results: dict[tuple[str, int], list[dict]] = {}
    ttft: dict[str, list[float]] = {}
    servers: list[subprocess.Popen] = []
    try:  # started inside the try: one that fails to start does not leave the others running
        servers += [
            start_aigate(ports["aigate"], **cloudflare_env(fake, CLOUDFLARE_MODELS="@cf/fake/chat"), WORKERS="1",
                         API_KEYS=KEY),
            start([str(BIN / "gunicorn"), "-c", "/dev/null", "-k", "gevent", "-w", "1", "-b",
                   f"127.0.0.1:{ports['floor']}", "floor:app", "--chdir", str(ROOT / "bench")],
                  {"UPSTREAM": f"{fake.base}/accounts/{ACCOUNT}/ai/run/{BODY['model']}", "TOKEN": TOKEN},
                  f"http://127.0.0.1:{ports['floor']}/health"),
        ]
        if with_litellm:
            servers.append(start([str(LITELLM), "--config", str(config), "--host", "127.0.0.1", "--port",
                                  str(ports["litellm"]), "--num_workers", "1"],
                                 {"LITELLM_LOG": "ERROR", "LITELLM_MASTER_KEY": KEY},
                                 f"http://127.0.0.1:{ports['litellm']}/health/liveliness"))
        for name, url in urls.items():  # warm-up, and a check that each answers
            if name != "floor":  # the floor passes Workers AI's frames, not OpenAI's
                stream_chat(url, BODY, AUTH)
        for r in range(args.rounds):
            for connections in (1, 10, 50):
                names = ["upstream", *urls]
                order = names[r % len(names):] + names[:r % len(names)]
                for name in order:
                    if name == "upstream":
                        res = wrk(upstream, {"messages": BODY["messages"]}, connections, args.seconds,
                                  {"Authorization": f"Bearer {TOKEN}"})
                    else:
                        res = wrk(urls[name], BODY, connections, args.seconds, AUTH)
                    results.setdefault((name, connections), []).append(res)
        for _ in range(30):
            ttft.setdefault("upstream", []).append(first_frame(upstream, {"messages": BODY["messages"]},
                                                                {"Authorization": f"Bearer {TOKEN}"}))
            for name in [n for n in urls if n != "floor"]:  # the floor passes Workers AI's frames, not OpenAI's
                ttft.setdefault(name, []).append(stream_chat(urls[name], BODY, AUTH).ttft)
    finally:
        for s in servers:
            s.terminate()
        fake.stop()
        config.unlink()
    report(results, ttft, args)


def report(results, ttft, args) -> None:
    intro = ["# Gateway cost on the Cloudflare path", "",
             "Fake Cloudflare on loopback answering at once; one worker per gateway; wrk, "
             f"{args.seconds} s per point, {args.rounds} alternated rounds (medians). "
             "Command: `.venv/bin/python bench/gateway.py`.", ""]
    load_report("gateway", intro, results, ttft, ("upstream", "floor", "aigate", "litellm"), "floor",
                ("floor", "aigate", "litellm"), "requests/s")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
