"""/v1/audio/transcriptions and /v1/audio/speech as OpenAI has them: the transcription's multipart form
-> backends.media.TranscriptionRequest (the file left where werkzeug spooled it: on disk past 500 KB),
a Transcript -> each response_format (json, text, srt, vtt, verbose_json), and the speech body ->
backends.media.SpeechRequest."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import msgspec

from backends.media import SpeechRequest, Transcript, TranscriptionRequest, Upload
from compat import media_wire, wire
from compat.errors import invalid


@dataclass(frozen=True)
class TranscriptionCall:
    request: TranscriptionRequest
    response_format: str
    words: bool  # verbose_json carries the words


def read_transcription(fields: dict[str, Any], upload: Upload | None) -> TranscriptionCall:
    """The form's fields (a ``name[]`` field as its list) and its file part -> the call. The route
    (web/routes/audio.py) reads the multipart body; this reads what it says."""
    read = {key.removesuffix("[]"): value for key, value in fields.items() if key != "file"}
    if upload is not None:
        read["file"] = upload.filename
    try:
        form_call = msgspec.convert(read, media_wire.TranscriptionForm, strict=False)
    except msgspec.ValidationError as err:
        raise wire.fault(str(err), read, {}) from None
    if upload is None:
        raise invalid("Missing required parameter: 'file' (the audio, as a file part of the form).", "file",
                      "missing_required_parameter")
    if not upload.size:
        raise invalid("The audio file is empty.", "file", "invalid_value")
    transcription = TranscriptionRequest(form_call.model, upload, form_call.language or None,
                                         form_call.prompt or None, form_call.temperature, bool(form_call.stream))
    return TranscriptionCall(transcription, form_call.response_format or "json",
                             "word" in (form_call.timestamp_granularities or ()))


JSON, TEXT = "application/json", "text/plain; charset=utf-8"


def transcription_body(transcript: Transcript, response_format: str, words: bool) -> tuple[str, str]:
    """The transcript as the client asked for it: the body and its Content-Type."""
    if response_format == "json":
        return json.dumps({"text": transcript.text}, ensure_ascii=False), JSON
    if response_format == "verbose_json":
        return json.dumps(verbose(transcript, words), ensure_ascii=False), JSON
    if response_format == "text":
        return transcript.text + "\n", TEXT
    cues = [(s.start, s.end, s.text) for s in transcript.segments]
    if response_format == "srt":
        text = "".join(f"{i}\n{_time(a, ',')} --> {_time(b, ',')}\n{t}\n\n" for i, (a, b, t) in enumerate(cues, 1))
    else:  # vtt
        text = "WEBVTT\n\n" + "".join(f"{_time(a, '.')} --> {_time(b, '.')}\n{t}\n\n" for a, b, t in cues)
    return text, TEXT


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


# -- speech ------------------------------------------------------------------------------------------------

def parse_speech(body: Any) -> SpeechRequest:
    call = wire.read(body, media_wire.SpeechRequest)
    voice = call.voice if isinstance(call.voice, str) else None  # {"id": ...}: a custom voice of OpenAI's
    return SpeechRequest(call.model, call.input, voice, call.response_format or "mp3", call.speed,
                         call.stream_format == "sse")
