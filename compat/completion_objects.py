"""chat.completion, chat.completion.chunk and text_completion objects, built from a backend's events (and
the model object of /v1/models).

The stream and the folded (non-stream) answer are both made from the same events here, so
they cannot disagree.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from backends.base import Event, Finish, TextDelta, ToolCall, Usage, Written


@dataclass(frozen=True)
class Completion:
    """What every chunk of one answer shares."""

    model: str
    id: str = field(default_factory=lambda: "chatcmpl-" + secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))


def usage_object(usage: Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens, "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def chunk(c: Completion, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {"id": c.id, "object": "chat.completion.chunk", "created": c.created, "model": c.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def content_chunk(c: Completion, text: str) -> dict[str, Any]:
    return chunk(c, {"content": text})


def stream_chunks(c: Completion, events: Iterator[Event], include_usage: bool) -> Iterator[dict[str, Any]]:
    """The chunk sequence: role first, content deltas, a final chunk with finish_reason, and the
    usage-only chunk (``choices: []``) when the client asked for it."""
    yield chunk(c, {"role": "assistant", "content": ""})
    calls = 0
    for event in events:
        if isinstance(event, TextDelta):
            if event.text:
                yield content_chunk(c, event.text)
        elif isinstance(event, Written):  # its chunks are on the wire already (content_chunk's frame)
            continue
        elif isinstance(event, ToolCall):
            # As OpenAI streams them: id, type and name once, then the arguments; index always.
            yield chunk(c, {"tool_calls": [{"index": calls, "id": event.id, "type": "function",
                                            "function": {"name": event.name, "arguments": ""}}]})
            yield chunk(c, {"tool_calls": [{"index": calls, "function": {"arguments": event.arguments}}]})
            calls += 1
        elif isinstance(event, Finish):
            yield chunk(c, {}, event.reason)
            if include_usage:
                yield {"id": c.id, "object": "chat.completion.chunk", "created": c.created, "model": c.model,
                       "choices": [], "usage": usage_object(event.usage)}
            return
    raise RuntimeError("the backend ended without a finish event")


def fold(c: Completion, events: Iterator[Event]) -> dict[str, Any]:
    """One chat.completion from the same events."""
    parts: list[str] = []
    calls: list[dict[str, Any]] = []
    for event in events:
        if isinstance(event, (TextDelta, Written)):
            parts.append(event.text)
        elif isinstance(event, ToolCall):
            calls.append(tool_call_object(event))
        elif isinstance(event, Finish):
            message: dict[str, Any] = {"role": "assistant", "content": "".join(parts) if parts or not calls else None}
            if calls:
                message["tool_calls"] = calls
            return {
                "id": c.id, "object": "chat.completion", "created": c.created, "model": c.model,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": event.reason}],
                "usage": usage_object(event.usage),
            }
    raise RuntimeError("the backend ended without a finish event")


def text_completion_chunk(c: Completion, text: str, index: int, finish_reason: str | None = None) -> dict[str, Any]:
    return {"id": c.id, "object": "text_completion", "created": c.created, "model": c.model,
            "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}]}


def text_completion_chunks(c: Completion, answers: Iterator[tuple[str, Iterator[Event]]], include_usage: bool
                           ) -> Iterator[dict[str, Any]]:
    """Legacy /v1/completions stream: each prompt's text as choice `index`, one after the other
    (a prompt is echoed first when asked: the caller passes it as the first text). A Written
    event's chunks are on the wire already (text_completion_chunk's frame)."""
    prompt_tokens = completion_tokens = cached_tokens = 0
    for index, (echo, events) in enumerate(answers):
        if echo:
            yield text_completion_chunk(c, echo, index)
        for event in events:
            if isinstance(event, TextDelta) and event.text:
                yield text_completion_chunk(c, event.text, index)
            elif isinstance(event, Finish):
                yield text_completion_chunk(c, "", index, event.reason)
                prompt_tokens += event.usage.prompt_tokens
                completion_tokens += event.usage.completion_tokens
                cached_tokens += event.usage.cached_tokens
    if include_usage:
        yield {"id": c.id, "object": "text_completion", "created": c.created, "model": c.model, "choices": [],
               "usage": usage_object(Usage(prompt_tokens, completion_tokens, cached_tokens))}


def fold_text_completion(c: Completion, answers: Iterator[tuple[str, Iterator[Event]]]) -> dict[str, Any]:
    choices = []
    prompt_tokens = completion_tokens = cached_tokens = 0
    for index, (echo, events) in enumerate(answers):
        parts = [echo]
        for event in events:
            if isinstance(event, TextDelta):
                parts.append(event.text)
            elif isinstance(event, Finish):
                choices.append({"text": "".join(parts), "index": index, "logprobs": None,
                                "finish_reason": event.reason})
                prompt_tokens += event.usage.prompt_tokens
                completion_tokens += event.usage.completion_tokens
                cached_tokens += event.usage.cached_tokens
    return {"id": c.id, "object": "text_completion", "created": c.created, "model": c.model, "choices": choices,
            "usage": usage_object(Usage(prompt_tokens, completion_tokens, cached_tokens))}


def tool_call_object(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def model_object(model_id: str, owned_by: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}


def legacy_function_call(obj: dict[str, Any]) -> dict[str, Any]:
    """A completion or chunk as clients of the deprecated `functions` read it: the first tool call
    as `function_call`, finish reason `function_call` (they know nothing of `tool_calls`)."""
    for choice in obj.get("choices", []):
        message = choice.get("message") or choice.get("delta") or {}
        calls = message.pop("tool_calls", None)
        if calls:
            first = [c for c in calls if c.get("index", 0) == 0]
            if first:
                function = first[0]["function"]
                message["function_call"] = {k: function[k] for k in ("name", "arguments") if k in function}
        if choice.get("finish_reason") == "tool_calls":
            choice["finish_reason"] = "function_call"
    return obj
