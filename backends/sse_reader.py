"""An incremental reader of server-sent events, for upstreams that stream (Workers AI, and
OpenAI-compatible servers): each event's data, and the JSON objects those carry.

Network chunks split events anywhere, even inside a JSON payload or a CRLF pair, so bytes are
buffered until a line is complete and a blank line completes an event.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from backends.base import UpstreamError


def sse_data(chunks: Iterable[bytes]) -> Iterator[str]:
    """Yield the data of each event (multi-line data joined with "\\n"); comments and other
    fields are skipped. An event cut off by the end of the input is yielded too: the caller
    decides whether a stream that ends without its terminator is complete."""
    buffer = b""
    data: list[bytes] = []
    for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw.rstrip(b"\r")
            if not line:
                if data:
                    yield b"\n".join(data).decode("utf-8", "replace")
                    data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(b" ") else value)
    line = buffer.rstrip(b"\r")
    if line.startswith(b"data:"):
        data.append(line[5:].lstrip(b" "))
    if data:
        yield b"\n".join(data).decode("utf-8", "replace")


class JsonFrames:
    """The JSON objects of a stream's events (its ``sse_data``), up to its `[DONE]` marker. Iterated
    once; ``done`` then says whether the marker came (a stream that ends without it may be cut
    short: the reader decides). Anything but a JSON object is an UpstreamError saying ``malformed``."""

    def __init__(self, datas: Iterable[str], malformed: str) -> None:
        self._datas, self._malformed = datas, malformed
        self.done = False

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for data in self._datas:
            if data.strip() == "[DONE]":
                self.done = True
                return
            try:
                frame = json.loads(data)
            except (ValueError, RecursionError):
                raise UpstreamError(self._malformed) from None
            if not isinstance(frame, dict):
                raise UpstreamError(self._malformed)
            yield frame
