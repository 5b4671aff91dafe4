"""Parse and check a /v1/chat/completions body; every problem is a 400 naming the field.

Fields the OpenAI API defines but aigate cannot honour either get a clear 400 (``n`` > 1,
``logprobs``, a JSON response format on a model that cannot honour it) or, where ignoring them
changes nothing a client relies on, are accepted: ``seed`` and the penalties are checked and
passed to the backend (Workers AI uses them, chatglm.cpp cannot), ``user`` and
``parallel_tool_calls`` are ignored.
Unknown fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from backends.base import ChatRequest, ImageInput, Message, Role, Tool, ToolCall
from compat.errors import invalid
from compat.structured import chat_format

# OpenAI role -> the role backends know; "developer" is what newer clients send for "system",
# "function" the deprecated form of "tool".
ROLES: dict[str, Role] = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
         "tool": "tool", "function": "tool"}
MAX_STOP_SEQUENCES = 4
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
DATA_URL = re.compile(r"data:(image/[A-Za-z0-9.+-]+)?(;[^,;]*)*;base64,(.*)", re.S)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, beyond the body size (MAX_BODY_BYTES, checked before parsing)."""

    max_messages: int = 2048
    max_input_chars: int = 1_000_000  # all message contents (or prompts) together
    max_tokens: int | None = None  # a ceiling on max_tokens; None: the model's context decides
    max_tokens_by_model: Mapping[str, int] = field(default_factory=dict)  # over max_tokens, by name asked for
    image_models: frozenset[str] = frozenset()  # models (and aliases) that read image parts
    max_image_bytes: int = 3 * 1024 * 1024  # one image, decoded

    def ceiling(self, model: str) -> int | None:
        return self.max_tokens_by_model.get(model, self.max_tokens)


@dataclass(frozen=True)
class ChatCall:
    request: ChatRequest
    stream: bool
    include_usage: bool
    legacy_functions: bool = False  # sent the deprecated `functions`: answer with `function_call`


def parse_chat(body: Any, limits: Limits = Limits()) -> ChatCall:
    model = parse_model(body)
    messages = _messages(body.get("messages"), limits if model in limits.image_models else None)
    if len(messages) > limits.max_messages:
        raise invalid(f"messages holds {len(messages)} messages; this server takes at most {limits.max_messages}.",
                      "messages", "too_many_messages")
    response_format = chat_format(body.get("response_format"))
    legacy = body.get("functions") is not None and body.get("tools") is None
    body = _legacy_functions(body)
    tools = _tools(body.get("tools"))
    # Everything the model reads counts: tool definitions and the arguments of earlier calls too.
    check_chars(sum(message_chars(m) for m in messages), limits, "messages")
    check_chars(sum(message_chars(m) for m in messages) + sum(tool_chars(t) for t in tools), limits, "tools")
    if body.get("logprobs") is True:
        raise invalid("logprobs are not supported by this server.", "logprobs", "unsupported_parameter")
    _optional_bool(body, "logprobs")
    tool_choice = _tool_choice(body.get("tool_choice"), tools)
    # Both are checked when both are sent; the newer max_completion_tokens wins.
    newer = _integer(body, "max_completion_tokens", minimum=1)
    older = _integer(body, "max_tokens", minimum=1)
    max_tokens, param = (older, "max_tokens") if newer is None else (newer, "max_completion_tokens")
    max_tokens = _bounded_max_tokens(max_tokens, limits.ceiling(model), param)
    stream, include_usage = _stream(body)
    request = ChatRequest(model=model, messages=messages, max_tokens=max_tokens, incremental=stream,
                          tools=tools if tool_choice != "none" else (), tool_choice=tool_choice,
                          response_format=response_format, **_sampling(body))
    return ChatCall(request, stream, include_usage, legacy)


@dataclass(frozen=True)
class CompletionCall:
    requests: tuple[ChatRequest, ...]  # one per prompt
    stream: bool
    include_usage: bool
    echo: bool


DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions


