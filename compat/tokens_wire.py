"""The bodies and answers of POST /v1/tokenize and /v1/detokenize (vLLM's shapes) and of POST
/v1/responses/input_tokens (OpenAI's answer; its body is /v1/responses'), declared as compat/wire.py and
compat/answers.py declare the others: the bodies read with wire.read (a 400 naming the field), and
``schemas()`` gives both to /openapi.json. Unknown fields are ignored."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from compat import wire
from compat.answers import Tokens, _Answer
from compat.wire import ChatMessage, ModelName, Tool, _schema


class TokenizeRequest(Struct, kw_only=True):
    """vLLM's two bodies in one: `prompt` (a completion's) or `messages` (a chat's), not both."""

    model: ModelName
    prompt: Annotated[str, Meta(description="Text, as /v1/completions reads it (after the model's prefix).")
                      ] | None = None
    messages: Annotated[list[ChatMessage], Meta(min_length=1, description="A chat, as /v1/chat/completions reads "
                                                                          "it (the model's chat template, ending "
                                                                          "where its answer starts).")] | None = None
    tools: Annotated[list[Tool], Meta(description="With `messages`: the tools, as the template writes them.")
                     ] | None = None
    add_special_tokens: Annotated[bool, Meta(description="Only `true` (the default) is accepted for a `prompt`: the "
                                                         "model's prefix is part of every prompt it reads. Ignored "
                                                         "with `messages` (the template holds its own).")
                                  ] | None = None
    add_generation_prompt: Annotated[bool, Meta(description="Accepted and ignored: the template always ends where "
                                                            "the answer starts.")] | None = None


class DetokenizeRequest(Struct, kw_only=True):
    model: ModelName
    tokens: Annotated[list[Annotated[int, Meta(ge=0)]], Meta(description="The model's own token ids (its special "
                                                                         "tokens come back as their names).")]


REQUESTS: tuple[type, ...] = (TokenizeRequest, DetokenizeRequest)


class TokenizeResponse(_Answer):
    count: Annotated[Tokens, Meta(description="How many tokens: `len(tokens)`.")]
    max_model_len: Annotated[int, Meta(ge=1, description="The model's context: prompt and answer together.")]
    tokens: list[Tokens]


class DetokenizeResponse(_Answer):
    prompt: str


class InputTokensResponse(_Answer):
    object: Literal["response.input_tokens"]
    input_tokens: Annotated[Tokens, Meta(description="Exact on the local model (its tokenizer and chat template, "
                                                     "as `usage.input_tokens` counts them); elsewhere an estimate "
                                                     "(cl100k_base).")]


ANSWERS: tuple[type, ...] = (TokenizeResponse, DetokenizeResponse, InputTokensResponse)


def schemas() -> dict[str, Any]:
    """The bodies and answers as OpenAPI 3.1 components, by name (answers open to fields added later)."""
    shared = wire.schemas()  # the chat messages and tools, declared there
    components = {name: schema for name, schema in msgspec.json.schema_components(
        REQUESTS, schema_hook=_schema, ref_template="#/components/schemas/{name}")[1].items() if name not in shared}
    answers = msgspec.json.schema_components(ANSWERS, ref_template="#/components/schemas/{name}")[1]
    for schema in answers.values():
        schema.pop("additionalProperties", None)
    return {**components, **answers}
