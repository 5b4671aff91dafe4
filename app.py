"""create_app(settings) -> Flask, the composition root: settings, the checked model, policy, backends, stored
responses, WSGI middleware, extensions, blueprints, error handlers; and check_config and ensure_demo_model,
which the gunicorn master runs before any worker."""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path
from typing import cast

from flask import Flask, request
from flask.json.provider import DefaultJSONProvider
from flask_cors import CORS
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from backends.base import Backend, BackendError
from backends.bounded import AnswerBounds
from backends.chatglm.ggml_file import ModelFileError, read_model_file
from backends.registry import Registry
from compat.errors import APIError, from_backend, internal_error
from config.policy import LocalModel, Policy
from config.settings import ConfigError, Settings, load_settings
from store.response_store import ResponseStore, StoreError
from web import metrics, rate_limits, request_log
from web.auth import KeyCheck
from web.body import BodyReader
from web.client_socket import ClientGone
from web.context import EXTENSION, AppState, context, state
from web.errors import error_response
from web.messages_errors import AnthropicErrors
from web.routes import (
    audio,
    chat,
    completions,
    embeddings,
    images,
    messages,
    models,
    openapi,
    ops,
    playground,
    rerank,
    responses,
    tokenize,
)

log = logging.getLogger("aigate")

DEMO_OWNER = "aigate-demo (random weights: set CHATGLM_MODEL to a real chatglm3-ggml.bin)"
# Headers a browser client may read: the request id, and when and how much it may ask again.
EXPOSED_HEADERS = ["x-request-id", "Retry-After", "retry-after-ms", "X-RateLimit-Limit", "X-RateLimit-Remaining",
                   "X-RateLimit-Reset", "X-RateLimit-Retry-After"]
# The API's paths without /v1 (a base URL without it), as LiteLLM and Ollama also serve them.
UNVERSIONED = re.compile(r"/(chat/completions|completions|embeddings|models|responses|messages|rerank|reranking|"
                         r"audio|images)(/.*)?")


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or load_settings()
    app = Flask(__name__, static_folder=None)  # the playground is served by its route, with its headers
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    cast(DefaultJSONProvider, app.json).sort_keys = False  # keys in the order the wire types declare them
    ensure_demo_model(settings)  # starting writes the demo model if it stands in; checking never writes
    local = check_config(settings)  # the local models, the default first
    app.extensions[EXTENSION] = AppState(settings, build_registry(settings, local), response_store(settings),
                                                 Policy.derive(settings, local))
    if not settings.api_keys:
        log.warning("API_KEYS is empty: anyone who can reach this server can use it")

    for bp in (models.bp, chat.bp, completions.bp, embeddings.bp, responses.bp, messages.bp, rerank.bp, audio.bp,
               images.bp, tokenize.bp, ops.bp, openapi.bp, playground.bp):
        app.register_blueprint(bp)
    # The body read whole, bounded in size and time, before anything else looks at the request (an upload
    # to its own bound, spooled to disk)...
    app.wsgi_app = BodyReader(app.wsgi_app, settings.max_body_bytes, settings.body_timeout,  # type: ignore[method-assign]
                              audio.UPLOAD_PATHS, settings.max_upload_bytes)
    # ...but only once the key is checked, from the headers: a request without one is answered unread.
    app.wsgi_app = KeyCheck(app.wsgi_app, settings.api_keys)  # type: ignore[method-assign]
    if settings.trusted_proxies:  # the client address and scheme as the proxies saw them
        n = settings.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n, x_host=n)  # type: ignore[method-assign]
    app.wsgi_app = AnthropicErrors(app.wsgi_app)  # type: ignore[method-assign]  # the Messages API's errors
    app.wsgi_app = api_paths(app.wsgi_app)  # type: ignore[method-assign]
    # web/'s extensions, in the order their hooks must run.
    metrics.init_app(app)  # what counts each request (the request log calls it with the request's line)
    request_log.init_app(app)  # first hook: the request's context (id, record, key); its line when closed
    # CORS on every response (errors too), the preflight's headers reflecting what was asked (the SDKs
    # send x-stainless-* headers); CORS_ORIGINS is one origin, a comma-separated list, or *.
    CORS(app, origins=[o.strip() for o in settings.cors_origins.split(",") if o.strip()], send_wildcard=True,
         always_send=True, methods=["GET", "POST", "DELETE", "OPTIONS"], allow_headers="*",
         expose_headers=EXPOSED_HEADERS, max_age=600)
    rate_limits.init_app(app)  # after the request log: its limits are per key (sets state(app).budgets)
    _install_error_handlers(app)
    return app