def parse_completion(body: Any, limits: Limits = Limits()) -> CompletionCall:
    """POST /v1/completions. `suffix` is accepted and ignored: neither backend's models fill in
    the middle, and editors send it on every request."""
    model = parse_model(body)
    raw = body.get("prompt")
    prompts = [raw] if isinstance(raw, str) else raw
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        if isinstance(prompts, list) and prompts and all(isinstance(p, (int, list)) for p in prompts):
            raise invalid("prompts given as token ids are not supported; send text.", "prompt", "unsupported_value")
        raise invalid("prompt must be a string or a non-empty array of strings.", "prompt", "invalid_type")
    for name in ("best_of",):
        value = _integer(body, name, minimum=1)
        if value is not None and value > 1:
            raise invalid(f"{name} > 1 is not supported.", name, "unsupported_value")
    if body.get("logprobs") is not None:
        raise invalid("logprobs are not supported by this server.", "logprobs", "unsupported_parameter")
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise invalid("suffix must be a string.", "suffix", "invalid_type")
    check_chars(sum(len(p) for p in prompts), limits, "prompt")
    asked, ceiling = _integer(body, "max_tokens", minimum=1), limits.ceiling(model)
    default = DEFAULT_COMPLETION_TOKENS if ceiling is None else min(DEFAULT_COMPLETION_TOKENS, ceiling)
    max_tokens = default if asked is None else _bounded_max_tokens(asked, ceiling, "max_tokens")
    echo = _optional_bool(body, "echo") or False
    stream, include_usage = _stream(body)
    sampling = _sampling(body)
    return CompletionCall(tuple(ChatRequest(model=model, messages=(), max_tokens=max_tokens, prompt=p,
                                            incremental=stream, **sampling) for p in prompts),
                          stream, include_usage, echo)


def message_chars(m: Message) -> int:
    return len(m.content) + sum(len(c.name) + len(c.arguments) for c in m.tool_calls)


def tool_chars(tool: Tool) -> int:
    return len(tool.name) + len(tool.description) + len(json.dumps(tool.parameters, ensure_ascii=False))


def check_chars(total: int, limits: Limits, param: str) -> None:
    if total > limits.max_input_chars:
        raise invalid(f"the {param} hold {total} characters; this server takes at most {limits.max_input_chars}.",
                      param, "input_too_large")


def _bounded_max_tokens(value: int | None, ceiling: int | None, param: str) -> int | None:
    """The max_tokens to use: as asked if within the model's ceiling (a 400 above it), the ceiling
    itself if none was asked for, so the ceiling bounds every answer."""
    if value is not None and ceiling is not None and value > ceiling:
        raise invalid(f"{param} is {value}; this server allows at most {ceiling} for this model.", param,
                      "max_tokens_too_large")
    return ceiling if value is None else value


def parse_model(body: Any) -> str:
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("you must provide a model parameter" if model is None else "model must be a non-empty string",
                      "model", "missing_required_parameter" if model is None else "invalid_type")
    n = _integer(body, "n", minimum=1)
    if n is not None and n > 1:
        raise invalid("n > 1 is not supported: this server returns one choice per request; "
                      "send n separate requests instead.", "n", "unsupported_value")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid("user must be a string.", "user", "invalid_type")
    return model


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = _optional_bool(body, "stream") or False
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid("stream_options must be an object.", "stream_options", "invalid_type")
    return stream, bool(options and _optional_bool(options, "include_usage", "stream_options.include_usage"))


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "temperature": _number(body, "temperature", 0.0, 2.0),
        "top_p": _number(body, "top_p", 0.0, 1.0),
        "stop": _stop(body.get("stop")),
        "seed": _integer(body, "seed"),
        "presence_penalty": _number(body, "presence_penalty", -2.0, 2.0),
        "frequency_penalty": _number(body, "frequency_penalty", -2.0, 2.0),
    }


