"""The upstreams as one backend: each model id is served by the pool of upstreams that list it.

Chat and completions answers go through aigate's events (normalise.py) rather than as raw bytes: the
road then applies stops, usage, token limits, metrics and aigate's exact shapes to upstream models as
to every other, and a chunk is re-encoded as it arrives (a few microseconds), never buffered. The
media tasks' answers are passed on as the upstream made them (media.py)."""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any

import requests

from backends.base import (
    BackendError,
    Caller,
    ChatRequest,
    Control,
    Embeddings,
    Event,
    Finish,
    ModelInfo,
    ModelNotFound,
    NotSupportedByModel,
    RateLimited,
    Unavailable,
    UpstreamError,
    UpstreamNotFound,
    UpstreamRateLimited,
    UpstreamTimeout,
    estimate_tokens,
)
from backends.bounded import READ_SIZE, AnswerBounds
from backends.chat_messages import message_json
from backends.media import ImageRequest, Ranking, RawAnswer, RerankRequest, SpeechRequest, TranscriptionRequest, Upload
from backends.upstream import media
from backends.upstream.config import UpstreamConfig
from backends.upstream.normalise import Kind, Normaliser
from backends.upstream.pool import Member, MetricsGuard, order, run
from backends.upstream.transport import Transport, broken_read, read_json

log = logging.getLogger("aigate")

# Worth the next upstream: it failed (5xx, refused, timed out, broke) or is busy (429).
FAIL_OVER_ON = (UpstreamError, RateLimited)
# Fields aigate reads, checks and sends itself; any other field the client sent goes on as sent.
OWN_FIELDS = {"model", "messages", "prompt", "stream", "stream_options", "max_tokens", "max_completion_tokens",
              "temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty", "tools", "tool_choice",
              "functions", "function_call", "response_format", "n", "logprobs", "top_logprobs", "echo", "best_of",
              "input", "encoding_format"}
# What _body sends on (seed, the penalties, tool_choice) or passes as the client sent it (logit_bias); n and
# logprobs are aigate's own fields, and the answers' logprobs are not read back.
CONTROLS: frozenset[Control] = frozenset({"seed", "penalties", "tool_choice", "logit_bias"})
DISCOVERY_RETRY = 5.0  # seconds between reads of a model list never read yet


