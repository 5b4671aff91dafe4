"""POST /v1/audio/transcriptions (a multipart upload: the audio's text) and POST /v1/audio/speech
(the input read aloud: the audio file itself)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from flask import Blueprint, Response, request

from backends.base import estimate_tokens
from backends.media import RawAnswer, Upload
from compat.audio import parse_speech, read_transcription, transcription_body
from compat.errors import invalid
from web.context import RequestContext, context, state
from web.json_body import read_json
from web.raw_answers import passed_on
from web.tasks import serving

# The upload's body has a bound of its own (MAX_UPLOAD_BYTES, not MAX_BODY_BYTES) on these paths:
# web/body.py reads it to a temporary file before the app sees it.
UPLOAD_PATHS = frozenset({"/v1/audio/transcriptions"})

bp = Blueprint("audio", __name__)


@bp.post("/v1/audio/transcriptions")
def transcribe() -> Response:
    ctx = context()
    fields, upload = read_form(ctx)
    call = read_transcription(fields, upload)
    route, backend = serving(ctx, call.request.model, "transcription")
    answer = backend.transcribe(replace(call.request, model=route.model_id), ctx)
    if isinstance(answer, RawAnswer):  # an upstream's, in the format the client asked it for
        return passed_on(answer)
    ctx.record.completion_tokens = estimate_tokens(len(answer.text))
    body, content_type = transcription_body(answer, call.response_format, call.words)
    return Response(body, content_type=content_type)


def read_form(ctx: RequestContext) -> tuple[dict[str, Any], Upload | None]:
    """The multipart form's fields (kept in the request's context, which an OpenAI-compatible upstream
    passes on as the client sent them) and its file, left where werkzeug spooled it."""
    if request.mimetype != "multipart/form-data":
        raise invalid(f"Invalid Content-Type header ({request.mimetype or 'none'}), expected multipart/form-data "
                      "with the audio in `file`.", code="invalid_request")
    request.max_content_length = state().settings.max_upload_bytes  # web/body.py has bounded it already
    # A part whose name werkzeug cannot read comes out named None: no field of ours, so it is left out.
    fields: dict[str, Any] = {key: request.form.getlist(key) if key.endswith("[]") else request.form[key]
                              for key in request.form if key}
    ctx.body = fields
    file = request.files.get("file")
    if file is None:
        return fields, None
    stream = file.stream
    stream.seek(0, 2)
    size = stream.tell()
    return fields, Upload(stream, size, file.filename or "audio", file.mimetype or "application/octet-stream")


@bp.post("/v1/audio/speech")
def speak() -> Response:
    ctx = context()
    request = parse_speech(read_json(ctx, pass_on=True))
    route, backend = serving(ctx, request.model, "speech")
    ctx.record.prompt_tokens = estimate_tokens(len(request.input))
    return passed_on(backend.speak(replace(request, model=route.model_id), ctx))
