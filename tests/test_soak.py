"""A bounded soak: mixed traffic on both backends (streams and whole answers, upstream faults, bad
requests, clients that leave) from several clients at once. Every answer must be the expected one,
and after the traffic the workers hold no more memory, file descriptors or slots than after a
warm-up round. AIGATE_SOAK_SECONDS sets the length (40 s here; run longer by hand)."""

from __future__ import annotations

import itertools
import os
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest
import requests

from tests.fake_cloudflare import MODES, cloudflare_env

SECONDS = float(os.environ.get("AIGATE_SOAK_SECONDS", "40"))
CLIENTS = 6
USER = [{"role": "user", "content": "hello there friend"}]
# (fault mode, stream) -> the status the client must see; 200 means an error event then [DONE].
FAULTS = {("500", False): 502, ("500", True): 502, ("429", False): 429, ("429", True): 429,
          ("unauthorized", False): 502, ("unauthorized", True): 502,
          ("drop", False): 502, ("drop", True): 200, ("malformed", False): 502, ("malformed", True): 200,
          ("nodone", False): 502, ("nodone", True): 200, ("stall", False): 504, ("stall", True): 200}


KEY = "sk-soak-0123"


@pytest.fixture(scope="module")
def server(server_factory, demo_model, fake, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.toml"  # limits far above the load: counted, never reached
    keys.write_text(f'[keys.soak]\nkey = "{KEY}"\nrequests_per_minute = 1000000\ntokens_per_minute = 100000000\n')
    keys.chmod(0o600)
    return server_factory(CHATGLM_MODEL=str(demo_model), CHATGLM_MODEL_ID="demo", WORKERS="2", MAX_QUEUE="32",
                          API_KEYS_FILE=str(keys),
                          **cloudflare_env(fake, CLOUDFLARE_MODELS=",".join(f"@cf/fake/{m}" for m in MODES),
                                       CLOUDFLARE_TIMEOUT="2,1", CLOUDFLARE_RETRIES="0"))


class Traffic:
    """Each call sends one request of a random kind and returns None if the answer was the expected one,
    else what was wrong."""

    def __init__(self, server, rng: random.Random) -> None:
        self.server, self.rng, self.http = server, rng, requests.Session()
        self.kinds: dict[str, Callable[[dict], str | None]] = {
            "local chat": self.local_chat, "local stream": self.local_stream, "local completion": self.completion,
            "local leaves": lambda h: self.leaves(h, "demo"), "cf chat": self.cf_chat, "cf stream": self.cf_stream,
            "cf embeddings": self.embeddings, "cf leaves": lambda h: self.leaves(h, "@cf/fake/slow"),
            "cf fault": self.cf_fault, "bad": self.bad}

    def post(self, path: str, body: object, headers: dict, **kw) -> requests.Response:
        data = body if isinstance(body, str) else None
        return self.http.post(self.server.v1 + path, json=None if data else body, data=data, headers=headers,
                              timeout=60, **kw)

    def local_chat(self, h: dict) -> str | None:
        n = self.rng.randint(1, 12)
        r = self.post("/chat/completions", {"model": "demo", "messages": USER, "max_tokens": n, "temperature": 0}, h)
        ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= n
        return None if ok else f"{r.status_code} {r.text[:200]}"

    def local_stream(self, h: dict) -> str | None:
        r = self.post("/chat/completions", {"model": "demo", "messages": USER, "max_tokens": 12, "stream": True}, h)
        return None if r.status_code == 200 and _clean_stream(r.text) else f"{r.status_code} {r.text[-200:]}"

    def completion(self, h: dict) -> str | None:
        r = self.post("/completions", {"model": "demo", "prompt": "Once upon a time", "max_tokens": 8}, h)
        ok = r.status_code == 200 and r.json()["object"] == "text_completion"
        return None if ok else f"{r.status_code} {r.text[:200]}"

    def leaves(self, h: dict, model: str) -> str | None:
        with requests.post(self.server.v1 + "/chat/completions", stream=True, timeout=60, headers=h,
                           json={"model": model, "messages": USER, "max_tokens": 300, "stream": True}) as r:
            first = next(r.iter_lines(), b"")
        return None if r.status_code == 200 and first.startswith(b"data: ") else f"{r.status_code} {first[:200]!r}"

    def cf_chat(self, h: dict) -> str | None:
        r = self.post("/chat/completions", {"model": "@cf/fake/chat", "messages": USER}, h)
        ok = r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "You said: hello there friend"
        return None if ok else f"{r.status_code} {r.text[:200]}"

    def cf_stream(self, h: dict) -> str | None:
        r = self.post("/chat/completions", {"model": "@cf/fake/chat", "messages": USER, "stream": True}, h)
        return None if r.status_code == 200 and _clean_stream(r.text) else f"{r.status_code} {r.text[-200:]}"

    def embeddings(self, h: dict) -> str | None:
        r = self.post("/embeddings", {"model": "@cf/fake/bge", "input": ["one", "two", "three"]}, h)
        return None if r.status_code == 200 and len(r.json()["data"]) == 3 else f"{r.status_code} {r.text[:200]}"

    def cf_fault(self, h: dict) -> str | None:
        mode, stream = self.rng.choice(list(FAULTS))
        r = self.post("/chat/completions", {"model": f"@cf/fake/{mode}", "messages": USER, "stream": stream}, h)
        if r.status_code != FAULTS[mode, stream]:
            return f"{mode} stream={stream}: {r.status_code} {r.text[:200]}"
        in_band = r.text.endswith('"}}\n\ndata: [DONE]\n\n') if r.status_code == 200 else "error" in r.json()
        return None if in_band else f"{mode} stream={stream}: {r.text[-200:]}"

    def bad(self, h: dict) -> str | None:
        body, status = self.rng.choice([("{not json", 400), ({"model": "nope", "messages": USER}, 404),
                                        ({"model": "demo"}, 400), ({"model": "demo", "messages": USER,
                                                                    "max_tokens": -1}, 400)])
        r = self.post("/chat/completions", body, h)
        return None if r.status_code == status and "error" in r.json() else f"{r.status_code} {r.text[:200]}"


def _clean_stream(text: str) -> bool:
    return text.endswith("data: [DONE]\n\n") and '"error"' not in text


def run_traffic(server, seconds: float, ids: itertools.count, seed: int) -> tuple[Counter, list[str]]:
    sent: Counter = Counter()
    unexpected: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(n: int) -> None:
        traffic = Traffic(server, random.Random(seed * 100 + n))
        while time.monotonic() < deadline:
            kind = traffic.rng.choice(list(traffic.kinds))
            with lock:
                request_id = f"soak-{next(ids)}"
            try:
                wrong = traffic.kinds[kind]({"X-Request-ID": request_id, "Authorization": f"Bearer {KEY}"})
            except Exception as exc:  # a reset or timeout is as unexpected as a wrong status
                wrong = repr(exc)
            with lock:
                sent[kind] += 1
                if wrong:
                    unexpected.append(f"{kind} ({request_id}): {wrong}")
        traffic.http.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sent, unexpected


def settled(server, requests_sent: int) -> dict[int, tuple[int, int]]:
    """Once every request has been logged as closed: each worker's (RSS in KiB, open descriptors)."""
    with server.changed:
        assert server.changed.wait_for(lambda: sum("id=soak-" in line for line in server.log) >= requests_sent, 30)
    pids = [int(p) for p in re.findall(r"Booting worker with pid: (\d+)", "".join(server.log))]
    return {pid: (_rss_kib(pid), len(os.listdir(f"/proc/{pid}/fd"))) for pid in pids}


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1))


