"""GET /: the playground page, one static HTML file with its CSS and JavaScript inline (no build
step, nothing fetched from anywhere but this server, so it works offline).

The page is served with a Content-Security-Policy that allows exactly its own inline <style> and
<script> (by hash) and requests to this origin: model output is only ever set as text, and even
a slip there could not run a script or send the API key kept in localStorage elsewhere.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import lru_cache
from pathlib import Path

from flask import Blueprint, Response, send_from_directory

STATIC = Path(__file__).resolve().parent.parent.parent / "static"
PAGE = "playground.html"
INLINE = re.compile(rb"<(script|style)>(.*?)</\1>", re.DOTALL)

bp = Blueprint("playground", __name__)


@bp.get("/")
def playground() -> Response:
    response = send_from_directory(STATIC, PAGE)
    response.headers["Content-Security-Policy"] = content_security_policy((STATIC / PAGE).stat().st_mtime_ns)
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


@lru_cache(maxsize=4)
def content_security_policy(mtime_ns: int) -> str:
    """The policy for the page as it is on disk (the modification time keys the cache, so an
    edited page gets new hashes without a restart)."""
    hashes: dict[bytes, list[str]] = {b"script": [], b"style": []}
    for tag, body in INLINE.findall((STATIC / PAGE).read_bytes()):
        hashes[tag].append("'sha256-" + base64.b64encode(hashlib.sha256(body).digest()).decode() + "'")
    return "; ".join([
        "default-src 'none'",
        "script-src " + (" ".join(hashes[b"script"]) or "'none'"),
        "style-src " + (" ".join(hashes[b"style"]) or "'none'"),
        "connect-src 'self'",
        "img-src data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ])
