"""/v1/images/generations' body -> backends.media.ImageRequest, and Images -> its answer
(`{created, data: [{b64_json}]}`). Images are only ever answered inline: aigate hosts no files to
point a `url` at."""

from __future__ import annotations

import time
from typing import Any

from backends.media import ImageRequest, Images
from compat import media_wire, wire
from compat.errors import invalid

MIN_SIDE, MAX_SIDE = 256, 2048  # what Stable Diffusion XL takes


def parse_image_request(body: Any) -> ImageRequest:
    call = wire.read(body, media_wire.ImageGenerationRequest)
    if call.response_format == "url":
        raise invalid("response_format url is not supported: aigate does not host the images it makes. Ask for "
                      "response_format b64_json (the default here) and decode `data[].b64_json`.", "response_format",
                      "unsupported_value")
    if call.n is not None and call.n > media_wire.MAX_IMAGES:
        raise invalid(f"Invalid value for 'n': {call.n} is more than {media_wire.MAX_IMAGES} images.", "n",
                      "invalid_value")
    width = height = None
    if call.size and call.size != "auto":
        width, height = (int(side) for side in call.size.split("x"))
        if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
            raise invalid(f"size {call.size} is not supported: each side must be {MIN_SIDE} to {MAX_SIDE} pixels "
                          "(or size auto).", "size", "invalid_value")
    return ImageRequest(call.model, call.prompt, call.n or 1, width, height, call.negative_prompt, call.seed)


def images_answer(images: Images) -> dict[str, Any]:
    return {"created": int(time.time()), "data": [{"b64_json": b64} for b64 in images.b64]}