def test_soak(server):
    ids = itertools.count()
    warm, unexpected = run_traffic(server, SECONDS / 4, ids, seed=1)
    before = settled(server, sum(warm.values()))
    sent, more = run_traffic(server, SECONDS * 3 / 4, ids, seed=2)
    after = settled(server, sum(warm.values()) + sum(sent.values()))
    unexpected += more

    gauges = requests.get(server.base_url + "/metrics", timeout=10).text
    print(f"\nsoak: {sum(warm.values()) + sum(sent.values())} requests ({dict(sent)}), "
          f"unexpected {len(unexpected)}; (RSS KiB, fds) after warm-up {before}, at the end {after}")
    assert not unexpected, "\n".join(unexpected[:20])
    assert min(sent.values()) >= 5 and len(sent) == 10  # every kind ran, more than a handful of times
    for pid, (rss, fds) in after.items():
        rss_before, fds_before = before[pid]
        assert rss - rss_before < 8 * 1024, f"worker {pid} grew from {rss_before} to {rss} KiB"
        assert fds - fds_before <= 8, f"worker {pid} went from {fds_before} to {fds} open descriptors"
    for gauge in ('aigate_generations_running{backend="chatglm"} 0.0', 'aigate_requests_waiting{backend="chatglm"} 0.0',
                  "aigate_active_streams 0.0"):
        assert gauge in gauges  # every slot released, no stream left open
