"""Where a Workers AI request's CPU goes in aigate, against the floor (bench/floor.py): both WSGI apps
called in this process (no gunicorn, no client), each with the same non-streamed chat request
against the fake Cloudflare, keys set and the multiprocess metrics on as under gunicorn.

    .venv/bin/python bench/profile_gateway.py [--requests 3000] [--top 25] [--out FILE]

Prints CPU microseconds per request for each app (alternated runs, the best of each) and
cProfile's top functions for aigate by CPU time (own and cumulative; waits on sockets and the GIL
do not count), which is what bench/results/gateway_profile.md quotes. The per-request times repeat
within a few percent on an idle core; on a busy machine compare runs made in the same minute.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import io
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
KEY = "sk-bench-0123456789abcdef"
BODY = json.dumps({"model": "@cf/fake/chat", "messages": [{"role": "user", "content": "hello there friend"}]}).encode()


# The parts of a request, by the functions that do them (before and after the Workers AI split).
PARTS = {
    "the upstream call (requests, or the urllib3 transport)": [("sessions.py", "post"), ("transport.py", "post")],
    "Flask-Limiter's hooks": [("_extension.py", "_check_request_limit"), ("_extension.py", "_inject_headers")],
    "CORS headers (flask-cors; before, two header sets inside the after-request hook)": [("extension.py",
                                                                                          "cors_after_request")],
    "the request line and metrics (RequestLog.write; before, RequestRecord.close)": [("web/request_log.py", "close"),
                                                                              ("web/request_log.py", "write")],
    "the body read and parsed (BodyReader, read_json, parse_chat)": [("body.py", "_read"),
                                                                      ("json_body.py", "read_json"),
                                                                      ("requests.py", "parse_chat")],
    "the answer built (fold, jsonify)": [("responses.py", "fold"), ("__init__.py", "jsonify")],
    "request id, record and key (open_request; before, identify)": [("app.py", "identify"),
                                                                     ("web/request_log.py", "open_request")],
    "Flask's request context push and pop": [("app.py", "request_context"), ("ctx.py", "pop")],
}


def environ(body: bytes) -> dict:
    return {"REQUEST_METHOD": "POST", "PATH_INFO": "/v1/chat/completions", "QUERY_STRING": "", "SERVER_NAME": "bench",
            "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1",
            "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(body)), "HTTP_HOST": "127.0.0.1:8000",
            "HTTP_AUTHORIZATION": f"Bearer {KEY}", "wsgi.input": io.BytesIO(body), "wsgi.url_scheme": "http",
            "wsgi.errors": sys.stderr, "wsgi.multithread": False, "wsgi.multiprocess": True, "wsgi.run_once": False,
            "wsgi.version": (1, 0)}


def call(app, body: bytes = BODY) -> bytes:
    status: list[str] = []
    result = app(environ(body), lambda s, h, e=None: status.append(s))
    try:
        out = b"".join(result)
    finally:
        if hasattr(result, "close"):
            result.close()
    if not status[0].startswith("200"):
        raise RuntimeError(f"{status[0]}: {out[:300]!r}")
    return out


def per_request(apps: dict[str, object], n: int, runs: int = 7) -> dict[str, float]:
    """CPU microseconds per request of each app, the best of ``runs`` runs of ``n``, the apps' runs
    alternated so that a busy moment of the machine hits each alike."""
    best = dict.fromkeys(apps, float("inf"))
    for _ in range(runs):
        for name, app in apps.items():
            started = time.thread_time()
            for _ in range(n):
                call(app)
            best[name] = min(best[name], (time.thread_time() - started) / n * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="aigate-profile-")  # as gunicorn.conf.py does
    from tests.fake_cloudflare import ACCOUNT, TOKEN, FakeCloudflare, cloudflare_env

    fake = FakeCloudflare(frame_delay=0.0).start()
    os.environ.update(cloudflare_env(fake, CLOUDFLARE_MODELS="@cf/fake/chat"), API_KEYS=KEY, CHATGLM_MODEL="",
                      LOG_LEVEL="warning")
    os.environ.update(UPSTREAM=f"{fake.base}/accounts/{ACCOUNT}/ai/run/@cf/fake/chat", TOKEN=TOKEN)
    import logging

    # the request line is formatted, as in gunicorn
    logging.basicConfig(level=logging.INFO, stream=open(os.devnull, "w"))
    from app import create_app

    aigate = create_app()
    floor = importlib.import_module("floor").app
    for app in (aigate, floor):
        for _ in range(200):
            call(app)
    fake.requests.clear()
    cpu = per_request({"floor": floor, "aigate": aigate}, args.requests // 5)
    lines = [f"CPU per request in the calling thread (the fake upstream runs in others), best of 7 alternated runs "
             f"of {args.requests // 5}, no gunicorn:", *(f"  {name:6s} {us:7.1f} us" for name, us in cpu.items()),
             f"  aigate - floor: {cpu['aigate'] - cpu['floor']:.1f} us", ""]
    fake.requests.clear()
    profile = cProfile.Profile(time.thread_time)  # CPU time: waits on sockets and the GIL do not count
    profile.enable()
    for _ in range(args.requests):
        call(aigate)
    profile.disable()
    stats = pstats.Stats(profile)
    total = sum(ct for (_, _, name), (_, _, _, ct, _) in stats.stats.items() if name == "call")  # type: ignore[attr-defined]
    lines += ["aigate, where a request's CPU goes (cumulative, share of the request; parts overlap where nested):"]
    for part, names in PARTS.items():
        spent = sum(ct for (path, _, name), (_, _, _, ct, _) in stats.stats.items()  # type: ignore[attr-defined]
                    if any(path.endswith(f) and name == n for f, n in names))
        lines.append(f"  {spent / total:6.1%}  {part}")
    lines.append("")
    for order in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profile, stream=text).strip_dirs().sort_stats(order).print_stats(args.top)
        lines += [f"aigate, top {args.top} by {order}:", text.getvalue().split("\n\n", 2)[-1].rstrip(), ""]
    fake.stop()
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
