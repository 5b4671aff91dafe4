"""chat.completion, chat.completion.chunk and text_completion objects, built from a backend's events (and
the model object of /v1/models).

The stream and the folded (non-stream) answer are both made from the same events here, so
they cannot disagree.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from backends.base import Event, Finish, TextDelta, TokenLogprob, ToolCall, TopLogprob, Usage, Written


@dataclass(frozen=True)
class Completion:
    """What every chunk of one answer shares."""

    model: str
    id: str = field(default_factory=lambda: "chatcmpl-" + secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))


def usage_object(usage: Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens, "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def summed(usages: Iterable[Usage]) -> Usage:
    """The usage of several answers together (choices count the prompt once: their Finishes say so)."""
    every = list(usages)
    return Usage(sum(u.prompt_tokens for u in every), sum(u.completion_tokens for u in every),
                 sum(u.cached_tokens for u in every))


def top_logprob_object(t: TopLogprob) -> dict[str, Any]:
    return {"token": t.token, "logprob": t.logprob, "bytes": list(t.raw)}


def token_logprob_object(t: TokenLogprob) -> dict[str, Any]:
    """One entry of chat's ``logprobs.content`` (openai-python's ChatCompletionTokenLogprob)."""
    return {"token": t.token, "logprob": t.logprob, "bytes": list(t.raw),
            "top_logprobs": [top_logprob_object(a) for a in t.top]}


def chat_logprobs(entries: Iterable[TokenLogprob]) -> dict[str, Any]:
    return {"content": [token_logprob_object(t) for t in entries], "refusal": None}


def chunk(c: Completion, delta: dict[str, Any], finish_reason: str | None = None, index: int = 0,
          logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": c.id, "object": "chat.completion.chunk", "created": c.created, "model": c.model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


def content_chunk(c: Completion, text: str) -> dict[str, Any]:
    return chunk(c, {"content": text})


def stream_chunks(c: Completion, events: Iterator[Event], include_usage: bool, choices: int = 1,
                  logprobs: bool = False) -> Iterator[dict[str, Any]]:
    """The chunk sequence of each of ``choices`` choices in turn (the backend answers them one after
    another): its role first, content deltas (with their tokens' ``logprobs`` when asked), a chunk with its
    finish_reason; then the usage-only chunk (``choices: []``, the choices' usage summed) when the client
    asked for it."""
    index = 0
    yield chunk(c, {"role": "assistant", "content": ""})
    calls = 0
    usages: list[Usage] = []
    for event in events:
        if isinstance(event, TextDelta):
            if event.text:
                yield chunk(c, {"content": event.text}, index=event.choice,
                            logprobs=chat_logprobs(event.logprobs) if logprobs else None)
        elif isinstance(event, Written):  # its chunks are on the wire already (content_chunk's frame)
            continue
        elif isinstance(event, ToolCall):
            # As OpenAI streams them: id, type and name once, then the arguments; index always.
            yield chunk(c, {"tool_calls": [{"index": calls, "id": event.id, "type": "function",
                                            "function": {"name": event.name, "arguments": ""}}]}, index=event.choice)
            yield chunk(c, {"tool_calls": [{"index": calls, "function": {"arguments": event.arguments}}]},
                        index=event.choice)
            calls += 1
        elif isinstance(event, Finish):
            yield chunk(c, {}, event.reason, index=event.choice)
            usages.append(event.usage)
            index, calls = index + 1, 0
            if index < choices:
                yield chunk(c, {"role": "assistant", "content": ""}, index=index)
                continue
            if include_usage:
                yield {"id": c.id, "object": "chat.completion.chunk", "created": c.created, "model": c.model,
                       "choices": [], "usage": usage_object(summed(usages))}
            return
    raise RuntimeError("the backend ended without a finish event")


def fold(c: Completion, events: Iterator[Event], choices: int = 1, logprobs: bool = False) -> dict[str, Any]:
    """One chat.completion from the same events: ``choices`` choices, each ended by its Finish."""
    parts: list[list[str]] = [[] for _ in range(choices)]
    calls: list[list[dict[str, Any]]] = [[] for _ in range(choices)]
    entries: list[list[TokenLogprob]] = [[] for _ in range(choices)]
    out: list[dict[str, Any]] = []
    usages: list[Usage] = []
    for event in events:
        if isinstance(event, TextDelta):
            parts[event.choice].append(event.text)
            entries[event.choice].extend(event.logprobs)
        elif isinstance(event, Written):
            parts[0].append(event.text)
        elif isinstance(event, ToolCall):
            calls[event.choice].append(tool_call_object(event))
        elif isinstance(event, Finish):
            i = event.choice
            message: dict[str, Any] = {"role": "assistant",
                                       "content": "".join(parts[i]) if parts[i] or not calls[i] else None}
            if calls[i]:
                message["tool_calls"] = calls[i]
            out.append({"index": i, "message": message, "logprobs": chat_logprobs(entries[i]) if logprobs else None,
                        "finish_reason": event.reason})
            usages.append(event.usage)
            if len(out) == choices:
                return {"id": c.id, "object": "chat.completion", "created": c.created, "model": c.model,
                        "choices": out, "usage": usage_object(summed(usages))}
    raise RuntimeError("the backend ended without a finish event")


def text_logprobs(entries: Iterable[TokenLogprob], offset: int) -> dict[str, Any]:
    """Legacy completions' ``logprobs`` for tokens whose text starts at ``offset`` of the choice's text:
    each alternative as {token: logprob}, the chosen token among them (OpenAI: up to logprobs + 1)."""
    tokens, logprobs, tops, offsets = [], [], [], []
    for t in entries:
        tokens.append(t.token)
        logprobs.append(t.logprob)
        tops.append({**{a.token: a.logprob for a in t.top}, t.token: t.logprob})
        offsets.append(offset)
        offset += len(t.token)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


def text_completion_chunk(c: Completion, text: str, index: int, finish_reason: str | None = None,
                          logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": c.id, "object": "text_completion", "created": c.created, "model": c.model,
            "choices": [{"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}]}


def text_completion_chunks(c: Completion, answers: Iterator[tuple[str, Iterator[Event]]], include_usage: bool,
                           choices: int = 1, logprobs: bool = False) -> Iterator[dict[str, Any]]:
    """Legacy /v1/completions stream: each prompt's ``choices`` choices in turn, prompt p's choice k as index
    p * choices + k (a prompt is echoed at the start of each of its choices when asked: the caller passes it
    as the first text). A Written event's chunks are on the wire already (text_completion_chunk's frame)."""
    usages: list[Usage] = []
    for p, (echo, events) in enumerate(answers):
        offset = 0
        if echo:
            yield text_completion_chunk(c, echo, p * choices)
        for event in events:
            index = p * choices + event.choice if isinstance(event, (TextDelta, Finish)) else p * choices
            if isinstance(event, TextDelta) and event.text:
                shown = text_logprobs(event.logprobs, offset) if logprobs else None
                offset += len(event.text)
                yield text_completion_chunk(c, event.text, index, logprobs=shown)
            elif isinstance(event, Finish):
                yield text_completion_chunk(c, "", index, event.reason)
                usages.append(event.usage)
                offset = 0
                if echo and event.choice + 1 < choices:
                    yield text_completion_chunk(c, echo, index + 1)
    if include_usage:
        yield {"id": c.id, "object": "text_completion", "created": c.created, "model": c.model, "choices": [],
               "usage": usage_object(summed(usages))}


def fold_text_completion(c: Completion, answers: Iterator[tuple[str, Iterator[Event]]], choices: int = 1,
                         logprobs: bool = False) -> dict[str, Any]:
    out = []
    usages: list[Usage] = []
    for p, (echo, events) in enumerate(answers):
        parts: list[list[str]] = [[echo] for _ in range(choices)]
        entries: list[list[TokenLogprob]] = [[] for _ in range(choices)]
        for event in events:
            if isinstance(event, TextDelta):
                parts[event.choice].append(event.text)
                entries[event.choice].extend(event.logprobs)
            elif isinstance(event, Finish):
                k = event.choice
                out.append({"text": "".join(parts[k]), "index": p * choices + k,
                            "logprobs": text_logprobs(entries[k], len(echo)) if logprobs else None,
                            "finish_reason": event.reason})
                usages.append(event.usage)
    return {"id": c.id, "object": "text_completion", "created": c.created, "model": c.model,
            "choices": sorted(out, key=lambda choice: choice["index"]), "usage": usage_object(summed(usages))}


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
