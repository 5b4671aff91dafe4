"""Settings: one frozen object read from the environment, or a .env file in the working directory.

Every problem is reported as a ConfigError naming the variable and the fix, so the server can
stop at start with one clear line instead of failing on the first request.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import sys
import tempfile
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

from backends.upstream.config import (
    UpstreamConfig,
    UpstreamsFileError,
    read_upstreams_file,
)

PROJECT_DIR = Path(__file__).resolve().parent
DEFAULT_CLOUDFLARE_MODELS = ("@cf/meta/llama-3.1-8b-instruct-fast", "@cf/meta/llama-3.3-70b-instruct-fp8-fast",
                             "@cf/mistralai/mistral-small-3.1-24b-instruct", "@cf/zai-org/glm-4.7-flash")
DEFAULT_CLOUDFLARE_EMBEDDING_MODELS = ("@cf/baai/bge-small-en-v1.5", "@cf/baai/bge-base-en-v1.5",
                                       "@cf/baai/bge-large-en-v1.5")
# The models Cloudflare's JSON-mode page lists (developers.cloudflare.com/workers-ai/features/json-mode/).
DEFAULT_CLOUDFLARE_JSON_MODELS = (
    "@cf/meta/llama-3.1-8b-instruct-fast", "@cf/meta/llama-3.1-70b-instruct",
    "@cf/meta/llama-3.3-70b-instruct-fp8-fast",
    "@cf/meta/llama-3-8b-instruct", "@cf/meta/llama-3.1-8b-instruct", "@cf/meta/llama-3.2-11b-vision-instruct",
    "@hf/nousresearch/hermes-2-pro-mistral-7b", "@hf/thebloke/deepseek-coder-6.7b-instruct-awq",
    "@cf/deepseek-ai/deepseek-r1-distill-qwen-32b")
DEFAULT_DEMO_MODEL = PROJECT_DIR / ".cache" / "demo-chatglm3.bin"

log = logging.getLogger("aigate")


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable and the fix."""


@dataclass(frozen=True)
class ApiKey:
    """One accepted bearer key. ``name`` stands for it in logs, metrics and rate-limit counters:
    the secret itself is never written anywhere."""

    name: str
    secret: str = field(repr=False)
    models: tuple[str, ...] = ()  # empty: every model
    requests_per_minute: int = 0  # 0: unlimited
    tokens_per_minute: int = 0

    def allows(self, *names: str) -> bool:
        """May this key use a model known by any of ``names`` (the name asked for, its id)?"""
        return not self.models or any(name in self.models for name in names)


