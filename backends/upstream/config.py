"""UPSTREAMS_FILE: a TOML file of [upstreams.<name>] tables, read into typed declarations.

Each mistake is one line naming the table and the field; nothing here touches the network."""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

EXAMPLE = ('[upstreams.gpu-box]\nbase_url = "http://10.0.0.5:8000/v1"\napi_key_env = "GPU_BOX_KEY"\n'
           'models = ["Qwen/Qwen2.5-7B-Instruct"]')


class UpstreamsFileError(ValueError):
    """A mistake in UPSTREAMS_FILE (settings turn it into a ConfigError)."""


@dataclass(frozen=True)
class UpstreamConfig:
    name: str  # the table's name: in logs, metrics and /ready (never the URL or key)
    base_url: str  # up to and including /v1: {base_url}/chat/completions
    api_key: str = field(default="", repr=False)
    models: tuple[str, ...] = ()  # (): discovered from GET {base_url}/models
    weight: float = 1.0  # a bigger share of the pool's requests
    connect_timeout: float = 3.0
    timeout: float = 120.0  # seconds without a byte from the upstream (first byte included)
    cooldown: float = 10.0  # seconds a failing upstream is left out (doubling while it keeps failing)
    refresh: float = 60.0  # seconds between reads of its model list (when discovered)
    structured_outputs: bool = False  # passes response_format (a JSON schema) on, and honours it

    @property
    def discovers(self) -> bool:
        return not self.models


def _number(low: float) -> Any:
    def check(value: Any) -> float | None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > low
        return float(value) if ok else None
    return check


FIELDS: dict[str, tuple[str, Any]] = {  # field -> (what it must be, a checker returning None when wrong)
    "base_url": ("an http:// or https:// URL", lambda v: v if isinstance(v, str) else None),
    "api_key": ("a string", lambda v: v if isinstance(v, str) else None),
    "api_key_env": ("the name of an environment variable", lambda v: v if isinstance(v, str) and v else None),
    "models": ("a list of model ids", lambda v: tuple(v) if isinstance(v, list) and all(
        isinstance(m, str) and m.strip() == m and m for m in v) else None),
    "weight": ("a number > 0", _number(0.0)),
    "connect_timeout": ("a number of seconds > 0", _number(0.0)),
    "timeout": ("a number of seconds > 0", _number(0.0)),
    "cooldown": ("a number of seconds > 0", _number(0.0)),
    "refresh": ("a number of seconds > 0", _number(0.0)),
    "structured_outputs": ("true or false", lambda v: v if isinstance(v, bool) else None),
}


def read_upstreams_file(path: Path, environ: Mapping[str, str]) -> tuple[UpstreamConfig, ...]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise UpstreamsFileError(f"UPSTREAMS_FILE: cannot read {path}: {exc.strerror}") from None
    return parse_upstreams(text, environ, str(path))


def parse_upstreams(text: str, environ: Mapping[str, str], where: str = "UPSTREAMS_FILE") -> tuple[UpstreamConfig, ...]:
    """Duplicate table names are TOML errors already (tomllib refuses a table defined twice)."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        twice = re.search(r"Cannot declare \('upstreams', '([^']*)'\) twice", str(exc))
        if twice:
            raise UpstreamsFileError(f"UPSTREAMS_FILE: [upstreams.{twice.group(1)}] is declared twice; give each "
                                     "upstream a name of its own") from None
        raise UpstreamsFileError(f"UPSTREAMS_FILE: {where} is not valid TOML: {exc}") from None
    unknown = set(document) - {"upstreams"}
    if unknown:
        raise UpstreamsFileError(f"UPSTREAMS_FILE: unknown top-level key {min(unknown)!r}; write upstreams "
                                 f"like\n{EXAMPLE}")
    tables = document.get("upstreams")
    if not isinstance(tables, dict) or not tables:
        raise UpstreamsFileError(f"UPSTREAMS_FILE: {where} has no [upstreams.<name>] tables; write them like\n"
                                 f"{EXAMPLE}")
    return tuple(_upstream(name, table, environ) for name, table in tables.items())


def _upstream(name: str, table: Any, environ: Mapping[str, str]) -> UpstreamConfig:
    where = f"UPSTREAMS_FILE: [upstreams.{name}]"
    if not isinstance(table, dict):
        raise UpstreamsFileError(f"{where} is not a table")
    values: dict[str, Any] = {}
    for key, raw in table.items():
        if key not in FIELDS:
            raise UpstreamsFileError(f"{where}: unknown field {key!r} (fields: {', '.join(FIELDS)})")
        what, check = FIELDS[key]
        value = check(raw)
        if value is None:
            raise UpstreamsFileError(f"{where}: {key} must be {what}")
        values[key] = value
    if "base_url" not in values:
        raise UpstreamsFileError(f"{where}: base_url is missing (example: base_url = \"http://10.0.0.5:8000/v1\")")
    values["base_url"] = _base_url(values["base_url"], where)
    if "api_key" in values and "api_key_env" in values:
        raise UpstreamsFileError(f"{where}: give api_key or api_key_env, not both")
    env_name = values.pop("api_key_env", None)
    if env_name is not None:
        values["api_key"] = environ.get(env_name, "").strip()
        if not values["api_key"]:
            raise UpstreamsFileError(f"{where}: api_key_env names {env_name}, which is not set in the environment")
    key = values.get("api_key", "")
    if key and (any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in key) or not key.isascii()):
        raise UpstreamsFileError(f"{where}: the api key holds characters no HTTP header can carry")
    models = values.get("models", ())
    if len(set(models)) != len(models):
        raise UpstreamsFileError(f"{where}: models lists a model twice")
    return UpstreamConfig(name=name, **values)


def _base_url(raw: str, where: str) -> str:
    """http(s)://host[:port][/path], without a query, fragment or credentials (those go in api_key)."""
    try:
        parts = urlsplit(raw.strip())
        port = parts.port  # raises on a port that is not a number or out of range
    except ValueError:
        parts, port = None, None
    shown = raw.split("@")[-1]  # never a password written into the URL
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise UpstreamsFileError(f"{where}: base_url {shown!r} is not an http:// or https:// URL "
                                 "(example: http://10.0.0.5:8000/v1)")
    if parts.username or parts.password:
        raise UpstreamsFileError(f"{where}: base_url must not hold credentials; put the key in api_key or api_key_env")
    if parts.query or parts.fragment:
        raise UpstreamsFileError(f"{where}: base_url {shown!r} must not have a query or fragment")
    del port
    return raw.strip().rstrip("/")
