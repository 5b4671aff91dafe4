"""GET /openapi.json: openapi.yaml (the API as implemented) as JSON, for SDK generators and API tools.

The file is read and converted once, at import: a broken description stops the server at start
(the gunicorn master imports the app) instead of failing the first request for it.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from flask import Blueprint, Response

SPEC = Path(__file__).resolve().parent.parent.parent / "openapi.yaml"
BODY = json.dumps(yaml.safe_load(SPEC.read_text(encoding="utf-8")), ensure_ascii=False)

bp = Blueprint("openapi", __name__)


@bp.get("/openapi.json")
def openapi():
    return Response(BODY, content_type="application/json")
