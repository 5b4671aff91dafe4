"""Server-sent events as the OpenAI SDKs read them: `data: <one-line JSON>\n\n`, then `data: [DONE]`."""

from __future__ import annotations

import json
from typing import Any

import msgspec

DONE = b"data: [DONE]\n\n"

_encoder = msgspec.json.Encoder()  # a chunk is encoded per token: its time is taken from a local model's cores
_fallback = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def encode(obj: dict[str, Any]) -> bytes:
    """One event. JSON never contains a raw newline, so one data line always suffices; lone
    surrogates (never valid UTF-8) are replaced rather than allowed to break the stream."""
    try:
        return b"data: " + _encoder.encode(obj) + b"\n\n"
    except UnicodeEncodeError:  # a lone surrogate
        return b"data: " + _fallback.encode(obj).encode("utf-8", "replace") + b"\n\n"


HOLE = "aigate:text-piece"  # stands for a text piece in a chunk whose frame is split around it


def around_hole(obj: dict[str, Any]) -> tuple[bytes, bytes]:
    """The frame of ``obj`` (one of whose strings is HOLE) as what comes before and after the piece
    that goes in its place, encoded as a JSON string: a backend writing the pieces itself writes the
    same bytes as ``encode`` would."""
    prefix, _, suffix = encode(obj).partition(b'"' + HOLE.encode() + b'"')
    return prefix, suffix