def response_store(settings: Settings) -> ResponseStore:
    try:
        # Each key's share of RESPONSES_MAX_MB is its own; a conversation continues for at most as many
        # responses as one request may hold messages.
        return ResponseStore(settings.state_dir, settings.responses_ttl, settings.responses_max_mb * 1024 * 1024,
                             owners=len(settings.api_keys), max_links=settings.max_messages)
    except StoreError as exc:
        raise ConfigError(str(exc)) from None


def api_paths(wsgi_app):
    """`/chat/completions` as `/v1/chat/completions`, and a doubled or trailing slash forgiven: what
    clients send with a base URL lacking /v1 or ending in a slash."""
    def middleware(environ, start_response):
        path = re.sub(r"//+", "/", environ.get("PATH_INFO", ""))
        if len(path) > 1:
            path = path.rstrip("/")
        if UNVERSIONED.fullmatch(path):
            path = "/v1" + path
        environ["PATH_INFO"] = path
        return wsgi_app(environ, start_response)
    return middleware


def load_backends(app: Flask) -> None:
    """Load models (the slow part of start-up); /ready answers 200 once this is done."""
    registry = state(app).registry
    failed = []
    for backend in registry.backends:
        try:
            backend.load()
        except Exception:
            log.exception("the %s backend failed to load; /ready will say so", backend.name)
            failed.append(backend.name)
    if failed:
        log.error("aigate is up but not ready: %s failed to load", ", ".join(failed))
    else:
        log.info("aigate ready: serving %s", ", ".join(m.id for m in registry.models()))


def start_loading(app: Flask) -> None:
    """Load in the background so the worker answers /health (and gunicorn's heartbeat) at once;
    under gevent this thread is a greenlet."""
    threading.Thread(target=load_backends, args=(app,), name="aigate-load", daemon=True).start()


def build_registry(settings: Settings, local: tuple[LocalModel, ...]) -> Registry:
    backends: list[Backend] = []
    if local:
        from backends.chatglm.backend import ChatGLMBackend, LocalFile
        from backends.chatglm.engine import launcher

        files = []
        for model in local:
            if model.file is None:
                raise ConfigError(f"CHATGLM_MODEL: {settings.model_path} is not written yet (app.ensure_demo_model)")
            files.append(LocalFile(model.id, model.file, model.context))
        backends.append(ChatGLMBackend(files, engine=launcher.client(settings.engine()),
                                       owned_by=DEMO_OWNER if settings.uses_demo_model else "local",
                                       max_image_pixels=settings.max_image_pixels,
                                       image_decode_seconds=settings.image_decode_seconds,
                                       image_wait_seconds=settings.queue_timeout))
    if settings.uses_cloudflare:
        from backends.cloudflare import CloudflareBackend  # imports urllib3: only in workers, after patching

        backends.append(CloudflareBackend(cloudflare_config(settings)))
    if settings.upstreams:
        from backends.upstream.backend import (
            UpstreamBackend,  # imports requests: only in workers, after patching
        )

        # Served elsewhere, so a discovered upstream model of the same name is left out (a listed one is refused).
        taken = {model.id for model in local}
        if settings.uses_cloudflare:
            taken |= {*settings.cloudflare_models, *settings.cloudflare_embedding_models,
                      *(model for model, _ in settings.cloudflare_media_models)}
        taken |= {alias for alias, _ in settings.model_aliases}
        backends.append(UpstreamBackend(settings.upstreams, taken, settings.worker_connections,
                                        answer_bounds(settings), metrics.safely))
    return Registry(backends, dict(settings.model_aliases))


