"""Workers AI's wire format for reranking, speech recognition, speech and images, without any I/O:
each task's `/ai/run/{model}` input for the model at hand (their schemas differ from model to model:
cloudflare-docs' workers-ai-models/*.json) and its answer, a JSON result or the bytes of a file."""

from __future__ import annotations

import json
import re
from typing import Any

from backends.base import NotSupportedByModel, UpstreamError
from backends.cloudflare.transport import Payload
from backends.media import Ranked, RerankRequest, Segment, SpeechRequest, Transcript, TranscriptionRequest, Upload, Word

# -- reranking: {query, contexts: [{text}], top_k} -> {response: [{id, score}]} ------------------------


def rerank_body(request: RerankRequest) -> dict[str, Any]:
    body: dict[str, Any] = {"query": request.query, "contexts": [{"text": d} for d in request.documents]}
    if request.top_n is not None:
        body["top_k"] = request.top_n
    return body


def ranked(result: dict[str, Any], request: RerankRequest) -> list[Ranked]:
    """The scores, best first, at most top_n; each document's index as the request has it."""
    items = result.get("response")
    count = len(request.documents)
    if not isinstance(items, list) or not all(
            isinstance(i, dict) and _is_int(i.get("id")) and 0 <= i["id"] < count and _is_number(i.get("score"))
            for i in items):
        raise UpstreamError(f"Cloudflare's answer for {request.model} holds no scores (is it a reranking model?)")
    ranking = sorted((Ranked(i["id"], float(i["score"])) for i in items), key=lambda r: -r.score)
    return ranking[:request.top_n] if request.top_n is not None else ranking


# -- speech recognition -----------------------------------------------------------------------------

# Whisper and Whisper tiny take the audio file itself as the body; the others (whisper-large-v3-turbo)
# take it base64-encoded in a JSON object, with a language and a prompt.
AUDIO_AS_BODY = {"@cf/openai/whisper", "@cf/openai/whisper-tiny-en"}


def transcription_payload(request: TranscriptionRequest) -> Payload:
    audio = request.audio
    if request.model in AUDIO_AS_BODY:
        return Payload("application/octet-stream", audio.size, audio.chunks)
    options: dict[str, Any] = {}
    if request.language:
        options["language"] = request.language
    if request.prompt:
        options["initial_prompt"] = request.prompt
    head, tail = b'{"audio":"', b'"' + (b"," + json.dumps(options).encode()[1:] if options else b"}")
    return Payload("application/json", len(head) + audio.base64_size + len(tail),
                   lambda: _around(head, audio, tail))


def _around(head: bytes, audio: Upload, tail: bytes) -> Any:
    yield head
    yield from audio.base64_chunks()
    yield tail


def transcript(result: dict[str, Any], model: str) -> Transcript:
    """`{text, words?, segments?, transcription_info?}`: segments as the model gives them, or (Whisper:
    words only) made of its words, a sentence or 16 words at a time."""
    text = result.get("text")
    if not isinstance(text, str):
        raise UpstreamError(f"Cloudflare's answer for {model} holds no transcription (is it a speech recognition "
                            "model?)")
    info: dict[str, Any] = result["transcription_info"] if isinstance(result.get("transcription_info"), dict) else {}
    segments = tuple(_segment(s) for s in _dicts(result.get("segments")) if isinstance(s.get("text"), str))
    words = tuple(_word(w) for w in _dicts(result.get("words")) if isinstance(w.get("word"), str))
    if not words:
        words = tuple(_word(w) for s in _dicts(result.get("segments")) for w in _dicts(s.get("words"))
                      if isinstance(w.get("word"), str))
    duration = _number(info.get("duration")) or None
    if not segments:
        segments = _sentences(words) if words else (Segment(0.0, duration or 0.0, text.strip()),)
    language = info.get("language") if isinstance(info.get("language"), str) else None
    return Transcript(text.strip(), segments, words, language, duration or (segments[-1].end if segments else None))


