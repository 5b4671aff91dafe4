"""What an OpenAI-compatible upstream is sent for reranking, transcription, speech and images, and what
is read of its answer: the client's own body (or form, its audio streamed from where the server keeps
it) with the model aigate resolved; the answer passed on as the upstream made it, but reranking's,
which is normalised (Jina's and Cohere's `results`, or a bare list as Text Embeddings Inference
answers; sorted best first; cut at top_n)."""

from __future__ import annotations

import secrets
from collections.abc import Generator, Iterator, Mapping
from typing import Any

import requests

from backends.base import Caller, UpstreamError
from backends.bounded import READ_SIZE, capped
from backends.media import Ranked, RerankRequest, Upload
from backends.upstream.config import UpstreamConfig
from backends.upstream.transport import broken_read, read_json


def passed_body(caller: Caller | None, model: str) -> dict[str, Any]:
    """The client's JSON body, with the model aigate resolved (an alias, a fallback)."""
    return {**(caller.body if caller is not None and caller.body is not None else {}), "model": model}


# -- reranking ----------------------------------------------------------------------------------------

def rerank_body(request: RerankRequest, caller: Caller | None) -> dict[str, Any]:
    """The documents as plain strings, which every server takes (llama.cpp's takes no other)."""
    return {**passed_body(caller, request.model), "query": request.query, "documents": list(request.documents),
            **({"top_n": request.top_n} if request.top_n is not None else {})}


def ranking(up: UpstreamConfig, response: requests.Response, request: RerankRequest,
            max_body: int) -> tuple[list[Ranked], int]:
    """The scores, best first and at most top_n, and the tokens the upstream counted (0: none)."""
    body = read_json(up, response, max_body)
    items = body.get("results", body.get("data")) if isinstance(body, dict) else body
    if not isinstance(items, list):
        raise UpstreamError(f"upstream {up.name}'s answer holds no reranking results (is it a reranking model?)")
    found = [_ranked(up, item, len(request.documents)) for item in items]
    found.sort(key=lambda r: -r.score)
    usage: dict[str, Any] = body["usage"] if isinstance(body, dict) and isinstance(body.get("usage"), dict) else {}
    tokens = usage.get("total_tokens", usage.get("prompt_tokens"))
    return (found[:request.top_n] if request.top_n is not None else found), tokens if isinstance(tokens, int) else 0


def _ranked(up: UpstreamConfig, item: Any, count: int) -> Ranked:
    """One result: `{index, relevance_score}` (or `score`), its index one of the request's documents."""
    if isinstance(item, dict):
        index, score = item.get("index"), item.get("relevance_score", item.get("score"))
        if isinstance(index, int) and _is_int(index) and 0 <= index < count and isinstance(score, (int, float)) \
                and not isinstance(score, bool):
            return Ranked(index, float(score))
    raise UpstreamError(f"upstream {up.name}'s reranking answer is not one aigate can read")


# -- transcription: the client's form, sent on as multipart -------------------------------------------

class MultipartBody:
    """A multipart/form-data body of text fields and one file, sent as the file is read (requests sends
    an iterable with a length as it is, with that Content-Length)."""

    def __init__(self, fields: list[tuple[str, str]], file_field: str, upload: Upload) -> None:
        self.boundary = "aigate-" + secrets.token_hex(16)
        self.upload = upload
        head = b"".join(self._part(name) + value.encode() + b"\r\n" for name, value in fields)
        self.head = head + self._part(file_field, upload.filename, upload.content_type)
        self.tail = f"\r\n--{self.boundary}--\r\n".encode()

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def _part(self, name: str, filename: str | None = None, content_type: str | None = None) -> bytes:
        disposition = f'form-data; name="{_quoted(name)}"' + (f'; filename="{_quoted(filename)}"' if filename else "")
        kind = f"Content-Type: {content_type}\r\n" if content_type else ""
        return f"--{self.boundary}\r\nContent-Disposition: {disposition}\r\n{kind}\r\n".encode()

    def __len__(self) -> int:
        return len(self.head) + self.upload.size + len(self.tail)

    def __iter__(self) -> Iterator[bytes]:
        yield self.head
        yield from self.upload.chunks()
        yield self.tail


def form_fields(caller: Caller | None, model: str) -> list[tuple[str, str]]:
    """The client's form fields (a repeated one, `timestamp_granularities[]`, once a value), the model
    as aigate resolved it."""
    fields: Mapping[str, Any] = caller.body if caller is not None and caller.body is not None else {}
    out = [("model", model)]
    for key, value in fields.items():
        if key not in ("model", "file"):
            out += [(key, str(v)) for v in (value if isinstance(value, list) else [value])]
    return out


def _quoted(text: str) -> str:
    """A form-data name or filename, its quotes and line breaks escaped as browsers do."""
    return text.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


# -- answers passed on ---------------------------------------------------------------------------------

def pieces(up: UpstreamConfig, response: requests.Response, limit: int) -> Generator[bytes, None, None]:
    """The answer's body as it arrives, at most ``limit`` bytes (UPSTREAM_MAX_MEDIA_BYTES): held by no one,
    but an answer without end would keep the worker's connection and the client's for good."""
    try:
        yield from capped(response.iter_content(READ_SIZE), limit, f"upstream {up.name}", "UPSTREAM_MAX_MEDIA_BYTES")
    except requests.RequestException as exc:
        raise broken_read(up, exc, "mid-answer") from None


def content_type(response: requests.Response) -> str:
    return response.headers.get("Content-Type") or "application/octet-stream"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
