"""/v1/audio/transcriptions and /v1/audio/speech as OpenAI has them: the transcription's multipart form
-> backends.media.TranscriptionRequest (the file left where werkzeug spooled it: on disk past 500 KB),
a Transcript -> each response_format (json, text, srt, vtt, verbose_json), and the speech body ->
backends.media.SpeechRequest.

The upload's body has a bound of its own (MAX_UPLOAD_BYTES, not MAX_BODY_BYTES) on UPLOAD_PATHS:
compat/body.py reads it to a temporary file before the app sees it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import msgspec
from flask import Response, request

from backends.media import SpeechRequest, Transcript, TranscriptionRequest, Upload
from compat import media_wire, wire
from compat.errors import invalid
from serving import RequestContext, state

UPLOAD_PATHS = frozenset({"/v1/audio/transcriptions"})


@dataclass(frozen=True)
class TranscriptionCall:
    request: TranscriptionRequest
    response_format: str
    words: bool  # verbose_json carries the words


def read_transcription(ctx: RequestContext) -> TranscriptionCall:
    """The multipart form; its fields (but the file) kept in the request's context, which an
    OpenAI-compatible upstream passes on as the client sent them."""
    if request.mimetype != "multipart/form-data":
        raise invalid(f"Invalid Content-Type header ({request.mimetype or 'none'}), expected multipart/form-data "
                      "with the audio in `file`.", code="invalid_request")
    request.max_content_length = state().settings.max_upload_bytes  # compat/body.py has bounded it already
    form, files = request.form, request.files
    # A part whose name werkzeug cannot read comes out named None: no field of ours, so it is left out.
    fields: dict[str, Any] = {key: form.getlist(key) if key.endswith("[]") else form[key] for key in form if key}
    ctx.body = fields
    upload = files.get("file")
    read = {key.removesuffix("[]"): value for key, value in fields.items() if key != "file"}
    if upload is not None:
        read["file"] = upload.filename or "audio"
    try:
        form_call = msgspec.convert(read, media_wire.TranscriptionForm, strict=False)
    except msgspec.ValidationError as err:
        raise wire.fault(str(err), read, {}) from None
    if upload is None:
        raise invalid("Missing required parameter: 'file' (the audio, as a file part of the form).", "file",
                      "missing_required_parameter")
    stream = upload.stream
    stream.seek(0, 2)
    size = stream.tell()
    if not size:
        raise invalid("The audio file is empty.", "file", "invalid_value")
    audio = Upload(stream, size, upload.filename or "audio", upload.mimetype or "application/octet-stream")
    transcription = TranscriptionRequest(form_call.model, audio, form_call.language or None,
                                         form_call.prompt or None, form_call.temperature, bool(form_call.stream))
    return TranscriptionCall(transcription, form_call.response_format or "json",
                             "word" in (form_call.timestamp_granularities or ()))


def transcription_response(transcript: Transcript, response_format: str, words: bool) -> Response:
    """The transcript as the client asked for it."""
    if response_format == "json":
        return _json({"text": transcript.text})
    if response_format == "verbose_json":
        return _json(verbose(transcript, words))
    if response_format == "text":
        return Response(transcript.text + "\n", content_type="text/plain; charset=utf-8")
    cues = [(s.start, s.end, s.text) for s in transcript.segments]
    if response_format == "srt":
        text = "".join(f"{i}\n{_time(a, ',')} --> {_time(b, ',')}\n{t}\n\n" for i, (a, b, t) in enumerate(cues, 1))
    else:  # vtt
        text = "WEBVTT\n\n" + "".join(f"{_time(a, '.')} --> {_time(b, '.')}\n{t}\n\n" for a, b, t in cues)
    return Response(text, content_type="text/plain; charset=utf-8")


def verbose(transcript: Transcript, words: bool) -> dict[str, Any]:
    segments = [{"id": i, "seek": 0, "start": s.start, "end": s.end, "text": s.text, "tokens": [],
                 "temperature": s.temperature, "avg_logprob": s.avg_logprob,
                 "compression_ratio": s.compression_ratio, "no_speech_prob": s.no_speech_prob}
                for i, s in enumerate(transcript.segments)]
    answer: dict[str, Any] = {"task": "transcribe", "language": transcript.language or "",
                              "duration": transcript.duration or 0.0, "text": transcript.text, "segments": segments}
    if words:
        answer["words"] = [{"word": w.word, "start": w.start, "end": w.end} for w in transcript.words]
    return answer


def _time(seconds: float, mark: str) -> str:
    """00:01:02,345 (SRT) or 00:01:02.345 (WebVTT)."""
    ms = round(max(seconds, 0.0) * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{mark}{ms % 1000:03d}"


def _json(obj: dict[str, Any]) -> Response:
    return Response(json.dumps(obj, ensure_ascii=False), content_type="application/json")


# -- speech ------------------------------------------------------------------------------------------------

def parse_speech(body: Any) -> SpeechRequest:
    call = wire.read(body, media_wire.SpeechRequest)
    voice = call.voice if isinstance(call.voice, str) else None  # {"id": ...}: a custom voice of OpenAI's
    return SpeechRequest(call.model, call.input, voice, call.response_format or "mp3", call.speed,
                         call.stream_format == "sse")
