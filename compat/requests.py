"""Requests of /v1/chat/completions, /v1/completions and /v1/embeddings -> the ChatRequests the
backends take. Each body is first read against its declaration (compat/wire.py: types, bounds,
enums; a 400 naming the field); what a declaration cannot say is checked here after it: the
server's limits, what the model supports (images), and what joins two fields.

The sampling controls (``n``, ``logprobs``, ``seed``, ``logit_bias``, the penalties) are read here and carried
to the backend; whether the model honours them is checked when it is chosen (compat/controls.py): a model
that cannot gets a 400, never a silent default. ``user`` and ``parallel_tool_calls`` are ignored. Unknown
fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from backends.base import ChatRequest, ImageInput, JsonFormat, Message, Role, Tool, ToolCall, ToolChoice
from compat import token_ids, wire
from compat.errors import APIError, invalid

# OpenAI role -> the role backends know; "developer" is what newer clients send for "system",
# "function" the deprecated form of "tool".
ROLES: dict[str, Role] = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
         "tool": "tool", "function": "tool"}
TOOL_NAME = re.compile(wire.TOOL_NAME.strip("^$"))  # the Responses API's flat tools, read by hand
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
    legacy = isinstance(body, dict) and body.get("functions") is not None and body.get("tools") is None
    request = _read_chat(_legacy_functions(body) if legacy else body, limits)
    model = request.model
    messages = _messages(request.messages, limits if model in limits.image_models else None)
    if len(messages) > limits.max_messages:
        raise invalid(f"messages holds {len(messages)} messages; this server takes at most {limits.max_messages}.",
                      "messages", "too_many_messages")
    response_format = _response_format(request.response_format)
    tools = tuple(Tool(t.function.name, t.function.description, t.function.parameters, bool(t.function.strict))
                  for t in request.tools or ())
    # Everything the model reads counts: tool definitions and the arguments of earlier calls too.
    chars = sum(map(message_chars, messages))
    check_chars(chars, limits, "messages")
    check_chars(chars + sum(map(tool_chars, tools)), limits, "tools")
    top = _int(request.top_logprobs) or 0
    if top and not request.logprobs:
        raise invalid("top_logprobs needs logprobs set to true.", "top_logprobs", "invalid_value")
    tool_choice, forced = _tool_choice(request.tool_choice, tools)
    # Both are checked when both are sent; the newer max_completion_tokens wins.
    newer, older = _int(request.max_completion_tokens), _int(request.max_tokens)
    max_tokens, param = (older, "max_tokens") if newer is None else (newer, "max_completion_tokens")
    max_tokens = _bounded_max_tokens(max_tokens, limits.ceiling(model), param)
    stream, include_usage = _stream(request)
    chat = ChatRequest(model=model, messages=messages, max_tokens=max_tokens, incremental=stream,
                       tools=tools if tool_choice != "none" else (), tool_choice=tool_choice, forced_tool=forced,
                       response_format=response_format, logprobs=bool(request.logprobs), top_logprobs=top,
                       logit_bias=_logit_bias(request.logit_bias), **_sampling(request))
    return ChatCall(chat, stream, include_usage, legacy)


_IMAGE_FAULT = re.compile(r"(messages\[(\d+)\]\.content\[\d+\])\.image_url")


def _read_chat(body: Any, limits: Limits) -> wire.ChatCompletionRequest:
    """The chat body as declared; where the model does not read an image part, a broken one is refused as
    any image part is (unsupported_content), not for what is wrong inside it."""
    try:
        return wire.read(body, wire.ChatCompletionRequest)
    except APIError as err:
        found = _IMAGE_FAULT.match(err.param or "")
        if found is not None:
            message = body["messages"][int(found.group(2))]
            if body.get("model") not in limits.image_models or message.get("role") != "user":
                raise invalid(f"{found.group(1)}: content parts of type 'image_url' are not supported; this "
                              "server's models take text only.", f"{found.group(1)}.type",
                              "unsupported_content") from None
        raise


@dataclass(frozen=True)
class CompletionCall:
    requests: tuple[ChatRequest, ...]  # one per prompt
    stream: bool
    include_usage: bool
    echo: bool


DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions


def parse_completion(body: Any, limits: Limits = Limits()) -> CompletionCall:
    """POST /v1/completions. `suffix` is accepted and not read: the local model and Workers AI do not
    fill in the middle, editors send it on every request, and an OpenAI-compatible upstream is passed it
    with the fields aigate does not read."""
    request = _read_texts(body, wire.CompletionRequest, "prompt")
    model = request.model
    n = _int(request.n) or 1
    if request.best_of is not None and request.best_of != n:
        raise invalid(f"best_of is {request.best_of} and n is {n}: this server answers with every choice it makes, so "
                      "best_of may only equal n.", "best_of", "unsupported_value")
    top = _int(request.logprobs)
    if top is not None and request.echo:
        raise invalid("logprobs with echo is not supported: the prompt's log probabilities are not computed here. "
                      "Send logprobs without echo.", "logprobs", "unsupported_value")
    prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
    check_chars(sum(len(p) for p in prompts), limits, "prompt")
    asked, ceiling = _int(request.max_tokens), limits.ceiling(model)
    default = DEFAULT_COMPLETION_TOKENS if ceiling is None else min(DEFAULT_COMPLETION_TOKENS, ceiling)
    max_tokens = default if asked is None else _bounded_max_tokens(asked, ceiling, "max_tokens")
    stream, include_usage = _stream(request)
    sampling = _sampling(request)
    return CompletionCall(tuple(ChatRequest(model=model, messages=(), max_tokens=max_tokens, prompt=p,
                                            incremental=stream, logprobs=top is not None, top_logprobs=top or 0,
                                            **sampling) for p in prompts),
                          stream, include_usage, bool(request.echo))


@dataclass(frozen=True)
class EmbeddingCall:
    model: str
    inputs: list[str]
    encoding: str  # float or base64
    dimensions: int | None


def parse_embeddings(body: Any) -> EmbeddingCall:
    """POST /v1/embeddings (the server's character limit is checked by the route, with the others')."""
    request = _read_texts(body, wire.EmbeddingRequest, "input")
    one_choice(request.n, "n")
    inputs = [request.input] if isinstance(request.input, str) else request.input
    return EmbeddingCall(request.model, inputs, request.encoding_format or "float", _int(request.dimensions))


def _read_texts(body: Any, declaration: type[wire.T], name: str) -> wire.T:
    """A body whose ``name`` holds text, or token ids of cl100k_base, read as the text they stand for."""
    decoded = token_ids.texts(body.get(name), name) if isinstance(body, dict) else None
    return wire.read(body if decoded is None else {**body, name: decoded}, declaration)


def message_chars(m: Message) -> int:
    calls = m.tool_calls
    return len(m.content) + sum(len(c.name) + len(c.arguments) for c in calls) if calls else len(m.content)


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


def one_choice(n: int | None, name: str) -> None:
    if n is not None and n > 1:
        raise invalid(f"{name} > 1 is not supported: this server returns one choice per request; "
                      f"send {name} separate requests instead.", name, "unsupported_value")


def _int(value: int | None) -> int | None:
    """A declared Count or Integer as the plain int the backends take."""
    return None if value is None else int(value)


def _stream(request: wire.Sampling) -> tuple[bool, bool]:
    options = request.stream_options
    return bool(request.stream), bool(options is not None and options.include_usage)


def _sampling(request: wire.Sampling) -> dict[str, Any]:
    stop = request.stop
    return {
        "temperature": request.temperature, "top_p": request.top_p,
        "stop": () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop),
        "seed": _int(request.seed),
        "presence_penalty": request.presence_penalty, "frequency_penalty": request.frequency_penalty,
        "n": _int(request.n) or 1,
    }


def _logit_bias(raw: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """{"token id": bias} as (id, bias) pairs, in id order (the declaration checked keys and values)."""
    return tuple(sorted((int(k), v) for k, v in (raw or {}).items()))


_ROLE_OF: dict[type, Role] = {wire.SystemMessage: "system", wire.DeveloperMessage: "system", wire.UserMessage: "user",
                             wire.AssistantMessage: "assistant", wire.ToolMessage: "tool", wire.FunctionMessage: "tool"}


def _messages(raw: list[wire.ChatMessage], images: Limits | None = None) -> tuple[Message, ...]:
    """The messages; ``images``: the limits of a model that reads image parts (None: text only)."""
    out = []
    pictures: tuple[ImageInput, ...] = ()
    for i, m in enumerate(raw):
        role = _ROLE_OF[type(m)]
        content = m.content
        if content is None or isinstance(content, str):
            text = content or ""
        else:
            text, pictures = _content_parts(content, f"messages[{i}].content", images if role == "user" else None)
        if role == "assistant":
            calls = tuple(ToolCall(c.id if isinstance(c.id, str) else f"call_{k}", c.function.name,
                                   _arguments(c.function.arguments))
                          for k, c in enumerate(m.tool_calls or ()))  # type: ignore[union-attr]
            out.append(Message(role, text, tool_calls=calls, images=pictures))
        elif role == "tool":
            out.append(Message(role, text, tool_call_id=m.tool_call_id, name=m.name, images=pictures))
        else:
            out.append(Message(role, text, images=pictures))
        pictures = ()
    if images is not None and sum(len(m.images) for m in out) > 1:
        raise invalid("This model reads one image per request (chatglm.cpp's GLM-4V takes one); send one.",
                      "messages", "too_many_images")
    return tuple(out)


def _arguments(raw: Any) -> str:
    """A history tool call's arguments: JSON text; some clients send an object, taken as meant."""
    if raw is wire.UNSET:
        return "{}"
    return raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False)


