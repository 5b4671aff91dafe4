"""Which model serves which task besides chat (reranking, transcription, speech, images): the route
to a model the key may use (a 404 if none), and a 400 naming the models that can when it cannot (its
backend lacks the task's method, or the model says it serves other tasks)."""

from __future__ import annotations

from typing import Any, Literal, overload

from backends.base import ModelInfo, Task
from backends.media import ImageGenerator, Reranker, Speaker, Transcriber
from backends.registry import Route
from compat.errors import APIError
from web.auth import allowed
from web.context import RequestContext, state
from web.generation import resolve

PROTOCOLS: dict[Task, type] = {"rerank": Reranker, "transcription": Transcriber, "speech": Speaker,
                               "image_generation": ImageGenerator}
WHAT: dict[Task, str] = {"rerank": "reranking (POST /v1/rerank)",
                         "transcription": "speech recognition (POST /v1/audio/transcriptions)",
                         "speech": "speech (POST /v1/audio/speech)",
                         "image_generation": "image generation (POST /v1/images/generations)"}


@overload
def serving(ctx: RequestContext, model: str, task: Literal["rerank"]) -> tuple[Route, Reranker]: ...
@overload
def serving(ctx: RequestContext, model: str, task: Literal["transcription"]) -> tuple[Route, Transcriber]: ...
@overload
def serving(ctx: RequestContext, model: str, task: Literal["speech"]) -> tuple[Route, Speaker]: ...
@overload
def serving(ctx: RequestContext, model: str, task: Literal["image_generation"]) -> tuple[Route, ImageGenerator]: ...


def serving(ctx: RequestContext, model: str, task: Task) -> tuple[Route, Any]:
    """The route to ``model`` and its backend, which has the task's protocol (backends/media.py)."""
    route = resolve(ctx, model, stream=False)
    backend = route.backend
    if not isinstance(backend, PROTOCOLS[task]) or not serves(info(route), task):
        able = [m.id for m in visible(ctx) if serves(m, task)]
        said = f"; models that do: {', '.join(able)}" if able else "; no model served here does"
        raise APIError(400, f"The model `{model}` does not support {WHAT[task]}{said}.", param="model",
                       code="model_not_supported")
    return route, backend


def serves(model: ModelInfo | None, task: Task) -> bool:
    """Does the model serve ``task`` (a model whose tasks are not known, an upstream's, may)?"""
    return model is not None and (model.tasks is None or task in model.tasks)


def info(route: Route) -> ModelInfo | None:
    return next((m for m in route.backend.models() if m.id == route.model_id), None)


def visible(ctx: RequestContext) -> list[ModelInfo]:
    """The models (and aliases) the request's key may use."""
    registry = state().registry
    return [m for m in registry.models() if allowed(ctx.key, m.id, registry.aliases.get(m.id, m.id))]
