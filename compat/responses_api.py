"""The Responses API (POST /v1/responses) as a codec over the same event road as chat completions:
a request body (declared in compat/wire.py, its items read here) read into a ChatRequest (input
items become messages), and the backend's events
written as OpenAI's typed stream events or folded into one `response` object. The folded object
is the last stream event's, so stream and non-stream cannot disagree.

Shapes follow openai-python's `types/responses/`. Tools other than functions (web_search,
namespace, image_generation...) are skipped, not refused: Codex sends them on every turn.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

from backends.base import (
    ChatRequest,
    Event,
    Finish,
    ImageInput,
    Message,
    PieceFrame,
    Role,
    TextDelta,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolChoice,
    Usage,
    Written,
)
from compat import sse, wire
from compat.errors import APIError, invalid
from compat.requests import DATA_URL, TOOL_NAME, Limits, _bounded_max_tokens, check_chars, image_input, one_choice
from compat.structured import text_format

ROLES: dict[str, Role] = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
TEXT_PARTS = ("input_text", "output_text", "text", "summary_text", "reasoning_text")
# Fields clients send that change nothing here: accepted, echoed where the response object has them.
NO_OPS = ("reasoning", "prompt_cache_key", "prompt_cache_retention", "client_metadata", "metadata",
          "user", "safety_identifier", "service_tier", "truncation", "max_tool_calls",
          "stream_options")


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


@dataclass(frozen=True)
class ResponsesCall:
    request: ChatRequest
    stream: bool
    store: bool
    input_items: tuple[dict[str, Any], ...]  # what the model is given: earlier turns, then this input (with ids)
    echo: dict[str, Any] = field(default_factory=dict)  # request fields the response object repeats
    history: int = 0  # how many of input_items are previous_response_id's (the rest are this request's)


def parse_responses(body: Any, limits: Limits = Limits(), history: list[dict[str, Any]] | None = None
                    ) -> ResponsesCall:
    """A /v1/responses body; `history` is the input and output of `previous_response_id`, if any,
    checked again as this request's input would be (the model may not be the one that answered it)."""
    request = wire.read(body, wire.ResponseRequest)
    model = request.model
    one_choice(request.n, "n")
    if request.background:
        raise invalid("background is not supported by this server.", "background", "unsupported_parameter")
    for name, value in (("conversation", request.conversation), ("prompt", request.prompt)):
        if value is not None:
            raise invalid(f"{name} is not supported by this server: send the input (or previous_response_id).",
                          name, "unsupported_parameter")
    images = limits if model in limits.image_models else None
    earlier = input_items(history, "previous_response_id", images) if history else []
    items = [*earlier, *input_items(request.input, images=images)]
    messages = [*instruction_messages(request.instructions), *to_messages(items)]
    if not messages:
        raise invalid("input must hold at least one message.", "input", "empty_array")
    if sum(len(m.images) for m in messages) > 1:
        raise invalid("This model reads one image per request (chatglm.cpp's GLM-4V takes one); send one.",
                      "input", "too_many_images")
    if len(messages) > limits.max_messages:
        raise invalid(f"input holds {len(messages)} messages; this server takes at most {limits.max_messages}.",
                      "input", "too_many_messages")
    check_chars(sum(len(m.content) for m in messages), limits, "input")
    tools, echoed_tools = function_tools(request.tools)
    choice, forced = tool_choice(request.tool_choice, tools)
    asked = None if request.max_output_tokens is None else int(request.max_output_tokens)
    max_tokens = _bounded_max_tokens(asked, limits.ceiling(model), "max_output_tokens")
    fmt = text_format(request.text)
    stream = bool(request.stream)
    top = 0 if request.top_logprobs is None else int(request.top_logprobs)
    chat = ChatRequest(model=model, messages=tuple(messages), max_tokens=max_tokens, temperature=request.temperature,
                       top_p=request.top_p, tools=tools if choice != "none" else (), tool_choice=choice,
                       forced_tool=forced, incremental=stream, response_format=fmt,
                       logprobs=logprobs_asked(request.include) or top > 0, top_logprobs=top)
    echo = {
        "instructions": request.instructions, "max_output_tokens": asked, "metadata": request.metadata or {},
        "parallel_tool_calls": True if request.parallel_tool_calls is None else request.parallel_tool_calls,
        "previous_response_id": request.previous_response_id,
        "reasoning": request.reasoning if isinstance(request.reasoning, dict) else None,
        "temperature": request.temperature, "text": request.text or {"format": {"type": "text"}},
        "tool_choice": request.tool_choice or "auto", "tools": echoed_tools, "top_p": request.top_p,
        "user": request.user, "store": True if request.store is None else request.store,
    }
    return ResponsesCall(chat, stream, echo["store"] is True, tuple(items), echo, len(earlier))


