"""How much of an upstream's answer aigate reads (an OpenAI-compatible server's or Workers AI's): the
bounds, and the readers that hold to them. Every read is incremental, in pieces of READ_SIZE, and stops
at its bound, so a server that sends an endless line or body costs a worker that much memory at most.
Past a bound the answer fails as any upstream failure does (UpstreamError: a 502 before the first
byte, an error event after it)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from backends.base import UpstreamError

# One read from the socket: urllib3 reads an HTTP chunk or a body in pieces of at most this, never whole.
READ_SIZE = 64 * 1024
# An error body: its message is all a client needs (the first few hundred characters); the rest is left unread.
ERROR_BODY_BYTES = 64 * 1024


@dataclass(frozen=True)
class AnswerBounds:
    """UPSTREAM_MAX_EVENT_BYTES, UPSTREAM_MAX_BODY_BYTES, UPSTREAM_MAX_MEDIA_BYTES (config/settings.py)."""

    event: int  # one SSE line, or one event's data
    body: int  # a JSON answer read whole (a chat answer, embeddings, a ranking, a model list)
    # Audio or an image, passed on as it arrives or held to be encoded. Larger than a JSON answer: speech of
    # OpenAI's longest input (4,096 characters, ~5 minutes) is ~14 MB as WAV, and an answer of several large
    # images in base64 holds tens of MB; 32 MiB by default, as Workers AI's images were bounded before.
    media: int


def read_whole(chunks: Iterable[bytes], limit: int, who: str, setting: str) -> bytearray:
    """The body of ``chunks``, refused (an UpstreamError naming ``who`` and ``setting``) the moment it
    passes ``limit`` bytes: nothing past the piece that crossed it is read."""
    data = bytearray()
    for piece in chunks:
        data += piece
        if len(data) > limit:
            raise too_large(who, limit, setting)
    return data


def read_head(chunks: Iterable[bytes], limit: int = ERROR_BODY_BYTES) -> bytes:
    """At most the first ``limit`` bytes of ``chunks`` (an error body: what it says comes first)."""
    data = bytearray()
    for piece in chunks:
        data += piece[:limit - len(data)]
        if len(data) >= limit:
            break
    return bytes(data)


def capped(chunks: Iterable[bytes], limit: int, who: str, setting: str) -> Iterable[bytes]:
    """``chunks`` passed on as they come, until more than ``limit`` bytes have come: then an UpstreamError."""
    total = 0
    for piece in chunks:
        total += len(piece)
        if total > limit:
            raise too_large(who, limit, setting)
        yield piece


def too_large(who: str, limit: int, setting: str, what: str = "an answer") -> UpstreamError:
    return UpstreamError(f"{who} sent {what} larger than aigate reads ({setting}: {limit} bytes)")
