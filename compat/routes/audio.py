"""POST /v1/audio/transcriptions (a multipart upload: the audio's text) and POST /v1/audio/speech
(the input read aloud: the audio file itself)."""

from __future__ import annotations

from dataclasses import replace

from flask import Blueprint, Response

from backends.base import estimate_tokens
from backends.media import RawAnswer
from compat.audio import UPLOAD_PATHS, parse_speech, read_transcription, transcription_response
from compat.json_body import read_json
from compat.media_response import passed_on
from compat.tasks import serving
from serving import context

__all__ = ["UPLOAD_PATHS", "bp"]

bp = Blueprint("audio", __name__)


@bp.post("/v1/audio/transcriptions")
def transcribe() -> Response:
    ctx = context()
    call = read_transcription(ctx)
    route, backend = serving(ctx, call.request.model, "transcription")
    answer = backend.transcribe(replace(call.request, model=route.model_id), ctx)
    if isinstance(answer, RawAnswer):  # an upstream's, in the format the client asked it for
        return passed_on(answer)
    ctx.record.completion_tokens = estimate_tokens(len(answer.text))
    return transcription_response(answer, call.response_format, call.words)


@bp.post("/v1/audio/speech")
def speak() -> Response:
    ctx = context()
    request = parse_speech(read_json(ctx, pass_on=True))
    route, backend = serving(ctx, request.model, "speech")
    ctx.record.prompt_tokens = estimate_tokens(len(request.input))
    return passed_on(backend.speak(replace(request, model=route.model_id), ctx))