LOGPROBS = "message.output_text.logprobs"  # the `include` value that asks for them


def logprobs_asked(include: Any) -> bool:
    """Whether `include` asks for the output text's log probabilities (its other values change nothing here)."""
    return isinstance(include, list) and LOGPROBS in include


def logprobs_param(request: ChatRequest) -> str:
    """The field that asked for log probabilities, for a refusal: `top_logprobs`, else `include`."""
    return "top_logprobs" if request.top_logprobs else "include"


def instruction_messages(raw: Any) -> list[Message]:
    if raw is None:
        return []
    if isinstance(raw, str):
        return [Message("system", raw)] if raw else []
    if isinstance(raw, list):
        return to_messages(input_items(raw, "instructions"))
    raise invalid("instructions must be a string.", "instructions", "invalid_type")


def input_items(raw: Any, param: str = "input", images: Limits | None = None) -> list[dict[str, Any]]:
    """The input as a list of checked items, each with an id (they are stored and listed);
    ``images``: the limits of a model that reads input_image parts (None: text only)."""
    if raw is None:
        return []
    if isinstance(raw, str):
        return [{"id": new_id("msg"), "type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": raw}], "status": "completed"}]
    if not isinstance(raw, list):
        raise invalid(f"{param} must be a string or an array of input items.", param, "invalid_type")
    items = []
    for i, item in enumerate(raw):
        where = f"{param}[{i}]"
        if not isinstance(item, dict):
            raise invalid(f"{where} must be an object.", where, "invalid_type")
        kind = item.get("type", "message")
        if kind == "message":
            items.append(_message_item(item, where, images))
        elif kind in ("function_call", "custom_tool_call"):
            name, call_id = item.get("name"), item.get("call_id")
            arguments = item.get("arguments" if kind == "function_call" else "input", "")
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments, ensure_ascii=False)
            if not isinstance(name, str) or not name or not isinstance(call_id, str) or not call_id:
                raise invalid(f"{where}: a {kind} needs a name and a call_id.", where, "missing_required_parameter")
            items.append({"id": _str(item.get("id")) or new_id("fc"), "type": "function_call", "status": "completed",
                          "arguments": arguments, "call_id": call_id, "name": name})
        elif kind in ("function_call_output", "custom_tool_call_output"):
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or not call_id:
                raise invalid(f"{where}.call_id must be a string.", f"{where}.call_id", "missing_required_parameter")
            items.append({"id": _str(item.get("id")) or new_id("fco"), "type": "function_call_output",
                          "status": "completed", "call_id": call_id,
                          "output": _text(item.get("output"), f"{where}.output")})
        # reasoning, item_reference and the items of tools skipped here carry nothing a model here can use
    return items


def _message_item(item: dict[str, Any], where: str, images: Limits | None = None) -> dict[str, Any]:
    role = item.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise invalid(f"{where}.role must be one of user, assistant, system, developer; got {role!r}.",
                      f"{where}.role", "invalid_value")
    content = item.get("content")
    kind = "output_text" if role == "assistant" else "input_text"
    pictures = []
    if images is not None and role == "user" and isinstance(content, list):
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "input_image":
                if part.get("image_url") is None and part.get("file_id") is not None:
                    raise invalid("Image files are not stored here; send the image as a base64 data: URL "
                                  "in image_url.", f"{where}.content[{j}].file_id", "unsupported_parameter")
                image_input(part.get("image_url"), f"{where}.content[{j}].image_url", images.max_image_bytes)
                pictures.append({"type": "input_image", "image_url": part["image_url"],
                                 "detail": part.get("detail") or "auto"})
        content = [p for p in content if not (isinstance(p, dict) and p.get("type") == "input_image")]
    text = _text(content, f"{where}.content")
    parts = [{"type": kind, "text": text, **({"annotations": []} if role == "assistant" else {})}, *pictures]
    return {"id": _str(item.get("id")) or new_id("msg"), "type": "message", "role": role, "content": parts,
            "status": "completed"}


