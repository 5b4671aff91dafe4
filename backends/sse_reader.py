"""An incremental reader of server-sent events, for upstreams that stream (Workers AI, and
OpenAI-compatible servers): each event's data, and the JSON objects those carry.

Network chunks split events anywhere, even inside a JSON payload or a CRLF pair, so bytes are
buffered until a line is complete and a blank line completes an event. Neither may grow past
UPSTREAM_MAX_EVENT_BYTES: a server that sends an endless line is refused at that bound, not read
to the end.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from backends.base import UpstreamError
from backends.bounded import too_large

EVENT_SETTING = "UPSTREAM_MAX_EVENT_BYTES"


def sse_data(chunks: Iterable[bytes], max_event: int, who: str) -> Iterator[str]:
    """Yield the data of each event (multi-line data joined with "\\n"); comments and other
    fields are skipped. An event cut off by the end of the input is yielded too: the caller
    decides whether a stream that ends without its terminator is complete. A line, or an event's
    data, longer than ``max_event`` bytes is an UpstreamError naming ``who``."""
    line = bytearray()  # the line being received: only it is searched for its end, never what came before
    data: list[bytes] = []
    size = 0  # of data
    for chunk in chunks:
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            line += chunk[start:end]
            start = end + 1
            if len(line) > max_event:
                raise too_large(who, max_event, EVENT_SETTING, "a line")
            if line.endswith(b"\r"):
                del line[-1]
            if not line:  # a blank line ends the event
                if data:
                    yield b"\n".join(data).decode("utf-8", "replace")
                    data, size = [], 0
            elif line.startswith(b"data:"):
                data.append(_value(line))
                size += len(data[-1]) + 1
                if size > max_event:
                    raise too_large(who, max_event, EVENT_SETTING, "an event")
            line.clear()
        line += chunk[start:]
        if len(line) > max_event:
            raise too_large(who, max_event, EVENT_SETTING, "a line")
    if line.endswith(b"\r"):
        del line[-1]
    if line.startswith(b"data:"):
        data.append(_value(line))
    if data:
        yield b"\n".join(data).decode("utf-8", "replace")


def _value(line: bytearray) -> bytes:
    """A data line's value: after "data:" and the one space that may follow it."""
    return bytes(line[6:] if line.startswith(b"data: ") else line[5:])


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
