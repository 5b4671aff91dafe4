"""POST /v1/embeddings: vectors as float lists, or base64 float32 (what the Python SDK asks for)."""

from __future__ import annotations

import base64
import struct

from flask import Blueprint, Response, jsonify

from compat.errors import invalid
from compat.requests import check_chars, parse_embeddings
from web.context import context, state
from web.generation import resolve
from web.json_body import read_json

bp = Blueprint("embeddings", __name__)


@bp.post("/v1/embeddings")
def create_embeddings() -> Response:
    ctx = context()
    call = parse_embeddings(read_json(ctx, pass_on=True))
    model, inputs, encoding, dimensions = call.model, call.inputs, call.encoding, call.dimensions
    check_chars(sum(len(x) for x in inputs), state().limits, "input")
    route = resolve(ctx, model, stream=False)
    result = route.backend.embed(route.model_id, inputs, ctx)
    size = len(result.vectors[0]) if result.vectors else 0
    if dimensions is not None and dimensions != size:  # the model's own size is no change: accept it
        raise invalid(f"dimensions is {dimensions}, but {route.model_id} makes vectors of {size} dimensions and "
                      "cannot shorten them; leave dimensions out or set it to the model's own size.", "dimensions",
                      "unsupported_value")
    ctx.record.prompt_tokens = result.prompt_tokens  # logged, counted, and charged to the key's TPM
    data = [{"object": "embedding", "index": i, "embedding": encode(vector, encoding)}
            for i, vector in enumerate(result.vectors)]
    return jsonify({"object": "list", "data": data, "model": route.model_id,
                    "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}})


def encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
