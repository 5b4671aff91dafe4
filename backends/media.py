"""What a backend speaks besides chat and embeddings: reranking, transcription, speech and image
generation. A backend that serves one of these tasks has the method of its protocol below, and names
the models that serve it in ModelInfo.tasks; web/tasks.py asks for the method and refuses a model (or
a backend) without it. An answer a backend passes on as its server made it (an OpenAI-compatible
upstream) is a RawAnswer."""

from __future__ import annotations

import base64
import math
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import IO, Protocol, runtime_checkable

from backends.base import Caller

READ_SIZE = 48 * 1024  # a multiple of 3: each piece base64-encodes without padding


# -- reranking ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RerankRequest:
    model: str
    query: str
    documents: tuple[str, ...]
    top_n: int | None = None  # None: every document


@dataclass(frozen=True)
class Ranked:
    index: int  # of the document in the request
    score: float


@dataclass(frozen=True)
class Ranking:
    results: list[Ranked]  # best first, at most top_n
    prompt_tokens: int


# -- transcription --------------------------------------------------------------------------------

class Upload:
    """An uploaded file where the server keeps it (in memory while small, on disk past that): read from
    its start each time it is sent (a retry sends it again), a piece at a time, never held whole."""

    def __init__(self, stream: IO[bytes], size: int, filename: str, content_type: str) -> None:
        self.stream, self.size, self.filename, self.content_type = stream, size, filename, content_type

    def chunks(self) -> Iterator[bytes]:
        self.stream.seek(0)
        while piece := self.stream.read(READ_SIZE):
            yield piece

    def base64_chunks(self) -> Iterator[bytes]:
        """The file base64-encoded, piece by piece (each piece but the last a multiple of 3 bytes)."""
        carry = b""
        for piece in self.chunks():
            piece = carry + piece
            cut = len(piece) - len(piece) % 3
            carry = piece[cut:]
            if cut:
                yield base64.b64encode(piece[:cut])
        if carry:
            yield base64.b64encode(carry)

    @property
    def base64_size(self) -> int:
        return 4 * math.ceil(self.size / 3)

    def read(self) -> bytes:
        """The whole file, for a format that needs it whole."""
        return b"".join(self.chunks())


@dataclass(frozen=True)
class TranscriptionRequest:
    model: str
    audio: Upload
    language: str | None = None  # ISO-639-1, as OpenAI takes it
    prompt: str | None = None  # text that leads the model (names, spelling)
    temperature: float | None = None
    stream: bool = False  # the text as it is recognised (server-sent events)


@dataclass(frozen=True)
class Word:
    word: str
    start: float
    end: float


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    text: str
    temperature: float = 0.0
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0


@dataclass(frozen=True)
class Transcript:
    text: str
    segments: tuple[Segment, ...]
    words: tuple[Word, ...] = ()
    language: str | None = None
    duration: float | None = None  # seconds of audio, where the model says


# -- speech and images ----------------------------------------------------------------------------

@dataclass(frozen=True)
class SpeechRequest:
    model: str
    input: str
    voice: str | None = None
    response_format: str = "mp3"  # mp3, opus, aac, flac, wav or pcm
    speed: float | None = None
    sse: bool = False  # the audio as server-sent events (stream_format sse)


@dataclass(frozen=True)
class ImageRequest:
    model: str
    prompt: str
    n: int = 1
    width: int | None = None  # None: the model's own size
    height: int | None = None
    negative_prompt: str | None = None
    seed: int | None = None


@dataclass(frozen=True)
class Images:
    b64: list[str]  # each image file (PNG or JPEG), base64-encoded


@dataclass
class RawAnswer:
    """An answer as its server made it, passed on as is: its Content-Type, and its body as it
    arrives (closing ``chunks`` ends the exchange with the server)."""

    content_type: str
    chunks: Generator[bytes, None, None]


# -- the protocols --------------------------------------------------------------------------------

@runtime_checkable
class Reranker(Protocol):
    def rerank(self, request: RerankRequest, caller: Caller | None = None) -> Ranking:
        """The documents' scores against the query, best first."""
        ...


@runtime_checkable
class Transcriber(Protocol):
    def transcribe(self, request: TranscriptionRequest, caller: Caller | None = None) -> Transcript | RawAnswer:
        """The audio's text (a RawAnswer: in the format the client asked its server for)."""
        ...


@runtime_checkable
class Speaker(Protocol):
    def speak(self, request: SpeechRequest, caller: Caller | None = None) -> RawAnswer:
        """The input read aloud, as an audio file in the format asked for."""
        ...


@runtime_checkable
class ImageGenerator(Protocol):
    def generate_image(self, request: ImageRequest, caller: Caller | None = None) -> Images | RawAnswer:
        """``n`` images drawn from the prompt."""
        ...