@dataclass(frozen=True)
class Settings:
    api_keys: tuple[ApiKey, ...] = ()
    chatglm_model: Path | None = None  # None: no local model (the demo model if nothing else is set)
    chatglm_model_id: str | None = None
    chatglm_max_length: int | None = None
    demo_model_path: Path = DEFAULT_DEMO_MODEL
    model_aliases: tuple[tuple[str, str], ...] = ()
    model_fallbacks: tuple[tuple[str, str], ...] = ()  # (model, next model to try), in order
    cloudflare_account_id: str = ""
    cloudflare_api_token: str = field(default="", repr=False)
    cloudflare_models: tuple[str, ...] = DEFAULT_CLOUDFLARE_MODELS  # ("auto",): discover them
    cloudflare_embedding_models: tuple[str, ...] = DEFAULT_CLOUDFLARE_EMBEDDING_MODELS
    cloudflare_json_models: tuple[str, ...] = DEFAULT_CLOUDFLARE_JSON_MODELS
    cloudflare_api_base: str = "https://api.cloudflare.com/client/v4"
    cloudflare_max_tokens: int = 2048
    cloudflare_timeout: tuple[float, float] = (10.0, 120.0)  # connect, read
    cloudflare_retries: int = 2
    upstreams: tuple[UpstreamConfig, ...] = ()  # UPSTREAMS_FILE: OpenAI-compatible servers behind us
    generation_slots: int = 1
    max_queue: int = 8
    queue_timeout: float = 60.0
    engine_socket: str = ""  # "@name": a Linux abstract socket; else a path; empty: derived (engine_address)
    engine_idle_timeout: float = 600.0  # an engine a worker started (no gunicorn master) exits when idle this long
    client_write_timeout: float = 30.0  # a client that leaves an answer's bytes unread this long is let go
    max_body_bytes: int = 4 * 1024 * 1024
    body_timeout: float = 30.0  # seconds a client has to send a request body (408 after)
    header_timeout: float = 30.0  # seconds a client has to send a request's headers (408 after)
    max_messages: int = 2048
    max_input_chars: int = 1_000_000
    max_image_bytes: int = 3 * 1024 * 1024  # one image part, decoded (GLM-4V); the body must hold it too
    max_image_pixels: int = 16_000_000  # width x height, checked before an image is decoded
    max_tokens_ceiling: int | None = None  # for every model
    max_tokens_by_model: tuple[tuple[str, int], ...] = ()  # over that, per model or alias
    rate_limit_rpm: int = 0  # per key (per client address without keys); 0: unlimited
    rate_limit_tpm: int = 0
    ratelimit_storage_uri: str = field(default="memory://", repr=False)  # redis:// shares counts (may hold a password)
    cors_origins: str = "*"
    trusted_proxies: int = 0  # proxies in front that set X-Forwarded-*; 0: trust none
    metrics_token: str = field(default="", repr=False)  # bearer for /metrics; empty: loopback clients only
    log_prompts: bool = False
    state_dir: Path = PROJECT_DIR / ".state"  # stored responses (SQLite)
    responses_ttl: int = 30 * 86400  # seconds a stored response is kept
    responses_max_mb: int = 256  # the oldest stored responses go first past this
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    worker_connections: int = 1000
    timeout: int = 300
    graceful_timeout: int = 60
    keepalive: int = 75
    log_level: str = "info"

    @property
    def uses_cloudflare(self) -> bool:
        return bool(self.cloudflare_account_id)

    @property
    def uses_demo_model(self) -> bool:
        """The random-weight demo model stands in when no backend at all is configured."""
        return self.chatglm_model is None and not self.uses_cloudflare and not self.upstreams

    @property
    def model_path(self) -> Path | None:
        return self.chatglm_model or (self.demo_model_path if self.uses_demo_model else None)

    @property
    def engine_address(self) -> str:
        """Where the local engine listens: ENGINE_SOCKET, or a name of this server's own (its model,
        engine settings, address and directory), so two servers on one machine keep apart."""
        if self.engine_socket:
            return self.engine_socket
        path = self.model_path.resolve() if self.model_path else None
        key = (f"{path}|{self.chatglm_max_length}|{self.generation_slots}|{self.max_queue}|{self.queue_timeout}|"
               f"{self.host}:{self.port}|{PROJECT_DIR}")
        name = f"aigate-engine-{os.getuid()}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
        return "@" + name if sys.platform.startswith("linux") else str(Path(tempfile.gettempdir()) / f"{name}.sock")


# What the gunicorn master last checked (gunicorn.conf.py sets it, at start and on each reload).
# Its workers are forked from it and use this rather than read the files again: a reload with a
# broken keys file or .env keeps serving the configuration that was checked before.
_checked: Settings | None = None


def set_checked(settings: Settings) -> None:
    global _checked
    _checked = settings


def checked() -> Settings | None:
    return _checked


