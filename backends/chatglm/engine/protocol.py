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

Images later (GLM-4V): the worker decodes an image only once the engine's line has taken the request,
so a request refused (the line full, two images, a prompt too long) costs no decode. Such a request
says ``images_later`` (how many images, and the side in pixels they will have) and carries each image
as an empty placeholder. Once it has its place in line, the engine sends ``{"send_images": n}``; the
worker answers with one line ``{"images": [pixels, ...]}`` (each image's raw RGB pixels, base64), or
closes the connection (a bad image: its own client hears why). The events follow as usual.

Choices and logprobs (a request for n > 1 choices, or logprobs): each event line past the first choice says
its ``choice``; a text line carries the ``logprobs`` of the tokens whose text it completes, each
``[token, logprob, bytes as ints, [[token, logprob, bytes], ...]]``. The answer ends with the last
choice's Finish (the others are acknowledged like any event). Such answers are never handed over: the
writer's frame knows one choice and no logprobs.

Models (hosts.py): a generate or tokenize line's request names its model (``model``, a configured id), a
detokenize line says ``model``; an id the engine does not know gets its default model. The status answer
(``{"op": "status"}``) says ``loaded`` (the engine has started: its default model's first load succeeded),
``error``, the totals ``running`` and ``waiting``, and under ``models`` each model's ``id``, ``state``
(unloaded, loading, loaded, failed), ``error``, ``running``, ``waiting`` (in its line, or for its load),
``controls`` and ``constrains``.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import msgspec

from backends.base import (
    BackendError,
    ChatRequest,
    ClientStream,
    ContextLengthExceeded,
    Event,
    Finish,
    ImageInput,
    ImageTooLarge,
    InvalidImage,
    InvalidRequest,
    NotSupportedByModel,
    QueueFull,
    QueueTimeout,
    TextDelta,
    TokenLogprob,
    ToolCall,
    ToolsNotSupported,
    TooManyImages,
    TopLogprob,
    Unavailable,
    UnsupportedContent,
    Usage,
    Written,
)

MAX_LINE = 64 * 1024 * 1024  # a request or images line; MAX_BODY_BYTES bounds a request long before this (an image
# goes as the model's own image_size squared x 3 bytes of pixels in base64: 5 MB for GLM-4V's 1120 px)
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


@dataclass(frozen=True)
class ImagesLater:
    """What a request whose images come later says of them."""

    count: int
    size: int  # each image is size x size pixels


@dataclass(frozen=True)
class Generate:
    """A generate line: the request, whether it may be handed over, and its images to come, if any."""

    request: ChatRequest
    handover: bool = False
    images_later: ImagesLater | None = None


@dataclass(frozen=True)
class Tokenize:
    """A tokenize line: the request whose prompt the model's tokenizer reads."""

    request: ChatRequest


@dataclass(frozen=True)
class Detokenize:
    """A detokenize line: the ids whose text is asked for, and of which model's vocabulary."""

    tokens: list[int]
    model: str = ""


def parse_request(line: bytes) -> Generate | Tokenize | Detokenize | None:
    """A request line: None for a status request, else what to do. Raises BadMessage."""
    try:
        message = decode(line)
        op = message.get("op")
        if op == "status":
            return None
        if op == "generate":
            later = message.get("images_later")
            return Generate(chat_request(message["request"]), bool(message.get("handover")),
                            None if later is None else msgspec.convert(later, ImagesLater))
        if op == "tokenize":
            return Tokenize(chat_request(message["request"]))
        if op == "detokenize":
            return Detokenize(msgspec.convert(message["tokens"], list[int]), str(message.get("model", "")))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, msgspec.ValidationError) as exc:
        raise BadMessage(f"a malformed request ({type(exc).__name__}: {str(exc)[:200]})") from None
    raise BadMessage(f"an unknown op {str(op)[:100]!r}")


def generate_request(request: ChatRequest, handover: bool = False,
                     images_later: ImagesLater | None = None) -> dict[str, Any]:
    line = {"op": "generate", "request": asdict(request), "handover": handover}
    if images_later is not None:
        line["images_later"] = asdict(images_later)
    return line


def without_images(request: ChatRequest) -> ChatRequest:
    """``request`` with each image an empty placeholder, for a generate line with ``images_later``."""
    return replace(request, messages=tuple(replace(m, images=tuple(ImageInput("") for _ in m.images)) if m.images
                                           else m for m in request.messages))


def with_images(request: ChatRequest, line: bytes, size: int) -> ChatRequest:
    """``request`` with its placeholders filled from an images line (their pixels are checked where they
    are used: Model.image). Raises BadMessage."""
    try:
        pixels = msgspec.convert(decode(line)["images"], list[str])
    except (ValueError, KeyError, TypeError, RecursionError, msgspec.ValidationError) as exc:
        raise BadMessage(f"a malformed images line ({type(exc).__name__})") from None
    wanted = sum(len(m.images) for m in request.messages)
    if len(pixels) != wanted:
        raise BadMessage(f"{len(pixels)} image(s) sent for {wanted}")
    given = iter(pixels)
    return replace(request, messages=tuple(
        replace(m, images=tuple(ImageInput(next(given), size, size) for _ in m.images)) if m.images else m
        for m in request.messages))


def tokenize_request(request: ChatRequest) -> dict[str, Any]:
    """The request's prompt as token ids, answered {"tokens": [...], "positions": n, "context": n}."""
    return {"op": "tokenize", "request": asdict(request)}


def detokenize_request(tokens: list[int], model: str = "") -> dict[str, Any]:
    """The text of token ids in ``model``'s vocabulary, answered {"text": "..."}."""
    return {"op": "detokenize", "tokens": tokens, "model": model}


def answer(message: dict[str, Any]) -> dict[str, Any]:
    """A one-line answer (tokenize, detokenize); an error line is raised."""
    if "error" in message:
        event(message)
    return message


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
    """An event's line; a choice past the first and logprobs only where there are some (a plain answer's
    text lines stay as short as they were)."""
    line: dict[str, Any]
    if isinstance(event, TextDelta):
        line = {"text": event.text}
        if event.logprobs:
            line["logprobs"] = [_logprob_entry(e) for e in event.logprobs]
    elif isinstance(event, ToolCall):
        return {"tool_call": asdict(event)}
    elif isinstance(event, Finish):
        line = {"finish": event.reason, "usage": asdict(event.usage), "stop_sequence": event.stop_sequence}
    else:
        raise TypeError(f"the engine does not send {type(event).__name__} events")
    if event.choice:
        line["choice"] = event.choice
    return line


# A logprob entry on the line: [token, logprob, bytes as a list of ints (JSON has no raw bytes), top entries].
def _logprob_entry(entry: TokenLogprob) -> list[Any]:
    return [entry.token, entry.logprob, list(entry.raw), [[t.token, t.logprob, list(t.raw)] for t in entry.top]]


def _token_logprob(entry: list[Any]) -> TokenLogprob:
    token, logprob, raw, top = entry
    return TokenLogprob(token, logprob, bytes(raw), tuple(TopLogprob(t, lp, bytes(r)) for t, lp, r in top))


def error_message(exc: BackendError) -> dict[str, Any]:
    kind = type(exc).__name__ if type(exc).__name__ in ERRORS else "BackendError"
    return {"error": kind, "message": exc.message, "param": exc.param, "retry_after": exc.retry_after}


def event(message: dict[str, Any]) -> Event:
    """The event a line stands for; an error line is raised."""
    if "text" in message:
        return TextDelta(message["text"], tuple(_token_logprob(e) for e in message.get("logprobs", ())),
                         message.get("choice", 0))
    if "tool_call" in message:
        return ToolCall(**message["tool_call"])
    if "finish" in message:
        return Finish(message["finish"], Usage(**message["usage"]), message.get("stop_sequence"),
                      message.get("choice", 0))
    if "error" in message:
        cls = ERRORS.get(message["error"], BackendError)
        raise cls(message["message"], param=message.get("param"), retry_after=message.get("retry_after"))
    raise ValueError(f"unknown engine message {sorted(message)}")