def _messages(raw: Any, images: Limits | None = None) -> tuple[Message, ...]:
    """The messages; ``images``: the limits of a model that reads image parts (None: text only)."""
    if raw is None:
        raise invalid("you must provide a messages parameter", "messages", "missing_required_parameter")
    if not isinstance(raw, list):
        raise invalid("messages must be an array of message objects.", "messages", "invalid_type")
    if not raw:
        raise invalid("messages must contain at least one message.", "messages", "empty_array")
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(f"{where} must be an object with a role and content.", where, "invalid_type")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:  # a dict or list is unhashable
            raise invalid(f"{where}.role must be one of system, developer, user, assistant, tool; got {role!r}.",
                          f"{where}.role", "invalid_value")
        content = m.get("content")
        if content is None and role != "assistant":
            raise invalid(f"{where}.content is required for role {role!r}.", f"{where}.content",
                          "missing_required_parameter")
        calls = _history_tool_calls(m.get("tool_calls"), f"{where}.tool_calls") if role == "assistant" else ()
        tool_call_id = m.get("tool_call_id")
        name = m.get("name")
        for field_name, value in (("tool_call_id", tool_call_id), ("name", name)):
            if value is not None and not isinstance(value, str):
                raise invalid(f"{where}.{field_name} must be a string.", f"{where}.{field_name}", "invalid_type")
        text, pictures = _content_parts(content, f"{where}.content", images if role == "user" else None)
        out.append(Message(ROLES[role], text, tool_calls=calls,
                           tool_call_id=tool_call_id if role in ("tool", "function") else None,
                           name=name if role in ("tool", "function") else None, images=pictures))
    if sum(len(m.images) for m in out) > 1:
        raise invalid("This model reads one image per request (chatglm.cpp's GLM-4V takes one); send one.",
                      "messages", "too_many_images")
    return tuple(out)


def _history_tool_calls(raw: Any, where: str) -> tuple[ToolCall, ...]:
    """Tool calls of an earlier assistant turn, as the client sends them back."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise invalid(f"{where} must be an array.", where, "invalid_type")
    calls = []
    for k, call in enumerate(raw):
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(function, dict) or not isinstance(name, str) or not name:
            raise invalid(f"{where}[{k}].function.name must be a string.", f"{where}[{k}].function.name",
                          "invalid_type")
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, str):  # some clients send an object: take it as meant
            arguments = json.dumps(arguments, ensure_ascii=False)
        call_id = call.get("id")
        calls.append(ToolCall(call_id if isinstance(call_id, str) else f"call_{k}", name, arguments))
    return tuple(calls)


def _content_parts(content: Any, where: str, images: Limits | None) -> tuple[str, tuple[ImageInput, ...]]:
    """A string, an array of text parts (joined), or null (an assistant turn with tool calls); and
    where the model reads them (``images``), the image parts."""
    if content is None or isinstance(content, str):
        return content or "", ()
    if not isinstance(content, list):
        raise invalid(f"{where} must be a string or an array of content parts.", where, "invalid_type")
    texts = []
    pictures: list[ImageInput] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image_url" and images is not None:
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            pictures.append(image_input(url, f"{where}[{j}].image_url.url", images.max_image_bytes))
            continue
        if kind != "text":
            raise invalid(f"{where}[{j}]: content parts of type {kind!r} are not supported; "
                          "this server's models take text only.", f"{where}[{j}].type", "unsupported_content")
        text = part.get("text")
        if not isinstance(text, str):
            raise invalid(f"{where}[{j}].text must be a string.", f"{where}[{j}].text", "invalid_type")
        texts.append(text)
    return "".join(texts), tuple(pictures)


def image_input(url: Any, param: str, max_bytes: int) -> ImageInput:
    """An image part's URL: a base64 data: URL of at most ``max_bytes`` (http(s) URLs are not fetched)."""
    if not isinstance(url, str):
        raise invalid(f"{param} must be a string (a data: URL).", param, "invalid_type")
    if url.startswith(("http://", "https://")):
        raise invalid("This server does not fetch image URLs; send the image inline as a base64 data: URL "
                      "(data:image/png;base64,...).", param, "image_url_not_supported")
    found = DATA_URL.fullmatch(url)
    if found is None:
        raise invalid("An image must be a base64 data: URL (data:image/png;base64,...).", param, "invalid_image")
    data = found.group(3)
    if len(data) > (max_bytes + 2) // 3 * 4 + 4:  # before decoding anything
        raise invalid(f"The image is larger than this server's limit of {max_bytes} bytes (MAX_IMAGE_BYTES).",
                      param, "image_too_large")
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise invalid("The image's base64 data is corrupt.", param, "invalid_image") from None
    return ImageInput(data)