def cloudflare_config(settings: Settings):
    from backends.cloudflare import CloudflareConfig

    discover = settings.cloudflare_models == ("auto",)
    return CloudflareConfig(
        account_id=settings.cloudflare_account_id, api_token=settings.cloudflare_api_token,
        api_base=settings.cloudflare_api_base, models=() if discover else settings.cloudflare_models,
        discover=discover, bounds=answer_bounds(settings), max_tokens=settings.cloudflare_max_tokens,
        connect_timeout=settings.cloudflare_timeout[0], read_timeout=settings.cloudflare_timeout[1],
        retries=settings.cloudflare_retries,
        pool_size=settings.worker_connections, embedding_models=settings.cloudflare_embedding_models,
        json_mode_models=settings.cloudflare_json_models, media_models=settings.cloudflare_media_models)


def answer_bounds(settings: Settings) -> AnswerBounds:
    """How much of an upstream's answer is read (UPSTREAM_MAX_*_BYTES), for Workers AI and the upstreams alike."""
    return AnswerBounds(event=settings.upstream_max_event_bytes, body=settings.upstream_max_body_bytes,
                        media=settings.upstream_max_media_bytes)


def check_config(settings: Settings) -> tuple[LocalModel, ...]:
    """Everything that can be checked without loading a model or calling Cloudflare (the gunicorn
    master runs this before starting workers), and without writing anything; returns the local models
    as checked, the default first. Their files are read, unless it is the demo model and not written yet
    (ensure_demo_model writes it at start): then the demo model's own context stands for it."""
    local = check_local_models(settings)
    if local:
        from backends.chatglm.engine.address import problem

        unsafe = problem(settings.engine_address)
        if unsafe:
            raise ConfigError(f"ENGINE_SOCKET: {unsafe}")
    known = {model.id for model in local}
    discovering = settings.uses_cloudflare and settings.cloudflare_models == ("auto",)
    if settings.uses_cloudflare:
        known.update(settings.cloudflare_embedding_models, (model for model, _ in settings.cloudflare_media_models))
    if settings.uses_cloudflare and not discovering:
        known.update(settings.cloudflare_models)
    known |= check_upstream_models(settings, known)
    upstream_discovers = any(u.discovers for u in settings.upstreams)

    def check(name: str, names: set[str], where: str, kinds: str = "model or alias") -> None:
        if name not in names and not (discovering and name.startswith("@")) and not upstream_discovers:
            raise ConfigError(f"{where}: no configured {kinds} is called {name!r} (models: {', '.join(sorted(names))})")

    aliases = [alias for alias, _ in settings.model_aliases]
    for alias, target in settings.model_aliases:
        check(target, known, f"MODEL_ALIASES: alias {alias}={target}", kinds="model")
        if alias in known:  # the alias would win, and the model could no longer be asked for
            raise ConfigError(f"MODEL_ALIASES: alias {alias}={target} has the name of a served model; "
                              "choose another alias")
        if aliases.count(alias) > 1:
            raise ConfigError(f"MODEL_ALIASES: alias {alias} is given twice; keep one")
    names = known | {alias for alias, _ in settings.model_aliases}
    for name, _ in settings.max_tokens_by_model:
        check(name, names, "MAX_TOKENS_CEILING")
    for key in settings.api_keys:
        for name in key.models:
            check(name, names, f"API_KEYS_FILE: [keys.{key.name}] models")
    for model, fallback in settings.model_fallbacks:
        for name in (model, fallback):
            check(name, names, f"MODEL_FALLBACKS: {model}={fallback}")
    return local


def check_upstream_models(settings: Settings, known: set[str]) -> set[str]:
    """The ids UPSTREAMS_FILE declares; one that a local or Workers AI model (or an alias) already
    names is refused (upstreams serving the same id form one pool, which is the point)."""
    aliases = {alias for alias, _ in settings.model_aliases}
    declared: set[str] = set()
    for upstream in settings.upstreams:
        for model in upstream.models:
            if model in known or model in aliases:
                what = "an alias in MODEL_ALIASES" if model in aliases else "a local or Workers AI model"
                raise ConfigError(f"UPSTREAMS_FILE: [upstreams.{upstream.name}] model {model!r} is also {what}; "
                                  "rename one of them (or alias the upstream's model)")
            declared.add(model)
    return declared


