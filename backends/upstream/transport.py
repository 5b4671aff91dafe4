"""HTTP to OpenAI-compatible upstreams over one `requests` session: every failure becomes a
BackendError whose text never holds an upstream's key or address. Bodies are always streamed and read
here within their bounds (backends/bounded.py), never by requests whole; redirects are never followed
(a 307 would send the prompt wherever its Location says): a 3xx is an upstream failure."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import Any, Protocol
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from backends.base import (
    BackendError,
    ContextLengthExceeded,
    UpstreamAuthFailed,
    UpstreamError,
    UpstreamNotFound,
    UpstreamRateLimited,
    UpstreamRefused,
    UpstreamTimeout,
)
from backends.bounded import READ_SIZE, AnswerBounds, read_head, read_whole
from backends.upstream.config import UpstreamConfig

MAX_ERROR_TEXT = 300  # an upstream's error message, as much as a client needs of it


class Payload(Protocol):
    """A body sent as it is read, with its length and type (media.MultipartBody)."""

    @property
    def content_type(self) -> str: ...

    def __iter__(self) -> Iterator[bytes]: ...

    def __len__(self) -> int: ...


class Transport:
    def __init__(self, upstreams: tuple[UpstreamConfig, ...], pool_size: int, bounds: AnswerBounds) -> None:
        self.bounds = bounds
        self.session = requests.Session()
        # One connection pool per upstream host, each as large as the worker's connections (gevent).
        adapter = HTTPAdapter(pool_connections=max(4, len(upstreams)), pool_maxsize=pool_size, max_retries=0)
        self.session.mount("https://", adapter)
        self.session.mount("http://", adapter)
        # The environment read once, here: requests would read it again on every call otherwise.
        self.session.trust_env = False
        self.session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
        self._proxies = {u.name: requests.utils.get_environ_proxies(u.base_url) for u in upstreams}

    def post(self, up: UpstreamConfig, path: str, body: dict[str, Any] | None = None, *,
             data: Payload | None = None) -> requests.Response:
        """The upstream's 2xx answer, its headers read and its body not yet; anything else raised. The
        body is JSON, or ``data`` sent as it is read (a multipart upload)."""
        headers = _headers(up)
        if data is not None:
            headers["Content-Type"] = data.content_type
        try:
            response = self.session.post(up.base_url + path, json=body, data=data, stream=True, headers=headers,
                                         timeout=(up.connect_timeout, up.timeout), proxies=self._proxies[up.name],
                                         allow_redirects=False)
        except requests.ConnectTimeout:
            raise UpstreamTimeout(f"upstream {up.name} did not accept a connection in time") from None
        except requests.Timeout:
            raise UpstreamTimeout(f"upstream {up.name} did not answer in time") from None
        except requests.RequestException as exc:
            raise UpstreamError(f"cannot reach upstream {up.name}: {reason(exc)}") from None
        if succeeded(response):
            return response
        try:
            raise error(up, response)
        finally:
            response.close()

    def models(self, up: UpstreamConfig) -> list[tuple[str, int]]:
        """GET {base_url}/models: (id, created) of each model the upstream lists."""
        try:
            response = self.session.get(up.base_url + "/models", headers=_headers(up), stream=True,
                                        timeout=(up.connect_timeout, min(up.timeout, 30.0)),
                                        proxies=self._proxies[up.name], allow_redirects=False)
        except requests.RequestException as exc:
            raise UpstreamError(f"cannot reach upstream {up.name}: {reason(exc)}") from None
        with response:
            if not succeeded(response):
                raise error(up, response)
            body = read_json(up, response, self.bounds.body)  # not JSON, too large, broken: said as it is
            data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise UpstreamError(f"upstream {up.name} answered GET /models without a list of models")
        return [(m["id"], m["created"] if isinstance(m.get("created"), int) else 0)
                for m in data if isinstance(m, dict) and isinstance(m.get("id"), str) and m["id"]]


def _headers(up: UpstreamConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {up.api_key}"} if up.api_key else {}


def succeeded(response: requests.Response) -> bool:
    """A 2xx: requests' own ``ok`` holds a 3xx too, which aigate does not follow."""
    return 200 <= response.status_code < 300


