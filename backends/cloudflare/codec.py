"""Workers AI's wire format, without any I/O: the body of a `/ai/run/{model}` call, its answer (a
whole result or stream frames, native or OpenAI-shaped) as events, its errors as typed BackendErrors,
and the model catalogue's entries."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from backends.base import (
    BackendError,
    ChatRequest,
    ContextLengthExceeded,
    Event,
    Finish,
    FinishReason,
    InvalidRequest,
    ModelNotFound,
    SchemaNotMet,
    TextDelta,
    ToolCall,
    UpstreamAuthFailed,
    UpstreamError,
    UpstreamOverCapacity,
    UpstreamQuotaExceeded,
    UpstreamRefused,
    UpstreamTimeout,
    Usage,
    estimate_tokens,
)
from backends.chat_messages import message_json
from backends.sse_reader import JsonFrames
from backends.stops import StopMatcher

CAPACITY_CODES = {3040, 971}  # transient: worth a retry
DAILY_LIMIT_CODES = {3036, 4006}  # the free allocation is used up until 00:00 UTC
UNKNOWN_MODEL_CODES = {5007, 3042}
TOO_LARGE_CODES = {3006}
AUTH_CODES = {10000, 9106, 6111, 7003}  # bad token, malformed header, bad account id
JSON_MODE_FAILED = "JSON Mode couldn't be met"

Scrub = Callable[[str], str]  # removes the account id and token from upstream text


# -- the request ------------------------------------------------------------------------------------

def chat_body(r: ChatRequest, default_max_tokens: int) -> dict[str, Any]:
    # Stream from upstream only when the client streams: a whole answer is one JSON body to read.
    body: dict[str, Any] = {"stream": r.incremental, "max_tokens": r.max_tokens or default_max_tokens}
    if r.response_format is not None:  # JSON mode: a bare schema, and never a stream upstream
        fmt = r.response_format
        body["response_format"] = ({"type": "json_object"} if fmt.schema is None
                                   else {"type": "json_schema", "json_schema": fmt.schema})
        body["stream"] = False
    if r.prompt is None:
        body["messages"] = [message_json(m) for m in r.messages]
    else:  # Workers AI's prompt form; raw skips the chat template: a plain continuation
        body.update(prompt=r.prompt, raw=True)
    if r.tools:  # the OpenAI form, which Workers AI's function-calling models take
        body["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                           "parameters": t.parameters}} for t in r.tools]
    if r.temperature is not None:
        body["temperature"] = r.temperature
    if r.top_p is not None:
        body["top_p"] = max(r.top_p, 0.001)  # some models' minimum
    if r.seed is not None and 1 <= r.seed <= 9_999_999_999:
        body["seed"] = r.seed
    # Classic models take penalties in 0..2 only; OpenAI's negative values mean "none" there.
    if r.frequency_penalty is not None:
        body["frequency_penalty"] = max(r.frequency_penalty, 0.0)
    if r.presence_penalty is not None:
        body["presence_penalty"] = max(r.presence_penalty, 0.0)
    return body


# -- the answer -------------------------------------------------------------------------------------

def result_of(body: Any, scrub: Scrub) -> dict[str, Any]:
    """The `result` of the v4 envelope `{success, result, errors}`; a failure reported inside it raised."""
    if not isinstance(body, dict) or body.get("success") is False or not isinstance(body.get("result"), dict):
        message = scrub(first_message(body))
        if JSON_MODE_FAILED in message:
            raise json_mode_failed(message)
        raise UpstreamError(f"Cloudflare reported a failure: {message}")
    result: dict[str, Any] = body["result"]
    return result


def stream_events(datas: Iterable[str], request: ChatRequest, max_tokens: int, scrub: Scrub) -> Iterator[Event]:
    """The events of a stream's frames (each frame's data, as sse_data yields them)."""
    stop = StopMatcher(request.stop)
    calls = _ToolCalls()
    usage: dict[str, Any] = {}
    finish: str | None = None
    parts = 0
    frames = JsonFrames(datas, "Cloudflare sent a malformed stream event")
    for frame in frames:
        if frame.get("errors") or frame.get("error"):
            raise UpstreamError(f"Cloudflare failed mid-stream: {scrub(first_message(frame))}")
        text, frame_finish, frame_calls = _frame_parts(frame)
        finish = frame_finish or finish
        calls.add(frame_calls)
        usage = frame.get("usage") or usage
        if text:
            parts += 1
            out = stop.feed(text)
            if out:
                yield TextDelta(out)
            if stop.stopped:
                break
    if not frames.done and not stop.stopped:
        raise UpstreamError("the Cloudflare stream ended before its end marker (truncated)")
    tail = stop.flush()
    if tail:
        yield TextDelta(tail)
    yield from calls.events()
    yield Finish(_finish_reason(finish, stop.stopped, usage, max_tokens, bool(calls)), _usage(usage, request, parts),
                 stop.matched)


def whole_events(result: dict[str, Any], request: ChatRequest, max_tokens: int) -> Iterator[Event]:
    """The events of a whole answer's `result`."""
    text, finish, items = _result_parts(result)
    stop = StopMatcher(request.stop)
    text = stop.feed(text) + stop.flush()
    if text:
        yield TextDelta(text)
    calls = _ToolCalls()
    calls.add(items)
    yield from calls.events()
    usage = result.get("usage") or {}
    yield Finish(_finish_reason(finish, stop.stopped, usage, max_tokens, bool(calls)),
                 _usage(usage, request, estimate_tokens(len(text))), stop.matched)


