"""Cloudflare Workers AI over its REST API (`POST {base}/accounts/{id}/ai/run/{model}`), with
`requests`: real streaming, usage from Cloudflare's own counts, and every upstream failure turned
into a BackendError that never carries the account id or the token.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from backends.base import (BackendError, ChatRequest, ContextLengthExceeded, Embeddings, Event, Finish, FinishReason,
                           InvalidRequest, Message, ModelInfo, ModelNotFound, RateLimited, TextDelta, ToolCall,
                           UpstreamError, UpstreamTimeout, Usage, estimate_tokens)
from backends.sse_reader import sse_data
from backends.stops import StopMatcher

log = logging.getLogger(__name__)

CAPACITY_CODES = {3040, 971}  # transient: worth a retry
DAILY_LIMIT_CODES = {3036, 4006}  # the free allocation is used up until 00:00 UTC
UNKNOWN_MODEL_CODES = {5007, 3042}
TOO_LARGE_CODES = {3006}
AUTH_CODES = {10000, 9106, 6111, 7003}  # bad token, malformed header, bad account id
MAX_RETRY_WAIT = 2.0  # an upstream Retry-After longer than this goes back to the client instead
EMBED_BATCH = 100  # Workers AI's limit of texts per embedding call
DISCOVERY_RETRY = 5.0  # seconds between catalogue attempts while none has succeeded (/ready says not ready)


@dataclass(frozen=True)
class CloudflareConfig:
    account_id: str
    api_token: str
    api_base: str
    models: tuple[str, ...]  # () with discover=True: found through the models search API
    discover: bool = False
    max_tokens: int = 2048  # sent when the client sets none: Cloudflare's own default (256) cuts answers short
    connect_timeout: float = 10.0
    read_timeout: float = 120.0
    retries: int = 2
    models_ttl: float = 3600.0
    pool_size: int = 100
    embedding_models: tuple[str, ...] = ()
    json_mode_models: tuple[str, ...] = ()  # those that take response_format (Workers AI's JSON mode)


class CloudflareBackend:
    name = "cloudflare"

    def __init__(self, config: CloudflareConfig) -> None:
        self.config = config
        self.session = requests.Session()
        # One pool sized to the worker's connections: under gevent each waiting stream is a greenlet.
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=config.pool_size, max_retries=0)
        self.session.mount("https://", adapter)
        self.session.mount("http://", adapter)
        self.session.headers["Authorization"] = f"Bearer {config.api_token}"
        # Proxies and the CA bundle from the environment, read once here: left to itself requests
        # re-reads the environment on every call (17% of a request's CPU in a profile).
        self.session.trust_env = False
        self.session.proxies = requests.utils.get_environ_proxies(config.api_base)
        self.session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
        self._account_url = f"{config.api_base.rstrip('/')}/accounts/{config.account_id}"
        self._models = [self._info(m, "cloudflare") for m in config.models]
        self._embedding_models = [ModelInfo(m, "cloudflare") for m in config.embedding_models]
        self._models_expire = 0.0 if config.discover else math.inf
        self._discovered = False  # with discovery on: has the catalogue been read at least once?

    def load(self) -> None:
        self.models()  # with discovery on, fill the list before the first client asks

    def readiness(self) -> str | None:
        """Credentials are present (settings insist on both) and each request is independent; with
        CLOUDFLARE_MODELS=auto, not ready until the catalogue has been read once (before that every
        @cf model would be a 404). Asking again here is what retries it when no request comes."""
        if self.config.discover and not self._discovered:
            self.models()
            if not self._discovered:
                return "the Workers AI model catalogue could not be read yet (CLOUDFLARE_MODELS=auto); retrying"
        return None

    def stats(self) -> dict[str, float]:
        return {}

    # -- models ---------------------------------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        if time.monotonic() >= self._models_expire:
            self._discover()
        return self._models + self._embedding_models

    def _discover(self) -> None:
        """Text-generation models from the catalogue; on failure keep what we had, retry later."""
        found: list[ModelInfo] = []
        try:
            for page in range(1, 41):
                r = self.session.get(f"{self._account_url}/ai/models/search", timeout=self._timeouts(),
                                     params={"task": "Text Generation", "per_page": "50", "page": str(page)})
                r.raise_for_status()
                items = r.json().get("result") or []
                found += [self._info(i["name"], "cloudflare" if i.get("source", 1) == 1 else "huggingface",
                                     _created(i.get("created_at"))) for i in items if isinstance(i.get("name"), str)]
                if len(items) < 50:
                    break
        except (requests.RequestException, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            # Never read yet, nothing is served: try again soon; later, the list we have still serves.
            retry = 60.0 if self._discovered else DISCOVERY_RETRY
            log.warning("Cloudflare model discovery failed (%s); retrying in %.0f s", self._scrub(str(exc)), retry)
            self._models_expire = time.monotonic() + retry
            return
        self._models = found
        self._discovered = True
        self._models_expire = time.monotonic() + self.config.models_ttl

    def _info(self, model: str, owned_by: str, created: int = 0) -> ModelInfo:
        return ModelInfo(model, owned_by, created, structured_outputs=model in self.config.json_mode_models)

    # -- embeddings -------------------------------------------------------------------------------

    def embed(self, model: str, inputs: list[str]) -> Embeddings:
        """`{"text": [...]}` -> `{"shape": [n, d], "data": [[...], ...]}`, at most 100 texts a call.
        Workers AI counts no tokens for embeddings: usage is a chars/4 estimate."""
        vectors: list[list[float]] = []
        for start in range(0, len(inputs), EMBED_BATCH):
            batch = inputs[start:start + EMBED_BATCH]
            response = self._post(model, {"text": batch})
            try:
                result = self._envelope(response)
            finally:
                response.close()
            data = result.get("data")
            if not (isinstance(data, list) and len(data) == len(batch)
                    and all(isinstance(v, list) and all(isinstance(x, (int, float)) for x in v) for v in data)):
                raise UpstreamError(f"Cloudflare's answer for {model} holds no embeddings (is it an embedding model?)")
            vectors += data
        return Embeddings(vectors, sum(estimate_tokens(len(text)) for text in inputs))

    # -- chat -------------------------------------------------------------------------------------

    def chat(self, request: ChatRequest) -> Generator[Event, None, None]:
        body = self._body(request)
        response = self._post(request.model, body)
        try:
            if "text/event-stream" in response.headers.get("Content-Type", ""):
                yield from self._stream(response, request, body["max_tokens"])
            else:  # some models answer a stream request with plain JSON
                yield from self._whole(self._envelope(response), request, body["max_tokens"])
        finally:
            response.close()  # a client that went away closes the upstream connection with it

    def _body(self, r: ChatRequest) -> dict[str, Any]:
        # Stream from upstream only when the client streams: a whole answer is one JSON body to read.
        body: dict[str, Any] = {"stream": r.incremental, "max_tokens": r.max_tokens or self.config.max_tokens}
        if r.response_format is not None:  # JSON mode: a bare schema, and never a stream upstream
            fmt = r.response_format
            body["response_format"] = ({"type": "json_object"} if fmt.schema is None
                                       else {"type": "json_schema", "json_schema": fmt.schema})
            body["stream"] = False
        if r.prompt is None:
            body["messages"] = [_message(m) for m in r.messages]
        else:  # Workers AI's prompt form; raw skips the chat template: a plain continuation
            body.update(prompt=r.prompt, raw=True)
        if r.tools:  # the OpenAI form, which Workers AI's function-calling models take
            body["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                               "parameters": t.parameters}} for t in r.tools]
        if r.temperature is not None:
            body["temperature"] = r.temperature
        if r.top_p is not None:
            body["top_p"] = max(r.top_p, 0.001)  # some models' minimum
        if r.seed is not None and 1 <= r.seed <= 9_999_999_999:
            body["seed"] = r.seed
        # Classic models take penalties in 0..2 only; OpenAI's negative values mean "none" there.
        if r.frequency_penalty is not None:
            body["frequency_penalty"] = max(r.frequency_penalty, 0.0)
        if r.presence_penalty is not None:
            body["presence_penalty"] = max(r.presence_penalty, 0.0)
        return body

    def _post(self, model: str, body: dict[str, Any]) -> requests.Response:
        """POST with bounded retries of what is safe to resend: connection failures, capacity 429s
        and 5xx, all before anything reached our client."""
        url = f"{self._account_url}/ai/run/{model}"
        for attempt in range(self.config.retries + 1):
            last = attempt == self.config.retries
            try:
                response = self.session.post(url, json=body, stream=True, timeout=self._timeouts())
            except requests.ConnectTimeout:
                if last:
                    raise UpstreamTimeout("Cloudflare Workers AI did not accept a connection in time") from None
            except requests.Timeout:  # connected, but no answer: resending could pay twice
                raise UpstreamTimeout("Cloudflare Workers AI did not answer in time") from None
            except requests.ConnectionError as exc:
                if last:
                    raise UpstreamError(f"cannot reach Cloudflare Workers AI: {self._scrub(_reason(exc))}") from None
            else:
                if response.ok:
                    return response
                error = self._error(response)
                response.close()
                # A stalled error body is not resent: each try would wait the whole read timeout.
                retryable = not isinstance(error, UpstreamTimeout) and (
                    response.status_code >= 500 or error.extra.get("code") in ("upstream_capacity",
                                                                               "upstream_broken_answer"))
                wait = error.retry_after if error.retry_after is not None else 0.25 * 2 ** attempt
                if last or not retryable or wait > MAX_RETRY_WAIT:
                    raise error
                time.sleep(wait)
                continue
            time.sleep(0.25 * 2 ** attempt)
        raise AssertionError("unreachable")

    def _stream(self, response: requests.Response, request: ChatRequest, max_tokens: int) -> Iterator[Event]:
        stop = StopMatcher(request.stop)
        calls = _ToolCalls()
        usage: dict[str, Any] = {}
        finish: str | None = None
        parts = 0
        done = False
        try:
            for data in sse_data(response.iter_content(chunk_size=None)):
                if data.strip() == "[DONE]":
                    done = True
                    break
                try:
                    frame = json.loads(data)
                except (ValueError, RecursionError):
                    raise UpstreamError("Cloudflare sent a malformed stream event") from None
                if not isinstance(frame, dict):
                    raise UpstreamError("Cloudflare sent a malformed stream event")
                if frame.get("errors") or frame.get("error"):
                    raise UpstreamError(f"Cloudflare failed mid-stream: {self._scrub(_first_message(frame))}")
                text, frame_finish, frame_calls = _frame_parts(frame)
                finish = frame_finish or finish
                calls.add(frame_calls)
                usage = frame.get("usage") or usage
                if text:
                    parts += 1
                    out = stop.feed(text)
                    if out:
                        yield TextDelta(out)
                    if stop.stopped:
                        break
        except requests.RequestException as exc:
            raise _broken_read(exc, "mid-stream") from None
        if not done and not stop.stopped:
            raise UpstreamError("the Cloudflare stream ended before its end marker (truncated)")
        tail = stop.flush()
        if tail:
            yield TextDelta(tail)
        yield from calls.events()
        yield Finish(_finish_reason(finish, stop.stopped, usage, max_tokens, bool(calls)),
                     _usage(usage, request, parts))

    def _whole(self, result: dict[str, Any], request: ChatRequest, max_tokens: int) -> Iterator[Event]:
        text, finish, items = _result_parts(result)
        stop = StopMatcher(request.stop)
        text = stop.feed(text) + stop.flush()
        if text:
            yield TextDelta(text)
        calls = _ToolCalls()
        calls.add(items)
        yield from calls.events()
        usage = result.get("usage") or {}
        yield Finish(_finish_reason(finish, stop.stopped, usage, max_tokens, bool(calls)),
                     _usage(usage, request, estimate_tokens(len(text))))

    # -- errors ------------------------------------------------------------------------------------

    def _envelope(self, response: requests.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except (ValueError, RecursionError):  # includes a body cut short, and one nested absurdly deep
            raise UpstreamError("Cloudflare answered with something that is not JSON") from None
        except requests.RequestException as exc:
            raise _broken_read(exc, "mid-answer") from None
        if not isinstance(body, dict) or body.get("success") is False or not isinstance(body.get("result"), dict):
            if JSON_MODE_FAILED in _first_message(body):
                raise _json_mode_failed(self._scrub(_first_message(body)))
            raise UpstreamError(f"Cloudflare reported a failure: {self._scrub(_first_message(body))}")
        return body["result"]

    def _error(self, response: requests.Response) -> BackendError:
        """The BackendError for a non-2xx answer."""
        status = response.status_code
        try:
            body = response.json()
        except (ValueError, RecursionError):  # not JSON, or nested past what the parser can follow
            body = {}
        except requests.RequestException as exc:  # the error body was cut short or stalled: a 502/504
            broken = _broken_read(exc, f"while sending an HTTP {status} error")
            broken.extra.setdefault("code", "upstream_broken_answer")
            return broken
        errors = body.get("errors") if isinstance(body, dict) else None
        codes = {e.get("code") for e in errors or [] if isinstance(e, dict)}
        message = self._scrub(_first_message(body) or f"HTTP {status}")
        retry_after = _retry_after(response.headers.get("Retry-After"))
        if JSON_MODE_FAILED in message:
            return _json_mode_failed(message)
        if codes & AUTH_CODES or status in (401, 403) and not codes - AUTH_CODES - {None}:
            return UpstreamError(f"Cloudflare rejected aigate's credentials ({message}): check CLOUDFLARE_API_TOKEN "
                                 "and CLOUDFLARE_ACCOUNT_ID in the server's configuration",
                                 extra={"code": "upstream_auth_failed"})
        if codes & DAILY_LIMIT_CODES:
            return RateLimited(f"Cloudflare Workers AI: {message}", retry_after=_seconds_to_utc_midnight(),
                               extra={"code": "upstream_quota_exceeded"})
        if status == 429 or codes & CAPACITY_CODES:
            return RateLimited(f"Cloudflare Workers AI is over capacity: {message}", retry_after=retry_after,
                               extra={"code": "upstream_capacity"})
        if codes & UNKNOWN_MODEL_CODES:
            return ModelNotFound(f"Cloudflare Workers AI: {message}", param="model")
        if status == 413 or codes & TOO_LARGE_CODES:
            return ContextLengthExceeded(f"Cloudflare Workers AI: {message}", param="messages",
                                         extra={"code": "context_length_exceeded"})
        if status == 408:
            return UpstreamTimeout(f"Cloudflare Workers AI timed out: {message}")
        if 400 <= status < 500:
            return InvalidRequest(f"Cloudflare Workers AI refused the request: {message}",
                                  extra={"code": "upstream_bad_request"})
        return UpstreamError(f"Cloudflare Workers AI failed (HTTP {status}): {message}", retry_after=retry_after)

    def _scrub(self, text: str) -> str:
        """Upstream messages may quote the account id (or, in theory, the token): never pass them on."""
        for secret in (self.config.api_token, self.config.account_id):
            if secret:
                text = text.replace(secret, "***")
        return text

    def _timeouts(self) -> tuple[float, float]:
        return (self.config.connect_timeout, self.config.read_timeout)


JSON_MODE_FAILED = "JSON Mode couldn't be met"


def _json_mode_failed(message: str) -> InvalidRequest:
    """The model could not produce JSON matching the schema: say so, and what may help."""
    return InvalidRequest(f"The model could not produce an answer matching the requested JSON schema (Workers AI: "
                          f"{message}). A simpler schema, a clearer prompt or another JSON-mode model may work.",
                          param="response_format", extra={"code": "json_schema_not_met"})


def _message(m: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                             for c in m.tool_calls]
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    if m.name:
        out["name"] = m.name
    return out


def _frame_parts(frame: dict[str, Any]) -> tuple[str, str | None, list[Any]]:
    """Text, finish reason and tool-call pieces of one stream event: native (`response`,
    `tool_calls`), or an OpenAI chunk (`choices[0].delta`)."""
    choices = frame.get("choices")
    if frame.get("response") is None and isinstance(choices, list) and choices and isinstance(choices[0], dict):
        delta = choices[0].get("delta") or {}
        return _as_text(delta.get("content")), choices[0].get("finish_reason"), _list(delta.get("tool_calls"))
    return _as_text(frame.get("response")), frame.get("finish_reason"), _list(frame.get("tool_calls"))


def _result_parts(result: dict[str, Any]) -> tuple[str, str | None, list[Any]]:
    """Text, finish reason and tool calls of a whole answer: `result.response` (a string, or an
    object in JSON mode) with `result.tool_calls`, or an OpenAI chat.completion inside `result`."""
    choices = result.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        message = choices[0].get("message") or {}
        return (_as_text(message.get("content")), choices[0].get("finish_reason"),
                _list(message.get("tool_calls")) or _list(result.get("tool_calls")))
    return _as_text(result.get("response")), None, _list(result.get("tool_calls"))


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


class _ToolCalls:
    """Tool calls gathered from either of Cloudflare's shapes: flat `{name, arguments: object}`,
    or OpenAI's `{index, id, type, function: {name, arguments: string}}`, whose arguments may
    arrive in pieces over several stream events."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, str]] = {}

    def __bool__(self) -> bool:
        return any(c.get("name") for c in self._calls.values())

    def add(self, items: list[Any]) -> None:
        for item in items:
            if not isinstance(item, dict):
                continue
            function: dict[str, Any] = item["function"] if isinstance(item.get("function"), dict) else item
            index: int = item["index"] if isinstance(item.get("index"), int) else len(self._calls)
            call = self._calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
            if isinstance(item.get("id"), str):
                call["id"] = item["id"]
            if isinstance(function.get("name"), str):
                call["name"] = function["name"]
            arguments = function.get("arguments")
            if isinstance(arguments, str):
                call["arguments"] += arguments
            elif arguments is not None:
                call["arguments"] = json.dumps(arguments, ensure_ascii=False)

    def events(self) -> list[ToolCall]:
        return [ToolCall(c["id"] or "call_" + secrets.token_hex(12), c["name"], c["arguments"] or "{}")
                for _, c in sorted(self._calls.items()) if c["name"]]


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _finish_reason(upstream: str | None, stopped: bool, usage: dict[str, Any], max_tokens: int,
                   called: bool) -> FinishReason:
    if called:
        return "tool_calls"
    if stopped:
        return "stop"
    if upstream == "length":
        return "length"
    if upstream == "stop":
        return "stop"
    # Native models say nothing: an answer that used every token it was allowed was cut short.
    return "length" if _int(usage.get("completion_tokens")) >= max_tokens else "stop"