def _segment(s: dict[str, Any]) -> Segment:
    return Segment(_number(s.get("start")), _number(s.get("end")), str(s["text"]).strip(),
                   _number(s.get("temperature")), _number(s.get("avg_logprob")), _number(s.get("compression_ratio")),
                   _number(s.get("no_speech_prob")))


def _word(w: dict[str, Any]) -> Word:
    return Word(str(w["word"]).strip(), _number(w.get("start")), _number(w.get("end")))


def _sentences(words: tuple[Word, ...]) -> tuple[Segment, ...]:
    segments, current = [], []
    for word in words:
        current.append(word)
        if len(current) == 16 or re.search(r"[.!?]$", word.word):
            segments.append(Segment(current[0].start, current[-1].end, " ".join(w.word for w in current)))
            current = []
    if current:
        segments.append(Segment(current[0].start, current[-1].end, " ".join(w.word for w in current)))
    return tuple(segments)


# -- speech: MeloTTS {prompt, lang} -> {audio: base64 MP3}; Aura {text, speaker, encoding, container} -> bytes

CONTENT_TYPES = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac",
                 "wav": "audio/wav", "pcm": "audio/pcm"}
# Aura's encoding and container for each of OpenAI's formats (pcm: 16-bit at 24 kHz, as OpenAI sends it).
AURA_FORMATS: dict[str, dict[str, Any]] = {
    "mp3": {"encoding": "mp3"}, "opus": {"encoding": "opus", "container": "ogg"}, "aac": {"encoding": "aac"},
    "flac": {"encoding": "flac"}, "wav": {"encoding": "linear16", "container": "wav"},
    "pcm": {"encoding": "linear16", "container": "none", "sample_rate": 24000}}
MELO_LANGUAGES = {"en", "es", "fr", "zh", "jp", "kr"}
# OpenAI's voice names, which clients send by default: the model's own default voice speaks instead.
OPENAI_VOICES = {"alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse",
                 "marin", "cedar"}


def is_aura(model: str) -> bool:
    return model.startswith("@cf/deepgram/aura")


def speech_body(request: SpeechRequest) -> dict[str, Any]:
    voice = request.voice if request.voice and request.voice.lower() not in OPENAI_VOICES else None
    if is_aura(request.model):
        body: dict[str, Any] = {"text": request.input, **AURA_FORMATS[request.response_format]}
        if voice:
            body["speaker"] = voice
        return body
    if request.response_format != "mp3":  # MeloTTS makes MP3 only
        raise NotSupportedByModel(f"{request.model} speaks in mp3 only; ask for response_format mp3 (or use an "
                                  "Aura model, which also makes opus, aac, flac, wav and pcm).",
                                  param="response_format")
    body = {"prompt": request.input}
    if voice and voice.lower() in MELO_LANGUAGES:
        body["lang"] = voice.lower()
    return body


# -- images: FLUX.1 schnell {prompt, steps} -> {image: base64}; Stable Diffusion XL and others take a size --

SIZELESS = {"@cf/black-forest-labs/flux-1-schnell"}  # refuses width and height (its own 1024x1024)


def image_body(model: str, prompt: str, width: int | None, height: int | None, negative_prompt: str | None,
               seed: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": prompt}
    if model in SIZELESS:
        return body
    if width and height:
        body.update(width=width, height=height)
    if negative_prompt:
        body["negative_prompt"] = negative_prompt
    if seed is not None:
        body["seed"] = seed
    return body


def image_of(result: dict[str, Any], model: str) -> str:
    image = result.get("image")
    if not isinstance(image, str) or not image:
        raise UpstreamError(f"Cloudflare's answer for {model} holds no image (is it a text-to-image model?)")
    return image


# -- shared -----------------------------------------------------------------------------------------

def _dicts(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value: Any) -> float:
    return float(value) if _is_number(value) else 0.0
