"""The objects aigate answers with (chat.completion and its chunks, text_completion, the Responses
API's response, items and stream events, embeddings, models, readiness, errors), declared once: the
OpenAPI document's schemas come from here, and tests/unit/test_answers.py holds what the builders make
to these declarations.

The builders (compat/completion_objects.py, compat/responses_api.py, compat/errors.py, the routes) still
make plain dicts: on the per-token path a dict costs less to build than a Struct
(bench/results/wire_parse.md), and the stream's JSON must not get slower. Every Struct forbids unknown
fields, so a builder that adds one fails the test until it is declared here (and so described).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

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


class TopLogprob(_Answer):
    token: str
    logprob: Annotated[float, Meta(le=0)]
    bytes: Annotated[list[Annotated[int, Meta(ge=0, le=255)]], Meta(description="The token's UTF-8 bytes (a token "
                                                                                "may end inside a character).")]


class TokenLogprob(TopLogprob):
    top_logprobs: Annotated[list[TopLogprob], Meta(description="The most likely tokens at this step, most likely "
                                                               "first, as many as `top_logprobs` asked for.")]


class ChoiceLogprobs(_Answer):
    content: Annotated[list[TokenLogprob], Meta(description="One entry per token of the content.")] | None
    refusal: None


ChoiceIndex = Annotated[int, Meta(ge=0, description="Which of the `n` choices.")]
Logprobs = Annotated[ChoiceLogprobs, Meta(description="With `logprobs: true`; null otherwise.")] | None


class ChatChoice(_Answer):
    index: ChoiceIndex
    message: AssistantAnswer
    logprobs: Logprobs
    finish_reason: FinishReason


class ChatCompletion(_Answer):
    id: ChatId
    object: Literal["chat.completion"]
    created: int
    model: Answered
    choices: Annotated[list[ChatChoice], Meta(min_length=1, max_length=128)]
    usage: Annotated[Usage, Meta(description="The prompt counted once, the choices' tokens summed.")]


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
    index: ChoiceIndex
    delta: Delta
    logprobs: Annotated[ChoiceLogprobs, Meta(description="On content chunks with `logprobs: true`: the tokens whose "
                                                         "text the chunk carries.")] | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(_Answer):
    """For each choice in turn (all of choice 0's chunks, then choice 1's...): the role first, then content
    or tool-call deltas, then a chunk with `finish_reason`; with `stream_options.include_usage`, a last one
    with `choices: []` and `usage`."""

    id: ChatId
    object: Literal["chat.completion.chunk"]
    created: int
    model: Answered
    choices: Annotated[list[ChunkChoice], Meta(max_length=1)]
    usage: Usage | UnsetType = UNSET


# -- legacy completions ------------------------------------------------------------------------------------

CompletionId = Annotated[str, Meta(pattern="^cmpl-")]


class TextLogprobs(_Answer):
    tokens: list[str]
    token_logprobs: list[Annotated[float, Meta(le=0)]]
    top_logprobs: Annotated[list[dict[str, float]], Meta(
        description="Per token, the most likely tokens (`logprobs` of them) and the chosen one, token -> logprob.")]
    text_offset: Annotated[list[Annotated[int, Meta(ge=0)]], Meta(
        description="Where each token's text starts in the choice's text.")]


TextIndex = Annotated[int, Meta(ge=0, description="Prompt p's choice k is p * n + k.")]


class TextChoice(_Answer):
    text: str
    index: TextIndex
    logprobs: Annotated[TextLogprobs, Meta(description="With `logprobs`; null otherwise.")] | None
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
    index: TextIndex
    logprobs: Annotated[TextLogprobs, Meta(description="With `logprobs`, on text chunks: their tokens'.")] | None
    finish_reason: Literal["stop", "length"] | None


class TextCompletionChunk(_Answer):
    """Each prompt's choices' texts, one choice after the other (index p * n + k), each one's last chunk
    carrying `finish_reason`; with `stream_options.include_usage`, a last one with `choices: []` and `usage`."""

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
    controls: Annotated[list[Literal["logprobs", "seed", "logit_bias", "n", "penalties", "tool_choice"]], Meta(
        description="The sampling controls honoured beyond temperature, top_p, stop and max tokens: `logprobs` "
                    "(with `top_logprobs`), `seed`, `logit_bias`, `n` (more than one choice), `penalties` "
                    "(`presence_penalty`, `frequency_penalty`), `tool_choice` (passed on or enforced). A request "
                    "asking for one not listed gets a 400 (zeros and nulls ask for nothing).")]
    structured_outputs: Annotated[bool, Meta(description="Whether a JSON format (`response_format`, `text.format`) is "
                                                         "honoured; refused if not.")]
    images: Annotated[bool, Meta(description="Whether image content parts (`image_url`, `input_image`) are read "
                                             "(GLM-4V); refused if not.")]
    tasks: Annotated[list[Literal["chat", "embeddings", "rerank", "transcription", "speech", "image_generation"]],
                     Meta(description="What the model serves: `chat` (chat completions, completions, responses), "
                                      "`embeddings`, `rerank`, `transcription`, `speech`, `image_generation`; null "
                                      "when not known (an upstream's model: its server decides).")] | None


class ModelStatus(_Answer):
    value: Annotated[Literal["unloaded", "loading", "loaded", "failed"],
                     Meta(description="Whether the local model is in memory now (`loaded`); an unloaded one is "
                                      "loaded by its next request, which waits for it; `failed`: its last load "
                                      "failed (the next request tries again).")]


class Model(_Answer):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    capabilities: Capabilities
    status: Annotated[ModelStatus, Meta(description="A local model's state (llama.cpp's router says it the same "
                                                    "way); absent on models served elsewhere.")] | UnsetType = UNSET


class ModelList(_Answer):
    object: Literal["list"]
    data: list[Model]


class Readiness(_Answer):
    status: Literal["ready", "not ready"]
    backends: Annotated[dict[str, str], Meta(description="Each backend's name and `ready`, or why it is not.")]
    responses: Annotated[str, Meta(description="Why responses cannot be stored now (present only then; answers "
                                               "say `store: false` meanwhile).")] | UnsetType = UNSET


# -- the Responses API ------------------------------------------------------------------------------------

Status = Literal["in_progress", "completed", "incomplete"]


class InputText(_Answer, tag_field="type", tag="input_text"):
    text: str


class OutputText(_Answer, tag_field="type", tag="output_text"):
    text: str
    annotations: list[Any]
    logprobs: Annotated[list[TokenLogprob], Meta(
        description="Each token's, with `include: [\"message.output_text.logprobs\"]` or `top_logprobs`; empty "
                    "otherwise.")] | UnsetType = UNSET  # an assistant turn given as input has none


class EventTopLogprob(_Answer):
    token: str
    logprob: Annotated[float, Meta(le=0)]


class EventLogprob(EventTopLogprob):
    """A token's log probability in a text event (no bytes there, as OpenAI's)."""

    top_logprobs: list[EventTopLogprob]


class InputImage(_Answer, tag_field="type", tag="input_image"):
    image_url: str
    detail: str


class MessageItem(_Answer, tag_field="type", tag="message"):
    """A message given (`user`, `system`, `developer`, or an earlier `assistant` turn) or answered."""

    id: str
    role: Literal["user", "assistant", "system", "developer"]
    content: list[InputText | OutputText | InputImage]
    status: Status


class FunctionCallItem(_Answer, tag_field="type", tag="function_call"):
    id: str
    call_id: str
    name: str
    arguments: Annotated[str, Meta(description="JSON text.")]
    status: Status


class FunctionCallOutputItem(_Answer, tag_field="type", tag="function_call_output"):
    id: str
    call_id: str
    output: str
    status: Status


ResponseItem = MessageItem | FunctionCallItem | FunctionCallOutputItem


class InputTokensDetails(_Answer):
    cached_tokens: Annotated[int, Meta(ge=0, description="Prompt tokens the engine reused from its cache.")]
    cache_write_tokens: Tokens


class OutputTokensDetails(_Answer):
    reasoning_tokens: Tokens


class ResponseUsage(_Answer):
    input_tokens: Tokens
    input_tokens_details: InputTokensDetails
    output_tokens: Tokens
    output_tokens_details: OutputTokensDetails
    total_tokens: Tokens


class ResponseError(_Answer):
    code: Annotated[str, Meta(description="`rate_limit_exceeded`, `invalid_prompt` or `server_error`; the `error` "
                                          "event before `response.failed` carries aigate's own code.")]
    message: str


class IncompleteDetails(_Answer):
    reason: Literal["max_output_tokens"]


class FunctionTool(_Answer, tag_field="type", tag="function"):
    name: str
    description: str | None
    parameters: dict[str, Any]
    strict: bool


class ResponseObject(_Answer):
    """A response: its output, and the request's fields it repeats (`store: false` keeps nothing)."""

    id: Annotated[str, Meta(pattern="^resp_")]
    object: Literal["response"]
    created_at: int
    status: Literal["completed", "incomplete", "failed", "in_progress"]
    background: bool
    error: ResponseError | None
    incomplete_details: IncompleteDetails | None
    instructions: str | list[dict[str, Any]] | None
    max_output_tokens: int | None
    max_tool_calls: None
    model: Answered
    output: list[ResponseItem]
    parallel_tool_calls: bool
    previous_response_id: str | None
    reasoning: dict[str, Any]
    service_tier: str
    store: bool
    temperature: float | None
    text: dict[str, Any]
    tool_choice: str | dict[str, Any]
    tools: list[FunctionTool]
    top_p: float | None
    truncation: str
    usage: ResponseUsage | None
    user: str | None
    metadata: dict[str, Any]
    completed_at: int | UnsetType = UNSET
    output_text: Annotated[str, Meta(description="The output's text, joined (not in stream events).")
                           ] | UnsetType = UNSET


