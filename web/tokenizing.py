"""Counting and reading tokens as a model does: POST /v1/tokenize and /v1/detokenize (vLLM's shapes) run
the model's own tokenizer, which only a backend that has one here serves (backends/tokens.py: the local
model's, in its engine); POST /v1/responses/input_tokens counts a Responses API request's prompt exactly
there, and estimates it elsewhere (cl100k_base)."""

from __future__ import annotations

import json
from typing import Any

from backends.base import ChatRequest
from backends.registry import Route
from backends.tokens import PromptTokens, Tokenizer
from compat import wire
from compat.errors import APIError, invalid
from compat.requests import Limits, check_chars, parse_chat
from compat.token_ids import cl100k
from compat.tokens_wire import DetokenizeRequest, TokenizeRequest
from web.context import RequestContext, state
from web.tasks import visible

# What a chat message adds to its content in a template (its role's marker, its line breaks), as OpenAI's
# own rule of thumb for cl100k_base counts it; and the answer's start.
PER_MESSAGE, PRIMING = 3, 3


def parse_tokenize(body: Any, limits: Limits) -> ChatRequest:
    """POST /v1/tokenize: `prompt` or `messages` (with their `tools`), as the model would be asked them."""
    request = wire.read(body, TokenizeRequest)
    if (request.prompt is None) == (request.messages is None):
        raise invalid("Send either prompt (a text) or messages (a chat), not both.",
                      "messages" if request.prompt is None else "prompt", "invalid_value")
    if request.prompt is not None:
        if request.add_special_tokens is False:
            raise invalid("add_special_tokens false is not supported: the model's prefix is part of every prompt "
                          "it reads.", "add_special_tokens", "unsupported_value")
        check_chars(len(request.prompt), limits, "prompt")
        return ChatRequest(model=request.model, messages=(), prompt=request.prompt)
    chat = {"model": request.model, "messages": body["messages"], **({"tools": body["tools"]} if request.tools else {})}
    return parse_chat(chat, limits).request


def parse_detokenize(body: Any) -> DetokenizeRequest:
    return wire.read(body, DetokenizeRequest)


def tokenizer(ctx: RequestContext, route: Route) -> Tokenizer:
    """The backend of ``route`` as a Tokenizer; a 400 naming the models that have one when it is not."""
    backend = route.backend
    if isinstance(backend, Tokenizer):
        return backend
    registry = state().registry
    able = [m.id for m in visible(ctx)
            if (r := registry.resolve(m.id)) is not None and isinstance(r.backend, Tokenizer)]
    said = f"; models that have one: {', '.join(able)}" if able else "; no model served here has one"
    raise APIError(400, f"The model `{route.model_id}` has no tokenizer here: /v1/tokenize and /v1/detokenize run "
                        f"the local model's own tokenizer{said}.", param="model", code="model_not_supported")


def input_tokens(route: Route, request: ChatRequest) -> int:
    """The prompt's tokens: the model's own count where its tokenizer runs here, else an estimate."""
    backend = route.backend
    if isinstance(backend, Tokenizer):
        counted: PromptTokens = backend.tokenize(request)
        return counted.positions
    return estimate(request)


def estimate(request: ChatRequest) -> int:
    """cl100k_base's count of what the model is sent: each message's text and tool calls, the tools' definitions,
    and a few tokens a message for its template."""
    encoding = cl100k()
    texts = [request.prompt or ""]
    for m in request.messages:
        texts += [m.content, *(c.name + c.arguments for c in m.tool_calls)]
    texts += [json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters})
              for t in request.tools]
    count = sum(len(encoding.encode(text, disallowed_special=())) for text in texts if text)
    return count + (PER_MESSAGE * len(request.messages) + PRIMING if request.messages else 0)
