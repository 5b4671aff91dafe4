"""The engine's socket protocol: the client sends one request line, the engine answers with one
event line after another (the client acknowledges each but the last with one byte, ACK) and closes
the connection after the last. Every line is a JSON object.

A client that closes its end cancels the generation; the engine notices before its next token.

Handover (a streamed answer, under gunicorn): a request may say ``handover``; the engine then marks
its first event line, if it is text, with ``"handover": true``, and the worker may answer it with
HANDOVER instead of ACK: that byte carries the HTTP client's socket (SCM_RIGHTS) and is followed by
a line with the frame of a text piece (``handover_message``). The engine writes the following text
pieces to the client itself; at the first other event (or when the client fails) it sends a
``written`` line (the text it wrote, how many pieces, and ``client``: null, ``client_gone`` or
``client_too_slow``), and the protocol goes on as before. A worker that must end the answer while the
engine writes shuts down its sending side and waits for the engine to close the connection.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import asdict
from typing import Any

import msgspec

from backends.base import (BackendError, ChatRequest, ClientStream, ContextLengthExceeded, Event, Finish, ImageTooLarge,
                           InvalidImage, InvalidRequest, NotSupportedByModel, QueueFull, QueueTimeout, TextDelta,
                           TooManyImages, ToolCall, ToolsNotSupported, Unavailable, UnsupportedContent, Usage, Written)

MAX_LINE = 64 * 1024 * 1024  # a request line; MAX_BODY_BYTES bounds it long before this (an image goes as the
# model's own image_size squared x 3 bytes of pixels in base64: 5 MB for GLM-4V's 1120 px)
MAX_FRAME = 64 * 1024  # a handover frame: a text piece's frame split around its text (a few hundred bytes)
ACK = b"\x06"  # the client's answer to each event but the last: passed on, send the next
HANDOVER = b"\x0e"  # instead of ACK, with the HTTP client's socket: write the text pieces to it yourself

# The errors the engine may answer with, by name on the wire.
ERRORS: dict[str, type[BackendError]] = {cls.__name__: cls for cls in (
    BackendError, InvalidRequest, ContextLengthExceeded, NotSupportedByModel, ToolsNotSupported, UnsupportedContent,
    InvalidImage, ImageTooLarge, TooManyImages, QueueFull, QueueTimeout, Unavailable)}


# msgspec: an event line is written and read once per token, and that time is taken from the model.
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


def encode(obj: dict[str, Any]) -> bytes:
    try:
        return _encoder.encode(obj) + b"\n"
    except UnicodeEncodeError:  # a lone surrogate a client sent (JSON allows "\ud800"): as an escape
        return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    try:
        obj = _decoder.decode(line)
    except msgspec.DecodeError:  # msgspec refuses the escape of a lone surrogate; the standard library reads it
        obj = json.loads(line)
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    return obj


class BadMessage(ValueError):
    """A line that is not what the protocol says (too long, not JSON, not the fields it needs)."""


def read_line(sock: socket.socket, limit: int, seconds: float) -> bytes:
    """One line from ``sock``, whole within ``seconds`` and at most ``limit`` bytes (b"" if the peer
    closes before sending anything). Raises BadMessage, TimeoutError or OSError. Nothing may follow
    the line: the peer waits for an answer. Leaves ``sock``'s timeout changed."""
    deadline = time.monotonic() + seconds
    line = bytearray()
    while True:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        block = sock.recv(min(256 * 1024, limit + 1 - len(line)))
        if not block:
            if line:
                raise BadMessage(f"the peer closed after {len(line)} bytes of a line")
            return b""
        end = block.find(b"\n")
        line += block
        if end >= 0:
            if end != len(block) - 1:
                raise BadMessage("bytes after a line, before any answer")
            return bytes(line)
        if len(line) > limit:
            raise BadMessage(f"a line longer than {limit} bytes")


def parse_request(line: bytes) -> tuple[str, ChatRequest | list[int] | None, bool]:
    """A request line: its op ("status", "generate", "tokenize" or "detokenize"), what it carries (the
    request to generate or tokenize, the ids to detokenize) and whether it may be handed over. Raises
    BadMessage."""
    try:
        message = decode(line)
        op = message.get("op")
        if op == "status":
            return op, None, False
        if op == "generate":
            return op, chat_request(message["request"]), bool(message.get("handover"))
        if op == "tokenize":
            return op, chat_request(message["request"]), False
        if op == "detokenize":
            return op, msgspec.convert(message["tokens"], list[int]), False
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, msgspec.ValidationError) as exc:
        raise BadMessage(f"a malformed request ({type(exc).__name__}: {str(exc)[:200]})") from None
    raise BadMessage(f"an unknown op {str(op)[:100]!r}")


def tokenize_request(request: ChatRequest) -> dict[str, Any]:
    """The request's prompt as token ids, answered {"tokens": [...], "positions": n, "context": n}."""
    return {"op": "tokenize", "request": asdict(request)}


def detokenize_request(tokens: list[int]) -> dict[str, Any]:
    """The text of token ids, answered {"text": "..."}."""
    return {"op": "detokenize", "tokens": tokens}


def answer(message: dict[str, Any]) -> dict[str, Any]:
    """A one-line answer (tokenize, detokenize); an error line is raised."""
    if "error" in message:
        event(message)
    return message


def generate_request(request: ChatRequest, handover: bool = False) -> dict[str, Any]:
    return {"op": "generate", "request": asdict(request), "handover": handover}


def handover_message(stream: ClientStream) -> dict[str, Any]:
    frame = stream.frame
    return {"prefix": frame.prefix.decode(), "suffix": frame.suffix.decode(), "number": frame.number,
            "after_number": frame.after_number.decode(), "chunked": stream.chunked,
            "write_timeout": stream.write_timeout}


def written(message: dict[str, Any]) -> Written:
    return Written(message["written"], message["deltas"])


def chat_request(fields: dict[str, Any]) -> ChatRequest:
    """The request a generate line carries, every field of the type it is declared with (a field of
    another type raises msgspec.ValidationError, not a failure deep in the model's code)."""
    return msgspec.convert(fields, ChatRequest)


def event_message(event: Event) -> dict[str, Any]:
    if isinstance(event, TextDelta):
        return {"text": event.text}
    if isinstance(event, ToolCall):
        return {"tool_call": asdict(event)}
    if isinstance(event, Finish):
        return {"finish": event.reason, "usage": asdict(event.usage), "stop_sequence": event.stop_sequence}
    raise TypeError(f"the engine does not send {type(event).__name__} events")


def error_message(exc: BackendError) -> dict[str, Any]:
    kind = type(exc).__name__ if type(exc).__name__ in ERRORS else "BackendError"
    return {"error": kind, "message": exc.message, "param": exc.param, "retry_after": exc.retry_after}


def event(message: dict[str, Any]) -> Event:
    """The event a line stands for; an error line is raised."""
    if "text" in message:
        return TextDelta(message["text"])
    if "tool_call" in message:
        return ToolCall(**message["tool_call"])
    if "finish" in message:
        return Finish(message["finish"], Usage(**message["usage"]), message.get("stop_sequence"))
    if "error" in message:
        cls = ERRORS.get(message["error"], BackendError)
        raise cls(message["message"], param=message.get("param"), retry_after=message.get("retry_after"))
    raise ValueError(f"unknown engine message {sorted(message)}")