def embeddings_of(result: dict[str, Any], count: int, model: str) -> list[list[float]]:
    """`{"shape": [n, d], "data": [[...], ...]}` -> the n vectors."""
    data = result.get("data")
    if not (isinstance(data, list) and len(data) == count
            and all(isinstance(v, list) and all(isinstance(x, (int, float)) for x in v) for v in data)):
        raise UpstreamError(f"Cloudflare's answer for {model} holds no embeddings (is it an embedding model?)")
    return data


def _frame_parts(frame: dict[str, Any]) -> tuple[str, str | None, list[Any]]:
    """Text, finish reason and tool-call pieces of one stream event: native (`response`,
    `tool_calls`), or an OpenAI chunk (`choices[0].delta`)."""
    choices = frame.get("choices")
    if frame.get("response") is None and isinstance(choices, list) and choices and isinstance(choices[0], dict):
        delta = choices[0].get("delta") or {}
        return _as_text(delta.get("content")), choices[0].get("finish_reason"), _list(delta.get("tool_calls"))
    return _as_text(frame.get("response")), frame.get("finish_reason"), _list(frame.get("tool_calls"))


def _result_parts(result: dict[str, Any]) -> tuple[str, str | None, list[Any]]:
    """Text, finish reason and tool calls of a whole answer: `result.response` (a string, or an
    object in JSON mode) with `result.tool_calls`, or an OpenAI chat.completion inside `result`."""
    choices = result.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        message = choices[0].get("message") or {}
        return (_as_text(message.get("content")), choices[0].get("finish_reason"),
                _list(message.get("tool_calls")) or _list(result.get("tool_calls")))
    return _as_text(result.get("response")), None, _list(result.get("tool_calls"))


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


class _ToolCalls:
    """Tool calls gathered from either of Cloudflare's shapes: flat `{name, arguments: object}`,
    or OpenAI's `{index, id, type, function: {name, arguments: string}}`, whose arguments may
    arrive in pieces over several stream events."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, str]] = {}

    def __bool__(self) -> bool:
        return any(c.get("name") for c in self._calls.values())

    def add(self, items: list[Any]) -> None:
        for item in items:
            if not isinstance(item, dict):
                continue
            function: dict[str, Any] = item["function"] if isinstance(item.get("function"), dict) else item
            index: int = item["index"] if isinstance(item.get("index"), int) else len(self._calls)
            call = self._calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
            if isinstance(item.get("id"), str):
                call["id"] = item["id"]
            if isinstance(function.get("name"), str):
                call["name"] = function["name"]
            arguments = function.get("arguments")
            if isinstance(arguments, str):
                call["arguments"] += arguments
            elif arguments is not None:
                call["arguments"] = json.dumps(arguments, ensure_ascii=False)

    def events(self) -> list[ToolCall]:
        return [ToolCall(c["id"] or "call_" + secrets.token_hex(12), c["name"], c["arguments"] or "{}")
                for _, c in sorted(self._calls.items()) if c["name"]]


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _finish_reason(upstream: str | None, stopped: bool, usage: dict[str, Any], max_tokens: int,
                   called: bool) -> FinishReason:
    if called:
        return "tool_calls"
    if stopped:
        return "stop"
    if upstream == "length":
        return "length"
    if upstream == "stop":
        return "stop"
    # Native models say nothing: an answer that used every token it was allowed was cut short.
    return "length" if _int(usage.get("completion_tokens")) >= max_tokens else "stop"


def _usage(usage: dict[str, Any], request: ChatRequest, completion_estimate: int) -> Usage:
    """Cloudflare's own counts; a rough estimate only where it sent none (or we closed early)."""
    prompt = _int(usage.get("prompt_tokens"))
    completion = _int(usage.get("completion_tokens"))
    if not prompt and not completion:
        prompt = request.estimated_prompt_tokens
        completion = completion_estimate
    return Usage(prompt, completion)


