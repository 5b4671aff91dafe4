"""An upstream's answer (a stream of chunks, or one JSON body) as aigate's events.

Real servers bend the format: chatglm.cpp's chunks lack id/created, its stream has no
`data: [DONE]`; some send usage in every chunk, nulls for absent fields, `delta.reasoning_content`,
or a whole JSON body to a stream request. Only the parts that mean something are read (text,
tool-call pieces, finish reason, usage), so the road writes aigate's own shapes, model id and
[DONE] whatever came in."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Iterator
from typing import Any, Literal

from backends.base import (
    ChatRequest,
    Event,
    Finish,
    FinishReason,
    TextDelta,
    ToolCall,
    UpstreamError,
    Usage,
    estimate_tokens,
)
from backends.sse_reader import JsonFrames, sse_data
from backends.stops import StopMatcher

Kind = Literal["chat", "text"]  # /chat/completions or the legacy /completions


class Normaliser:
    """One answer's reading. ``estimated`` says, once the Finish is out, that usage was guessed."""

    def __init__(self, request: ChatRequest, kind: Kind, upstream: str, max_event: int) -> None:
        self.request, self.kind, self.upstream = request, kind, upstream
        self.max_event = max_event  # UPSTREAM_MAX_EVENT_BYTES: the longest line or event read
        self.stop = StopMatcher(request.stop)
        self.calls: dict[int, dict[str, str]] = {}
        self.usage: dict[str, Any] = {}
        self.finish: str | None = None
        self.stopped_by: str | None = None  # the stop string the upstream says ended it (vLLM's stop_reason)
        self.chars = 0
        self.estimated = False

    # -- the two shapes of an answer -----------------------------------------------------------

    def stream(self, chunks: Iterable[bytes]) -> Iterator[Event]:
        frames = JsonFrames(sse_data(chunks, self.max_event, f"upstream {self.upstream}"),
                            f"upstream {self.upstream} sent a malformed stream chunk")
        for frame in frames:
            self._failure(frame)
            self._usage(frame)
            choice = _first(frame.get("choices"))
            if choice is None:  # a usage-only chunk (include_usage), or a keep-alive
                continue
            self.finish = _str(choice.get("finish_reason")) or self.finish
            self._stopped_by(choice)
            part = choice.get("delta") if self.kind == "chat" else choice
            part = part if isinstance(part, dict) else {}
            self._tool_pieces(part.get("tool_calls"))
            out = self._text(_str(part.get("content" if self.kind == "chat" else "text")))
            if out:
                yield TextDelta(out)
            if self.stop.stopped:
                break  # closing the response stops the upstream's generation with it
        if not frames.done and self.finish is None and not self.stop.stopped:
            raise UpstreamError(f"upstream {self.upstream}'s stream ended before the answer did (truncated)")
        yield from self._end()

    def whole(self, body: Any) -> Iterator[Event]:
        if not isinstance(body, dict):
            raise UpstreamError(f"upstream {self.upstream} answered with something that is not a JSON object")
        self._failure(body)
        self._usage(body)
        choice = _first(body.get("choices"))
        if choice is None:
            raise UpstreamError(f"upstream {self.upstream} answered without a choice")
        self.finish = _str(choice.get("finish_reason"))
        self._stopped_by(choice)
        part = choice.get("message") if self.kind == "chat" else choice
        part = part if isinstance(part, dict) else {}
        self._tool_pieces(part.get("tool_calls"))
        out = self._text(_str(part.get("content" if self.kind == "chat" else "text")))
        if out:
            yield TextDelta(out)
        yield from self._end()

    # -- pieces ------------------------------------------------------------------------------------

    def _failure(self, frame: dict[str, Any]) -> None:
        error = frame.get("error")
        if error:
            message = error.get("message") if isinstance(error, dict) else error
            raise UpstreamError(f"upstream {self.upstream} failed mid-answer: {str(message)[:300]}")

    def _usage(self, frame: dict[str, Any]) -> None:
        usage = frame.get("usage")
        if isinstance(usage, dict) and (usage.get("prompt_tokens") or usage.get("completion_tokens")):
            self.usage = usage  # the last one wins: servers that send it in every chunk count up to it

    def _stopped_by(self, choice: dict[str, Any]) -> None:
        said = choice.get("stop_reason")
        if isinstance(said, str) and said in self.request.stop:
            self.stopped_by = said

    def _text(self, text: str) -> str:
        self.chars += len(text)
        return self.stop.feed(text) if text else ""

    def _tool_pieces(self, items: Any) -> None:
        """OpenAI's tool-call deltas: {index, id, function: {name, arguments}} with arguments in pieces
        (a whole answer's calls are one piece each, and may lack index and id)."""
        if not isinstance(items, list):
            return
        for position, item in enumerate(items):
            if not isinstance(item, dict):
                continue
            function: dict[str, Any] = item["function"] if isinstance(item.get("function"), dict) else {}
            index = item["index"] if isinstance(item.get("index"), int) else len(self.calls) + position
            call = self.calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
            call["id"] = _str(item.get("id")) or call["id"]
            call["name"] = _str(function.get("name")) or call["name"]
            arguments = function.get("arguments")
            if arguments is not None and not isinstance(arguments, str):  # an object where JSON text belongs
                arguments = json.dumps(arguments, ensure_ascii=False)
            call["arguments"] += arguments or ""
            self.chars += len(_str(function.get("name"))) + len(arguments or "")

    def _end(self) -> Iterator[Event]:
        tail = self.stop.flush()
        if tail:
            yield TextDelta(tail)
        calls = [ToolCall(c["id"] or "call_" + secrets.token_hex(12), c["name"], c["arguments"] or "{}")
                 for _, c in sorted(self.calls.items()) if c["name"]]
        yield from calls
        usage = self._final_usage()
        yield Finish(self._reason(bool(calls), usage), usage, self.stop.matched or self.stopped_by)

    def _final_usage(self) -> Usage:
        prompt, completion = _int(self.usage.get("prompt_tokens")), _int(self.usage.get("completion_tokens"))
        if not prompt and not completion:
            self.estimated = True
            return Usage(self.request.estimated_prompt_tokens, estimate_tokens(self.chars))
        details = self.usage.get("prompt_tokens_details")
        cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
        return Usage(prompt, completion, min(cached, prompt))

    def _reason(self, called: bool, usage: Usage) -> FinishReason:
        if called:
            return "tool_calls"
        if self.stop.stopped or self.finish == "stop":
            return "stop"
        if self.finish == "length":
            return "length"
        limit = self.request.max_tokens
        return "length" if limit is not None and usage.completion_tokens >= limit and not self.estimated else "stop"


def _first(choices: Any) -> dict[str, Any] | None:
    return choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _int(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else 0
