"""What every backend speaks: the request it is given, the events it yields, the errors it raises."""

from __future__ import annotations

import json
import math
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Role = Literal["system", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "tool_calls"]
ToolChoice = Literal["auto", "none", "required"]
# The sampling controls a model may honour beyond temperature, top_p, stop and max_tokens (ModelInfo.controls);
# a request that asks a model for one it lacks gets a 400 naming the models that have it.
Control = Literal["logprobs", "seed", "logit_bias", "n", "penalties", "tool_choice"]


@dataclass(frozen=True)
class ToolCall:
    """A call the model made (in an answer) or made earlier (in the history)."""

    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    choice: int = 0  # in an answer: the choice it belongs to (a request for n choices)


@dataclass(frozen=True)
class Tool:
    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)  # JSON Schema
    strict: bool = False  # the arguments must match parameters exactly (a model that constrains its output)


@dataclass(frozen=True)
class ImageInput:
    """An image a user turn carries (models that read images: GLM-4V). As parsed, ``data`` is the
    image file as sent (base64) and width = height = 0; the backend decodes it into raw RGB pixels
    (base64, width x height x 3 bytes) before the engine sees it."""

    data: str
    width: int = 0
    height: int = 0


@dataclass(frozen=True)
class Message:
    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # assistant turns that called tools
    tool_call_id: str | None = None  # tool turns: the call answered
    name: str | None = None  # tool turns: the function's name, when the client sent it
    images: tuple[ImageInput, ...] = ()  # the image parts of the turn, in order


@dataclass(frozen=True)
class JsonFormat:
    """Structured output asked for: any JSON object (schema None) or one matching a JSON Schema."""

    schema: dict[str, Any] | None = None
    name: str = "response"
    param: str = "response_format"  # where the client asked for it, for errors
    strict: bool = False  # every keyword of the schema enforced (else what cannot be enforced is ignored)


class Caller(Protocol):
    """The request a backend serves, as much of it as a backend may know (aigate's
    web.context.RequestContext): its id, for a backend's log lines; the client's JSON body, whose fields
    aigate does not read an OpenAI-compatible upstream passes on (None: nothing to pass on);
    ``served_by``, for a backend that says which of its servers answered; and ``client_stream()``, the
    connection of a streamed answer, for a backend that can write its text itself (None: it cannot be
    handed over). Ask it only once the first event was passed on: the frame is known from then."""

    @property
    def id(self) -> str: ...

    @property
    def body(self) -> Mapping[str, Any] | None: ...

    def served_by(self, backend: str) -> None: ...

    def client_stream(self) -> ClientStream | None: ...


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: tuple[Message, ...]
    max_tokens: int | None = None  # None: as many as the context allows
    temperature: float | None = None  # None: the backend's default; 0: greedy
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = "auto"
    forced_tool: str | None = None  # the tool the model must call (tool_choice naming one; tool_choice is "required")
    prompt: str | None = None  # raw text to continue (legacy /v1/completions): no chat template, no messages
    incremental: bool = True  # False: the client takes the answer whole, so an upstream may send it whole
    response_format: JsonFormat | None = None  # None: free text
    n: int = 1  # choices to answer with (a backend with the "n" control: one after another, each its own Finish)
    logprobs: bool = False  # each token's log probability on its TextDelta
    top_logprobs: int = 0  # and that many most likely alternatives (0-20)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id of the model's vocabulary, bias -100..100)

    @property
    def controls_asked(self) -> dict[Control, str]:
        """The sampling controls the request asks for, each with the field that asked; zeros and nulls ask
        for nothing (SDKs send presence_penalty: 0 on every request). tool_choice is not among them: it is
        enforced where the model constrains its output, a hint elsewhere."""
        asked: dict[Control, str] = {}
        if self.logprobs:
            asked["logprobs"] = "logprobs"
        if self.seed is not None:
            asked["seed"] = "seed"
        if self.logit_bias:
            asked["logit_bias"] = "logit_bias"
        if self.n > 1:
            asked["n"] = "n"
        if self.presence_penalty or self.frequency_penalty:
            asked["penalties"] = "presence_penalty" if self.presence_penalty else "frequency_penalty"
        return asked

    @property
    def estimated_prompt_tokens(self) -> int:
        """The prompt's tokens where no tokenizer counts them (an upstream or Workers AI that sends no usage,
        the tokens a key's budget reserves): its text at about 4 characters a token and, for chat, what
        the chat template adds (each message's framing and role, the reply's priming, the tools'
        definitions), as OpenAI's counting guidance has it for its own models."""
        if self.prompt is not None:  # raw text: no template around it
            return estimate_tokens(len(self.prompt))
        return (REPLY_TOKENS + sum(_message_tokens(m) for m in self.messages)
                + sum(estimate_tokens(len(_tool_json(t))) for t in self.tools))


