"""Token requests read and counted without a model: the bodies of POST /v1/tokenize and /v1/detokenize
(vLLM's shapes) read into requests, and cl100k_base's estimate of a request's prompt, for the models whose
own tokenizer does not run here (web/tokenizing.py chooses)."""

from __future__ import annotations

import json
from typing import Any

from backends.base import ChatRequest
from compat import wire
from compat.errors import invalid
from compat.requests import Limits, check_chars, parse_chat
from compat.token_ids import cl100k
from compat.tokens_wire import DetokenizeRequest, TokenizeRequest

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
