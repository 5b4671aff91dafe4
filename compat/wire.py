"""The request bodies of /v1/chat/completions, /v1/completions, /v1/embeddings and /v1/responses,
declared once as msgspec Structs: `read` checks a body against its declaration (a 400 naming the field), and
`schemas()` gives the same declarations as the OpenAPI document's components (/openapi.json).

msgspec was chosen by measurement (bench/results/wire_parse.md: it reads a chat request about 10x
faster than the hand-written parser before it, pydantic v2 about 3x). What a declaration cannot say
stays a check in compat/requests.py after it: the server's limits, what a model supports (images; the
sampling controls, once the model is known: compat/controls.py), and what depends on two fields (a
tool_choice naming a tool in tools).

Unknown fields are ignored, and a field sent as null is the same as a field left out.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from compat.errors import APIError, invalid, printable

T = TypeVar("T")


# -- numbers as JSON has them ------------------------------------------------------------------------------

class Integer(int):
    """An integer; 5.0 is read as 5 (JSON does not tell them apart), true is not an integer."""

    minimum: int | None = None
    maximum: int | None = None


class Count(Integer):
    """An integer of at least 1."""

    minimum = 1


class Choices(Count):
    """How many choices to answer with (OpenAI's bound)."""

    maximum = 128


class TopLogprobs(Integer):
    """How many most likely alternatives to give with each token's log probability (chat, Responses)."""

    minimum, maximum = 0, 20


class LegacyLogprobs(Integer):
    """/v1/completions' `logprobs`: the alternatives per token, at most 5 (OpenAI's bound)."""

    minimum, maximum = 0, 5


def _decode(kind: type, value: Any) -> Any:
    if isinstance(kind, type) and issubclass(kind, Integer):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if type(value) is not int:
            raise TypeError(f"Expected `int`, got `{_json_type(value)}`")
        if kind.minimum is not None and value < kind.minimum:
            raise ValueError(f"Expected `int` >= {kind.minimum}")
        if kind.maximum is not None and value > kind.maximum:
            raise ValueError(f"Expected `int` <= {kind.maximum}")
        return kind(value)
    raise NotImplementedError(kind)


def _schema(kind: type) -> dict[str, Any]:
    if isinstance(kind, type) and issubclass(kind, Integer):
        bounds = {"minimum": kind.minimum, "maximum": kind.maximum}
        return {"type": "integer", **{k: v for k, v in bounds.items() if v is not None}}
    raise NotImplementedError(kind)


def _json_type(value: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "str", list: "array", dict: "object",
            type(None): "null"}.get(type(value), type(value).__name__)


def _doc(text: str, **extra: Any) -> Meta:
    return Meta(description=text, extra_json_schema=extra or None)


Temperature = Annotated[float, Meta(ge=0, le=2, description="0 is greedy decoding.")]
TopP = Annotated[float, Meta(ge=0, le=1)]
REFUSED_ELSEWHERE = ("Honoured by the models whose `capabilities.controls` list it, refused on the others "
                     "(`unsupported_parameter`, naming those that can); never ignored.")
Penalty = Annotated[float, Meta(ge=-2, le=2, description=f"0 asks for nothing. {REFUSED_ELSEWHERE} (control "
                                                         "`penalties`; Workers AI takes negative values as 0).")]
MaxTokens = Annotated[Count, _doc(
    "The most tokens to generate; more than the model's context leaves room for are clamped to that room "
    "(`finish_reason` `length`). Where `MAX_TOKENS_CEILING` sets a ceiling for the model, more is a 400 and none "
    "asked for means the ceiling.")]
Seed = Annotated[Integer, _doc(f"The same seed and request give the same answer. {REFUSED_ELSEWHERE} (control "
                               "`seed`; Workers AI is passed it when 1 to 9999999999).")]
ModelName = Annotated[str, Meta(min_length=1, description="A model id or alias from `GET /v1/models`.")]
One = Annotated[Count, _doc("One choice per request; more are refused (`unsupported_value`).", maximum=1)]
ManyChoices = Annotated[Choices, _doc("How many choices to answer with, each its own `index`; usage counts the prompt "
                                      "once and the choices' tokens summed. More than 1 is honoured by the models "
                                      "whose `capabilities.controls` list `n`, refused on the others "
                                      "(`unsupported_value`).")]
NonEmpty = Annotated[str, Meta(min_length=1)]
MAX_STOP_SEQUENCES = 4
MAX_INPUTS = 2048  # embedding inputs per request, OpenAI's limit
Stop = Annotated[NonEmpty | Annotated[list[NonEmpty], Meta(max_length=MAX_STOP_SEQUENCES)], Meta(
    description="Up to 4 non-empty sequences; the answer ends before the first one it would contain.")]
Stream = Annotated[bool, Meta(description="true answers with server-sent events (`text/event-stream`).")]
User = Annotated[str, Meta(description="Accepted and ignored.")]
TOOL_NAME = "^[A-Za-z0-9_-]{1,64}$"


class StreamOptions(Struct):
    include_usage: Annotated[bool, Meta(description="End the stream with a chunk holding `usage` and "
                                                    "`choices: []`.")] | None = None


class Sampling(Struct, kw_only=True):
    """What every generating endpoint takes besides its input."""

    model: ModelName
    n: ManyChoices | None = None
    user: User | None = None
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: Stop | None = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    stream: Stream | None = None
    stream_options: StreamOptions | None = None


# -- chat --------------------------------------------------------------------------------------------------

class TextPart(Struct, tag_field="type", tag="text"):
    text: str


class ImageUrl(Struct):
    url: Annotated[str, Meta(description="A base64 data: URL (`data:image/png;base64,...`); image URLs are not "
                                         "fetched (`image_url_not_supported`).")]


class ImagePart(Struct, tag_field="type", tag="image_url"):
    """Read by a model that reads images (GLM-4V), in a user turn, one per request; refused elsewhere
    (`unsupported_content`)."""

    image_url: ImageUrl | str


ContentPart = TextPart | ImagePart
MessageContent = Annotated[str | list[ContentPart], Meta(
    description="A string, or text parts (joined). Image parts only for a model that reads them; audio and "
                "file parts are refused (`unsupported_content`).")]


class HistoryFunction(Struct):
    name: NonEmpty
    arguments: Annotated[Any, Meta(description="JSON text (an object is taken as meant).")] = UNSET


class HistoryToolCall(Struct):
    function: HistoryFunction
    id: Any = None
    type: Any = None


class _ContentMessage(Struct, tag_field="role", kw_only=True):
    content: MessageContent
    tool_call_id: Annotated[str, Meta(description="For `tool` turns, the call answered.")] | None = None
    name: Annotated[str, Meta(description="For `tool` turns, the function's name.")] | None = None


class SystemMessage(_ContentMessage, tag="system"):
    pass


class DeveloperMessage(_ContentMessage, tag="developer"):
    """Taken as `system`."""


class UserMessage(_ContentMessage, tag="user"):
    pass


class ToolMessage(_ContentMessage, tag="tool"):
    pass


class FunctionMessage(_ContentMessage, tag="function"):
    """The deprecated form of `tool`."""


class AssistantMessage(Struct, tag_field="role", tag="assistant", kw_only=True):
    """An earlier answer, with the tool calls it made."""

    content: MessageContent | None = None
    tool_calls: list[HistoryToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


ChatMessage = SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage | FunctionMessage


Strict = Annotated[bool, Meta(description="Output that must match the schema exactly; a model that constrains its "
                                         "output enforces every keyword (and refuses one it cannot), others take it "
                                         "as a hint.")]


class FunctionDefinition(Struct):
    name: Annotated[str, Meta(pattern=TOOL_NAME)]
    description: str = ""
    parameters: Annotated[dict[str, Any], Meta(description="A JSON Schema object.")] = {}
    strict: Strict | None = None


class Tool(Struct):
    function: FunctionDefinition
    type: Literal["function"] = "function"


class NamedFunction(Struct):
    name: str


class NamedToolChoice(Struct):
    function: NamedFunction
    type: Any = "function"


ToolChoice = Annotated[Literal["none", "auto", "required"] | NamedToolChoice, Meta(
    description="`required` or a named function needs `tools` (and the name one of them). OpenAI-compatible upstreams "
                "are passed it (control `tool_choice`); Workers AI takes tools as a hint only; the local model "
                "enforces it where its engine constrains its output.")]


class TextFormat(Struct, tag_field="type", tag="text"):
    pass


class JsonObjectFormat(Struct, tag_field="type", tag="json_object"):
    pass


class JsonSchemaSpec(Struct):
    schema: dict[str, Any]
    name: str = "response"
    strict: Strict | None = None


class JsonSchemaFormat(Struct, tag_field="type", tag="json_schema"):
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Meta(
    description="`json_object` and `json_schema` are honoured by the models whose `capabilities.structured_outputs` "
                "is true (Workers AI's JSON mode) and refused on the others (`unsupported_value`, naming those that "
                "can); never ignored.")]


class ChatCompletionRequest(Sampling, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: Annotated[MaxTokens, Meta(
        description="Takes precedence over `max_tokens` (both are checked when both are sent).")] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    response_format: ResponseFormat | None = None
    logprobs: Annotated[bool, Meta(description=f"`true`: each content token's log probability. {REFUSED_ELSEWHERE} "
                                               "(control `logprobs`).")] | None = None
    top_logprobs: Annotated[TopLogprobs, Meta(description="With `logprobs`, that many most likely alternatives per "
                                                          "token (0 to 20).")] | None = None
    logit_bias: Annotated[dict[Annotated[str, Meta(pattern="^[0-9]+$")], Annotated[float, Meta(ge=-100, le=100)]],
                          Meta(max_length=300, description="Token id (of the model's own vocabulary, as a string) -> "
                                                           "a bias from -100 to 100 added to its logit; at most 300. "
                                                           f"Empty asks for nothing. {REFUSED_ELSEWHERE} (control "
                                                           "`logit_bias`).")] | None = None
    functions: Annotated[Any, Meta(description="Deprecated: read as `tools` (ignored when `tools` is sent).")] = None
    function_call: Annotated[Any, Meta(description="Deprecated: read as `tool_choice`.")] = None
    parallel_tool_calls: Annotated[Any, Meta(description="Accepted and ignored.")] = None


# -- legacy completions and embeddings ---------------------------------------------------------------------

IDS_AS_TEXT = ("Token ids of cl100k_base (OpenAI's encoding) are taken too, a list of them or a list of such lists, "
             "and read as the text they stand for; an id that is not one is a 400 (`invalid_value`).")


class CompletionRequest(Sampling, kw_only=True):
    prompt: Annotated[str | Annotated[list[str], Meta(min_length=1)], Meta(
        description=f"One text, or several (one choice each). {IDS_AS_TEXT}")]
    max_tokens: Annotated[Count, Meta(description="The most tokens to generate (see chat's `max_tokens`).",
                                      extra_json_schema={"default": 16})] | None = None
    echo: Annotated[bool, Meta(description="Put the prompt in front of its answer.")] | None = None
    suffix: Annotated[str, Meta(description="Not read here (no model served here fills in the middle); an "
                                            "OpenAI-compatible upstream is passed it.")
                      ] | None = None
    best_of: Annotated[Choices, Meta(description="Only equal to `n` (no answer is chosen among more).")
                       ] | None = None
    logprobs: Annotated[LegacyLogprobs, Meta(description="Each token's log probability, with that many most likely "
                                                         "alternatives (0 to 5). Not with `echo` (the prompt's are "
                                                         f"not computed). {REFUSED_ELSEWHERE} (control `logprobs`).")
                        ] | None = None


class EmbeddingRequest(Struct, kw_only=True):
    model: ModelName
    input: Annotated[NonEmpty | Annotated[list[NonEmpty], Meta(min_length=1, max_length=MAX_INPUTS)], Meta(
        description=f"One text or up to 2048, none empty. {IDS_AS_TEXT} LangChain's `OpenAIEmbeddings` sends them.",
        )]
    encoding_format: Annotated[Literal["float", "base64"], Meta(
        description="`float` (the default) or `base64` (little-endian float32s, as the Python SDK asks for).")
                               ] | None = None
    dimensions: Annotated[Count, Meta(description="Only the model's own size is accepted (these models cannot "
                                                  "shorten their vectors).")] | None = None
    n: One | None = None
    user: User | None = None


# -- the Responses API -------------------------------------------------------------------------------------
# Its top-level fields are declared; the input items, function tools and tool_choice, whose unknown kinds
# are skipped rather than refused (Codex sends hosted tools and reasoning items on every turn), are read
# by hand in compat/responses_api.py, and described here.

Item = dict[str, Any]
_FUNCTION_TOOL = {"description": "Only `function` tools are used; the others are skipped.",
                  "if": {"required": ["type"], "properties": {"type": {"const": "function"}}},
                  "then": {"required": ["name"], "properties": {
                      "name": {"type": "string", "pattern": TOOL_NAME},
                      "description": {"type": ["string", "null"]}, "parameters": {"type": ["object", "null"]},
                      "strict": {"type": ["boolean", "null"]}}}}
_TEXT_FORMAT = {"properties": {"format": {
    "description": "Structured outputs, as `response_format` in chat completions.",
    "oneOf": [{"type": "null"},
              {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
              {"type": "object", "required": ["type", "schema"], "properties": {
                  "type": {"const": "json_schema"}, "name": {"type": "string"}, "schema": {"type": "object"},
                  "strict": {"type": ["boolean", "null"]}}}]}}}
Ignored = Annotated[Any, Meta(description="Accepted and ignored.")]


class ResponseRequest(Struct, kw_only=True):
    model: ModelName
    input: Annotated[str | list[Item], Meta(
        description="A user message as a string, or input items: messages (roles `user`, `assistant`, `system`, "
                    "`developer`; content as a string or `input_text` / `output_text` parts), `function_call` and "
                    "`function_call_output` items; others (`reasoning`...) are skipped.")] | None = None
    instructions: Annotated[str | list[Item], Meta(
        description="A system message before the input (not carried over by `previous_response_id`).")] | None = None
    previous_response_id: Annotated[str, Meta(
        description="Continue a stored response of this key (its input and output come before `input`).")
                                    ] | None = None
    store: Annotated[bool, Meta(description="Keep the response (the default); `false` keeps nothing.")] | None = None
    stream: Stream | None = None
    max_output_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    tools: list[Annotated[Item, Meta(extra_json_schema=_FUNCTION_TOOL)]] | None = None
    tool_choice: Annotated[Any, Meta(extra_json_schema={"oneOf": [{"enum": ["none", "auto", "required", None]},
                                                                  {"type": "object"}]})] = None
    parallel_tool_calls: Annotated[bool, Meta(description="`false`: the first tool call only.")] | None = None
    text: Annotated[Item, Meta(extra_json_schema=_TEXT_FORMAT)] | None = None
    metadata: dict[str, Any] | None = None
    user: User | None = None
    n: One | None = None
    top_logprobs: Annotated[TopLogprobs, Meta(description="Each output token's log probability with that many most "
                                                          "likely alternatives (0 to 20), in `output_text.logprobs`.")
                            ] | None = None
    include: Annotated[Any, Meta(description="`message.output_text.logprobs` asks for each output token's log "
                                             f"probability. {REFUSED_ELSEWHERE} (control `logprobs`.) Other values are "
                                             "accepted and ignored.")] = None
    background: Annotated[Any, Meta(description="`true` is refused (`unsupported_parameter`).")] = None
    conversation: Annotated[Any, Meta(description="Refused (`unsupported_parameter`); use `previous_response_id`.",
                                      extra_json_schema={"type": "null"})] = None
    prompt: Annotated[Any, Meta(description="Refused (`unsupported_parameter`).", extra_json_schema={"type": "null"})
                      ] = None
    reasoning: Ignored = None
    prompt_cache_key: Ignored = None
    client_metadata: Ignored = None


REQUESTS: tuple[type, ...] = (ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ResponseRequest)


# -- reading a body ----------------------------------------------------------------------------------------

def read(body: Any, declaration: type[T]) -> T:
    """``body`` (parsed JSON) as ``declaration``, or the 400 naming the first field at fault."""
    try:
        return msgspec.convert(body, declaration, strict=True, dec_hook=_decode)
    except msgspec.ValidationError as err:
        raise fault(str(err), body, EXCEPTIONS.get(declaration, _COMMON)) from None
    except UnicodeEncodeError:  # a lone surrogate ("\\ud800") where msgspec reads a name or value as UTF-8
        raise _surrogate_fault(body, declaration) from None


def _surrogate_fault(body: Any, declaration: type) -> APIError:
    """The 400 for a body holding a lone UTF-16 surrogate where it cannot be: the field at fault as it would
    be with the surrogate written as its escape (a role, a number, an enum...), else the key holding one."""
    escaped = _escaped(body)
    try:
        msgspec.convert(escaped, declaration, strict=True, dec_hook=_decode)
    except msgspec.ValidationError as err:
        return fault(str(err), escaped, EXCEPTIONS.get(declaration, _COMMON))
    except UnicodeEncodeError:
        pass
    where = _surrogate_key(body)
    if where is None:  # not met: msgspec encodes keys and the values it checks, both escaped above
        return invalid("The request body holds a lone UTF-16 surrogate, which is not valid Unicode.",
                       code="invalid_value")
    return invalid(f"Invalid key '{where}': a lone UTF-16 surrogate is not valid Unicode.", where, "invalid_value")


def _escaped(value: Any) -> Any:
    """``value`` with every string (and key) written with its lone surrogates escaped."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, list):
        return [_escaped(v) for v in value]
    if isinstance(value, dict):
        return {printable(k): _escaped(v) for k, v in value.items()}
    return value


def _surrogate_key(value: Any, path: str = "") -> str | None:
    """The path of the first key that holds a lone surrogate (the key itself last, escaped)."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        here = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key
        if isinstance(key, str) and printable(key) != key:
            return printable(here)
        found = _surrogate_key(child, here)
        if found is not None:
            return found
    return None


# Where the answers clients had before the declarations differ from the generic ones (a missing field:
# missing_required_parameter; a wrong JSON type: invalid_type; a wrong value: invalid_value; an empty
# array: empty_array): for each declaration, the field (its indices written []) and the kind of fault
# -> the code, and the field named if it is not the one at fault. One table, so that clients keep the
# param and code they were given (tests/unit/test_wire.py holds every recorded case to it).
Rows = dict[tuple[str, str], tuple[str, str | None]]
_ALL = ("missing", "type", "value", "empty")
_TOO_LATE = "tools[].function"
_COMMON: Rows = {
    **{("model", k): ("invalid_type", None) for k in ("type", "value")},
    ("stop[]", "missing"): ("invalid_type", "stop"), ("stop[]", "type"): ("invalid_type", "stop"),
    ("stop[]", "value"): ("invalid_value", "stop"),
}
_CHAT: Rows = {
    **{("messages[].role", k): ("invalid_value", None) for k in _ALL},
    ("messages[].content[]", "type"): ("unsupported_content", "messages[].content[].type"),
    **{("messages[].content[].type", k): ("unsupported_content", None) for k in _ALL},
    ("messages[].content[].text", "missing"): ("invalid_type", None),
    **{("messages[].content[].image_url", k): ("invalid_type", "messages[].content[].image_url.url") for k in _ALL},
    ("messages[].content[].image_url.url", "missing"): ("invalid_type", None),
    **{(p, k): ("invalid_type", "messages[].tool_calls[].function.name") for k in _ALL
       for p in ("messages[].tool_calls[]", "messages[].tool_calls[].function",
                 "messages[].tool_calls[].function.name")},
    **{(p, k): ("invalid_value", "tools[].type") for k in _ALL for p in ("tools[]", "tools[].type")},
    **{("tools[].function", k): ("invalid_type", None) for k in _ALL},
    **{("tools[].function.name", k): ("invalid_value", None) for k in _ALL},
    **{(f"{_TOO_LATE}.{p}", k): ("invalid_type", _TOO_LATE) for k in _ALL for p in ("description", "parameters")},
    **{(p, k): ("invalid_value", "tool_choice") for k in _ALL
       for p in ("tool_choice", "tool_choice.function", "tool_choice.function.name")},
    **{(p, k): ("invalid_value", "response_format") for k in _ALL for p in ("response_format", "response_format.type")},
    **{(p, k): ("invalid_type", None) for k in _ALL
       for p in ("response_format.json_schema", "response_format.json_schema.schema",
                 "response_format.json_schema.name")},
}
EXCEPTIONS: dict[type, Rows] = {
    ChatCompletionRequest: {**_COMMON, **_CHAT},
    CompletionRequest: {**_COMMON, **{("prompt", k): ("invalid_type", None) for k in _ALL},
                        **{("prompt[]", k): ("invalid_type", "prompt") for k in _ALL}},
    EmbeddingRequest: {**_COMMON, ("input", "missing"): ("invalid_type", None),
                       ("input", "type"): ("invalid_type", None),
                       ("input", "empty"): ("invalid_type", None), ("input[]", "missing"): ("invalid_type", "input"),
                       ("input[]", "type"): ("invalid_type", "input"), ("input[]", "value"): ("invalid_value", "input"),
                       ("encoding_format", "type"): ("invalid_value", None)},
    ResponseRequest: _COMMON,
}
CODES = {"missing": "missing_required_parameter", "type": "invalid_type", "value": "invalid_value",
         "empty": "empty_array"}
_AT = re.compile(r"^(?P<what>.*?)(?: - at (?P<key>`key` in )?`\$(?P<path>.*)`)?$", re.S)
_MISSING = re.compile(r"Object missing required field `(?P<field>[^`]+)`")
_INDEX = re.compile(r"\[\d+\]")


def fault(error: str, body: Any, rows: Rows) -> APIError:
    """The 400 for msgspec's ``error`` ("<what> - at `$.messages[0].role`") on ``body``, with the
    declaration's EXCEPTIONS ``rows``."""
    found = _AT.match(error)
    what, path = (found.group("what"), (found.group("path") or "").lstrip(".")) if found else (error, "")
    path = path.replace("[...]", "")  # a map's value (logit_bias): the map is the field at fault
    if found and found.group("key"):
        what = f"a key: {what[0].lower()}{what[1:]}"
    missing = _MISSING.match(what)
    if missing:
        path = f"{path}.{missing.group('field')}" if path else missing.group("field")
        kind = "missing"
    elif what.endswith("got `null`") and not path.endswith("]"):
        kind = "missing"  # a field sent as null is the same as one left out (an array's null item is not)
    elif what.startswith("Expected `array` of length >= 1"):
        kind = "empty"
    elif _is_nan(body, path):  # JSON has no NaN, Python's json reads one: not a number
        kind, what = "type", "Expected a number, got NaN"
    elif what.startswith("Expected `") and ", got `" in what:
        kind = "type"
    else:
        kind = "value"
        what = re.sub(r"^Invalid (enum )?value ", "not an accepted value: ", what)
    if not path:  # the body itself
        return invalid("The request body must be a JSON object.", code="invalid_json")
    pattern = _INDEX.sub("[]", path)
    code, param = rows.get((pattern, kind), (CODES[kind], None))
    param = _fill(param, path) if param else path
    if kind == "missing":
        return invalid(f"Missing required parameter: '{param}'.", param, code)
    if kind == "empty":
        return invalid(f"Invalid '{param}': empty array. Expected an array with at least one item.", param, code)
    return invalid(f"Invalid {'type' if kind == 'type' else 'value'} for '{path}': {what[0].lower()}{what[1:]}.",
                   param, code)


def _fill(pattern: str, path: str) -> str:
    """``pattern``'s [] filled with ``path``'s indices, in order."""
    indices = iter(_INDEX.findall(path))
    return re.sub(r"\[\]", lambda _: next(indices, "[0]"), pattern)


def _is_nan(body: Any, path: str) -> bool:
    value: Any = body
    for key in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        if key.startswith("["):
            index = int(key[1:-1])
            value = value[index] if isinstance(value, list) and index < len(value) else None
        else:
            value = value.get(key) if isinstance(value, dict) else None
    return isinstance(value, float) and math.isnan(value)


# What joins two fields, which a Struct cannot say: a tool_choice that asks for a tool needs tools.
_JOINED = {"ChatCompletionRequest": {
    "if": {"required": ["tool_choice"], "properties": {"tool_choice": {"anyOf": [{"const": "required"},
                                                                                {"type": "object"}]}}},
    "then": {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}}}}


# The fields that take token ids besides text (compat/token_ids.py reads them before the declaration, which
# says the text alone): declaration -> (field, the most lists of ids).
_TOKEN_ID_FIELDS = {"CompletionRequest": ("prompt", None), "EmbeddingRequest": ("input", MAX_INPUTS)}


def schemas() -> dict[str, Any]:
    """The request declarations as OpenAPI 3.1 components (JSON Schema 2020-12), by name."""
    components = msgspec.json.schema_components(REQUESTS, schema_hook=_schema,
                                                ref_template="#/components/schemas/{name}")[1]
    for name, extra in _JOINED.items():
        components[name].update(extra)
    for name, (field, most) in _TOKEN_ID_FIELDS.items():
        ids = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
        lists = {"type": "array", "items": ids, "minItems": 1, **({"maxItems": most} if most else {})}
        components[name]["properties"][field]["anyOf"] += [ids, lists]
    return components


__all__ = ["REQUESTS", "UNSET", "AssistantMessage", "ChatCompletionRequest", "ChatMessage", "CompletionRequest",
           "Count", "EmbeddingRequest", "ImagePart", "Integer", "JsonObjectFormat", "JsonSchemaFormat",
           "NamedToolChoice", "TextPart", "Tool", "UnsetType", "fault", "read", "schemas"]
