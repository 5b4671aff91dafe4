"""HTTP to Cloudflare's REST API over one urllib3 pool: JSON out, a response to read whole or in
chunks as they arrive, and every failure as one of four transport errors that say whether resending
is safe. urllib3 rather than `requests`: the same pool and sockets without requests' per-call
preparation (session merging, hooks, cookies), which was a fifth of a Workers AI request's CPU.
Proxies and the CA bundle come from the environment, read once here.
"""

from __future__ import annotations

import json
import os
import re
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import certifi
import urllib3
from urllib3.exceptions import HTTPError, NewConnectionError, ProtocolError, ReadTimeoutError
from urllib3.exceptions import TimeoutError as Urllib3Timeout

from backends.bounded import READ_SIZE, read_head, read_whole


class TransportError(Exception):
    """The HTTP exchange failed; str() names the OS error, never a URL (it holds the account id)."""


class ConnectFailed(TransportError):
    """No connection (refused, reset before an answer, DNS): nothing was processed, resending is safe."""


class ConnectTimedOut(ConnectFailed):
    """The connection was not accepted in time."""


class NoAnswer(TransportError):
    """Connected and sent, but no answer came within the read timeout: resending could pay twice."""


class ReadBroken(TransportError):
    """An answer under way broke off (``timed_out``: it stopped coming for the read timeout)."""

    def __init__(self, reason: str, timed_out: bool) -> None:
        super().__init__(reason)
        self.timed_out = timed_out


@dataclass(frozen=True)
class Payload:
    """A body that is not a JSON object held in memory (an audio file, or JSON around one), sent as it is
    read: ``chunks()`` starts it again for each attempt, ``length`` bytes in all."""

    content_type: str
    length: int
    chunks: Callable[[], Iterable[bytes]]


class Response:
    """A response whose body is still unread."""

    def __init__(self, raw: urllib3.BaseHTTPResponse) -> None:
        self._raw = raw
        self.status = raw.status
        self.content_type = raw.headers.get("Content-Type", "")
        self.retry_after = raw.headers.get("Retry-After")

    @property
    def ok(self) -> bool:
        """A 2xx. A 3xx is not followed (redirect=False), and no answer either."""
        return 200 <= self.status < 300

    def json(self, limit: int, setting: str = "UPSTREAM_MAX_BODY_BYTES") -> Any:
        """The whole body as JSON: ValueError (or RecursionError) if it is not, ReadBroken if it broke off, an
        UpstreamError the moment it passes ``limit`` bytes (``setting`` says which bound)."""
        return json.loads(read_whole(self.chunks(), limit, "Cloudflare Workers AI", setting))

    def head(self) -> bytes:
        """The start of the body (an error's: what it says comes first), the rest left unread."""
        return read_head(self.chunks())

    def chunks(self) -> Iterator[bytes]:
        """The body, each piece as soon as it arrives, at most READ_SIZE bytes (an HTTP chunk is not read
        whole: a server may make one as large as it likes)."""
        with _reading():
            yield from self._raw.stream(READ_SIZE)

    def close(self) -> None:
        """A body read whole gives its connection back to the pool; one left half read closes it
        (a client that went away stops the upstream's work with it)."""
        if not self._raw.closed:
            self._raw.close()
        self._raw.release_conn()


class Transport:
    def __init__(self, base_url: str, token: str, connect_timeout: float, read_timeout: float,
                 pool_size: int) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json",
                         "User-Agent": "aigate"}
        timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        options: dict[str, Any] = dict(num_pools=4, maxsize=pool_size, block=False, retries=False, timeout=timeout,
                                       ca_certs=os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
                                       or certifi.where())
        proxy = _environ_proxy(self.base_url)
        # One pool per host, sized to the worker's connections: under gevent each waiting stream is a greenlet.
        self._manager = urllib3.ProxyManager(proxy, **options) if proxy else urllib3.PoolManager(**options)
        # Without a proxy every call goes to one host: its pool is looked up once, not per call.
        self._pool = None if proxy else self._manager.connection_from_url(self.base_url)
        self._path = urlsplit(self.base_url).path

    def post(self, path: str, body: dict[str, Any] | Payload) -> Response:
        if isinstance(body, Payload):  # sent with its length, not chunked: as it is read
            return self._request("POST", path, body.chunks(), {"Content-Type": body.content_type,
                                                                "Content-Length": str(body.length)})
        data = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
        return self._request("POST", path, data)

    def get(self, path: str, params: dict[str, str]) -> Response:
        return self._request("GET", f"{path}?{urlencode(params)}", None)

    def _request(self, method: str, path: str, body: bytes | Iterable[bytes] | None,
                 headers: dict[str, str] | None = None) -> Response:
        sent = {**self._headers, **headers} if headers else self._headers
        try:
            if self._pool is not None:
                raw = self._pool.urlopen(method, self._path + path, body=body, headers=sent,
                                         preload_content=False, redirect=False, retries=False)
            else:
                raw = self._manager.urlopen(method, self.base_url + path, body=body, headers=sent,
                                            preload_content=False, redirect=False, retries=False)
        except NewConnectionError as exc:  # before ConnectTimeoutError: urllib3 makes it a subclass
            raise ConnectFailed(_reason(exc)) from None
        except ReadTimeoutError:
            raise NoAnswer("read timed out") from None
        except Urllib3Timeout as exc:
            raise ConnectTimedOut(_reason(exc)) from None
        except (HTTPError, OSError) as exc:  # reset, refused, a stale pooled connection, TLS
            raise ConnectFailed(_reason(exc)) from None
        return Response(raw)


class _reading:
    """Failures while a body is read, as ReadBroken."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is None or not isinstance(exc, (HTTPError, OSError)):
            return
        timed_out = isinstance(exc, (ReadTimeoutError, TimeoutError)) or (
            isinstance(exc, ProtocolError) and "timed out" in str(exc).lower())
        raise ReadBroken(_reason(exc), timed_out) from None


def _environ_proxy(url: str) -> str | None:
    """The proxy the environment names for ``url`` (HTTPS_PROXY, NO_PROXY...), as requests finds it."""
    parts = urlsplit(url)
    if urllib.request.proxy_bypass(parts.netloc):  # NO_PROXY (on Linux, from the environment only)
        return None
    return urllib.request.getproxies().get(parts.scheme)


def _reason(exc: BaseException) -> str:
    """The OS error inside urllib3's wrappers ("[Errno 111] Connection refused")."""
    found = re.search(r"\[Errno -?\d+\][^'\")]*", str(exc))
    return found.group(0).strip() if found else exc.__class__.__name__
