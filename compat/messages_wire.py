"""The request bodies of the Anthropic Messages API (POST /v1/messages and /v1/messages/count_tokens),
declared once as msgspec Structs, as compat/wire.py declares OpenAI's: `wire.read` checks a body
against them (a 400 naming the field), and `schemas()` gives them to /openapi.json. What a declaration
cannot say (a custom tool's schema, which blocks a role may carry, images, limits) is checked in
compat/messages_request.py.

The shapes are the `anthropic` SDK's types (message_create_params.py, message_count_tokens_params.py).
Anthropic refuses fields it does not know; here they are ignored, as on the OpenAI routes: Claude
Code sends beta fields on every request (context_management, output_config...) that no declaration
written today can know, and refusing them would break it on its next release.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from compat import wire

MAX_STOP_SEQUENCES = 64
Ignored = Annotated[Any, Meta(description="Accepted and ignored.")]
ToolName = Annotated[str, Meta(pattern=wire.TOOL_NAME)]


# -- content blocks ----------------------------------------------------------------------------------------

class AnthropicTextBlock(Struct, tag_field="type", tag="text"):
    text: str
    cache_control: Ignored = None
    citations: Ignored = None


class AnthropicSystemBlock(Struct):
    """A text block of `system` (its `type` written out: msgspec checks a tag only inside a union)."""

    type: Literal["text"]
    text: str
    cache_control: Ignored = None
    citations: Ignored = None


class AnthropicBase64Source(Struct, tag_field="type", tag="base64"):
    media_type: str
    data: Annotated[str, Meta(description="The file, base64.")]


class AnthropicUrlSource(Struct, tag_field="type", tag="url"):
    """Not fetched: refused (`image_url_not_supported`)."""

    url: str


class AnthropicFileSource(Struct, tag_field="type", tag="file"):
    """No files are stored here: refused (`unsupported_content`)."""

    file_id: str


class AnthropicImageBlock(Struct, tag_field="type", tag="image"):
    """Read by a model that reads images (GLM-4V: one per request, in a user turn, base64); refused on
    the others (`unsupported_content`), as chat's image parts are."""

    source: AnthropicBase64Source | AnthropicUrlSource | AnthropicFileSource
    cache_control: Ignored = None


class AnthropicPlainTextSource(Struct, tag_field="type", tag="text"):
    data: str
    media_type: str = "text/plain"


class AnthropicContentSource(Struct, tag_field="type", tag="content"):
    content: str | list[AnthropicTextBlock | AnthropicImageBlock]


class AnthropicDocumentBlock(Struct, tag_field="type", tag="document"):
    """A text document (a `text` or `content` source) is read as text; a PDF, a URL or a file is
    refused (`unsupported_content`)."""

    source: (AnthropicPlainTextSource | AnthropicContentSource | AnthropicBase64Source | AnthropicUrlSource
             | AnthropicFileSource)
    title: str | None = None
    context: str | None = None
    cache_control: Ignored = None
    citations: Ignored = None


class AnthropicToolUseBlock(Struct, tag_field="type", tag="tool_use"):
    """An earlier answer's tool call (an assistant turn)."""

    id: Annotated[str, Meta(min_length=1)]
    name: Annotated[str, Meta(min_length=1)]
    input: dict[str, Any]
    cache_control: Ignored = None


ToolResultPart = AnthropicTextBlock | AnthropicImageBlock | AnthropicDocumentBlock


class AnthropicToolResultBlock(Struct, tag_field="type", tag="tool_result"):
    """A tool's answer (a user turn), given to the model as a tool turn; its images are refused."""

    tool_use_id: Annotated[str, Meta(min_length=1)]
    content: str | list[ToolResultPart] | None = None
    is_error: bool | None = None
    cache_control: Ignored = None


class AnthropicThinkingBlock(Struct, tag_field="type", tag="thinking"):
    """Skipped: no model here thinks aloud, and another model's thoughts are not this one's."""

    thinking: str
    signature: Ignored = None


class AnthropicRedactedThinkingBlock(Struct, tag_field="type", tag="redacted_thinking"):
    """Skipped."""

    data: str


ContentBlock = (AnthropicTextBlock | AnthropicImageBlock | AnthropicDocumentBlock | AnthropicToolUseBlock
                | AnthropicToolResultBlock | AnthropicThinkingBlock | AnthropicRedactedThinkingBlock)