def _content_parts(content: list[wire.ContentPart], where: str, images: Limits | None
                   ) -> tuple[str, tuple[ImageInput, ...]]:
    """Content parts: the texts joined, and where the model reads them (``images``), the image parts."""
    texts = []
    pictures: list[ImageInput] = []
    for j, part in enumerate(content):
        if isinstance(part, wire.TextPart):
            texts.append(part.text)
        elif images is not None:
            url = part.image_url.url if isinstance(part.image_url, wire.ImageUrl) else part.image_url
            pictures.append(image_input(url, f"{where}[{j}].image_url.url", images.max_image_bytes))
        else:
            raise invalid(f"{where}[{j}]: content parts of type 'image_url' are not supported; "
                          "this server's models take text only.", f"{where}[{j}].type", "unsupported_content")
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


def _response_format(raw: Any) -> JsonFormat | None:
    if isinstance(raw, wire.JsonObjectFormat):
        return JsonFormat(None, param="response_format")
    if isinstance(raw, wire.JsonSchemaFormat):
        spec = raw.json_schema
        return JsonFormat(spec.schema, spec.name, param="response_format", strict=bool(spec.strict))
    return None  # none, or type text


def _legacy_functions(body: dict[str, Any]) -> dict[str, Any]:
    """The deprecated `functions` / `function_call` as the `tools` / `tool_choice` they became
    (ignored beside `tools`, as OpenAI does); older clients still send them."""
    functions, call = body["functions"], body.get("function_call")
    if not isinstance(functions, list):
        raise invalid("functions must be an array of function definitions.", "functions", "invalid_type")
    if isinstance(call, dict):
        call = {"type": "function", "function": call}
    rest = {k: v for k, v in body.items() if k not in ("functions", "function_call")}
    return {**rest, "tools": [{"type": "function", "function": f} for f in functions],
            "tool_choice": call if body.get("tool_choice") is None else body["tool_choice"]}


def _tool_choice(raw: str | wire.NamedToolChoice | None, tools: tuple[Tool, ...]) -> tuple[ToolChoice, str | None]:
    """The choice, and the tool it forces (a named choice is ``required`` of that one tool)."""
    if raw is None or raw == "auto":
        return "auto", None
    if raw == "none":
        return "none", None
    forced = None
    if isinstance(raw, wire.NamedToolChoice):
        forced = raw.function.name
        if forced not in {t.name for t in tools}:
            raise invalid(f"tool_choice names {forced!r}, which is not in tools.", "tool_choice", "invalid_value")
    if not tools:
        raise invalid("tool_choice needs tools.", "tool_choice", "invalid_value")
    return "required", forced


# The parsers, their limits, and what the Responses parser shares with them.
__all__ = ["DATA_URL", "DEFAULT_COMPLETION_TOKENS", "ROLES", "TOOL_NAME", "ChatCall", "CompletionCall", "EmbeddingCall",
           "Limits", "_bounded_max_tokens", "check_chars", "image_input", "message_chars", "one_choice", "parse_chat",
           "parse_completion", "parse_embeddings", "tool_chars"]