class UpstreamBackend:
    name = "upstream"

    def __init__(self, upstreams: tuple[UpstreamConfig, ...], taken: set[str], pool_size: int,
                 bounds: AnswerBounds, count: MetricsGuard = run) -> None:
        self.members = [Member(u, count=count) for u in upstreams]
        self.bounds = bounds
        self.transport = Transport(upstreams, pool_size, bounds)
        self.taken = taken  # ids a local or Workers AI model (or an alias) has: a discovered one is left out
        self._pools: dict[str, list[Member]] = {}
        self._infos: list[ModelInfo] = []
        self._refresher: threading.Thread | None = None
        self._build()

    # -- models ------------------------------------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        return self._infos

    def load(self) -> None:
        """Read the model lists of the upstreams that declare none, then keep them fresh in the
        background: a request never waits for a GET /models."""
        self.refresh_models()
        if any(m.config.discovers for m in self.members) and self._refresher is None:
            self._refresher = threading.Thread(target=self._refresh_forever, name="aigate-upstream-models",
                                               daemon=True)
            self._refresher.start()

    def refresh_models(self) -> None:
        for member in self.members:
            if not member.config.discovers:
                continue
            try:
                member.discovered = self.transport.models(member.config)
            except BackendError as exc:  # the list read before (if any) keeps serving
                log.warning("cannot read the models of upstream %s (%s); %s", member.name, exc,
                            "keeping its last list" if member.discovered else "it serves none until it answers")
        self._build()

    def _refresh_forever(self) -> None:
        discovering = [m for m in self.members if m.config.discovers]
        while True:
            # An upstream never read yet is asked again soon: until then it serves nothing.
            unread = any(m.discovered is None for m in discovering)
            time.sleep(min(DISCOVERY_RETRY if unread else math.inf, *(m.config.refresh for m in discovering)))
            try:
                self.refresh_models()
            except Exception:  # the refresher must outlive any surprise
                log.exception("refreshing the upstreams' model lists failed")

    def _build(self) -> None:
        pools: dict[str, list[Member]] = {}
        created: dict[str, int] = {}
        for member in self.members:
            listed = [(m, 0) for m in member.config.models] if member.config.models else member.discovered or []
            for model, when in listed:
                if model in self.taken:
                    log.warning("upstream %s lists %r, which a local or Workers AI model or an alias already names; "
                                "left out", member.name, model)
                    continue
                pools.setdefault(model, []).append(member)
                created[model] = max(created.get(model, 0), when)
        self._infos = [ModelInfo(model, members[0].name, created[model],
                                 structured_outputs=all(m.config.structured_outputs for m in members),
                                 tasks=None, controls=CONTROLS)  # whatever its server serves
                       for model, members in pools.items()]
        self._pools = pools  # swapped whole: requests read one list or the other, never half of one

    # -- state ---------------------------------------------------------------------------------------

    def readiness(self) -> str | None:
        if not self._pools:
            return "no upstream model is known yet (their GET /models has not answered)"
        now = time.monotonic()
        down = [model for model, members in self._pools.items() if all(m.cooling(now) for m in members)]
        if len(down) == len(self._pools):
            return "every upstream is failing; each is tried again after its cool-down"
        return None

    def stats(self) -> dict[str, float]:
        return {}

    def report(self) -> dict[str, dict[str, object]]:
        """Each upstream's state, for /ready (metrics has the same as aigate_upstream_*)."""
        now = time.monotonic()
        return {m.name: m.report(now) for m in self.members}

    # -- requests --------------------------------------------------------------------------------------

    def chat(self, request: ChatRequest, caller: Caller | None = None) -> Generator[Event, None, None]:
        kind: Kind = "chat" if request.prompt is None else "text"
        body = _body(request, kind, caller)
        path = "/chat/completions" if kind == "chat" else "/completions"
        failures: list[BackendError] = []
        for member in order(self._pool(request.model)):
            member.begin()
            started = time.monotonic()
            response: requests.Response | None = None
            try:
                response = self.transport.post(member.config, path, body)
                reader = Normaliser(request, kind, member.name, self.bounds.event)
                events = _read(reader, member.config, response, self.bounds.body)
                first = next(events)  # a failure up to here moves to the next upstream: the client saw nothing
            except FAIL_OVER_ON as exc:
                _close(response)
                member.end()
                member.failed(exc)
                failures.append(exc)
                continue
            except BackendError:
                _close(response)
                member.end()
                member.refused()
                raise
            except BaseException:
                _close(response)
                member.end()
                raise
            member.answered(time.monotonic() - started)
            if caller is not None:
                caller.served_by(f"upstream/{member.name}")  # the request's log line says which one answered
            try:
                for event in itertools.chain((first,), events):
                    if isinstance(event, Finish) and reader.estimated:  # said now: the road may close us after it
                        log.info("request %s: usage estimated (upstream %s sent none)",
                                 caller.id if caller else "-", member.name)
                    yield event
            except FAIL_OVER_ON as exc:  # too late for another upstream: the client has the start of it
                member.failed(exc, answering=True)
                raise
            finally:
                response.close()  # a client that left closes the upstream's connection, which stops its work
                member.end()
            return
        raise _gave_up(request.model, failures)

    def embed(self, model: str, inputs: list[str], caller: Caller | None = None) -> Embeddings:
        body = {**_extras(caller), "model": model, "input": inputs, "encoding_format": "float"}
        failures: list[BackendError] = []
        for member in order(self._pool(model)):
            member.begin()
            started = time.monotonic()
            try:
                response = self.transport.post(member.config, "/embeddings", body)
                with response:
                    result = _embeddings(member.config, response, len(inputs), self.bounds.body)
            except FAIL_OVER_ON as exc:
                member.failed(exc)
                failures.append(exc)
                continue
            except BackendError:
                member.refused()
                raise
            finally:
                member.end()
            member.answered(time.monotonic() - started)
            if caller is not None:
                caller.served_by(f"upstream/{member.name}")
            vectors, tokens = result
            return Embeddings(vectors, tokens or sum(estimate_tokens(len(text)) for text in inputs))
        raise _gave_up(model, failures)

    # -- reranking, transcription, speech, images (backends/media.py): passed on ------------------------

    def rerank(self, request: RerankRequest, caller: Caller | None = None) -> Ranking:
        body = media.rerank_body(request, caller)
        member, response = self._exchange(request.model, caller,
                                          lambda up: self.transport.post(up, "/rerank", body))
        try:
            results, tokens = media.ranking(member.config, response, request, self.bounds.body)
        finally:
            response.close()
            member.end()
        return Ranking(results, tokens or sum(estimate_tokens(len(request.query) + len(d)) for d in request.documents))

    def transcribe(self, request: TranscriptionRequest, caller: Caller | None = None) -> RawAnswer:
        fields = media.form_fields(caller, request.model)
        return self._passed_on(request.model, caller, "/audio/transcriptions", upload=(fields, request.audio))

    def speak(self, request: SpeechRequest, caller: Caller | None = None) -> RawAnswer:
        return self._passed_on(request.model, caller, "/audio/speech", media.passed_body(caller, request.model))

    def generate_image(self, request: ImageRequest, caller: Caller | None = None) -> RawAnswer:
        return self._passed_on(request.model, caller, "/images/generations", media.passed_body(caller, request.model))

    def _passed_on(self, model: str, caller: Caller | None, path: str, body: dict[str, Any] | None = None,
                   upload: tuple[list[tuple[str, str]], Upload] | None = None) -> RawAnswer:
        """The upstream's answer as it made it, streamed to the client."""
        def send(up: UpstreamConfig) -> requests.Response:
            data = media.MultipartBody(upload[0], "file", upload[1]) if upload else None  # afresh for each try
            return self.transport.post(up, path, body, data=data)

        member, response = self._exchange(model, caller, send)

        def chunks() -> Generator[bytes, None, None]:
            try:
                yield from media.pieces(member.config, response, self.bounds.media)
            finally:
                response.close()
                member.end()
        return RawAnswer(media.content_type(response), chunks())

    def _exchange(self, model: str, caller: Caller | None,
                  send: Callable[[UpstreamConfig], requests.Response]) -> tuple[Member, requests.Response]:
        """The first upstream of the pool to answer a 2xx, its body unread (the caller ends the member's
        request when it has read it); a failure moves to the next, as chat's does. A 404 says the server has
        no such endpoint (a chat model's server asked to rerank): the request's fault, not the upstream's."""
        failures: list[BackendError] = []
        for member in order(self._pool(model)):
            member.begin()
            started = time.monotonic()
            try:
                response = send(member.config)
            except UpstreamNotFound as exc:
                member.end()
                member.refused()
                raise NotSupportedByModel(f"{model} does not serve this endpoint ({exc})", param="model") from None
            except FAIL_OVER_ON as exc:
                member.end()
                member.failed(exc)
                failures.append(exc)
                continue
            except BackendError:
                member.end()
                member.refused()
                raise
            except BaseException:
                member.end()
                raise
            member.answered(time.monotonic() - started)
            if caller is not None:
                caller.served_by(f"upstream/{member.name}")
            return member, response
        raise _gave_up(model, failures)

    def _pool(self, model: str) -> list[Member]:
        members = self._pools.get(model)
        if not members:  # its upstream's list changed since the model was resolved
            raise ModelNotFound(f"no upstream serves {model} any more")
        return members


