"""GET /v1/models and GET /v1/models/<id> (ids may contain '/', e.g. Cloudflare's @cf/...)."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from compat.errors import model_not_found
from compat.responses import model_object

bp = Blueprint("models", __name__)


@bp.get("/v1/models")
def list_models():
    registry = current_app.extensions["aigate"].registry
    return jsonify({"object": "list",
                    "data": [model_object(m.id, m.owned_by, m.created) for m in registry.models()]})


@bp.get("/v1/models/<path:model_id>")
def retrieve_model(model_id: str):
    info = current_app.extensions["aigate"].registry.get(model_id)
    if info is None:
        raise model_not_found(model_id)
    return jsonify(model_object(info.id, info.owned_by, info.created))
