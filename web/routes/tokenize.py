"""POST /v1/tokenize and /v1/detokenize (vLLM's shapes): the model's own tokenizer, on the models whose
backend runs one here (the local model); a 400 on the others."""

from __future__ import annotations

from dataclasses import replace

from flask import Blueprint, Response, jsonify

from compat.tokens import parse_detokenize, parse_tokenize
from web.context import context, state
from web.generation import resolve
from web.json_body import read_json
from web.tokenizing import tokenizer

bp = Blueprint("tokenize", __name__)


@bp.post("/v1/tokenize")
def tokenize() -> Response:
    ctx = context()
    request = parse_tokenize(read_json(ctx, pass_on=False), state().limits)
    route = resolve(ctx, request.model, stream=False)
    counted = tokenizer(ctx, route).tokenize(replace(request, model=route.model_id))  # an alias resolved
    return jsonify({"count": len(counted.ids), "max_model_len": counted.context, "tokens": counted.ids})


@bp.post("/v1/detokenize")
def detokenize() -> Response:
    ctx = context()
    request = parse_detokenize(read_json(ctx, pass_on=False))
    route = resolve(ctx, request.model, stream=False)
    return jsonify({"prompt": tokenizer(ctx, route).detokenize(route.model_id, request.tokens)})