def read_json(up: UpstreamConfig, response: requests.Response, limit: int) -> Any:
    """A streamed answer's body as JSON, read to at most ``limit`` bytes (UPSTREAM_MAX_BODY_BYTES)."""
    try:
        data = read_whole(response.iter_content(READ_SIZE), limit, f"upstream {up.name}", "UPSTREAM_MAX_BODY_BYTES")
    except requests.RequestException as exc:
        raise broken_read(up, exc, "mid-answer") from None
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise UpstreamError(f"upstream {up.name} answered with something that is not JSON") from None


def error(up: UpstreamConfig, response: requests.Response) -> BackendError:
    """The BackendError for an upstream's non-2xx answer (OpenAI's error shape, FastAPI's `detail`, or text),
    of which the first ERROR_BODY_BYTES are read."""
    status = response.status_code
    if 300 <= status < 400:  # its body and Location are not read: where it points is no business of ours
        return UpstreamError(f"upstream {up.name} answered with a redirect (HTTP {status}), which aigate does not "
                             "follow: check its base_url in UPSTREAMS_FILE")
    try:
        text = read_head(response.iter_content(READ_SIZE)).decode("utf-8", "replace")
    except requests.RequestException as exc:  # the error body stalled or broke
        return broken_read(up, exc, f"while sending an HTTP {status} error")
    message = scrub(up, error_message(text) or f"HTTP {status}")
    retry_after = _seconds(response.headers.get("Retry-After"))
    if status == 429:
        return UpstreamRateLimited(f"upstream {up.name} is rate limited: {message}", retry_after=retry_after)
    if status in (401, 403):
        return UpstreamAuthFailed(f"upstream {up.name} refused aigate's credentials ({message}): check its api_key in "
                             "UPSTREAMS_FILE")
    if status == 404:  # the upstream no longer serves the model (or the URL is wrong): another may
        return UpstreamNotFound(f"upstream {up.name} does not serve this: {message}")
    if status == 408:
        return UpstreamTimeout(f"upstream {up.name} timed out: {message}")
    if status == 413 or "context length" in message.lower() or "maximum context" in message.lower():
        return ContextLengthExceeded(f"upstream {up.name}: {message}", param="messages")
    if 400 <= status < 500:  # the request as sent: the client can change it, another upstream would refuse it too
        return UpstreamRefused(f"upstream {up.name} refused the request: {message}")
    return UpstreamError(f"upstream {up.name} failed (HTTP {status}): {message}", retry_after=retry_after)


def error_message(text: str) -> str:
    """What an error body says: {"error": {"message"}}, {"error": "..."}, {"detail": ...}, {"message"}, or text."""
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        return text.strip()[:MAX_ERROR_TEXT]
    if isinstance(body, dict):
        inner = body.get("error")
        for candidate in (inner.get("message") if isinstance(inner, dict) else inner, body.get("detail"),
                          body.get("message")):
            if candidate:
                return (candidate if isinstance(candidate, str) else json.dumps(candidate))[:MAX_ERROR_TEXT]
    return ""


def scrub(up: UpstreamConfig, text: str) -> str:
    """An upstream's text may echo its own address or our key back: neither goes further."""
    parts = urlsplit(up.base_url)
    for secret in (up.api_key, up.base_url, parts.netloc, parts.hostname or ""):
        if secret:
            text = text.replace(secret, "***")
    return text


def broken_read(up: UpstreamConfig, exc: requests.RequestException, where: str) -> UpstreamError:
    """A failure while reading an answer under way; urllib3 wraps a read timeout as a ConnectionError."""
    if isinstance(exc, requests.Timeout) or "timed out" in str(exc).lower():
        return UpstreamTimeout(f"upstream {up.name} stopped sending {where} (read timeout)")
    return UpstreamError(f"the connection to upstream {up.name} broke {where}")


def reason(exc: Exception) -> str:
    """The OS error inside requests' wrappers ("[Errno 111] Connection refused"), never the URL."""
    found = re.search(r"\[Errno -?\d+\][^'\")]*", str(exc))
    return found.group(0).strip() if found else exc.__class__.__name__


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None