def _read(reader: Normaliser, up: UpstreamConfig, response: requests.Response, max_body: int) -> Iterator[Event]:
    """The answer's events: a stream, or (also to a stream request, as some servers do) one JSON body."""
    if "text/event-stream" in response.headers.get("Content-Type", ""):
        return reader.stream(_chunks(up, response))
    return reader.whole(read_json(up, response, max_body))


def _chunks(up: UpstreamConfig, response: requests.Response) -> Iterator[bytes]:
    """The stream as it arrives, in pieces of at most READ_SIZE (an HTTP chunk is not read whole)."""
    try:
        yield from response.iter_content(chunk_size=READ_SIZE)
    except requests.RequestException as exc:
        raise broken_read(up, exc, "mid-stream") from None


def _embeddings(up: UpstreamConfig, response: requests.Response, count: int,
                max_body: int) -> tuple[list[list[float]], int]:
    body = read_json(up, response, max_body)
    data = body.get("data") if isinstance(body, dict) else None
    items = sorted((d for d in data if isinstance(d, dict)), key=lambda d: d.get("index", 0)) if isinstance(
        data, list) else []
    vectors = [d.get("embedding") for d in items]
    if len(vectors) != count or not all(isinstance(v, list) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in v) for v in vectors):
        raise UpstreamError(f"upstream {up.name}'s answer holds no embeddings (is it an embedding model?)")
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    tokens = usage.get("prompt_tokens")
    return vectors, tokens if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > 0 else 0  # type: ignore[return-value]


