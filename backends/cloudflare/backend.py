"""Cloudflare Workers AI as a Backend (`POST {base}/accounts/{id}/ai/run/{model}`): real streaming,
usage from Cloudflare's own counts, bounded retries of what is safe to resend, the model list read
from the catalogue in the background (CLOUDFLARE_MODELS=auto), and every upstream failure turned
into a BackendError that never carries the account id or the token."""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from backends.base import (
    BackendError,
    Caller,
    ChatRequest,
    ContextLengthExceeded,
    Control,
    Embeddings,
    Event,
    ModelInfo,
    NotSupportedByModel,
    Task,
    UpstreamBrokenAnswer,
    UpstreamError,
    UpstreamOverCapacity,
    UpstreamRefused,
    UpstreamTimeout,
    estimate_tokens,
)
from backends.bounded import AnswerBounds, capped, read_whole
from backends.cloudflare import codec, media
from backends.cloudflare.transport import (
    ConnectFailed,
    ConnectTimedOut,
    NoAnswer,
    Payload,
    ReadBroken,
    Response,
    Transport,
    TransportError,
)
from backends.media import (
    ImageRequest,
    Images,
    Ranking,
    RawAnswer,
    RerankRequest,
    SpeechRequest,
    Transcript,
    TranscriptionRequest,
)
from backends.sse_reader import sse_data

log = logging.getLogger("backends.cloudflare")

MAX_RETRY_WAIT = 2.0  # an upstream Retry-After longer than this goes back to the client instead
EMBED_BATCH = 100  # Workers AI's limit of texts per embedding call
DISCOVERY_RETRY = 5.0  # seconds between catalogue attempts while none has succeeded (/ready says not ready)
DISCOVERY_RETRY_LATER = 60.0  # after a failure once a list is known (it keeps serving)

# What codec.chat_body passes on besides temperature, top_p and max_tokens (tools' tool_choice is not sent).
CONTROLS: frozenset[Control] = frozenset({"seed", "penalties"})


@dataclass(frozen=True)
class CloudflareConfig:
    account_id: str
    api_token: str
    api_base: str
    models: tuple[str, ...]  # () with discover=True: found through the models search API
    bounds: AnswerBounds  # how much of an answer is read
    discover: bool = False
    max_tokens: int = 2048  # sent when the client sets none: Cloudflare's own default (256) cuts answers short
    connect_timeout: float = 10.0
    read_timeout: float = 120.0
    retries: int = 2
    models_ttl: float = 3600.0
    pool_size: int = 100
    embedding_models: tuple[str, ...] = ()
    json_mode_models: tuple[str, ...] = ()  # those that take response_format (Workers AI's JSON mode)
    media_models: tuple[tuple[str, Task], ...] = ()  # rerank, speech recognition, speech, image models


