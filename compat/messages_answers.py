"""What the Anthropic Messages API routes answer with (the message, its stream events, the token count,
errors), declared once as compat/answers.py declares OpenAI's: the OpenAPI document's schemas come from
here, and tests/unit/test_messages_api.py holds what compat/messages_codec.py builds to these declarations
(every Struct refuses unknown fields). Shapes: the `anthropic` SDK's types."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from compat.answers import Tokens, _Answer

ErrorType = Literal["invalid_request_error", "authentication_error", "permission_error", "not_found_error",
                    "request_too_large", "rate_limit_error", "timeout_error", "api_error", "overloaded_error"]


class AnthropicErrorObject(_Answer):
    type: Annotated[ErrorType, Meta(description="By status: 400 `invalid_request_error`, 401 `authentication_error`, "
                                                "403 `permission_error`, 404 `not_found_error`, 408 and 504 "
                                                "`timeout_error`, 413 `request_too_large`, 429 `rate_limit_error`, "
                                                "503 `overloaded_error`, other 5xx `api_error`.")]
    message: str


class AnthropicErrorResponse(_Answer):
    type: Literal["error"]
    error: AnthropicErrorObject
    request_id: Annotated[str, Meta(description="The request's id (also its `request-id` header).")
                          ] | UnsetType = UNSET


class AnthropicUsage(_Answer):
    input_tokens: Annotated[int, Meta(ge=0, description="Prompt tokens not read from a cache.")]
    cache_creation_input_tokens: Annotated[int, Meta(ge=0, le=0, description="Always 0 (no cache is written "
                                                                             "on request).")]
    cache_read_input_tokens: Annotated[int, Meta(ge=0, description="Prompt tokens the engine reused from its cache "
                                                                   "(a conversation's earlier turns).")]
    output_tokens: Tokens


class AnthropicTextContent(_Answer, tag_field="type", tag="text"):
    text: str


class AnthropicToolUseContent(_Answer, tag_field="type", tag="tool_use"):
    id: str
    name: str
    input: Annotated[dict[str, Any], Meta(description="The call's arguments (arguments that are not a JSON object "
                                                      "are kept as `arguments`).")]


AnthropicContent = AnthropicTextContent | AnthropicToolUseContent
StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class AnthropicMessage(_Answer):
    id: Annotated[str, Meta(pattern="^msg_")]
    type: Literal["message"]
    role: Literal["assistant"]
    model: Annotated[str, Meta(description="The model that answered (the served id, or the fallback that took over).")]
    content: list[AnthropicContent]
    stop_reason: Annotated[StopReason, Meta(description="null only in `message_start`.")] | None
    stop_sequence: Annotated[str, Meta(description="The stop sequence that ended the answer, if one did.")] | None
    usage: AnthropicUsage


class AnthropicTokenCount(_Answer):
    input_tokens: Annotated[int, Meta(ge=0, description="The prompt's tokens (what `usage.input_tokens` plus "
                                                        "`cache_read_input_tokens` of the same message say).")]


class _StreamEvent(_Answer, tag_field="type"):
    pass


class AnthropicMessageStart(_StreamEvent, tag="message_start"):
    message: AnthropicMessage


class AnthropicContentBlockStart(_StreamEvent, tag="content_block_start"):
    index: Tokens
    content_block: AnthropicContent


class AnthropicTextDelta(_Answer, tag_field="type", tag="text_delta"):
    text: str


class AnthropicInputJsonDelta(_Answer, tag_field="type", tag="input_json_delta"):
    partial_json: str


class AnthropicContentBlockDelta(_StreamEvent, tag="content_block_delta"):
    index: Tokens
    delta: AnthropicTextDelta | AnthropicInputJsonDelta


class AnthropicContentBlockStop(_StreamEvent, tag="content_block_stop"):
    index: Tokens


class AnthropicMessageDeltaBody(_Answer):
    stop_reason: StopReason
    stop_sequence: str | None


class AnthropicMessageDelta(_StreamEvent, tag="message_delta"):
    delta: AnthropicMessageDeltaBody
    usage: AnthropicUsage


class AnthropicMessageStop(_StreamEvent, tag="message_stop"):
    pass


class AnthropicPing(_StreamEvent, tag="ping"):
    pass


class AnthropicStreamError(_StreamEvent, tag="error"):
    """A failure after the stream began; nothing follows it."""

    error: AnthropicErrorObject
    request_id: str | UnsetType = UNSET


AnthropicStreamEvent = Annotated[
    AnthropicMessageStart | AnthropicContentBlockStart | AnthropicPing | AnthropicContentBlockDelta
    | AnthropicContentBlockStop | AnthropicMessageDelta | AnthropicMessageStop | AnthropicStreamError,
    Meta(title="AnthropicStreamEvent", description="One event of a Messages stream (its `event:` line says its "
                                                   "`type`).")]

ANSWERS: tuple[type, ...] = (AnthropicErrorResponse, AnthropicMessage, AnthropicTokenCount)
UNIONS: dict[str, Any] = {"AnthropicStreamEvent": AnthropicStreamEvent}
CLOSED = ("AnthropicErrorResponse", "AnthropicErrorObject")


def schemas() -> dict[str, dict[str, object]]:
    """The answers as OpenAPI 3.1 components, by name (closed only where compat/answers.py closes its own)."""
    refs, components = msgspec.json.schema_components((*ANSWERS, *UNIONS.values()),
                                                      ref_template="#/components/schemas/{name}")
    components.update(zip(UNIONS, refs[len(ANSWERS):]))
    for name, schema in components.items():
        if name not in CLOSED:
            schema.pop("additionalProperties", None)
    return components
