"""Anthropic Messages API bodies -> the ChatRequest every backend takes. The body is first read
against its declaration (compat/messages_wire.py); what a declaration cannot say is checked here, as
compat/requests.py does for chat: which blocks a role may carry, images (only where the model reads
them), the server's limits, and a tool_choice naming a tool.

How the conversation maps onto chat's: `system` (a string, or text blocks joined by a blank line)
comes first as a system turn; a user turn's `tool_result` blocks become tool turns (answering the
`tool_use` of the same id) and its other blocks one user turn; an assistant turn's `tool_use` blocks
become its tool calls, their `input` the arguments' JSON. Consecutive turns of one role are one turn,
as Anthropic joins them. `tool_choice` maps like chat's: auto, any (chat's `required`), a named tool,
none (the tools are not given to the model).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from backends.base import ChatRequest, ImageInput, Message, Tool, ToolCall, ToolChoice
from compat import messages_wire as mw
from compat import wire
from compat.errors import invalid
from compat.requests import Limits, _bounded_max_tokens, check_chars, image_input, message_chars, tool_chars

TEXT_ONLY = "this server's models take text only"


@dataclass(frozen=True)
class MessagesCall:
    request: ChatRequest
    stream: bool
    first_tool_call_only: bool = False  # tool_choice.disable_parallel_tool_use


def parse_messages(body: Any, limits: Limits = Limits()) -> MessagesCall:
    """A POST /v1/messages body."""
    request = wire.read(body, mw.AnthropicMessageRequest)
    asked = None if request.max_tokens is None else int(request.max_tokens)
    max_tokens = _bounded_max_tokens(asked, limits.ceiling(request.model), "max_tokens")
    stream = bool(request.stream)
    chat, first_only = _chat_request(request, limits, max_tokens)
    return MessagesCall(replace(chat, temperature=request.temperature, top_p=request.top_p,
                                stop=tuple(request.stop_sequences or ()), incremental=stream), stream, first_only)


def parse_count_tokens(body: Any, limits: Limits = Limits()) -> ChatRequest:
    """A POST /v1/messages/count_tokens body, as the request that counts it: the same prompt as a
    message with these fields, answered with one token."""
    return _chat_request(wire.read(body, mw.AnthropicCountTokensRequest), limits, 1)[0]


def _chat_request(request: mw.AnthropicCountTokensRequest, limits: Limits, max_tokens: int | None
                  ) -> tuple[ChatRequest, bool]:
    model = request.model
    messages = [*_system(request.system), *_conversation(request.messages, limits if model in limits.image_models
                                                          else None)]
    if len(messages) > limits.max_messages:
        raise invalid(f"messages holds {len(messages)} turns; this server takes at most {limits.max_messages}.",
                      "messages", "too_many_messages")
    if sum(len(m.images) for m in messages) > 1:
        raise invalid("This model reads one image per request (chatglm.cpp's GLM-4V takes one); send one.",
                      "messages", "too_many_images")
    tools = _tools(request.tools)
    chars = sum(map(message_chars, messages))
    check_chars(chars, limits, "messages")
    check_chars(chars + sum(map(tool_chars, tools)), limits, "tools")
    choice, forced, first_only = _tool_choice(request.tool_choice, tools)
    return ChatRequest(model=model, messages=tuple(messages), max_tokens=max_tokens, tools=tools if choice != "none"
                       else (), tool_choice=choice, forced_tool=forced, incremental=False), first_only


def _system(raw: str | list[mw.AnthropicSystemBlock] | None) -> list[Message]:
    text = raw if isinstance(raw, str) or raw is None else "\n\n".join(block.text for block in raw)
    return [Message("system", text)] if text else []


def _conversation(raw: list[mw.AnthropicMessageParam], images: Limits | None) -> list[Message]:
    """The turns as chat messages; ``images``: the limits of a model that reads images (None: text only)."""
    out: list[Message] = []
    names: dict[str, str] = {}  # tool_use id -> the tool's name, for the tool turn answering it
    for i, turn in enumerate(raw):
        where = f"messages[{i}].content"
        blocks: list[mw.ContentBlock] = [mw.AnthropicTextBlock(turn.content)] if isinstance(turn.content, str) \
            else turn.content
        if turn.role == "assistant":
            _join(out, _assistant(blocks, where, names))
        elif turn.role == "system":
            _join(out, [Message("system", _texts(blocks, where, "system"))])
        else:
            _join(out, _user(blocks, where, names, images))
    return out


def _join(out: list[Message], turns: list[Message]) -> None:
    """Add ``turns``; a user or assistant turn right after one of its role joins it (Anthropic's rule)."""
    for turn in turns:
        last = out[-1] if out else None
        if last is not None and last.role == turn.role and turn.role in ("user", "assistant"):
            text = "\n\n".join(t for t in (last.content, turn.content) if t)
            out[-1] = replace(last, content=text, tool_calls=last.tool_calls + turn.tool_calls,
                              images=last.images + turn.images)
        else:
            out.append(turn)


def _assistant(blocks: list[mw.ContentBlock], where: str, names: dict[str, str]) -> list[Message]:
    texts, calls = [], []
    for j, block in enumerate(blocks):
        if isinstance(block, mw.AnthropicTextBlock):
            texts.append(block.text)
        elif isinstance(block, mw.AnthropicToolUseBlock):
            names[block.id] = block.name
            calls.append(ToolCall(block.id, block.name, json.dumps(block.input, ensure_ascii=False)))
        elif not isinstance(block, (mw.AnthropicThinkingBlock, mw.AnthropicRedactedThinkingBlock)):
            raise _misplaced(block, f"{where}[{j}]", "assistant")
    return [Message("assistant", "".join(texts), tool_calls=tuple(calls))]


def _user(blocks: list[mw.ContentBlock], where: str, names: dict[str, str], images: Limits | None
          ) -> list[Message]:
    """The tool results (as tool turns), then the rest of the turn as one user turn."""
    results: list[Message] = []
    texts: list[str] = []
    pictures: list[ImageInput] = []
    for j, block in enumerate(blocks):
        at = f"{where}[{j}]"
        if isinstance(block, mw.AnthropicToolResultBlock):
            content = block.content
            text = _texts(content, f"{at}.content", "tool_result") if isinstance(content, list) else content or ""
            results.append(Message("tool", text, tool_call_id=block.tool_use_id, name=names.get(block.tool_use_id)))
        elif isinstance(block, mw.AnthropicTextBlock):
            texts.append(block.text)
        elif isinstance(block, mw.AnthropicDocumentBlock):
            texts.append(_document(block, at))
        elif isinstance(block, mw.AnthropicImageBlock):
            pictures.append(_image(block, at, images))
        elif not isinstance(block, (mw.AnthropicThinkingBlock, mw.AnthropicRedactedThinkingBlock)):
            raise _misplaced(block, at, "user")
    text = "".join(texts)
    return results + ([Message("user", text, images=tuple(pictures))] if text or pictures or not results else [])


def _texts(blocks: list[Any], where: str, what: str) -> str:
    """Text blocks (and text documents) joined; what else a system turn or a tool_result holds is refused."""
    texts = []
    for j, block in enumerate(blocks):
        if isinstance(block, mw.AnthropicTextBlock):
            texts.append(block.text)
        elif isinstance(block, mw.AnthropicDocumentBlock):
            texts.append(_document(block, f"{where}[{j}]"))
        elif isinstance(block, mw.AnthropicImageBlock):
            raise invalid(f"{where}[{j}]: images in a {what} are not supported here ({TEXT_ONLY} there); send the "
                          "image in a user turn.", f"{where}[{j}].type", "unsupported_content")
        else:
            raise _misplaced(block, f"{where}[{j}]", what)
    return "".join(texts)


def _misplaced(block: Any, where: str, role: str) -> Exception:
    kind = type(block).__struct_config__.tag
    return invalid(f"{where}: a {role} turn cannot carry a '{kind}' block.", f"{where}.type", "invalid_value")


def _document(block: mw.AnthropicDocumentBlock, where: str) -> str:
    source = block.source
    if isinstance(source, mw.AnthropicPlainTextSource):
        return source.data
    if isinstance(source, mw.AnthropicContentSource):
        content = source.content
        return content if isinstance(content, str) else _texts(content, f"{where}.source.content", "document")
    raise invalid(f"{where}: documents of source type '{type(source).__struct_config__.tag}' (PDFs, URLs, files) are "
                  f"not supported; {TEXT_ONLY} (a 'text' source).", f"{where}.source.type", "unsupported_content")


def _image(block: mw.AnthropicImageBlock, where: str, images: Limits | None) -> ImageInput:
    if images is None:
        raise invalid(f"{where}: content blocks of type 'image' are not supported; {TEXT_ONLY}.", f"{where}.type",
                      "unsupported_content")
    source = block.source
    if isinstance(source, mw.AnthropicUrlSource):
        raise invalid("This server does not fetch image URLs; send the image inline, as a 'base64' source.",
                      f"{where}.source.url", "image_url_not_supported")
    if isinstance(source, mw.AnthropicFileSource):
        raise invalid("No files are stored on this server; send the image inline, as a 'base64' source.",
                      f"{where}.source.file_id", "unsupported_content")
    return image_input(f"data:{source.media_type};base64,{source.data}", f"{where}.source.data",
                       images.max_image_bytes)


def _tools(raw: list[mw.AnthropicTool] | None) -> tuple[Tool, ...]:
    """The client tools; server tools (any other `type`) are skipped: no model here runs them."""
    tools = []
    for i, tool in enumerate(raw or ()):
        if tool.type not in (None, "custom"):
            continue
        if tool.input_schema is None:
            raise invalid(f"tools[{i}].input_schema: a custom tool needs one.", f"tools[{i}].input_schema",
                          "missing_required_parameter")
        tools.append(Tool(tool.name, tool.description or "", tool.input_schema))
    return tuple(tools)


def _tool_choice(raw: mw.ToolChoice | None, tools: tuple[Tool, ...]) -> tuple[ToolChoice, str | None, bool]:
    """Chat's tool_choice, the tool it forces, and whether only the first tool call is wanted."""
    if raw is None:
        return "auto", None, False
    first_only = bool(getattr(raw, "disable_parallel_tool_use", False))
    if isinstance(raw, mw.AnthropicToolChoiceNone):
        return "none", None, False
    if isinstance(raw, mw.AnthropicToolChoiceAuto):
        return "auto", None, first_only
    if not tools:
        raise invalid(f"tool_choice of type '{type(raw).__struct_config__.tag}' needs tools.", "tool_choice",
                      "invalid_value")
    if isinstance(raw, mw.AnthropicToolChoiceTool):
        if raw.name not in {t.name for t in tools}:
            raise invalid(f"tool_choice names {raw.name!r}, which is not in tools.", "tool_choice.name",
                          "invalid_value")
        return "required", raw.name, first_only
    return "required", None, first_only


__all__ = ["MessagesCall", "parse_count_tokens", "parse_messages"]