def _text(content: Any, where: str) -> str:
    """A string, or text parts joined; images, files and audio are refused (text-only models)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"{where} must be a string or an array of content parts.", where, "invalid_type")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "refusal":
            texts.append(str(part.get("refusal", "")))
            continue
        if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
            raise invalid(f"{where}[{j}]: content parts of type {kind!r} are not supported; this server's models "
                          "take text only.", f"{where}[{j}].type", "unsupported_content")
        texts.append(part["text"])
    return "".join(texts)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def to_messages(items: list[dict[str, Any]]) -> list[Message]:
    """Checked items as chat messages: consecutive function calls join the assistant turn before them."""
    out: list[Message] = []
    names: dict[str, str] = {}
    for item in items:
        if item["type"] == "message":
            text = "".join(p["text"] for p in item["content"] if "text" in p)
            found = [DATA_URL.fullmatch(p["image_url"]) for p in item["content"] if p["type"] == "input_image"]
            pictures = tuple(ImageInput(m.group(3)) for m in found if m is not None)
            out.append(Message(ROLES[item["role"]], text, images=pictures))
        elif item["type"] == "function_call":
            call = ToolCall(item["call_id"], item["name"], item["arguments"])
            names[item["call_id"]] = item["name"]
            last = out[-1] if out else None
            if last is not None and last.role == "assistant":
                out[-1] = Message("assistant", last.content, (*last.tool_calls, call))
            else:
                out.append(Message("assistant", "", (call,)))
        elif item["type"] == "function_call_output":
            out.append(Message("tool", item["output"], tool_call_id=item["call_id"], name=names.get(item["call_id"])))
    return out


def function_tools(raw: Any) -> tuple[tuple[Tool, ...], list[dict[str, Any]]]:
    """Function tools (flat, as the Responses API writes them); other tool types are skipped."""
    if raw is None:
        return (), []
    if not isinstance(raw, list):
        raise invalid("tools must be an array.", "tools", "invalid_type")
    tools, echoed = [], []
    for i, tool in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise invalid(f"{where} must be an object.", where, "invalid_type")
        if tool.get("type") != "function":
            continue
        name = tool.get("name")
        description = "" if tool.get("description") is None else tool["description"]
        parameters = {} if tool.get("parameters") is None else tool["parameters"]
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise invalid(f"{where}.name must be 1-64 letters, digits, _ or -.", f"{where}.name", "invalid_value")
        if not isinstance(description, str) or not isinstance(parameters, dict):
            raise invalid(f"{where}: description must be a string and parameters an object.", where, "invalid_type")
        strict = tool.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise invalid(f"{where}.strict must be a boolean.", f"{where}.strict", "invalid_type")
        tools.append(Tool(name, description, parameters, bool(strict)))
        echoed.append({"type": "function", "name": name, "description": description or None,
                       "parameters": parameters, "strict": bool(strict)})
    return tuple(tools), echoed


def tool_choice(raw: Any, tools: tuple[Tool, ...]) -> tuple[ToolChoice, str | None]:
    """The choice, and the tool it forces (a named choice is ``required`` of that one tool)."""
    if raw is None or raw == "auto":
        return "auto", None
    if raw == "none":
        return "none", None
    if raw == "required":
        return ("required" if tools else "auto"), None
    if isinstance(raw, dict):
        if raw.get("type") == "function":
            name = raw.get("name")
            if not isinstance(name, str) or name not in {t.name for t in tools}:
                raise invalid(f"tool_choice names {name!r}, which is not a function in tools.", "tool_choice",
                              "invalid_value")
            return "required", name
        if raw.get("type") == "allowed_tools" and raw.get("mode") in ("auto", "required"):
            return ("required" if raw["mode"] == "required" and tools else "auto"), None
        return "auto", None  # a hosted tool's choice: those tools are skipped here
    raise invalid("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'name': ...}.",
                  "tool_choice", "invalid_value")


# -- the response object and its stream -----------------------------------------------------------

def output_logprob(t: TokenLogprob) -> dict[str, Any]:
    """An output_text part's log probability entry (openai-python's ResponseOutputText Logprob)."""
    return {"token": t.token, "bytes": list(t.raw), "logprob": t.logprob,
            "top_logprobs": [{"token": a.token, "bytes": list(a.raw), "logprob": a.logprob} for a in t.top]}


def event_logprob(t: TokenLogprob) -> dict[str, Any]:
    """A text delta's or done event's entry, which carries no bytes (ResponseTextDeltaEvent's Logprob)."""
    return {"token": t.token, "logprob": t.logprob,
            "top_logprobs": [{"token": a.token, "logprob": a.logprob} for a in t.top]}


def usage_object(usage: Usage) -> dict[str, Any]:
    return {"input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
            "output_tokens": usage.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.total_tokens}


class ResponseStream:
    """One response's typed events, numbered; `.final` is the response object once it has ended."""

    def __init__(self, model: str, echo: dict[str, Any], parallel_tool_calls: bool = True,
                 logprobs: bool = False) -> None:
        self.id, self.model, self.echo = new_id("resp"), model, echo
        self.logprobs = logprobs  # the output text's tokens' log probabilities were asked for
        self._entries: list[TokenLogprob] = []  # the open message's, when asked
        self.created_at = int(time.time())
        self.output: list[dict[str, Any]] = []
        self.final: dict[str, Any] | None = None
        self._sequence = 0  # the next event's sequence_number
        self._writing: str | None = None  # the id of the message whose text is being streamed
        self._parallel = parallel_tool_calls

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": kind, "sequence_number": self._number(), **fields}

    def _number(self) -> int:
        self._sequence += 1
        return self._sequence - 1

    def _text_delta(self, message_id: str, text: str, number: int | str,
                    logprobs: tuple[TokenLogprob, ...] = ()) -> dict[str, Any]:
        return {"type": "response.output_text.delta", "sequence_number": number, "item_id": message_id,
                "output_index": len(self.output), "content_index": 0, "delta": text,
                "logprobs": [event_logprob(t) for t in logprobs]}

    def piece_frame(self, encode: Callable[[dict[str, Any]], bytes]) -> PieceFrame | None:
        """The frame of the next text delta, for a backend that writes them itself (None: no message's
        text is being streamed)."""
        if self._writing is None:
            return None
        return sse.piece_frame(encode(self._text_delta(self._writing, sse.PIECE, sse.NUMBER)), self._sequence)

    def snapshot(self, status: str, *, usage: Usage | None = None, error: dict[str, Any] | None = None,
                 incomplete: str | None = None) -> dict[str, Any]:
        e = self.echo
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "background": False, "error": error,
            "incomplete_details": {"reason": incomplete} if incomplete else None,
            "instructions": e.get("instructions"), "max_output_tokens": e.get("max_output_tokens"),
            "max_tool_calls": None, "model": self.model, "output": list(self.output),
            "parallel_tool_calls": e.get("parallel_tool_calls", True),
            "previous_response_id": e.get("previous_response_id"),
            "reasoning": e.get("reasoning") or {"effort": None, "summary": None}, "service_tier": "default",
            "store": e.get("store", True), "temperature": e.get("temperature"),
            "text": e.get("text") or {"format": {"type": "text"}}, "tool_choice": e.get("tool_choice", "auto"),
            "tools": e.get("tools", []), "top_p": e.get("top_p"), "truncation": "disabled",
            "usage": usage_object(usage) if usage else None, "user": e.get("user"), "metadata": e.get("metadata", {}),
        }

    def events(self, events: Iterator[Event]) -> Iterator[dict[str, Any]]:
        """response.created, in_progress, each output item (added, its parts and deltas, done), then
        response.completed or response.incomplete."""
        yield self.event("response.created", response=self.snapshot("in_progress"))
        yield self.event("response.in_progress", response=self.snapshot("in_progress"))
        message: dict[str, Any] | None = None
        text: list[str] = []
        self._entries = []
        calls = 0
        for ev in events:
            if isinstance(ev, TextDelta):
                if not ev.text:
                    continue
                if message is None:
                    message = yield from self._open_message()
                text.append(ev.text)
                self._writing = message["id"]
                shown = ev.logprobs if self.logprobs else ()
                self._entries.extend(shown)
                yield self._text_delta(message["id"], ev.text, self._number(), shown)
            elif isinstance(ev, Written):  # deltas the backend wrote itself, numbered as ours would be
                text.append(ev.text)
                self._sequence += ev.deltas
            elif isinstance(ev, ToolCall):
                self._writing = None
                if message is not None:
                    yield from self._close_message(message, "".join(text), "completed")
                    message, text, self._entries = None, [], []
                if calls and not self._parallel:
                    continue  # parallel_tool_calls false: the first call only
                calls += 1
                yield from self._tool_call(ev)
            elif isinstance(ev, Finish):
                self._writing = None
                incomplete = "max_output_tokens" if ev.reason == "length" else None
                if message is None and not calls:
                    message = yield from self._open_message()  # an empty answer is still a message
                if message is not None:
                    yield from self._close_message(message, "".join(text), "incomplete" if incomplete else "completed")
                status = "incomplete" if incomplete else "completed"
                self.final = self.snapshot(status, usage=ev.usage, incomplete=incomplete)
                if status == "completed":
                    self.final["completed_at"] = int(time.time())
                yield self.event(f"response.{status}", response=self.final)
                return
        raise RuntimeError("the backend ended without a finish event")

    def failed(self, error: APIError) -> Iterator[dict[str, Any]]:
        """After the first byte a failure is in-band: an error event, then response.failed."""
        yield self.event("error", code=error.code or error.type, message=error.message, param=error.param)
        # response.error.code is one of OpenAI's few; the error event above carries ours.
        code = {429: "rate_limit_exceeded", 400: "invalid_prompt"}.get(error.status, "server_error")
        self.final = self.snapshot("failed", error={"code": code, "message": error.message})
        yield self.event("response.failed", response=self.final)

    def _open_message(self) -> Generator[dict[str, Any], None, dict[str, Any]]:
        item = {"id": new_id("msg"), "type": "message", "status": "in_progress", "role": "assistant", "content": []}
        index = len(self.output)
        yield self.event("response.output_item.added", output_index=index, item=item)
        yield self.event("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                         part={"type": "output_text", "annotations": [], "logprobs": [], "text": ""})
        return item

    def _close_message(self, item: dict[str, Any], text: str, status: str) -> Iterator[dict[str, Any]]:
        index = len(self.output)
        entries = self._entries
        part = {"type": "output_text", "annotations": [], "logprobs": [output_logprob(t) for t in entries],
                "text": text}
        yield self.event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                         text=text, logprobs=[event_logprob(t) for t in entries])
        yield self.event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                         part=part)
        done = {**item, "status": status, "content": [part]}
        self.output.append(done)
        yield self.event("response.output_item.done", output_index=index, item=done)

    def _tool_call(self, call: ToolCall) -> Iterator[dict[str, Any]]:
        index = len(self.output)
        item = {"id": new_id("fc"), "type": "function_call", "status": "in_progress", "arguments": "",
                "call_id": call.id, "name": call.name}
        yield self.event("response.output_item.added", output_index=index, item=item)
        yield self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                         delta=call.arguments)
        yield self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                         name=call.name, arguments=call.arguments)
        done = {**item, "status": "completed", "arguments": call.arguments}
        self.output.append(done)
        yield self.event("response.output_item.done", output_index=index, item=done)


def output_text(response: dict[str, Any]) -> str:
    return "".join(p.get("text", "") for item in response.get("output", []) if item.get("type") == "message"
                   for p in item.get("content", []) if p.get("type") == "output_text")