def load_settings(environ: Mapping[str, str] | None = None, dotenv: str | os.PathLike[str] | None = ".env") -> Settings:
    """Read settings from ``environ`` (default os.environ) over the values of a .env file."""
    env: dict[str, str] = {}
    if dotenv is not None and Path(dotenv).is_file():
        env.update({k: v for k, v in dotenv_values(dotenv).items() if v is not None})
    env.update(os.environ if environ is None else environ)
    r = _Reader(env)
    model = r.text("CHATGLM_MODEL") or r.text("MODEL")
    account, token = r.text("CLOUDFLARE_ACCOUNT_ID"), r.text("CLOUDFLARE_API_TOKEN")
    if bool(account) != bool(token):
        missing = "CLOUDFLARE_API_TOKEN" if account else "CLOUDFLARE_ACCOUNT_ID"
        raise ConfigError(f"{missing} is not set: Workers AI needs both CLOUDFLARE_ACCOUNT_ID and CLOUDFLARE_API_TOKEN")
    cf_models = r.items("CLOUDFLARE_MODELS")
    cf_embedding = r.items("CLOUDFLARE_EMBEDDING_MODELS")
    ceiling, ceilings = _ceilings(r.text("MAX_TOKENS_CEILING"))
    rpm = r.integer("RATE_LIMIT_RPM", 0, minimum=0)
    tpm = r.integer("RATE_LIMIT_TPM", 0, minimum=0)
    return Settings(
        api_keys=_api_keys(r.items("API_KEYS"), r.text("API_KEYS_FILE"), rpm, tpm),
        chatglm_model=Path(model).expanduser() if model else None,
        chatglm_model_id=r.text("CHATGLM_MODEL_ID") or None,
        chatglm_max_length=r.integer("CHATGLM_MAX_LENGTH", None, minimum=16),
        demo_model_path=Path(r.text("DEMO_MODEL_PATH") or DEFAULT_DEMO_MODEL),
        model_aliases=_pairs("MODEL_ALIASES", r.text("MODEL_ALIASES"), "gpt-3.5-turbo=chatglm3-6b"),
        model_fallbacks=_pairs("MODEL_FALLBACKS", r.text("MODEL_FALLBACKS"),
                               "@cf/meta/llama-3.1-8b-instruct-fast=chatglm3-6b"),
        cloudflare_account_id=account,
        cloudflare_api_token=token,
        cloudflare_models=cf_models or DEFAULT_CLOUDFLARE_MODELS,
        cloudflare_embedding_models=cf_embedding or DEFAULT_CLOUDFLARE_EMBEDDING_MODELS,
        cloudflare_json_models=r.items("CLOUDFLARE_JSON_MODELS") or DEFAULT_CLOUDFLARE_JSON_MODELS,
        cloudflare_api_base=r.text("CLOUDFLARE_API_BASE") or Settings.cloudflare_api_base,
        cloudflare_max_tokens=r.integer("CLOUDFLARE_MAX_TOKENS", 2048, minimum=1),
        cloudflare_timeout=_timeouts(r.text("CLOUDFLARE_TIMEOUT")),
        cloudflare_retries=r.integer("CLOUDFLARE_RETRIES", 2, minimum=0),
        upstreams=_upstreams(r.text("UPSTREAMS_FILE"), env),
        generation_slots=r.integer("GENERATION_SLOTS", 1, minimum=1),
        max_queue=r.integer("MAX_QUEUE", 8, minimum=0),
        queue_timeout=r.number("QUEUE_TIMEOUT", 60.0, minimum=0.0),
        engine_socket=r.text("ENGINE_SOCKET"),
        engine_idle_timeout=r.number("ENGINE_IDLE_TIMEOUT", Settings.engine_idle_timeout, minimum=0.0),
        client_write_timeout=r.number("CLIENT_WRITE_TIMEOUT", Settings.client_write_timeout, minimum=0.1),
        max_body_bytes=r.integer("MAX_BODY_BYTES", Settings.max_body_bytes, minimum=1024),
        body_timeout=r.number("BODY_TIMEOUT", Settings.body_timeout, minimum=0.1),
        header_timeout=r.number("HEADER_TIMEOUT", Settings.header_timeout, minimum=0.1),
        max_messages=r.integer("MAX_MESSAGES", Settings.max_messages, minimum=1),
        max_input_chars=r.integer("MAX_INPUT_CHARS", Settings.max_input_chars, minimum=1),
        max_image_bytes=r.integer("MAX_IMAGE_BYTES", Settings.max_image_bytes, minimum=1024),
        max_image_pixels=r.integer("MAX_IMAGE_PIXELS", Settings.max_image_pixels, minimum=64 * 64),
        max_tokens_ceiling=ceiling,
        max_tokens_by_model=ceilings,
        rate_limit_rpm=rpm,
        rate_limit_tpm=tpm,
        ratelimit_storage_uri=_storage_uri(r.text("RATELIMIT_STORAGE_URI")),
        cors_origins=r.text("CORS_ORIGINS") or "*",
        trusted_proxies=r.integer("TRUSTED_PROXIES", 0, minimum=0),
        metrics_token=r.text("METRICS_TOKEN"),
        log_prompts=r.flag("LOG_PROMPTS"),
        state_dir=Path(r.text("STATE_DIR") or Settings.state_dir).expanduser(),
        responses_ttl=r.integer("RESPONSES_TTL", Settings.responses_ttl, minimum=60),
        responses_max_mb=r.integer("RESPONSES_MAX_MB", Settings.responses_max_mb, minimum=1),
        host=r.text("HOST") or "127.0.0.1",
        port=r.integer("PORT", 8000, minimum=0),
        workers=r.integer("WORKERS", 1, minimum=1),
        worker_connections=r.integer("WORKER_CONNECTIONS", 1000, minimum=1),
        timeout=r.integer("TIMEOUT", 300, minimum=1),
        graceful_timeout=r.integer("GRACEFUL_TIMEOUT", 60, minimum=0),
        keepalive=r.integer("KEEPALIVE", 75, minimum=0),
        log_level=(r.text("LOG_LEVEL") or "info").lower(),
    )


