"""POST /v1/embeddings: vectors as float lists, or base64 float32 (what the Python SDK asks for)."""

from __future__ import annotations

import base64
import struct
from typing import Any

from flask import Blueprint, jsonify

from compat.errors import invalid
from compat.generation import resolve
from compat.json_body import read_json
from compat.requests import _integer, check_chars, parse_model
from serving import context, state

bp = Blueprint("embeddings", __name__)

MAX_INPUTS = 2048  # OpenAI's limit per request


@bp.post("/v1/embeddings")
def create_embeddings():
    ctx = context()
    body = read_json(ctx, pass_on=True)
    model, inputs, encoding, dimensions = parse_embeddings(body)
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


def parse_embeddings(body: Any) -> tuple[str, list[str], str, int | None]:
    model = parse_model(body)
    raw = body.get("input")
    inputs = [raw] if isinstance(raw, str) else raw
    if isinstance(inputs, list) and inputs and all(isinstance(x, (int, list)) for x in inputs):
        raise invalid("input given as token ids is not supported: send the text itself. (LangChain's "
                      "OpenAIEmbeddings sends token ids unless it is created with check_embedding_ctx_length=False.)",
                      "input", "unsupported_value")
    if not isinstance(inputs, list) or not inputs or not all(isinstance(x, str) for x in inputs):
        raise invalid("input must be a string or a non-empty array of strings.", "input", "invalid_type")
    if len(inputs) > MAX_INPUTS:
        raise invalid(f"input takes at most {MAX_INPUTS} strings.", "input", "invalid_value")
    if any(not x for x in inputs):
        raise invalid("input strings must not be empty.", "input", "invalid_value")
    encoding = body.get("encoding_format")
    encoding = "float" if encoding is None else encoding
    if encoding not in ("float", "base64"):
        raise invalid("encoding_format must be 'float' or 'base64'.", "encoding_format", "invalid_value")
    dimensions = _integer(body, "dimensions", minimum=1)
    return model, inputs, encoding, dimensions


def encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
