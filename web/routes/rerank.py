"""POST /v1/rerank (also /v1/reranking, as llama.cpp's server has it): documents scored against a
query, best first."""

from __future__ import annotations

from dataclasses import replace

from flask import Blueprint, Response, jsonify

from compat.rerank import parse_rerank, rerank_answer
from web.context import context, state
from web.json_body import read_json
from web.tasks import serving

bp = Blueprint("rerank", __name__)


@bp.post("/v1/rerank")
@bp.post("/v1/reranking")
def rerank() -> Response:
    ctx = context()
    call = parse_rerank(read_json(ctx, pass_on=True), state().limits)
    route, backend = serving(ctx, call.request.model, "rerank")
    ranking = backend.rerank(replace(call.request, model=route.model_id), ctx)
    ctx.record.prompt_tokens = ranking.prompt_tokens  # logged, counted, and charged to the key's TPM
    return jsonify(rerank_answer(call, route.model_id, ranking))
