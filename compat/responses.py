"""chat.completion and chat.completion.chunk objects, built from a backend's events.

The stream and the folded (non-stream) answer are both made from the same events here, so
they cannot disagree.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from backends.base import Event, Finish, TextDelta, Usage


@dataclass(frozen=True)
class Completion:
    """What every chunk of one answer shares."""

    model: str
    id: str = field(default_factory=lambda: "chatcmpl-" + secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))


def usage_object(usage: Usage) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}


def chunk(c: Completion, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {"id": c.id, "object": "chat.completion.chunk", "created": c.created, "model": c.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def stream_chunks(c: Completion, events: Iterator[Event], include_usage: bool) -> Iterator[dict[str, Any]]:
    """The chunk sequence: role first, content deltas, a final chunk with finish_reason, and the
    usage-only chunk (``choices: []``) when the client asked for it."""
    yield chunk(c, {"role": "assistant", "content": ""})
    for event in events:
        if isinstance(event, TextDelta):
            if event.text:
                yield chunk(c, {"content": event.text})
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
    for event in events:
        if isinstance(event, TextDelta):
            parts.append(event.text)
        elif isinstance(event, Finish):
            return {
                "id": c.id, "object": "chat.completion", "created": c.created, "model": c.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                             "logprobs": None, "finish_reason": event.reason}],
                "usage": usage_object(event.usage),
            }
    raise RuntimeError("the backend ended without a finish event")


def model_object(model_id: str, owned_by: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}
