"""The objects /v1/rerank, /v1/audio/transcriptions and /v1/images/generations answer with, declared
as compat/answers.py declares the others (the OpenAPI document's schemas; tests/unit/test_media_answers.py
holds what the builders make to them). Speech answers with the audio file itself, and an
OpenAI-compatible upstream's transcription or images are passed on as it made them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from compat.answers import Tokens


class _Answer(Struct, forbid_unknown_fields=True):
    pass


class RerankDocument(_Answer):
    text: str


class RerankResult(_Answer):
    index: Annotated[int, Meta(ge=0, description="The document's place in the request's `documents`.")]
    relevance_score: float
    document: Annotated[RerankDocument, Meta(description="Unless `return_documents` is false.")] | UnsetType = UNSET


class RerankUsage(_Answer):
    prompt_tokens: Tokens
    total_tokens: Tokens


class RerankList(_Answer):
    id: str
    object: Literal["list"]
    model: str
    results: Annotated[list[RerankResult], Meta(description="Best first.")]
    usage: RerankUsage


class Transcription(_Answer):
    text: str


class TranscriptionSegment(_Answer):
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float


class TranscriptionWord(_Answer):
    word: str
    start: float
    end: float


class TranscriptionVerbose(_Answer):
    task: Literal["transcribe"]
    language: Annotated[str, Meta(description="As the model says it (`en`), or empty when it does not.")]
    duration: Annotated[float, Meta(ge=0)]
    text: str
    segments: list[TranscriptionSegment]
    words: Annotated[list[TranscriptionWord], Meta(
        description="With `timestamp_granularities[]` `word`.")] | UnsetType = UNSET


class ImageData(_Answer):
    b64_json: Annotated[str, Meta(extra_json_schema={"contentEncoding": "base64"})]


class ImagesResponse(_Answer):
    created: int
    data: Annotated[list[ImageData], Meta(min_length=1)]


ANSWERS: tuple[type, ...] = (RerankList, Transcription, TranscriptionVerbose, ImagesResponse)


def schemas() -> dict[str, Any]:
    """The answers as OpenAPI 3.1 components, by name (open to fields added later, as answers.py's)."""
    components = msgspec.json.schema_components(ANSWERS, ref_template="#/components/schemas/{name}")[1]
    for schema in components.values():
        schema.pop("additionalProperties", None)
    return components
