"""The request bodies of /v1/rerank, /v1/audio/transcriptions, /v1/audio/speech and
/v1/images/generations, declared as compat/wire.py declares the others (read with wire.read, a 400
naming the field; ``schemas()`` gives them to /openapi.json). Unknown fields are ignored (and passed on
to an OpenAI-compatible upstream)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from compat.wire import MAX_INPUTS, Count, Integer, ModelName, NonEmpty, User, _schema

# -- reranking (the Jina / Cohere shape, as llama.cpp, vLLM and LiteLLM serve it) --------------------------


class TextDocument(Struct):
    text: str


class RerankRequest(Struct, kw_only=True):
    model: ModelName
    query: NonEmpty
    documents: Annotated[list[str | TextDocument], Meta(
        min_length=1, max_length=MAX_INPUTS, description="Up to 2048 texts, or `{\"text\": ...}` objects.")]
    top_n: Annotated[Count, Meta(description="Answer the best `top_n` only (all of them by default).")] | None = None
    return_documents: Annotated[bool, Meta(description="Each result carries its `document` (the default).")
                                ] | None = None


# -- speech recognition (multipart/form-data) --------------------------------------------------------------

TranscriptFormat = Literal["json", "text", "srt", "vtt", "verbose_json"]


class TranscriptionForm(Struct, kw_only=True):
    file: Annotated[Any, Meta(description="The audio file (flac, mp3, mp4, m4a, ogg, wav, webm...), at most "
                                          "`MAX_UPLOAD_BYTES` with the rest of the form.",
                              extra_json_schema={"type": "string", "format": "binary"})]
    model: ModelName
    language: Annotated[str, Meta(description="The audio's language (ISO-639-1, e.g. `en`): passed to the "
                                              "models that take one.")] | None = None
    prompt: Annotated[str, Meta(description="Text that leads the model (names, spelling): passed to the models "
                                            "that take one.")] | None = None
    response_format: Annotated[TranscriptFormat, Meta(description="`json` (the default), `text`, `srt`, `vtt` or "
                                                                  "`verbose_json` (segments, and words when "
                                                                  "`timestamp_granularities[]` asks for them).")
                               ] | None = None
    temperature: Annotated[float, Meta(ge=0, le=1, description="Accepted; passed on to OpenAI-compatible "
                                                               "upstreams.")] | None = None
    timestamp_granularities: Annotated[list[Literal["word", "segment"]], Meta(
        description="Sent as `timestamp_granularities[]`; `word` adds `words` to `verbose_json`.")] | None = None
    stream: Annotated[bool, Meta(description="`true` is refused on Workers AI (`unsupported_parameter`); passed "
                                             "on to OpenAI-compatible upstreams.")] | None = None


# -- speech ------------------------------------------------------------------------------------------------

SpeechFormat = Literal["mp3", "opus", "aac", "flac", "wav", "pcm"]
MAX_SPEECH_CHARS = 4096  # OpenAI's limit


class SpeechRequest(Struct, kw_only=True):
    model: ModelName
    input: Annotated[str, Meta(min_length=1, max_length=MAX_SPEECH_CHARS)]
    voice: Annotated[str | dict[str, Any], Meta(description="An Aura speaker (`asteria`, `luna`...) or a MeloTTS "
                                                            "language (`en`, `fr`...); OpenAI's voice names "
                                                            "(`alloy`...) get the model's own voice.")] | None = None
    response_format: Annotated[SpeechFormat, Meta(description="`mp3` (the default); Aura models also make `opus`, "
                                                              "`aac`, `flac`, `wav` and `pcm` (16-bit, 24 kHz), "
                                                              "MeloTTS only `mp3`.")] | None = None
    speed: Annotated[float, Meta(ge=0.25, le=4.0, description="Accepted; passed on to OpenAI-compatible "
                                                              "upstreams.")] | None = None
    instructions: Annotated[str, Meta(description="Accepted; passed on to OpenAI-compatible upstreams.")
                            ] | None = None
    stream_format: Annotated[Literal["audio", "sse"], Meta(
        description="`sse` is refused on Workers AI (`unsupported_value`).")] | None = None


# -- images ------------------------------------------------------------------------------------------------

MAX_IMAGES = 10  # OpenAI's limit


class ImageGenerationRequest(Struct, kw_only=True):
    model: ModelName
    prompt: Annotated[str, Meta(min_length=1, max_length=32000)]
    n: Annotated[Count, Meta(description="1 to 10 images (Workers AI makes them one after the other).",
                             extra_json_schema={"maximum": MAX_IMAGES})] | None = None
    size: Annotated[str, Meta(pattern=r"^(auto|\d{2,5}x\d{2,5})$", description=(
        "`WIDTHxHEIGHT` or `auto` (the model's own). Stable Diffusion XL takes 256 to 2048 a side; FLUX.1 schnell "
        "makes its own size."))] | None = None
    response_format: Annotated[Literal["b64_json", "url"], Meta(
        description="`b64_json` (the default); `url` is refused (`unsupported_value`): aigate hosts no images.")
                               ] | None = None
    negative_prompt: Annotated[str, Meta(description="What to keep out of the image (models that take it).")
                               ] | None = None
    seed: Annotated[Integer, Meta(description="Passed to the models that take it.")] | None = None
    quality: Annotated[Any, Meta(description="Accepted; passed on to OpenAI-compatible upstreams.")] = None
    style: Annotated[Any, Meta(description="Accepted; passed on to OpenAI-compatible upstreams.")] = None
    user: User | None = None


REQUESTS: tuple[type, ...] = (RerankRequest, TranscriptionForm, SpeechRequest, ImageGenerationRequest)


def schemas() -> dict[str, Any]:
    """The declarations as OpenAPI 3.1 components, by name."""
    return msgspec.json.schema_components(REQUESTS, schema_hook=_schema,
                                          ref_template="#/components/schemas/{name}")[1]