def _int(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


# -- errors -----------------------------------------------------------------------------------------

def first_message(body: Any) -> str:
    if not isinstance(body, dict):
        return ""
    errors = body.get("errors") or ([body["error"]] if isinstance(body.get("error"), dict) else [])
    for e in errors:
        if isinstance(e, dict) and e.get("message"):
            return str(e["message"])
    return ""


def error_for(status: int, body: Any, retry_after: float | None, scrub: Scrub) -> BackendError:
    """The BackendError for a non-2xx answer: by Cloudflare's error codes first, then the status."""
    if 300 <= status < 400:  # never followed: a redirect would send the request wherever its Location says
        return UpstreamError(f"Cloudflare Workers AI answered with a redirect (HTTP {status}), which aigate does not "
                             "follow: check CLOUDFLARE_API_BASE")
    errors = body.get("errors") if isinstance(body, dict) else None
    codes = {e.get("code") for e in errors or [] if isinstance(e, dict)}
    message = scrub(first_message(body) or f"HTTP {status}")
    if JSON_MODE_FAILED in message:
        return json_mode_failed(message)
    if codes & AUTH_CODES or status in (401, 403) and not codes - AUTH_CODES - {None}:
        return UpstreamAuthFailed(f"Cloudflare rejected aigate's credentials ({message}): check CLOUDFLARE_API_TOKEN "
                                  "and CLOUDFLARE_ACCOUNT_ID in the server's configuration")
    if codes & DAILY_LIMIT_CODES:
        return UpstreamQuotaExceeded(f"Cloudflare Workers AI: {message}", retry_after=_seconds_to_utc_midnight())
    if status == 429 or codes & CAPACITY_CODES:
        return UpstreamOverCapacity(f"Cloudflare Workers AI is over capacity: {message}", retry_after=retry_after)
    if codes & UNKNOWN_MODEL_CODES:
        return ModelNotFound(f"Cloudflare Workers AI: {message}", param="model")
    if status == 413 or codes & TOO_LARGE_CODES:
        return ContextLengthExceeded(f"Cloudflare Workers AI: {message}", param="messages")
    if status == 408:
        return UpstreamTimeout(f"Cloudflare Workers AI timed out: {message}")
    if 400 <= status < 500:
        return UpstreamRefused(f"Cloudflare Workers AI refused the request: {message}")
    return UpstreamError(f"Cloudflare Workers AI failed (HTTP {status}): {message}", retry_after=retry_after)


def json_mode_failed(message: str) -> InvalidRequest:
    """The model could not produce JSON matching the schema: say so, and what may help."""
    return SchemaNotMet(f"The model could not produce an answer matching the requested JSON schema (Workers AI: "
                        f"{message}). A simpler schema, a clearer prompt or another JSON-mode model may work.",
                        param="response_format")


def retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def _seconds_to_utc_midnight() -> float:
    now = datetime.now(UTC)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (midnight - now).total_seconds()


# -- the model catalogue ----------------------------------------------------------------------------

def created(value: Any) -> int:
    try:
        return int(datetime.fromisoformat(str(value)).replace(tzinfo=UTC).timestamp())
    except ValueError:
        return 0
