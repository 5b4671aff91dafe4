"""GET /openapi.json: the API as implemented, for SDK generators and API tools.

openapi.yaml holds the paths and the schemas not declared in code; the request bodies' schemas
come from their declarations (compat/wire.py, compat/messages_wire.py, compat/media_wire.py), so what is
validated and what is described cannot drift apart, and the answers' from theirs (compat/answers.py,
compat/messages_answers.py, compat/media_answers.py),
which the builders are tested against. The document is built once, at import: a broken description stops
the server at start (the gunicorn master imports the app) instead of failing the first request.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import yaml
from flask import Blueprint, Response

from compat import answers, media_answers, media_wire, messages_answers, messages_wire, tokens_wire, wire

SPEC = Path(__file__).resolve().parent.parent.parent / "openapi.yaml"


def document() -> dict[str, Any]:
    """openapi.yaml with the declared schemas added; a name in both is a mistake, refused."""
    doc = yaml.safe_load(SPEC.read_text(encoding="utf-8"))
    parts = (wire.schemas(), answers.schemas(), messages_wire.schemas(), messages_answers.schemas(),
             media_wire.schemas(), media_answers.schemas(), tokens_wire.schemas())
    written, declared = doc["components"]["schemas"], {name: s for part in parts for name, s in part.items()}
    both = sorted(set(written) & set(declared) | {name for i, part in enumerate(parts) for other in parts[i + 1:]
                                                  for name in set(part) & set(other)})
    if both:
        raise ValueError(f"schemas written or declared twice: {', '.join(both)}")
    written.update(declared)
    return cast(dict[str, Any], doc)


BODY = json.dumps(document(), ensure_ascii=False)

bp = Blueprint("openapi", __name__)


@bp.get("/openapi.json")
def openapi() -> Response:
    return Response(BODY, content_type="application/json")