def check_local_models(settings: Settings) -> tuple[LocalModel, ...]:
    """The local models, the default first: each file read and checked (the demo model, when it is not
    written yet, as it will be), and each id, given once."""
    models = settings.local_models
    ids = [model_id for model_id, _ in models]
    for model_id in ids:
        if ids.count(model_id) > 1:
            raise ConfigError(f"CHATGLM_MODELS: the id {model_id!r} is also CHATGLM_MODEL's; give each model an id "
                              "of its own")
    return tuple(check_local_model(settings, model_id, path, first=i == 0) for i, (model_id, path) in enumerate(models))


def check_local_model(settings: Settings, model_id: str, path: Path, first: bool) -> LocalModel:
    """One local model: its file read and checked, and its context (CHATGLM_MAX_LENGTH, at most its own: for
    the default model, more than its own is an error)."""
    where = f"CHATGLM_MODELS: {model_id}" if (model_id, path) in settings.chatglm_models else "CHATGLM_MODEL"
    if settings.uses_demo_model and not demo_model_written(path):
        from backends.chatglm.demo_model import DEMO_MAX_LENGTH

        model, context, images = None, DEMO_MAX_LENGTH, False
    else:
        try:
            model = read_model_file(path)
        except ModelFileError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        context, images = model.config.max_length, model.vision is not None
    if first and settings.chatglm_max_length and settings.chatglm_max_length > context:
        raise ConfigError(f"CHATGLM_MAX_LENGTH={settings.chatglm_max_length} is more than the model's own "
                          f"{context}; lower it or leave it unset")
    return LocalModel(model_id, min(settings.chatglm_max_length or context, context), images, model)


def demo_model_written(path: Path) -> bool:
    """Is the demo model at ``path`` as this aigate writes it? One an older aigate wrote, with a
    smaller context (1,024 tokens), or a file that is no model, is written again at start."""
    from backends.chatglm.demo_model import DEMO_MAX_LENGTH

    if not path.is_file():
        return False
    try:
        return read_model_file(path).config.max_length >= DEMO_MAX_LENGTH
    except ModelFileError:
        return False


def ensure_demo_model(settings: Settings) -> None:
    """Write the random-weight demo model if it stands in and is not there yet: a step of starting
    (gunicorn.conf.py's master, create_app), never of checking the configuration."""
    if not settings.uses_demo_model or demo_model_written(settings.demo_model_path):
        return
    from backends.chatglm.demo_model import write_demo_model

    log.warning("no CHATGLM_MODEL set: writing the random-weight demo model to %s. It answers with "
                "nonsense; set CHATGLM_MODEL=/path/to/chatglm3-ggml.bin to serve a real model.",
                settings.demo_model_path)
    try:
        write_demo_model(settings.demo_model_path)
    except OSError as exc:
        raise ConfigError(f"DEMO_MODEL_PATH: cannot write {settings.demo_model_path}: {exc.strerror or exc}; "
                          "point it at a writable place or set CHATGLM_MODEL") from None


def _install_error_handlers(app: Flask) -> None:
    @app.errorhandler(APIError)
    def api_error(err: APIError):
        return error_response(err)

    @app.errorhandler(BackendError)
    def backend_error(err: BackendError):
        return error_response(from_backend(err))

    @app.errorhandler(ClientGone)
    def client_gone(err: ClientGone):
        # Nobody reads this: the client left before its whole answer was ready (nginx's 499).
        context().record.error = "client_gone"
        return error_response(APIError(499, "The client closed the connection.", code="client_gone"))

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException):
        status = err.code or 500
        code = {404: "unknown_url", 405: "method_not_allowed", 413: "request_too_large"}.get(status)
        message = {404: f"Unknown request URL: {request.method} {request.path}.",
                   413: "The request body is too large (MAX_BODY_BYTES)."}.get(status, err.description or "")
        return error_response(APIError(status, message, code=code))

    @app.errorhandler(Exception)
    def unexpected(err: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(internal_error())
