"""Which backend counts and reads tokens: POST /v1/tokenize and /v1/detokenize (vLLM's shapes) run the
model's own tokenizer, which only a backend that has one here serves (backends/tokens.py: the local
model's, in its engine); POST /v1/responses/input_tokens counts a Responses API request's prompt exactly
there, and estimates it elsewhere (compat/tokens.py: cl100k_base)."""

from __future__ import annotations

from dataclasses import replace

from backends.base import ChatRequest
from backends.registry import Route
from backends.tokens import PromptTokens, Tokenizer
from compat import tokens
from compat.errors import APIError
from web.context import RequestContext, state
from web.tasks import visible


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
        counted: PromptTokens = backend.tokenize(replace(request, model=route.model_id))  # an alias resolved
        return counted.positions
    return tokens.estimate(request)


