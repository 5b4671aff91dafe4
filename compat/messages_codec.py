"""A backend's events as the Anthropic Messages API's objects: the stream's events in Anthropic's order
(`message_start`; for each content block `content_block_start`, its `content_block_delta`s,
`content_block_stop`, with one `ping` after the first block's start; `message_delta` with the stop
reason and usage; `message_stop`), or, folded, the `message` they make. The folded message is the
one the stream builds, so the two cannot disagree. Errors in Anthropic's shape are made here too.

Shapes follow the `anthropic` SDK's types (message.py, raw_message_stream_event.py). Usage is
Anthropic's: `input_tokens` are the prompt tokens not read from a cache, `cache_read_input_tokens`
those the engine reused, so that their sum is the whole prompt (what count_tokens says). The prompt is
counted only once the answer has ended: `message_start` says 0, `message_delta` the counts.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any

from backends.base import Event, Finish, PieceFrame, TextDelta, ToolCall, Usage, Written
from compat import sse
from compat.errors import APIError

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
_NO_USAGE = Usage(0, 0)

# HTTP status -> Anthropic's error type (the SDK's ErrorType; its statuses are kept as aigate answers them).
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 408: "timeout_error", 413: "request_too_large", 429: "rate_limit_error",
               503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error"}


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def error_body(status: int, message: str, request_id: str | None = None) -> dict[str, Any]:
    """`{"type": "error", "error": {"type", "message"}}`, and the request's id where known."""
    body: dict[str, Any] = {"type": "error", "error": {"type": error_type(status), "message": message}}
    if request_id:
        body["request_id"] = request_id
    return body


def usage_object(usage: Usage) -> dict[str, Any]:
    return {"input_tokens": usage.prompt_tokens - usage.cached_tokens, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": usage.cached_tokens, "output_tokens": usage.completion_tokens}


def tool_input(arguments: str) -> dict[str, Any]:
    """A tool call's arguments as the object Anthropic's `input` is. A model that wrote something else
    has it kept under `arguments`, where the client (and, sent back, the model) can see it."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        value = arguments
    return value if isinstance(value, dict) else {"arguments": value}


def frame(event: dict[str, Any]) -> bytes:
    """One server-sent event, named by its type, as Anthropic sends them."""
    return b"event: " + str(event["type"]).encode() + b"\n" + sse.encode(event)


class MessageStream:
    """One answer's events; `.final` is the message once it has ended."""

    def __init__(self, model: str, first_tool_call_only: bool = False) -> None:
        self.id, self.model = "msg_" + secrets.token_hex(12), model
        self.final: dict[str, Any] | None = None
        self._content: list[dict[str, Any]] = []  # the blocks so far
        self._text: list[str] = []  # the open text block's pieces
        self._writing: int | None = None  # the index of the open text block
        self._first_only = first_tool_call_only
        self._pinged = False

    def message(self, stop_reason: str | None, stop_sequence: str | None, usage: Usage) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": list(self._content), "stop_reason": stop_reason, "stop_sequence": stop_sequence,
                "usage": usage_object(usage)}

    def events(self, events: Iterator[Event]) -> Iterator[dict[str, Any]]:
        yield {"type": "message_start", "message": self.message(None, None, _NO_USAGE)}
        calls = 0
        for ev in events:
            if isinstance(ev, TextDelta):
                if not ev.text:
                    continue
                if self._writing is None:
                    yield from self._start({"type": "text", "text": ""})
                    self._writing = len(self._content) - 1
                self._text.append(ev.text)
                yield self._text_delta(self._writing, ev.text)
            elif isinstance(ev, Written):  # pieces the backend wrote itself, in this open block
                self._text.append(ev.text)
            elif isinstance(ev, ToolCall):
                yield from self._close_text()
                if calls and self._first_only:
                    continue
                calls += 1
                arguments = tool_input(ev.arguments)
                yield from self._start({"type": "tool_use", "id": ev.id, "name": ev.name, "input": {}})
                index = len(self._content) - 1
                yield {"type": "content_block_delta", "index": index,
                       "delta": {"type": "input_json_delta", "partial_json": json.dumps(arguments, ensure_ascii=False)}}
                self._content[index] = {**self._content[index], "input": arguments}
                yield {"type": "content_block_stop", "index": index}
            elif isinstance(ev, Finish):
                yield from self._close_text()
                if not self._pinged:
                    yield {"type": "ping"}
                stop_sequence = ev.stop_sequence if ev.reason == "stop" else None
                reason = "stop_sequence" if stop_sequence else STOP_REASONS[ev.reason]
                self.final = self.message(reason, stop_sequence, ev.usage)
                yield {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": stop_sequence},
                       "usage": self.final["usage"]}
                yield {"type": "message_stop"}
                return
        raise RuntimeError("the backend ended without a finish event")

    def piece_frame(self) -> PieceFrame | None:
        """The frame of the next text delta, for a backend that writes them itself (None: no text block
        is open)."""
        if self._writing is None:
            return None
        return sse.piece_frame(frame(self._text_delta(self._writing, sse.PIECE)))

    def failed(self, error: APIError) -> Iterator[dict[str, Any]]:
        """After the first byte a failure is in-band: an `error` event, and nothing after it."""
        yield error_body(error.status, error.message)

    def _start(self, block: dict[str, Any]) -> Iterator[dict[str, Any]]:
        self._content.append(block)
        yield {"type": "content_block_start", "index": len(self._content) - 1, "content_block": block}
        if not self._pinged:
            self._pinged = True
            yield {"type": "ping"}

    def _close_text(self) -> Iterator[dict[str, Any]]:
        if self._writing is None:
            return
        index, self._writing = self._writing, None
        self._content[index] = {"type": "text", "text": "".join(self._text)}
        self._text = []
        yield {"type": "content_block_stop", "index": index}

    @staticmethod
    def _text_delta(index: int, text: str) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}}


def token_count(events: Iterator[Event]) -> dict[str, int]:
    """count_tokens' answer: the prompt tokens of the answer the events end with."""
    for ev in events:
        if isinstance(ev, Finish):
            return {"input_tokens": ev.usage.prompt_tokens}
    raise RuntimeError("the backend ended without a finish event")

__all__ = ["ERROR_TYPES", "MessageStream", "error_body", "error_type", "frame", "token_count", "tool_input",
           "usage_object"]
