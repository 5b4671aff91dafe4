"""POST /v1/images/generations: images drawn from a prompt, answered as base64."""

from __future__ import annotations

from dataclasses import replace

from flask import Blueprint, Response, jsonify

from backends.base import estimate_tokens
from backends.media import RawAnswer
from compat.images import images_answer, parse_image_request
from web.context import context
from web.json_body import read_json
from web.raw_answers import passed_on
from web.tasks import serving

bp = Blueprint("images", __name__)


@bp.post("/v1/images/generations")
def generate_images() -> Response:
    ctx = context()
    request = parse_image_request(read_json(ctx, pass_on=True))
    route, backend = serving(ctx, request.model, "image_generation")
    ctx.record.prompt_tokens = estimate_tokens(len(request.prompt))
    answer = backend.generate_image(replace(request, model=route.model_id), ctx)
    if isinstance(answer, RawAnswer):
        return passed_on(answer)
    return jsonify(images_answer(answer))