def _usage(usage: dict[str, Any], request: ChatRequest, completion_estimate: int) -> Usage:
    """Cloudflare's own counts; a rough estimate only where it sent none (or we closed early)."""
    prompt = _int(usage.get("prompt_tokens"))
    completion = _int(usage.get("completion_tokens"))
    if not prompt and not completion:
        prompt = request.estimated_prompt_tokens
        completion = completion_estimate
    return Usage(prompt, completion)


def _int(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def _first_message(body: Any) -> str:
    if not isinstance(body, dict):
        return ""
    errors = body.get("errors") or ([body["error"]] if isinstance(body.get("error"), dict) else [])
    for e in errors:
        if isinstance(e, dict) and e.get("message"):
            return str(e["message"])
    return ""


def _broken_read(exc: requests.RequestException, where: str) -> UpstreamError:
    """A failure while reading an answer already under way; urllib3 wraps a read timeout as a
    ConnectionError, so it is told apart by its text."""
    if isinstance(exc, requests.exceptions.ConnectionError) and "timed out" in str(exc).lower():
        return UpstreamTimeout("Cloudflare Workers AI stopped sending (read timeout)")
    return UpstreamError(f"the connection to Cloudflare Workers AI broke {where}")


def _reason(exc: Exception) -> str:
    """The OS error inside requests' and urllib3's wrappers ("[Errno 111] Connection refused")."""
    found = re.search(r"\[Errno -?\d+\][^'\")]*", str(exc))
    return found.group(0).strip() if found else exc.__class__.__name__


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def _seconds_to_utc_midnight() -> float:
    now = datetime.now(UTC)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (midnight - now).total_seconds()


def _created(value: Any) -> int:
    try:
        return int(datetime.fromisoformat(str(value)).replace(tzinfo=UTC).timestamp())
    except ValueError:
        return 0
