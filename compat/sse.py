"""Server-sent events as the OpenAI SDKs read them: `data: <one-line JSON>\n\n`, then `data: [DONE]`."""

from __future__ import annotations

import json
from typing import Any

import msgspec

from backends.base import PieceFrame

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


PIECE, NUMBER = "aigate:text-piece", "aigate:number"  # stand for a text piece and its number in a frame


def piece_frame(encoded: bytes, number: int | None = None) -> PieceFrame:
    """A text piece's frame from the frame of an event whose piece is PIECE (and, with ``number``, whose
    number is NUMBER): a backend writing pieces itself writes the bytes the worker would."""
    before, _, suffix = encoded.partition(b'"' + PIECE.encode() + b'"')
    if number is None:
        return PieceFrame(before, suffix)
    prefix, _, after = before.partition(b'"' + NUMBER.encode() + b'"')
    return PieceFrame(prefix, suffix, number, after)