# A chat template's own tokens, as OpenAI's counting guidance for chat models has them: each message is framed by
# 3 and its role is 1 more (a name: 1 more than its own tokens), and the reply is primed with 3. Other templates
# differ by a token or so a message: this is an estimate, not a count.
MESSAGE_TOKENS = 4
NAME_TOKENS = 1
REPLY_TOKENS = 3


def _message_tokens(m: Message) -> int:
    chars = len(m.content) + sum(len(c.name) + len(c.arguments) for c in m.tool_calls)
    return MESSAGE_TOKENS + estimate_tokens(chars) + (NAME_TOKENS + estimate_tokens(len(m.name)) if m.name else 0)


def _tool_json(t: Tool) -> str:
    """A tool's definition as the upstream is sent it (its ``function``), which a template writes into the prompt."""
    return json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters},
                      ensure_ascii=False, separators=(",", ":"))


def estimate_tokens(chars: int) -> int:
    """A rough count where no tokenizer tells: about 4 characters a token."""
    return math.ceil(chars / 4)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens served from a cache (the engine's prefix reuse)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TopLogprob:
    token: str  # the token's text (its bytes decoded, U+FFFD where they end inside a character)
    logprob: float
    raw: bytes  # the token's bytes


@dataclass(frozen=True)
class TokenLogprob:
    """The log probability of a token the model chose, and the most likely alternatives at that step."""

    token: str
    logprob: float
    raw: bytes
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class TextDelta:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()  # the tokens whose text this delta completes (a request with logprobs)
    choice: int = 0


@dataclass(frozen=True)
class Finish:
    reason: FinishReason
    usage: Usage  # of this choice: the first choice counts the prompt, later ones only their completion
    stop_sequence: str | None = None  # the request's stop string that ended the answer, where aigate saw it
    choice: int = 0


@dataclass(frozen=True)
class Written:
    """Text the backend wrote to the client itself (the local engine, handed the client's socket):
    ``deltas`` pieces, counted and logged like TextDeltas but not written again."""

    text: str
    deltas: int


Event = TextDelta | ToolCall | Finish | Written


@dataclass(frozen=True)
class PieceFrame:
    """How one text piece of a stream goes on the wire: ``prefix``, then (when ``number`` is set: the
    Responses API's sequence_number, one up a piece) the number and ``after_number``, then the piece
    as a JSON string, then ``suffix``."""

    prefix: bytes
    suffix: bytes
    number: int | None = None
    after_number: bytes = b""


@dataclass(frozen=True)
class ClientStream:
    """A streamed answer's connection, offered to a backend that can write its text pieces itself
    (the local engine, so that no worker sits between the model and the client for every token):
    each piece in ``frame``, in an HTTP/1.1 chunk when ``chunked``; a write that blocks for
    ``write_timeout`` seconds ends the answer."""

    fileno: int
    frame: PieceFrame
    chunked: bool
    write_timeout: float


class ClientGone(Exception):
    """The client closed its connection (``client_gone``), or left its bytes unread for too long
    (``client_too_slow``), before its answer was complete."""

    def __init__(self, reason: str = "client_gone") -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Embeddings:
    vectors: list[list[float]]
    prompt_tokens: int


# What a model serves: chat (chat completions, completions, responses, messages), embeddings, or one of
# backends/media.py's tasks.
Task = Literal["chat", "embeddings", "rerank", "transcription", "speech", "image_generation"]
CHAT: frozenset[Task] = frozenset({"chat"})


@dataclass(frozen=True)
class ModelInfo:
    id: str
    owned_by: str
    created: int = 0
    structured_outputs: bool = False  # can honour a JSON schema (response_format / text.format)
    images: bool = False  # reads image content parts (GLM-4V)
    # What an answer without max_tokens may take (None: the backend sets no bound), and whether the prompt
    # and the answer share that room (a local context) rather than the answer having it all to itself:
    # token budgets reserve a request's most by these.
    open_ended_tokens: int | None = None
    shared_context: bool = False
    tasks: frozenset[Task] | None = CHAT  # None: not known (an upstream's model serves what its server does)
    controls: frozenset[Control] = frozenset()  # the sampling controls it honours
    status: str | None = None  # a local model's: unloaded, loading, loaded or failed (None: always there)


class Backend(Protocol):
    """A backend that also reranks, transcribes, speaks or draws has the method of that task's protocol
    (backends/media.py), and says which of its models serve it (ModelInfo.tasks)."""

    name: str  # for logs, metrics and /ready

    def models(self) -> list[ModelInfo]: ...

    def load(self) -> None:
        """Do the slow start-up work (loading a model); called once, off the request path."""
        ...

    def readiness(self) -> str | None:
        """None when requests can be served; otherwise why not."""
        ...

    def stats(self) -> dict[str, float]:
        """Gauges read at scrape time (e.g. generations running, requests waiting)."""
        ...

    def embed(self, model: str, inputs: list[str], caller: Caller | None = None) -> Embeddings:
        """One vector per input (InvalidRequest if the model makes none)."""
        ...

    def chat(self, request: ChatRequest, caller: Caller | None = None) -> Generator[Event, None, None]:
        """Yield TextDeltas (and ToolCalls) then exactly one Finish, for each of the request's n choices in
        turn (every event carries its choice). Errors raised before the first event are the
        request's fault or the server's state (BackendError); closing the iterator must stop
        the work at once."""
        ...


@dataclass
class BackendError(Exception):
    """A failure a client should hear about. Backends raise the most precise class below; compat maps
    each class to an HTTP status and an OpenAI error type and code (compat/errors.py, one table)."""

    message: str
    param: str | None = None
    retry_after: float | None = None

    def __str__(self) -> str:
        return self.message


class InvalidRequest(BackendError):
    """The engine refused the request as given (the client can fix it)."""


class ContextLengthExceeded(InvalidRequest):
    """The prompt does not fit the model's context."""


class NotSupportedByModel(InvalidRequest):
    """The model cannot do what was asked (embeddings from a chat model)."""


class UpstreamRefused(InvalidRequest):
    """The provider refused the request as given (its own validation)."""


class SchemaNotMet(InvalidRequest):
    """The model could not produce JSON matching the requested schema."""


class ToolsNotSupported(InvalidRequest):
    """The model's family has no tool calling (ChatGLM2)."""


class UnsupportedContent(InvalidRequest):
    """The model takes text only and the request has images."""


class InvalidImage(InvalidRequest):
    """An image part that is not a readable image."""


class ImageTooLarge(InvalidRequest):
    """An image over MAX_IMAGE_BYTES or MAX_IMAGE_PIXELS."""


class TooManyImages(InvalidRequest):
    """More images than the model takes in one request."""


class ModelNotFound(BackendError):
    """The engine does not know the model."""


class RateLimited(BackendError):
    """The engine (or the account behind it) takes no more requests for now."""


class UpstreamOverCapacity(RateLimited):
    """The provider is busy for a moment: worth a retry."""


class UpstreamQuotaExceeded(RateLimited):
    """The account's allocation is used up (until retry_after)."""


class UpstreamRateLimited(RateLimited):
    """An OpenAI-compatible upstream (or every one of a pool) answered 429."""


class UpstreamError(BackendError):
    """The engine behind us failed, refused our credentials, or could not be reached."""


class UpstreamTimeout(UpstreamError):
    """The engine behind us did not answer in time."""


class UpstreamAuthFailed(UpstreamError):
    """The provider rejected our credentials: a configuration problem that resending will not mend."""


class UpstreamBrokenAnswer(UpstreamError):
    """The provider's answer (an error's body) broke off while being read: worth a retry."""


class UpstreamNotFound(UpstreamError):
    """The upstream does not serve the model (any more), or its URL is wrong."""


class Unavailable(BackendError):
    """The backend cannot serve yet (a model still loading) or any more (it failed to load)."""


class QueueFull(BackendError):
    """Every generation slot is busy and the waiting line is full."""


class QueueTimeout(BackendError):
    """The request waited in line longer than QUEUE_TIMEOUT."""