class AnthropicMessageParam(Struct):
    role: Annotated[Literal["user", "assistant", "system"], Meta(
        description="Consecutive turns of one role are joined into one turn, as Anthropic does; a `system` turn "
                    "takes text only.")]
    content: Annotated[str | list[ContentBlock], Meta(
        description="A string, or content blocks: `text`; in user turns `image`, `document` and `tool_result` "
                    "(before the turn's other blocks); in assistant turns `tool_use`. `thinking` blocks are "
                    "skipped; blocks of other types (server tools') are refused.")]


# -- tools -------------------------------------------------------------------------------------------------

_CUSTOM_TOOL = {"if": {"not": {"required": ["type"], "properties": {"type": {
    "not": {"enum": ["custom", None]}}}}}, "then": {"required": ["input_schema"]}}


class AnthropicTool(Struct, kw_only=True):
    """A client tool (`type` left out or `custom`, with its `input_schema`). Server tools (`web_search_...`,
    `bash_...`, any other `type`) are skipped: no model here runs them."""

    name: ToolName
    description: str | None = None
    input_schema: Annotated[dict[str, Any], Meta(description="A JSON Schema object.")] | None = None
    type: str | None = None
    cache_control: Ignored = None


ParallelFlag = Annotated[bool, Meta(description="`true`: the answer's first tool call only.")]


class AnthropicToolChoiceAuto(Struct, tag_field="type", tag="auto"):
    disable_parallel_tool_use: ParallelFlag | None = None


class AnthropicToolChoiceAny(Struct, tag_field="type", tag="any"):
    """Passed on as "use tools" (chat's `required`), which no engine here can be forced to obey."""

    disable_parallel_tool_use: ParallelFlag | None = None


class AnthropicToolChoiceTool(Struct, tag_field="type", tag="tool"):
    """The tool must be in `tools`; passed on as chat's named tool choice."""

    name: str
    disable_parallel_tool_use: ParallelFlag | None = None


class AnthropicToolChoiceNone(Struct, tag_field="type", tag="none"):
    """The tools are not given to the model."""


ToolChoice = AnthropicToolChoiceAuto | AnthropicToolChoiceAny | AnthropicToolChoiceTool | AnthropicToolChoiceNone


# -- the requests ------------------------------------------------------------------------------------------

class AnthropicCountTokensRequest(Struct, kw_only=True):
    """What the prompt of a message holds. Counted by the model that would answer: the prompt is run
    for one token (`usage.input_tokens` of a message with the same fields is the same count)."""

    model: wire.ModelName
    messages: Annotated[list[AnthropicMessageParam], Meta(min_length=1)]
    system: Annotated[str | list[AnthropicSystemBlock], Meta(
        description="The system prompt: a string, or text blocks (joined by a blank line).")] | None = None
    tools: list[Annotated[AnthropicTool, Meta(extra_json_schema=_CUSTOM_TOOL)]] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Ignored = None
    cache_control: Ignored = None


class AnthropicMessageRequest(AnthropicCountTokensRequest, kw_only=True):
    max_tokens: Annotated[wire.Count, Meta(
        description="The most tokens to generate (required by Anthropic, here optional: the model's room). More than "
                    "the model's context leaves room for are clamped to that room (`stop_reason` `max_tokens`); "
                    "where `MAX_TOKENS_CEILING` sets a ceiling for the model, more is a 400.")] | None = None
    stop_sequences: Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(
        max_length=MAX_STOP_SEQUENCES, description="The answer ends before the first one it would contain "
                                                   "(`stop_reason` `stop_sequence`, with `stop_sequence`).")
                              ] | None = None
    stream: wire.Stream | None = None
    temperature: wire.Temperature | None = None
    top_p: wire.TopP | None = None
    top_k: Ignored = None
    metadata: Ignored = None
    service_tier: Ignored = None


REQUESTS: tuple[type, ...] = (AnthropicMessageRequest, AnthropicCountTokensRequest)

# What joins two fields: a tool_choice naming a tool, or asking for any, needs tools.
_JOINED = {"if": {"required": ["tool_choice"], "properties": {"tool_choice": {
    "required": ["type"], "properties": {"type": {"enum": ["any", "tool"]}}}}},
    "then": {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}}}


def schemas() -> dict[str, Any]:
    """The declarations as OpenAPI 3.1 components, by name."""
    components = msgspec.json.schema_components(REQUESTS, schema_hook=wire._schema,
                                                ref_template="#/components/schemas/{name}")[1]
    for name in ("AnthropicMessageRequest", "AnthropicCountTokensRequest"):
        components[name].update(_JOINED)
    return components


__all__ = ["REQUESTS", "AnthropicCountTokensRequest", "AnthropicMessageRequest", "ContentBlock", "ToolChoice",
           "schemas"]