class CloudflareBackend:
    name = "cloudflare"

    def __init__(self, config: CloudflareConfig) -> None:
        self.config = config
        self.transport = Transport(f"{config.api_base.rstrip('/')}/accounts/{config.account_id}", config.api_token,
                                   config.connect_timeout, config.read_timeout, config.pool_size)
        self._models = [self._info(m, "cloudflare") for m in config.models]
        self._embedding_models = [ModelInfo(m, "cloudflare", tasks=frozenset({"embeddings"}))
                                  for m in config.embedding_models]
        self._media_models = [ModelInfo(m, "cloudflare", tasks=frozenset({task})) for m, task in config.media_models]
        self._discovery = threading.Lock()  # one catalogue read at a time
        self._refresh_at = 0.0 if config.discover else float("inf")
        self._discovered = False  # with discovery on: has the catalogue been read at least once?

    def load(self) -> None:
        if self.config.discover:  # fill the list before the first client asks (off the request path)
            self._discover()

    def readiness(self) -> str | None:
        """Credentials are present (settings insist on both) and each request is independent; with
        CLOUDFLARE_MODELS=auto, not ready until the catalogue has been read once (before that every
        @cf model would be a 404)."""
        if self.config.discover and not self._discovered:
            self._refresh_when_due()  # what retries it when no request comes
            return "the Workers AI model catalogue could not be read yet (CLOUDFLARE_MODELS=auto); retrying"
        return None

    def stats(self) -> dict[str, float]:
        return {}

    # -- models ---------------------------------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        """The list as last read; a stale one is refreshed in the background, never in the request."""
        self._refresh_when_due()
        return self._models + self._embedding_models + self._media_models

    def _refresh_when_due(self) -> None:
        if time.monotonic() >= self._refresh_at and not self._discovery.locked():
            self._refresh_at = time.monotonic() + DISCOVERY_RETRY  # one reader started, not one per request
            threading.Thread(target=self._discover, name="aigate-cloudflare-models", daemon=True).start()

    def _discover(self) -> None:
        """Text-generation models from the catalogue; on failure keep what we had, retry later."""
        if not self._discovery.acquire(blocking=False):
            return  # another read is under way
        try:
            self._models = self._read_catalogue()
            self._discovered = True
            self._refresh_at = time.monotonic() + self.config.models_ttl
        except (TransportError, UpstreamError, ValueError, KeyError, TypeError, AttributeError,
                RecursionError) as exc:
            # Never read yet, nothing is served: try again soon; later, the list we have still serves.
            retry = DISCOVERY_RETRY_LATER if self._discovered else DISCOVERY_RETRY
            log.warning("Cloudflare model discovery failed (%s); retrying in %.0f s", self._scrub(str(exc)), retry)
            self._refresh_at = time.monotonic() + retry
        finally:
            self._discovery.release()

    def _read_catalogue(self) -> list[ModelInfo]:
        found: list[ModelInfo] = []
        for page in range(1, 41):
            response = self.transport.get("/ai/models/search", {"task": "Text Generation", "per_page": "50",
                                                                 "page": str(page)})
            try:
                if not response.ok:
                    raise ValueError(f"HTTP {response.status} from the models search API")
                items = response.json(self.config.bounds.body).get("result") or []
            finally:
                response.close()
            found += [self._info(i["name"], "cloudflare" if i.get("source", 1) == 1 else "huggingface",
                                 codec.created(i.get("created_at"))) for i in items if isinstance(i.get("name"), str)]
            if len(items) < 50:
                break
        return found

    def _info(self, model: str, owned_by: str, created: int = 0) -> ModelInfo:
        return ModelInfo(model, owned_by, created, structured_outputs=model in self.config.json_mode_models,
                         open_ended_tokens=self.config.max_tokens, controls=CONTROLS)

    # -- embeddings -------------------------------------------------------------------------------

    def embed(self, model: str, inputs: list[str], caller: Caller | None = None) -> Embeddings:
        """`{"text": [...]}` at most 100 texts a call. Workers AI counts no tokens for embeddings:
        usage is a chars/4 estimate."""
        vectors: list[list[float]] = []
        for start in range(0, len(inputs), EMBED_BATCH):
            batch = inputs[start:start + EMBED_BATCH]
            response = self._post(model, {"text": batch})
            try:
                result = self._result(response)
            finally:
                response.close()
            vectors += codec.embeddings_of(result, len(batch), model)
        return Embeddings(vectors, sum(estimate_tokens(len(text)) for text in inputs))

    # -- reranking, speech recognition, speech, images (backends/media.py) -----------------------

    def rerank(self, request: RerankRequest, caller: Caller | None = None) -> Ranking:
        """Workers AI counts no tokens here either: usage is a chars/4 estimate of each (query, document)
        pair the model reads."""
        result = self._run(request.model, media.rerank_body(request), "documents")
        return Ranking(media.ranked(result, request),
                       sum(estimate_tokens(len(request.query) + len(d)) for d in request.documents))

    def transcribe(self, request: TranscriptionRequest, caller: Caller | None = None) -> Transcript:
        if request.stream:
            raise NotSupportedByModel(f"{request.model} cannot stream its transcription; leave stream out.",
                                      param="stream")
        return media.transcript(self._run(request.model, media.transcription_payload(request), "file"),
                                request.model)

    def speak(self, request: SpeechRequest, caller: Caller | None = None) -> RawAnswer:
        """MeloTTS answers JSON (base64 MP3), Aura the audio itself, passed on as it arrives."""
        if request.sse:
            raise NotSupportedByModel(f"{request.model} cannot stream its audio as events; leave stream_format "
                                      "out (or ask for audio).", param="stream_format")
        response = self._post_media(request.model, media.speech_body(request), "input")
        content_type = media.CONTENT_TYPES[request.response_format]
        if "application/json" in response.content_type:
            try:
                audio = self._result(response, media=True).get("audio")
            finally:
                response.close()
            if not isinstance(audio, str) or not audio:
                raise UpstreamError(f"Cloudflare's answer for {request.model} holds no audio (is it a speech model?)")
            return RawAnswer(content_type, _once(base64.b64decode(audio)))
        return RawAnswer(content_type, self._streamed(response))

    def generate_image(self, request: ImageRequest, caller: Caller | None = None) -> Images:
        """One call an image: FLUX.1 schnell answers JSON (base64), Stable Diffusion XL the PNG itself."""
        body = media.image_body(request.model, request.prompt, request.width, request.height,
                                request.negative_prompt, request.seed)
        images = []
        for _ in range(request.n):
            response = self._post_media(request.model, body, "prompt")
            try:
                if "application/json" in response.content_type:
                    images.append(media.image_of(self._result(response, media=True), request.model))
                else:
                    images.append(base64.b64encode(self._file(response)).decode("ascii"))
            finally:
                response.close()
        return Images(images)

    def _run(self, model: str, body: dict[str, Any] | Payload, param: str) -> dict[str, Any]:
        """A task's JSON result."""
        response = self._post_media(model, body, param)
        try:
            return self._result(response)
        finally:
            response.close()

    def _post_media(self, model: str, body: dict[str, Any] | Payload, param: str) -> Response:
        """_post, with Workers AI's "too large" said of the client's field rather than of chat messages."""
        try:
            return self._post(model, body)
        except ContextLengthExceeded as exc:
            raise UpstreamRefused(exc.message, param=param) from None

    def _file(self, response: Response) -> bytearray:
        """An image's bytes, held to be encoded: at most UPSTREAM_MAX_MEDIA_BYTES."""
        try:
            return read_whole(response.chunks(), self.config.bounds.media, "Cloudflare Workers AI",
                              "UPSTREAM_MAX_MEDIA_BYTES")
        except ReadBroken as exc:
            raise _broken_read(exc, "mid-answer") from None

    def _streamed(self, response: Response) -> Generator[bytes, None, None]:
        """Audio passed on as it arrives: held by no one, but bounded all the same (UPSTREAM_MAX_MEDIA_BYTES),
        or an answer without end would hold the worker's connection and the client's for good."""
        try:
            yield from capped(response.chunks(), self.config.bounds.media, "Cloudflare Workers AI",
                              "UPSTREAM_MAX_MEDIA_BYTES")
        except ReadBroken as exc:
            raise _broken_read(exc, "mid-answer") from None
        finally:
            response.close()

    # -- chat -------------------------------------------------------------------------------------

    def chat(self, request: ChatRequest, caller: Caller | None = None) -> Generator[Event, None, None]:
        body = codec.chat_body(request, self.config.max_tokens)
        response = self._post(request.model, body)
        try:
            if "text/event-stream" in response.content_type:
                try:
                    datas = sse_data(response.chunks(), self.config.bounds.event, "Cloudflare Workers AI")
                    yield from codec.stream_events(datas, request, body["max_tokens"], self._scrub)
                except ReadBroken as exc:
                    raise _broken_read(exc, "mid-stream") from None
            else:  # some models answer a stream request with plain JSON
                yield from codec.whole_events(self._result(response), request, body["max_tokens"])
        finally:
            response.close()  # a client that went away closes the upstream connection with it

    def _post(self, model: str, body: dict[str, Any] | Payload) -> Response:
        """POST with bounded retries of what is safe to resend: connection failures, capacity 429s
        and 5xx, all before anything reached our client."""
        path = f"/ai/run/{model}"
        for attempt in range(self.config.retries + 1):
            last = attempt == self.config.retries
            try:
                response = self.transport.post(path, body)
            except ConnectTimedOut:
                if last:
                    raise UpstreamTimeout("Cloudflare Workers AI did not accept a connection in time") from None
            except NoAnswer:  # connected, but no answer: resending could pay twice
                raise UpstreamTimeout("Cloudflare Workers AI did not answer in time") from None
            except ConnectFailed as exc:
                if last:
                    raise UpstreamError(f"cannot reach Cloudflare Workers AI: {self._scrub(str(exc))}") from None
            else:
                if response.ok:
                    return response
                error = self._error(response)
                response.close()
                # A stalled error body is not resent: each try would wait the whole read timeout.
                retryable = not isinstance(error, UpstreamTimeout) and (
                    response.status >= 500 or isinstance(error, (UpstreamOverCapacity, UpstreamBrokenAnswer)))
                wait = error.retry_after if error.retry_after is not None else 0.25 * 2 ** attempt
                if last or not retryable or wait > MAX_RETRY_WAIT:
                    raise error
                time.sleep(wait)
                continue
            time.sleep(0.25 * 2 ** attempt)
        raise AssertionError("unreachable")

    def _result(self, response: Response, media: bool = False) -> dict[str, Any]:
        """The JSON answer's result, read to UPSTREAM_MAX_BODY_BYTES (UPSTREAM_MAX_MEDIA_BYTES where it
        holds a file: MeloTTS's audio, FLUX's image, in base64)."""
        bounds = self.config.bounds
        try:
            body = (response.json(bounds.media, "UPSTREAM_MAX_MEDIA_BYTES") if media else
                    response.json(bounds.body))
        except (ValueError, RecursionError):  # includes a body cut short, and one nested absurdly deep
            raise UpstreamError("Cloudflare answered with something that is not JSON") from None
        except ReadBroken as exc:
            raise _broken_read(exc, "mid-answer") from None
        return codec.result_of(body, self._scrub)

    def _error(self, response: Response) -> BackendError:
        """The BackendError for a non-2xx answer, of which the first ERROR_BODY_BYTES are read."""
        try:
            body = json.loads(response.head())
        except (ValueError, RecursionError):
            # not JSON (or cut at its bound), or nested past what the parser can follow
            body = {}
        except ReadBroken as exc:  # the error body was cut short or stalled: a 502/504
            return _broken_read(exc, f"while sending an HTTP {response.status} error", UpstreamBrokenAnswer)
        return codec.error_for(response.status, body, codec.retry_after(response.retry_after), self._scrub)

    def _scrub(self, text: str) -> str:
        """Upstream messages may quote the account id (or, in theory, the token): never pass them on."""
        for secret in (self.config.api_token, self.config.account_id):
            if secret:
                text = text.replace(secret, "***")
        return text


def _once(data: bytes) -> Generator[bytes, None, None]:
    yield data


def _broken_read(exc: ReadBroken, where: str, broken: type[UpstreamError] = UpstreamError) -> UpstreamError:
    """A failure while reading an answer already under way."""
    if exc.timed_out:
        return UpstreamTimeout("Cloudflare Workers AI stopped sending (read timeout)")
    return broken(f"the connection to Cloudflare Workers AI broke {where}")
