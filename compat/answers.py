"""The objects aigate answers with (chat.completion and its chunks, text_completion, embeddings,
models, readiness, errors), declared once: the OpenAPI document's schemas come from here, and
tests/test_answers.py holds what the builders make to these declarations.

The builders (compat/responses.py, the routes) still make plain dicts: on the per-token path a
dict costs less to build than a Struct (bench/results/wire_parse.md), and the stream's JSON must
not get slower. Every Struct forbids unknown fields, so a builder that adds one fails the test
until it is declared here (and so described).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType


class _Answer(Struct, forbid_unknown_fields=True):
    pass


Tokens = Annotated[int, Meta(ge=0)]


class ErrorBody(_Answer):
    message: str
    type: Annotated[str, Meta(description="`invalid_request_error` (4xx but 429), `rate_limit_error`, `requests` or "
                                          "`tokens` (429), `server_error` (5xx).")]
    param: Annotated[str, Meta(description="The field at fault, e.g. `messages[0].content`.")] | None
    code: str | None


class ErrorResponse(_Answer):
    error: ErrorBody


class PromptTokensDetails(_Answer):
    cached_tokens: Annotated[int, Meta(ge=0, description="Prompt tokens taken from the local engine's KV cache (a "
                                                         "conversation's earlier turns).")]


class Usage(_Answer):
    prompt_tokens: Tokens
    completion_tokens: Tokens
    total_tokens: Tokens
    prompt_tokens_details: PromptTokensDetails


# -- chat --------------------------------------------------------------------------------------------------

class FunctionCall(_Answer):
    name: str
    arguments: Annotated[str, Meta(description="JSON text.")]


class ToolCall(_Answer):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantAnswer(_Answer):
    role: Literal["assistant"]
    content: Annotated[str, Meta(description="null when the answer is only tool calls.")] | None
    tool_calls: Annotated[list[ToolCall], Meta(min_length=1)] | UnsetType = UNSET
    function_call: Annotated[FunctionCall, Meta(
        description="The first tool call, when the request used the deprecated `functions`.")] | UnsetType = UNSET


FinishReason = Annotated[Literal["stop", "length", "tool_calls", "function_call"], Meta(
    description="`function_call` (with `function_call`) when the request used the deprecated `functions`.")]
ChatId = Annotated[str, Meta(pattern="^chatcmpl-")]
Answered = Annotated[str, Meta(description="The model that answered (the served id, or the fallback that took over).")]


class ChatChoice(_Answer):
    index: Literal[0]
    message: AssistantAnswer
    logprobs: None
    finish_reason: FinishReason


class ChatCompletion(_Answer):
    id: ChatId
    object: Literal["chat.completion"]
    created: int
    model: Answered
    choices: Annotated[list[ChatChoice], Meta(min_length=1, max_length=1)]
    usage: Usage


class FunctionDelta(_Answer):
    name: str | UnsetType = UNSET
    arguments: str | UnsetType = UNSET


class ToolCallDelta(_Answer):
    index: Annotated[int, Meta(ge=0)]
    function: FunctionDelta
    id: str | UnsetType = UNSET
    type: Literal["function"] | UnsetType = UNSET


class Delta(_Answer):
    role: Literal["assistant"] | UnsetType = UNSET
    content: str | UnsetType = UNSET
    tool_calls: list[ToolCallDelta] | UnsetType = UNSET
    function_call: FunctionDelta | UnsetType = UNSET


class ChunkChoice(_Answer):
    index: Literal[0]
    delta: Delta
    logprobs: None
    finish_reason: FinishReason | None


class ChatCompletionChunk(_Answer):
    """The role first, then content or tool-call deltas, then a chunk with `finish_reason`; with
    `stream_options.include_usage`, a last one with `choices: []` and `usage`."""

    id: ChatId
    object: Literal["chat.completion.chunk"]
    created: int
    model: Answered
    choices: Annotated[list[ChunkChoice], Meta(max_length=1)]
    usage: Usage | UnsetType = UNSET


# -- legacy completions ------------------------------------------------------------------------------------

CompletionId = Annotated[str, Meta(pattern="^cmpl-")]


class TextChoice(_Answer):
    text: str
    index: Annotated[int, Meta(ge=0)]
    logprobs: None
    finish_reason: Literal["stop", "length"]


class TextCompletion(_Answer):
    id: CompletionId
    object: Literal["text_completion"]
    created: int
    model: Answered
    choices: Annotated[list[TextChoice], Meta(min_length=1)]
    usage: Usage


class TextChunkChoice(_Answer):
    text: str
    index: Annotated[int, Meta(ge=0)]
    logprobs: None
    finish_reason: Literal["stop", "length"] | None


class TextCompletionChunk(_Answer):
    """Each prompt's text as choice `index`, one prompt after the other, its last chunk carrying
    `finish_reason`; with `stream_options.include_usage`, a last one with `choices: []` and `usage`."""

    id: CompletionId
    object: Literal["text_completion"]
    created: int
    model: Answered
    choices: Annotated[list[TextChunkChoice], Meta(max_length=1)]
    usage: Usage | UnsetType = UNSET


# -- embeddings, models, readiness -------------------------------------------------------------------------

class Embedding(_Answer):
    object: Literal["embedding"]
    index: Annotated[int, Meta(ge=0)]
    embedding: list[float] | Annotated[str, Meta(extra_json_schema={"contentEncoding": "base64"})]


class EmbeddingUsage(_Answer):
    prompt_tokens: Tokens
    total_tokens: Tokens


class EmbeddingList(_Answer):
    object: Literal["list"]
    data: Annotated[list[Embedding], Meta(min_length=1)]
    model: str
    usage: EmbeddingUsage


class Capabilities(_Answer):
    structured_outputs: Annotated[bool, Meta(description="Whether a JSON format (`response_format`, `text.format`) is "
                                                         "honoured; refused if not.")]
    images: Annotated[bool, Meta(description="Whether image content parts (`image_url`, `input_image`) are read "
                                             "(GLM-4V); refused if not.")]


class Model(_Answer):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    capabilities: Capabilities


class ModelList(_Answer):
    object: Literal["list"]
    data: list[Model]


class Readiness(_Answer):
    status: Literal["ready", "not ready"]
    backends: Annotated[dict[str, str], Meta(description="Each backend's name and `ready`, or why it is not.")]


ANSWERS: tuple[type, ...] = (ErrorResponse, ChatCompletion, ChatCompletionChunk, TextCompletion, TextCompletionChunk,
                             EmbeddingList, Model, ModelList, Readiness)


CLOSED = ("ErrorResponse", "ErrorBody")  # described as closed; other answers may gain fields, as OpenAI's do


def schemas() -> dict[str, dict[str, object]]:
    """The answers as OpenAPI 3.1 components, by name."""
    components = msgspec.json.schema_components(ANSWERS, ref_template="#/components/schemas/{name}")[1]
    for name, schema in components.items():
        if name not in CLOSED:
            schema.pop("additionalProperties", None)
    return components