def _stop(raw: Any) -> tuple[str, ...]:
    if raw is None:
        return ()
    stops = [raw] if isinstance(raw, str) else raw
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("stop must be a string or an array of strings.", "stop", "invalid_type")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise invalid(f"stop takes at most {MAX_STOP_SEQUENCES} sequences.", "stop", "invalid_value")
    if any(s == "" for s in stops):
        raise invalid("stop sequences must not be empty strings.", "stop", "invalid_value")
    return tuple(stops)


def _legacy_functions(body: dict[str, Any]) -> dict[str, Any]:
    """The deprecated `functions` / `function_call` as the `tools` / `tool_choice` they became
    (ignored beside `tools`, as OpenAI does); older clients still send them."""
    functions, call = body.get("functions"), body.get("function_call")
    if functions is None or body.get("tools") is not None:
        return body
    if not isinstance(functions, list):
        raise invalid("functions must be an array of function definitions.", "functions", "invalid_type")
    if isinstance(call, dict):
        call = {"type": "function", "function": call}
    return {**body, "tools": [{"type": "function", "function": f} for f in functions],
            "tool_choice": call if body.get("tool_choice") is None else body["tool_choice"]}


def _tools(raw: Any) -> tuple[Tool, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise invalid("tools must be an array of function tools.", "tools", "invalid_type")
    tools = []
    for i, tool in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise invalid(f"{where} must be an object of type 'function'.", f"{where}.type", "invalid_value")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise invalid(f"{where}.function must be an object.", f"{where}.function", "invalid_type")
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise invalid(f"{where}.function.name must be 1-64 letters, digits, _ or -.", f"{where}.function.name",
                          "invalid_value")
        description = function.get("description", "")
        parameters = function.get("parameters", {})
        if not isinstance(description, str) or not isinstance(parameters, dict):
            raise invalid(f"{where}.function: description must be a string and parameters an object.",
                          f"{where}.function", "invalid_type")
        tools.append(Tool(name, description, parameters))
    return tuple(tools)


def _tool_choice(raw: Any, tools: tuple[Tool, ...]) -> str:
    if raw is None:
        return "auto"
    if raw in ("none", "auto"):
        return raw
    if raw == "required":
        choice = raw
    elif isinstance(raw, dict) and isinstance(raw.get("function"), dict) and isinstance(raw["function"].get("name"),
                                                                                           str):
        choice = raw["function"]["name"]
        if choice not in {t.name for t in tools}:
            raise invalid(f"tool_choice names {choice!r}, which is not in tools.", "tool_choice", "invalid_value")
    else:
        raise invalid("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                      "{'name': ...}}.", "tool_choice", "invalid_value")
    if not tools:
        raise invalid("tool_choice needs tools.", "tool_choice", "invalid_value")
    return choice


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_number(value) or value != value:
        raise invalid(f"{name} must be a number.", name, "invalid_type")
    if not low <= value <= high:
        raise invalid(f"{value} is not a valid {name}: it must be between {low:g} and {high:g}.", name,
                      "invalid_value")
    return float(value)


def _integer(body: dict[str, Any], name: str, *, minimum: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise invalid(f"{name} must be an integer.", name, "invalid_type")
    if minimum is not None and value < minimum:
        raise invalid(f"{value} is not a valid {name}: it must be at least {minimum}.", name, "invalid_value")
    return value


def _optional_bool(body: dict[str, Any], name: str, param: str | None = None) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise invalid(f"{param or name} must be true or false.", param or name, "invalid_type")
    return value


# The parsers, their limits, and the field readers the Responses and embeddings parsers share.
__all__ = ["DEFAULT_COMPLETION_TOKENS", "MAX_STOP_SEQUENCES", "ROLES", "TOOL_NAME", "ChatCall", "CompletionCall",
           "Limits", "_bounded_max_tokens", "_integer", "_number", "_optional_bool", "check_chars", "message_chars",
           "parse_chat", "parse_completion", "parse_model", "tool_chars"]