class InputItemList(_Answer):
    object: Literal["list"]
    data: list[ResponseItem]
    first_id: str | None
    last_id: str | None
    has_more: bool


class _Event(_Answer, tag_field="type"):
    sequence_number: Tokens


class _ResponseEvent(_Event):
    response: ResponseObject


class ResponseCreated(_ResponseEvent, tag="response.created"):
    pass


class ResponseInProgress(_ResponseEvent, tag="response.in_progress"):
    pass


class ResponseCompleted(_ResponseEvent, tag="response.completed"):
    pass


class ResponseIncomplete(_ResponseEvent, tag="response.incomplete"):
    pass


class ResponseFailed(_ResponseEvent, tag="response.failed"):
    pass


class _ItemEvent(_Event):
    output_index: Tokens
    item: ResponseItem


class OutputItemAdded(_ItemEvent, tag="response.output_item.added"):
    pass


class OutputItemDone(_ItemEvent, tag="response.output_item.done"):
    pass


class _PartEvent(_Event):
    item_id: str
    output_index: Tokens
    content_index: Tokens
    part: OutputText


class ContentPartAdded(_PartEvent, tag="response.content_part.added"):
    pass


class ContentPartDone(_PartEvent, tag="response.content_part.done"):
    pass


class OutputTextDelta(_Event, tag="response.output_text.delta"):
    item_id: str
    output_index: Tokens
    content_index: Tokens
    delta: str
    logprobs: Annotated[list[EventLogprob], Meta(description="The delta's tokens', when asked.")]


