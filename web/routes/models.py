"""GET /v1/models and GET /v1/models/<id> (ids may contain '/', e.g. Cloudflare's @cf/...)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from backends.base import ModelInfo
from compat.completion_objects import model_object
from compat.errors import model_not_found
from web.auth import allowed
from web.context import context, state

bp = Blueprint("models", __name__)


@bp.get("/v1/models")
def list_models() -> Response:
    return jsonify({"object": "list", "data": [_object(m) for m in _visible()]})


@bp.get("/v1/models/<path:model_id>")
def retrieve_model(model_id: str) -> Response:
    info = next((m for m in _visible() if m.id == model_id), None)
    if info is None:
        raise model_not_found(model_id)
    return jsonify(_object(info))


def _object(m: ModelInfo) -> dict[str, Any]:
    # An extra field: the sampling controls it honours (others are refused), whether response_format /
    # text.format (a JSON schema) is honoured, or refused, whether image content parts are read (GLM-4V) or
    # refused, and which endpoints' tasks it serves.
    # A local model also says whether it is loaded now (llama.cpp's router's shape).
    status = {} if m.status is None else {"status": {"value": m.status}}
    return {**model_object(m.id, m.owned_by, m.created),
            "capabilities": {"controls": sorted(m.controls), "structured_outputs": m.structured_outputs,
                             "images": m.images,
                             "tasks": None if m.tasks is None else sorted(m.tasks)}, **status}


def _visible() -> list[ModelInfo]:
    """The models (and aliases) the request's key may use, each local one's state as its engine says now."""
    registry, key = state().registry, context().key
    return [m for m in registry.models(now=True) if allowed(key, m.id, registry.aliases.get(m.id, m.id))]
