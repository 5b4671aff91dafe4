"""Settings: one frozen object read from the environment, or a .env file in the working directory.

Each setting is declared once, as a field of Settings (config/fields.py's setting: its variable,
default, bound, one line of doc); the reader and docs/configuration.md's settings table both come from
those declarations. Every problem is reported as a ConfigError naming the variable and the fix, so
the server can stop at start with one clear line instead of failing on the first request. Reading
settings has no side effect; what they decide about requests is derived in config/policy.py.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dotenv import dotenv_values

from backends.base import Task
from backends.chatglm.engine.launcher import EngineSettings
from backends.upstream.config import (
    UpstreamConfig,
    UpstreamsFileError,
    read_upstreams_file,
)
from config.fields import ConfigError, Declaration, Parser, Reading, items, read_fields, setting, table_rows

__all__ = ["ApiKey", "ConfigError", "Settings", "checked", "configuration_table", "key_name", "load_settings",
           "set_checked"]

PROJECT_DIR = Path(__file__).resolve().parents[1]  # config/ is one down from the checkout
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
DEMO_MODEL_ID = "chatglm3-demo"
# The Workers AI models of /v1/rerank, /v1/audio/transcriptions, /v1/audio/speech and /v1/images/generations.
DEFAULT_CLOUDFLARE_RERANK_MODELS = ("@cf/baai/bge-reranker-base",)
DEFAULT_CLOUDFLARE_TRANSCRIPTION_MODELS = ("@cf/openai/whisper", "@cf/openai/whisper-large-v3-turbo")
DEFAULT_CLOUDFLARE_SPEECH_MODELS = ("@cf/myshell-ai/melotts", "@cf/deepgram/aura-1")
DEFAULT_CLOUDFLARE_IMAGE_MODELS = ("@cf/black-forest-labs/flux-1-schnell",
                                   "@cf/stabilityai/stable-diffusion-xl-base-1.0")

log = logging.getLogger("aigate")


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


# Parsers of the settings too rich for their type alone (declared in Settings below) --------------

def _api_keys(raw: str, r: Reading) -> tuple[ApiKey, ...]:
    """API_KEYS (each with the default limits) and the keys of API_KEYS_FILE (limits of their own)."""
    rpm, tpm, keys_file = r.got["rate_limit_rpm"], r.got["rate_limit_tpm"], r.got["api_keys_file"]
    keys = [ApiKey(key_name(secret), secret, requests_per_minute=rpm, tokens_per_minute=tpm) for secret in items(raw)]
    if keys_file is not None:
        keys += _keys_file(keys_file, rpm, tpm)
    for key in keys:
        _check_header_safe(key)
    secrets = [k.secret for k in keys]
    if len(set(secrets)) != len(secrets):
        raise ConfigError("API_KEYS / API_KEYS_FILE: the same key is listed twice")
    names = [k.name for k in keys]
    if len(set(names)) != len(names):
        raise ConfigError("API_KEYS_FILE: two keys have the same name")
    return tuple(keys)


def _local_models(raw: str, r: Reading) -> tuple[tuple[str, Path], ...]:
    """CHATGLM_MODELS: `id=path,...` (its files are read by the configuration check, app.check_local_models)."""
    models: list[tuple[str, Path]] = []
    for item in items(raw):
        model_id, sep, path = (s.strip() for s in item.partition("="))
        if not sep or not model_id or not path:
            raise ConfigError(f"CHATGLM_MODELS: {item!r} is not id=path (example: "
                              "CHATGLM_MODELS=glm4=/models/glm4-q4_0.bin,chatglm3=/models/chatglm3-q4_0.bin)")
        if any(model_id == known for known, _ in models):
            raise ConfigError(f"CHATGLM_MODELS: the id {model_id!r} is given twice; give each model an id of its own")
        models.append((model_id, Path(path).expanduser()))
    return tuple(models)


def _cloudflare_token(raw: str, r: Reading) -> str:
    if bool(r.got["cloudflare_account_id"]) != bool(raw):
        missing = "CLOUDFLARE_ACCOUNT_ID" if raw else "CLOUDFLARE_API_TOKEN"
        raise ConfigError(f"{missing} is not set: Workers AI needs both CLOUDFLARE_ACCOUNT_ID and CLOUDFLARE_API_TOKEN")
    return raw


def _pairs_of(name: str, example: str) -> Parser:
    """`a=b,c=d` (model ids may hold '/' and '@' but not '=' or ',')."""
    def parse(raw: str, r: Reading) -> tuple[tuple[str, str], ...]:
        pairs = []
        for item in items(raw):
            left, sep, right = (s.strip() for s in item.partition("="))
            if not sep or not left or not right:
                raise ConfigError(f"{name}: {item!r} is not model=model (example: {name}={example})")
            pairs.append((left, right))
        return tuple(pairs)
    return parse


def _ceilings(raw: str) -> tuple[int | None, tuple[tuple[str, int], ...]]:
    """MAX_TOKENS_CEILING: `1024` for every model, `model=512,...` per model, or both: `1024,model=512`."""
    default, per_model = None, []
    for item in items(raw):
        model, _, number = item.rpartition("=")
        if not re.fullmatch(r"\s*[0-9]+\s*", number) or int(number) < 1 or (model == "" and "=" in item):
            raise ConfigError(f"MAX_TOKENS_CEILING: {item!r} is not a number or model=number "
                              "(example: MAX_TOKENS_CEILING=1024,chatglm3-6b=512)")
        if model:
            per_model.append((model.strip(), int(number)))
        else:
            default = int(number)
    return default, tuple(per_model)


def _timeouts(raw: str, r: Reading) -> tuple[float, float]:
    """CLOUDFLARE_TIMEOUT: "read" or "connect,read", in seconds."""
    try:
        values = [float(v) for v in raw.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or not all(math.isfinite(v) and v > 0 for v in values):
        raise ConfigError(f"CLOUDFLARE_TIMEOUT={raw!r} is not 'read' or 'connect,read' in seconds (example: 10,120)")
    return (min(values[0], 10.0), values[0]) if len(values) == 1 else (values[0], values[1])


def _upstreams(raw: str, r: Reading) -> tuple[UpstreamConfig, ...]:
    try:
        return read_upstreams_file(Path(raw).expanduser(), r.env)
    except UpstreamsFileError as exc:
        raise ConfigError(str(exc)) from None


def _storage_uri(raw: str, r: Reading) -> str:
    shown = raw.split("@")[-1]  # never the password
    if not raw.startswith(("memory://", "redis://", "rediss://", "redis+unix://")):
        raise ConfigError(f"RATELIMIT_STORAGE_URI={shown!r} is not memory:// or redis://host:port")
    if raw.startswith("redis"):
        from redis.connection import parse_url  # reads the address the way the client will, without connecting

        try:
            parse_url(raw.replace("redis+unix://", "unix://", 1))  # type: ignore[no-untyped-call]  # redis has no hints
        except ValueError as exc:
            raise ConfigError(f"RATELIMIT_STORAGE_URI=...{shown!r}: {exc}") from None
    return raw


@dataclass(frozen=True)
class Settings:
    """Every setting, declared once: its variable, default, bound and its line in docs/configuration.md's table
    (`make settings-table` writes that table from these; tests/unit/test_settings.py checks it)."""

    # Keys and limits
    api_keys: tuple[ApiKey, ...] = setting(
        "API_KEYS", (), "comma-separated accepted bearer keys; empty = no auth (a warning is logged)",
        parse=_api_keys, uses=("api_keys_file", "rate_limit_rpm", "rate_limit_tpm"))
    api_keys_file: Path | None = setting(
        "API_KEYS_FILE", None, "a TOML file of named keys, each with its own models and limits (see below)")
    rate_limit_rpm: int = setting(
        "RATE_LIMIT_RPM", 0, "requests per minute per key (per client address without keys); a key in the file "
        "may set its own", shown="`0` (unlimited)", minimum=0)
    rate_limit_tpm: int = setting(
        "RATE_LIMIT_TPM", 0, "tokens (prompt + answer) per minute per key (per client address without keys); a key "
        "in the file may set its own", shown="`0` (unlimited)", minimum=0)
    ratelimit_storage_uri: str = setting(
        "RATELIMIT_STORAGE_URI", "memory://", "where the rate-limit counts live: `memory://` (per worker) or "
        "`redis://host:port` (shared by all workers and hosts)", parse=_storage_uri, secret=True)  # may hold a password
    # The local model
    chatglm_model: Path | None = setting(
        "CHATGLM_MODEL", None, "path of a chatglm.cpp GGML model file (GLM-4, GLM-4V, ChatGLM3 or ChatGLM2)",
        also=("MODEL",), shown="unset: no local model (the demo model if neither Cloudflare nor upstreams are set)")
    chatglm_model_id: str | None = setting(
        "CHATGLM_MODEL_ID", None, "the id shown in `/v1/models`", shown="file name without `.bin`")
    chatglm_max_length: int | None = setting(
        "CHATGLM_MAX_LENGTH", None, "context length (prompt + answer) given to the model (to each local model, "
        "at most its own)", shown="the model's own", minimum=16)
    chatglm_models: tuple[tuple[str, Path], ...] = setting(
        "CHATGLM_MODELS", (), "more local models, `id=path,...` (chatglm.cpp files): each is loaded on its first "
        "request, and `/v1/models` says which are loaded; `CHATGLM_MODEL`, or else the first of these, is the one "
        "loaded at start", shown="unset: none", parse=_local_models)
    max_loaded_models: int = setting(
        "MAX_LOADED_MODELS", 1, "local models loaded at once: loading one more first unloads the least recently "
        "used idle one (each holds its file's pages and its KV caches in memory)", minimum=1)
    model_keep_alive: float = setting(
        "MODEL_KEEP_ALIVE", 0.0, "seconds a local model stays loaded without requests before it is unloaded "
        "(Ollama's `keep_alive`); `0`: until another model needs its room", minimum=0.0)
    # Models across backends
    model_fallbacks: tuple[tuple[str, str], ...] = setting(  # (model, next model to try), in order
        "MODEL_FALLBACKS", (), "`model=next,...` (repeat a model for a longer chain): when a model fails before "
        "answering (rate limit, upstream error or timeout, busy queue), the next one answers and the response's "
        "`model` says which", parse=_pairs_of("MODEL_FALLBACKS", "@cf/meta/llama-3.1-8b-instruct-fast=chatglm3-6b"))
    model_aliases: tuple[tuple[str, str], ...] = setting(
        "MODEL_ALIASES", (), "`alias=model,...`, across backends, e.g. "
        "`gpt-3.5-turbo=chatglm3-ggml,gpt-4o-mini=@cf/meta/llama-3.1-8b-instruct-fast`",
        parse=_pairs_of("MODEL_ALIASES", "gpt-3.5-turbo=chatglm3-6b"))
    # Workers AI
    cloudflare_account_id: str = setting(
        "CLOUDFLARE_ACCOUNT_ID", "", "the Cloudflare account whose Workers AI to use (with `CLOUDFLARE_API_TOKEN`)",
        shown="unset: Workers AI off")
    cloudflare_api_token: str = setting(
        "CLOUDFLARE_API_TOKEN", "", "its API token (needs Workers AI Read and Edit)", shown="unset: Workers AI off",
        parse=_cloudflare_token, uses=("cloudflare_account_id",), secret=True)
    cloudflare_models: tuple[str, ...] = setting(  # ("auto",): discover them
        "CLOUDFLARE_MODELS", DEFAULT_CLOUDFLARE_MODELS, "comma-separated `@cf/...` ids to serve, or `auto` to list "
        "the account's text-generation models (refreshed hourly; `/ready` is 503 until the list was read once, "
        "retried every 5 s)", shown="four text-generation models (`settings.DEFAULT_CLOUDFLARE_MODELS`)")
    cloudflare_embedding_models: tuple[str, ...] = setting(
        "CLOUDFLARE_EMBEDDING_MODELS", DEFAULT_CLOUDFLARE_EMBEDDING_MODELS,
        "embedding models to serve on `/v1/embeddings`", shown="`@cf/baai/bge-{small,base,large}-en-v1.5`")
    cloudflare_json_models: tuple[str, ...] = setting(
        "CLOUDFLARE_JSON_MODELS", DEFAULT_CLOUDFLARE_JSON_MODELS,
        "the Workers AI models that take `response_format` (JSON mode)",
        shown="those Cloudflare's JSON-mode page lists (`settings.DEFAULT_CLOUDFLARE_JSON_MODELS`)")
    cloudflare_rerank_models: tuple[str, ...] = setting(
        "CLOUDFLARE_RERANK_MODELS", DEFAULT_CLOUDFLARE_RERANK_MODELS, "reranking models to serve on `/v1/rerank`")
    cloudflare_transcription_models: tuple[str, ...] = setting(
        "CLOUDFLARE_TRANSCRIPTION_MODELS", DEFAULT_CLOUDFLARE_TRANSCRIPTION_MODELS,
        "speech recognition models to serve on `/v1/audio/transcriptions`",
        shown="`@cf/openai/whisper`, `@cf/openai/whisper-large-v3-turbo`")
    cloudflare_speech_models: tuple[str, ...] = setting(
        "CLOUDFLARE_SPEECH_MODELS", DEFAULT_CLOUDFLARE_SPEECH_MODELS, "text-to-speech models to serve on "
        "`/v1/audio/speech` (MeloTTS, Aura)", shown="`@cf/myshell-ai/melotts`, `@cf/deepgram/aura-1`")
    cloudflare_image_models: tuple[str, ...] = setting(
        "CLOUDFLARE_IMAGE_MODELS", DEFAULT_CLOUDFLARE_IMAGE_MODELS, "text-to-image models to serve on "
        "`/v1/images/generations`",
        shown="`@cf/black-forest-labs/flux-1-schnell`, `@cf/stabilityai/stable-diffusion-xl-base-1.0`")
    cloudflare_api_base: str = setting("CLOUDFLARE_API_BASE", "https://api.cloudflare.com/client/v4",
                                       "the REST base URL")
    cloudflare_max_tokens: int = setting(
        "CLOUDFLARE_MAX_TOKENS", 2048, "`max_tokens` sent when the client sets none (Cloudflare's own default, "
        "256, cuts answers short)", minimum=1)
    cloudflare_timeout: tuple[float, float] = setting(  # connect, read
        "CLOUDFLARE_TIMEOUT", (10.0, 120.0), "`read` or `connect,read` seconds", shown="`10,120`", parse=_timeouts)
    cloudflare_retries: int = setting(
        "CLOUDFLARE_RETRIES", 2, "resends of a failed connection, a capacity 429 or a 5xx, before anything reached "
        "the client", minimum=0)
    # OpenAI-compatible servers behind us
    upstreams: tuple[UpstreamConfig, ...] = setting(
        "UPSTREAMS_FILE", (), "a TOML file of OpenAI-compatible servers to serve models from (vLLM, SGLang, "
        "llama.cpp, Ollama, a hosted API...), pooled by model id with failover (see \"Put other servers behind "
        "aigate\")", shown="unset: none", parse=_upstreams)
    # What is read of an upstream's answer (an OpenAI-compatible server's or Workers AI's)
    upstream_max_event_bytes: int = setting(
        "UPSTREAM_MAX_EVENT_BYTES", 4 * 1024 * 1024, "the longest line or event read of a stream from an "
        "upstream or Workers AI; past it the answer fails (502, or an error event once it has begun)",
        shown="`4194304` (4 MiB)", minimum=1024)
    upstream_max_body_bytes: int = setting(
        "UPSTREAM_MAX_BODY_BYTES", 16 * 1024 * 1024, "the largest JSON answer of an upstream read whole (a chat "
        "answer, embeddings, a ranking, a model list); past it the answer fails with a 502",
        shown="`16777216` (16 MiB)", minimum=1024)
    upstream_max_media_bytes: int = setting(
        "UPSTREAM_MAX_MEDIA_BYTES", 32 * 1024 * 1024, "the largest audio or image answer of an upstream (about 5 "
        "minutes of WAV, or a few large images in base64); past it the answer fails", shown="`33554432` (32 MiB)",
        minimum=1024)
    # The local engine
    generation_slots: int = setting(
        "GENERATION_SLOTS", 4, "generations at once on each local model, across all workers (each slot is a KV "
        "cache in the engine, its memory taken as its conversation grows); with aigate's build of chatglm.cpp they "
        "share the model's steps (four at once: about twice the tokens per second of one), with a stock one they "
        "take turns", minimum=1)
    max_queue: int = setting("MAX_QUEUE", 8, "requests waiting for a slot before new ones get 429", minimum=0)
    queue_timeout: float = setting(
        "QUEUE_TIMEOUT", 60.0, "seconds a request may wait for a slot (or for an engine that is starting) before "
        "a 503", minimum=0.0)
    client_write_timeout: float = setting(
        "CLIENT_WRITE_TIMEOUT", 30.0, "seconds a streaming client may leave its answer unread before its "
        "generation stops and the connection closes", minimum=0.1)
    engine_socket: str = setting(  # empty: derived (engine_address)
        "ENGINE_SOCKET", "", "where the engine listens: a path in a directory only aigate's user may enter (mode "
        "700, made if missing), or `@name`, a Linux abstract socket (any local user may take its name while the "
        "engine is down: not for shared machines)", shown="`$XDG_RUNTIME_DIR/aigate/` or `$TMPDIR/aigate-<uid>/`, "
        "a file of this server's own")
    engine_idle_timeout: float = setting(
        "ENGINE_IDLE_TIMEOUT", 600.0, "without a gunicorn master (Passenger), seconds without requests before the "
        "engine exits", minimum=0.0)
    # What one request may be
    max_body_bytes: int = setting("MAX_BODY_BYTES", 4 * 1024 * 1024, "largest request body (413 above it)",
                                  minimum=1024)
    max_upload_bytes: int = setting(
        "MAX_UPLOAD_BYTES", 25 * 1024 * 1024, "largest upload body (`/v1/audio/transcriptions`, multipart; 413 "
        "above it): read to disk past 1 MB, never held whole in memory", shown="`26214400` (25 MB, OpenAI's)",
        minimum=1024)
    body_timeout: float = setting(
        "BODY_TIMEOUT", 30.0, "seconds a client has to send a request's body once its headers are in (408 after)",
        minimum=0.1)
    header_timeout: float = setting(
        "HEADER_TIMEOUT", 30.0, "seconds a client has to send a request's headers from their first byte (408 "
        "after); a new connection that sends nothing for this long is closed (after 1 s when the worker's "
        "connections run short)", minimum=0.1)
    max_messages: int = setting("MAX_MESSAGES", 2048, "most messages in one request", minimum=1)
    max_input_chars: int = setting(
        "MAX_INPUT_CHARS", 1_000_000, "most characters of content in one request (messages with their tool-call "
        "arguments and the tool definitions, prompts or embedding inputs)", minimum=1)
    max_image_bytes: int = setting(
        "MAX_IMAGE_BYTES", 3 * 1024 * 1024, "the largest image part (decoded bytes) a model that reads images "
        "(GLM-4V) takes; one image per request; the body must hold it too", minimum=1024)
    max_image_pixels: int = setting(
        "MAX_IMAGE_PIXELS", 16_000_000, "the largest image (width x height), checked before it is decoded",
        minimum=64 * 64)
    image_decode_seconds: float = setting(
        "IMAGE_DECODE_SECONDS", 5.0, "seconds one image may take to decode (in a helper process of its worker, "
        "its memory bounded by `MAX_IMAGE_PIXELS`) before its request gets a 400", minimum=0.1)
    max_tokens_ceiling: int | None = setting(  # for every model
        "MAX_TOKENS_CEILING", None, "the most `max_tokens` a request may ask for (400 above it), and what it gets "
        "when it asks for none: `1024` for every model, `model=512,...` per model or alias (an alias has its "
        "model's), or both", shown="unset: the context decides", parse=lambda raw, r: _ceilings(raw)[0])
    max_tokens_by_model: tuple[tuple[str, int], ...] = setting(  # over that, per model or alias
        "MAX_TOKENS_CEILING", (), "", parse=lambda raw, r: _ceilings(raw)[1], listed=False)
    # Serving
    cors_origins: str = setting("CORS_ORIGINS", "*", "`Access-Control-Allow-Origin`: one origin, a "
                                "comma-separated list, or `*`")
    trusted_proxies: int = setting("TRUSTED_PROXIES", 0, "how many proxies in front set `X-Forwarded-*` "
                                   "(0: trust none)", minimum=0)
    metrics_token: str = setting("METRICS_TOKEN", "", "bearer token for `/metrics`; unset: only local clients "
                                 "may read it", secret=True)
    state_dir: Path = setting(  # stored responses (SQLite)
        "STATE_DIR", PROJECT_DIR / ".state", "where stored responses are kept (`responses.sqlite3`); must be "
        "writable and the same for every worker", shown="`.state` in the project")
    responses_ttl: int = setting("RESPONSES_TTL", 30 * 86400, "seconds a stored response is kept after the last "
                                 "response of its conversation", shown="`2592000` (30 days)", minimum=60)
    responses_max_mb: int = setting(
        "RESPONSES_MAX_MB", 256, "the most stored responses may take, an even share per key; past its share a "
        "key's own conversations go, the one continued longest ago first", minimum=1)
    log_prompts: bool = setting("LOG_PROMPTS", False, "`1` also logs each prompt and answer (debugging only)")
    # gunicorn
    host: str = setting("HOST", "127.0.0.1", "where gunicorn listens: the address")
    port: int = setting("PORT", 8000, "where gunicorn listens: the port", minimum=0)
    workers: int = setting("WORKERS", 1, "gunicorn worker processes", minimum=1)
    worker_connections: int = setting("WORKER_CONNECTIONS", 1000, "connections per worker", minimum=1)
    timeout: int = setting("TIMEOUT", 300, "seconds a worker may miss its heartbeat before gunicorn restarts it",
                           minimum=1)
    graceful_timeout: int = setting("GRACEFUL_TIMEOUT", 60, "seconds running streams get to finish when a "
                                    "worker stops", minimum=0)
    keepalive: int = setting("KEEPALIVE", 75, "seconds an idle keep-alive connection stays open (closed sooner, "
                             "the longest idle first, when the worker's connections run short)", minimum=0)
    log_level: str = setting("LOG_LEVEL", "info", "`debug`, `info`, `warning`...", parse=lambda raw, r: raw.lower())
    demo_model_path: Path = setting("DEMO_MODEL_PATH", DEFAULT_DEMO_MODEL, "where the demo model is written",
                                    shown="`.cache/demo-chatglm3.bin` in the project")

    @property
    def uses_cloudflare(self) -> bool:
        return bool(self.cloudflare_account_id)

    @property
    def cloudflare_media_models(self) -> tuple[tuple[str, Task], ...]:
        """Each Workers AI model of a task besides chat and embeddings, with its task."""
        tasks: tuple[tuple[tuple[str, ...], Task], ...] = (
            (self.cloudflare_rerank_models, "rerank"), (self.cloudflare_transcription_models, "transcription"),
            (self.cloudflare_speech_models, "speech"), (self.cloudflare_image_models, "image_generation"))
        return tuple((model, task) for models, task in tasks for model in models)

    @property
    def uses_demo_model(self) -> bool:
        """The random-weight demo model stands in when no backend at all is configured."""
        return self.chatglm_model is None and not self.chatglm_models and not self.uses_cloudflare \
            and not self.upstreams

    @property
    def model_path(self) -> Path | None:
        """The default local model's file (the one loaded at start)."""
        if self.chatglm_model is None and self.chatglm_models:
            return self.chatglm_models[0][1]
        return self.chatglm_model or (self.demo_model_path if self.uses_demo_model else None)

    @property
    def local_models(self) -> tuple[tuple[str, Path], ...]:
        """Every local model, (id, path), the default first: CHATGLM_MODEL with CHATGLM_MODEL_ID (else its file
        name without .bin), or else the first of CHATGLM_MODELS; the demo model when nothing is configured."""
        path = self.model_path
        if path is None:
            return ()
        if self.chatglm_model is None and self.chatglm_models:
            return self.chatglm_models
        model_id = self.chatglm_model_id or (DEMO_MODEL_ID if self.uses_demo_model else path.name.removesuffix(".bin"))
        return ((model_id, path), *self.chatglm_models)

    @property
    def engine_address(self) -> str:
        """Where the local engine listens: ENGINE_SOCKET, or a path of this server's own (its model,
        engine settings, address and directory), so two servers on one machine keep apart, in a
        directory only this user may enter (backends/chatglm/engine/address.py makes and checks it):
        $XDG_RUNTIME_DIR/aigate, else aigate-<uid> in the temporary directory."""
        if self.engine_socket:
            return self.engine_socket
        models = ",".join(f"{model_id}={path.resolve()}" for model_id, path in self.local_models)
        key = (f"{models}|{self.max_loaded_models}|{self.model_keep_alive}|{self.chatglm_max_length}|"
               f"{self.generation_slots}|{self.max_queue}|{self.queue_timeout}|"
               f"{self.host}:{self.port}|{PROJECT_DIR}")
        runtime = os.environ.get("XDG_RUNTIME_DIR", "")
        directory = (Path(runtime) / "aigate" if runtime and os.path.isdir(runtime)
                     else Path(tempfile.gettempdir()) / f"aigate-{os.getuid()}")
        return str(directory / f"engine-{hashlib.sha256(key.encode()).hexdigest()[:12]}.sock")

    def engine(self) -> EngineSettings:
        """What the local engine is started with (a ValueError when no local model is configured)."""
        models = self.local_models
        if not models:
            raise ValueError("no local model is configured")
        # A worker may wait for a free image decoder as long as for a slot, then decode, then send.
        images_timeout = self.queue_timeout + self.image_decode_seconds + self.client_write_timeout
        (model_id, path), *also = models
        return EngineSettings(self.engine_address, path, self.chatglm_max_length or 0,
                              self.generation_slots, self.max_queue, self.queue_timeout, self.client_write_timeout,
                              images_timeout, self.engine_idle_timeout, self.log_level, model_id, tuple(also),
                              self.max_loaded_models, self.model_keep_alive)


# Variables read before settings are (documented in the same table).
ELSEWHERE = (
    Declaration("PROMETHEUS_MULTIPROC_DIR", "where the workers' metric files live (emptied at start, kept across "
                "reloads; read by gunicorn.conf.py before anything imports prometheus_client); see "
                "[deploy.md](deploy.md#observing-a-running-server)",
                shown="a private directory under `$TMPDIR`, removed at exit"),
)


def configuration_table() -> str:
    """docs/configuration.md's settings table, from the declarations."""
    return "\n".join(table_rows(Settings, ELSEWHERE)) + "\n"


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
    """Read settings from ``environ`` (default os.environ) over the values of a .env file. Reads,
    never writes: the demo model, if it stands in, is written at start (app.ensure_demo_model)."""
    env: dict[str, str] = {}
    if dotenv is not None and Path(dotenv).is_file():
        env.update({k: v for k, v in dotenv_values(dotenv).items() if v is not None})
    env.update(os.environ if environ is None else environ)
    return Settings(**read_fields(Settings, env))


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