def _gave_up(model: str, failures: list[BackendError]) -> BackendError:
    """Every upstream of the pool failed: one error saying so, with the status the failures share."""
    said = "; ".join(str(f) for f in failures)
    if not failures:
        return Unavailable(f"no upstream serves {model}")
    if all(isinstance(f, RateLimited) for f in failures):
        waits = [f.retry_after for f in failures if f.retry_after is not None]
        return UpstreamRateLimited(f"every upstream serving {model} is rate limited: {said}",
                                   retry_after=min(waits) if waits else None)
    if all(isinstance(f, UpstreamTimeout) for f in failures):
        return UpstreamTimeout(f"every upstream serving {model} timed out: {said}")
    last = failures[-1]  # its kind (and so its code) stands for the pool's
    kind = type(last) if isinstance(last, UpstreamError) else UpstreamError
    return kind(f"every upstream serving {model} failed: {said}")


def _body(r: ChatRequest, kind: Kind, caller: Caller | None) -> dict[str, Any]:
    """The request as the upstream is sent it: the client's own fields, with those aigate checked
    (and may have changed: a ceiling's max_tokens, a fallback's model) as aigate has them."""
    body: dict[str, Any] = {**_extras(caller), "model": r.model, "stream": r.incremental}
    if kind == "chat":
        body["messages"] = [message_json(m) for m in r.messages]
    else:
        body["prompt"] = r.prompt
    if r.incremental:  # exact usage, where the upstream can say it
        body["stream_options"] = {"include_usage": True}
    if r.max_tokens is not None:
        body["max_tokens"] = r.max_tokens
    for name in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty"):
        value = getattr(r, name)
        if value is not None:
            body[name] = value
    if r.stop:
        body["stop"] = list(r.stop)
    if r.tools:
        body["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                           "parameters": t.parameters}} for t in r.tools]
        body["tool_choice"] = (r.tool_choice if r.forced_tool is None
                               else {"type": "function", "function": {"name": r.forced_tool}})
    if r.response_format is not None:
        fmt = r.response_format
        body["response_format"] = ({"type": "json_object"} if fmt.schema is None else
                                   {"type": "json_schema", "json_schema": {"name": fmt.name, "schema": fmt.schema}})
    return body


def _extras(caller: Caller | None) -> dict[str, Any]:
    """The fields of the client's body that aigate does not read itself (top_k, user, logit_bias...)."""
    body = caller.body if caller is not None else None
    return {k: v for k, v in body.items() if k not in OWN_FIELDS} if body is not None else {}


def _close(response: requests.Response | None) -> None:
    if response is not None:
        response.close()