def _api_keys(plain: tuple[str, ...], keys_file: str, rpm: int, tpm: int) -> tuple[ApiKey, ...]:
    """API_KEYS (each with the default limits) and the keys of API_KEYS_FILE (limits of their own)."""
    keys = [ApiKey(key_name(secret), secret, requests_per_minute=rpm, tokens_per_minute=tpm) for secret in plain]
    if keys_file:
        keys += _keys_file(Path(keys_file).expanduser(), rpm, tpm)
    for key in keys:
        _check_header_safe(key)
    secrets = [k.secret for k in keys]
    if len(set(secrets)) != len(secrets):
        raise ConfigError("API_KEYS / API_KEYS_FILE: the same key is listed twice")
    names = [k.name for k in keys]
    if len(set(names)) != len(names):
        raise ConfigError("API_KEYS_FILE: two keys have the same name")
    return tuple(keys)


def _check_header_safe(key: ApiKey) -> None:
    """A key no client could send: HTTP header values are Latin-1 text without control characters
    (and a bearer token holds no spaces)."""
    try:
        key.secret.encode("latin-1")
        safe = not any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in key.secret)
    except UnicodeEncodeError:
        safe = False
    if not safe:  # named, never quoted: the message goes to the log
        raise ConfigError(f"API_KEYS / API_KEYS_FILE: key {key.name} holds characters no HTTP header can carry "
                          "(use printable ASCII, e.g. the output of `openssl rand -hex 24`)")


def key_name(secret: str) -> str:
    """A stable name for a key given without one: a short digest, which does not give the key away."""
    return "key-" + hashlib.sha256(secret.encode()).hexdigest()[:8]


KEY_FIELDS = {"key": str, "models": list, "requests_per_minute": int, "tokens_per_minute": int}
KEYS_EXAMPLE = ('[keys.alice]\nkey = "sk-..."\nmodels = ["chatglm3-6b"]\nrequests_per_minute = 60\n'
                'tokens_per_minute = 20000')


def _keys_file(path: Path, rpm: int, tpm: int) -> list[ApiKey]:
    """A TOML file with one [keys.<name>] table per key; see KEYS_EXAMPLE."""
    try:
        tables = tomllib.loads(path.read_text()).get("keys")
    except OSError as exc:
        raise ConfigError(f"API_KEYS_FILE: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"API_KEYS_FILE: {path} is not valid TOML: {exc}") from None
    if path.stat().st_mode & 0o044:
        log.warning("API_KEYS_FILE %s can be read by other users: chmod 600 it", path)
    if not isinstance(tables, dict) or not tables:
        raise ConfigError(f"API_KEYS_FILE: {path} has no [keys.<name>] tables; write them like\n{KEYS_EXAMPLE}")
    keys = []
    for name, table in tables.items():
        where = f"API_KEYS_FILE: [keys.{name}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where} is not a table")
        for field_name, value in table.items():
            kind = KEY_FIELDS.get(field_name)
            if kind is None:
                raise ConfigError(f"{where}: unknown field {field_name!r} (fields: {', '.join(KEY_FIELDS)})")
            if not isinstance(value, kind) or isinstance(value, bool) or (isinstance(value, int) and value < 0):
                what = "a whole number >= 0" if kind is int else kind.__name__
                raise ConfigError(f"{where}: {field_name} must be {what}")
        secret, models = table.get("key", "").strip(), table.get("models", [])
        if not secret:
            raise ConfigError(f"{where}: key is missing")
        if not all(isinstance(m, str) and m for m in models):
            raise ConfigError(f"{where}: models must be a list of model ids")
        keys.append(ApiKey(name, secret, tuple(models), table.get("requests_per_minute", rpm),
                           table.get("tokens_per_minute", tpm)))
    return keys


