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

from common import CACHE, free_port, load_report, start, start_aigate, stream_chat
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
    intro = ["# aigate in front of an OpenAI-compatible upstream", "",
             ("A fake OpenAI-compatible upstream on loopback answering at once (tests/fake_upstream.py); one worker "
              f"per gateway; wrk, non-stream chat, {args.seconds} s per point, {args.rounds} alternated rounds "
              "(medians). Command: `.venv/bin/python bench/upstream.py`."), "",
             f"Machine load before: `{load_before}`; after: `{load_after}` (2 cores, shared with other work).", ""]
    load_report("upstream", intro, results, ttft, NAMES, "upstream", NAMES, "requests/s (non-stream chat)")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