class OutputTextDone(_Event, tag="response.output_text.done"):
    item_id: str
    output_index: Tokens
    content_index: Tokens
    text: str
    logprobs: Annotated[list[EventLogprob], Meta(description="The text's tokens', when asked.")]


class FunctionCallArgumentsDelta(_Event, tag="response.function_call_arguments.delta"):
    item_id: str
    output_index: Tokens
    delta: str


class FunctionCallArgumentsDone(_Event, tag="response.function_call_arguments.done"):
    item_id: str
    output_index: Tokens
    name: str
    arguments: str


class StreamError(_Event, tag="error"):
    """A failure after the stream began, with aigate's own code; `response.failed` follows."""

    code: str
    message: str
    param: str | None


ResponseStreamEvent = Annotated[
    ResponseCreated | ResponseInProgress | OutputItemAdded | ContentPartAdded | OutputTextDelta | OutputTextDone
    | ContentPartDone | OutputItemDone | FunctionCallArgumentsDelta | FunctionCallArgumentsDone | ResponseCompleted
    | ResponseIncomplete | StreamError | ResponseFailed,
    Meta(title="ResponseStreamEvent", description="One event of a Responses stream, numbered by `sequence_number`.")]


ANSWERS: tuple[type, ...] = (ErrorResponse, ChatCompletion, ChatCompletionChunk, TextCompletion, TextCompletionChunk,
                             EmbeddingList, Model, ModelList, Readiness, ResponseObject, InputItemList)
UNIONS: dict[str, Any] = {"ResponseStreamEvent": ResponseStreamEvent}  # a union has no name of its own


CLOSED = ("ErrorResponse", "ErrorBody")  # described as closed; other answers may gain fields, as OpenAI's do


def schemas() -> dict[str, dict[str, object]]:
    """The answers as OpenAPI 3.1 components, by name."""
    refs, components = msgspec.json.schema_components((*ANSWERS, *UNIONS.values()),
                                                      ref_template="#/components/schemas/{name}")
    components.update(zip(UNIONS, refs[len(ANSWERS):]))
    for name, schema in components.items():
        if name not in CLOSED:
            schema.pop("additionalProperties", None)
    return components