def _upstreams(path: str, env: Mapping[str, str]) -> tuple[UpstreamConfig, ...]:
    if not path:
        return ()
    try:
        return read_upstreams_file(Path(path).expanduser(), env)
    except UpstreamsFileError as exc:
        raise ConfigError(str(exc)) from None


def _ceilings(raw: str) -> tuple[int | None, tuple[tuple[str, int], ...]]:
    """MAX_TOKENS_CEILING: `1024` for every model, `model=512,...` per model, or both: `1024,model=512`."""
    default, per_model = None, []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        model, _, number = item.rpartition("=")
        if not re.fullmatch(r"\s*[0-9]+\s*", number) or int(number) < 1 or (model == "" and "=" in item):
            raise ConfigError(f"MAX_TOKENS_CEILING: {item!r} is not a number or model=number "
                              "(example: MAX_TOKENS_CEILING=1024,chatglm3-6b=512)")
        if model:
            per_model.append((model.strip(), int(number)))
        else:
            default = int(number)
    return default, tuple(per_model)


def _storage_uri(raw: str) -> str:
    if not raw:
        return Settings.ratelimit_storage_uri
    shown = raw.split("@")[-1]  # never the password
    if not raw.startswith(("memory://", "redis://", "rediss://", "redis+unix://")):
        raise ConfigError(f"RATELIMIT_STORAGE_URI={shown!r} is not memory:// or redis://host:port")
    if raw.startswith("redis"):
        from redis.connection import (
            parse_url,  # reads the address the way the client will, without connecting
        )

        try:
            parse_url(raw.replace("redis+unix://", "unix://", 1))
        except ValueError as exc:
            raise ConfigError(f"RATELIMIT_STORAGE_URI=...{shown!r}: {exc}") from None
    return raw


def _pairs(name: str, raw: str, example: str) -> tuple[tuple[str, str], ...]:
    """`a=b,c=d` (model ids may hold '/' and '@' but not '=' or ',')."""
    pairs = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        left, sep, right = (s.strip() for s in item.partition("="))
        if not sep or not left or not right:
            raise ConfigError(f"{name}: {item!r} is not model=model (example: {name}={example})")
        pairs.append((left, right))
    return tuple(pairs)


def _timeouts(raw: str) -> tuple[float, float]:
    """CLOUDFLARE_TIMEOUT: "read" or "connect,read", in seconds."""
    if not raw:
        return Settings.cloudflare_timeout
    try:
        values = [float(v) for v in raw.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or not all(math.isfinite(v) and v > 0 for v in values):
        raise ConfigError(f"CLOUDFLARE_TIMEOUT={raw!r} is not 'read' or 'connect,read' in seconds (example: 10,120)")
    return (min(values[0], 10.0), values[0]) if len(values) == 1 else (values[0], values[1])


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def text(self, name: str) -> str:
        return self.env.get(name, "").strip()

    def items(self, name: str) -> tuple[str, ...]:
        return tuple(item.strip() for item in self.text(name).split(",") if item.strip())

    def flag(self, name: str) -> bool:
        raw = self.text(name).lower()
        if raw in ("", "0", "false", "no", "off"):
            return False
        if raw in ("1", "true", "yes", "on"):
            return True
        raise ConfigError(f"{name}={raw!r} is not a yes/no value (use 1 or 0)")

    def integer(self, name: str, default: Any, *, minimum: int) -> Any:
        return self._parsed(name, default, int, "a whole number", minimum)

    def number(self, name: str, default: float, *, minimum: float) -> float:
        return self._parsed(name, default, float, "a number", minimum)

    def _parsed(self, name: str, default: Any, kind: Callable[[str], Any], what: str, minimum: float) -> Any:
        raw = self.text(name)
        if not raw:
            return default
        try:
            value = kind(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not {what}") from None
        if not math.isfinite(value):  # nan compares false with everything: it would slip past every check
            raise ConfigError(f"{name}={raw!r} is not {what} (a finite one)")
        if value < minimum:
            raise ConfigError(f"{name}={value} is too small (at least {minimum:g})")
        return value
