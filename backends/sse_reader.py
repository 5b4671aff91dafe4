"""An incremental reader of server-sent events, for upstreams that stream (Cloudflare).

Network chunks split events anywhere, even inside a JSON payload or a CRLF pair, so bytes are
buffered until a line is complete and a blank line completes an event.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator


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
