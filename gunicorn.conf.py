"""gunicorn settings for aigate, from the environment (or .env): gunicorn -c gunicorn.conf.py wsgi:application

No preload: each worker imports the app after gevent has patched it. The model runs in the local
engine, one process that the master starts before the first worker and starts again if it dies
(backends/chatglm/engine/); workers only do I/O. The configuration is checked here first, in the master,
so a bad setting or model file stops the server with one clear line instead of a crash loop of
workers; on a reload (SIGHUP), a bad one is logged and the previous configuration stays in service.
"""

import gc
import json
import os
import shutil
import sys
import tempfile

import gunicorn.util

# SIGHUP (systemctl reload) runs this file again in the same master process: it must neither
# make a new metrics directory (counters would restart from zero on every key rotation) nor
# exit on a configuration error (the master would take the workers with it).
_reloading = os.environ.get("AIGATE_MASTER_PID") == str(os.getpid())
os.environ["AIGATE_MASTER_PID"] = str(os.getpid())


def _metrics_directory() -> tuple[str, bool]:
    """Metrics from every worker add up through files in one directory, which must be known before
    anything imports prometheus_client: PROMETHEUS_MULTIPROC_DIR if the operator set one (emptied at
    start), else a private one made at start and removed at exit. Returns it and whether it is ours."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    if _reloading and path:
        os.makedirs(path, mode=0o700, exist_ok=True)  # in case a cleaner took it: web/metrics.py copes either way
        return path, os.environ.get("AIGATE_METRICS_TEMPORARY") == path
    if path and os.environ.get("AIGATE_METRICS_TEMPORARY") != path:  # the operator's: counts start at zero
        os.makedirs(path, mode=0o700, exist_ok=True)
        for name in os.listdir(path):
            if name.endswith(".db"):
                os.remove(os.path.join(path, name))
        return path, False
    path = tempfile.mkdtemp(prefix="aigate-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.environ["AIGATE_METRICS_TEMPORARY"] = path
    return path, True


_metrics_dir, _metrics_temporary = _metrics_directory()

import app as _app  # noqa: E402
import config.settings as _config  # noqa: E402
from compat.errors import APIError  # noqa: E402
from config.settings import ConfigError, load_settings  # noqa: E402

try:
    _settings = load_settings()
    _app.check_config(_settings)  # reads only
    # A step of its own: starting writes the random-weight demo model when it stands in, before the
    # engine (when_ready) and the workers need it.
    _app.ensure_demo_model(_settings)
except Exception as _exc:
    _previous = _config.checked() if _reloading else None
    _what = str(_exc) if isinstance(_exc, ConfigError) else f"{type(_exc).__name__}: {_exc}"
    if _previous is None:
        if not isinstance(_exc, ConfigError):
            raise
        if _metrics_temporary:
            shutil.rmtree(_metrics_dir, ignore_errors=True)
        sys.exit(f"aigate: configuration error: {_what}")
    # A reload: keep serving what was checked before (new workers are given it too).
    print(f"aigate: configuration error on reload, still serving the previous configuration: {_what}",
          file=sys.stderr, flush=True)
    _settings = _previous
else:
    _config.set_checked(_settings)

bind = f"{_settings.host}:{_settings.port}"
workers = _settings.workers
worker_class = "web.gunicorn_worker.Worker"  # gevent, with a time bound on request headers
worker_connections = _settings.worker_connections
timeout = _settings.timeout  # a worker that misses its heartbeat this long is restarted
graceful_timeout = _settings.graceful_timeout  # SIGTERM: running streams get this long to finish
keepalive = _settings.keepalive
# The heartbeat file on tmpfs, so a busy disk never delays it (gunicorn's own advice; the file is
# gunicorn's, created with mkstemp).
_shm = "/dev/shm"  # nosec B108: a directory for gunicorn's mkstemp, not a file name anyone could predict
worker_tmp_dir = _shm if os.path.isdir(_shm) and os.access(_shm, os.W_OK) else None
preload_app = False
loglevel = _settings.log_level
errorlog = "-"
accesslog = None  # aigate logs one richer line per request itself (web/request_log.py)
# gunicorn 27's control socket defaults to one path per user: two servers would fight over it.
control_socket_disable = True

# The request line and headers are checked by gunicorn before the app sees them (its defaults,
# spelled out): 414 for a longer line, 431 for more or longer header fields, 400 for malformed ones.
limit_request_line = 4094
limit_request_fields = 100
limit_request_field_size = 8190


def _write_error(sock, status_int, reason, mesg):
    """gunicorn writes its refusals as HTML pages; write them as OpenAI error objects instead."""
    err = APIError(status_int, f"{reason}: {mesg}", code=reason.lower().replace(" ", "_"))
    if status_int >= 500:  # not the client's fault, and resending will not help
        err.type, err.headers = "server_error", {"x-should-retry": "false"}
    body = json.dumps(err.body()).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in err.headers.items())
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n")
    gunicorn.util.write_nonblock(sock, head.encode("latin-1") + body)


gunicorn.util.write_error = _write_error  # the workers fork from here, patched

# aigate's own loggers (the root) and gunicorn's error log to stderr, each line once.
logconfig_dict = {
    "root": {"level": loglevel.upper(), "handlers": ["error_console"]},
    # gunicorn logs a malformed header line whole, which may be "Authorization Bearer sk-..."
    "filters": {"header_lines": {"()": "web.request_log.HideHeaderLines"},
                "write_timeouts": {"()": "web.request_log.QuietWriteTimeouts"}},
    "loggers": {
        "gunicorn.error": {"level": loglevel.upper(), "handlers": ["error_console"], "propagate": False,
                           "qualname": "gunicorn.error", "filters": ["header_lines", "write_timeouts"]},
        # A logconfig_dict turns gunicorn's access log on; aigate's own line per request replaces it.
        "gunicorn.access": {"level": "CRITICAL", "handlers": [], "propagate": False, "qualname": "gunicorn.access"},
    },
}


def when_ready(server):
    """The master keeps the local engine running (before the first worker, and after any crash).
    The keeper hangs off the arbiter, which outlives the reloads that re-read this file."""
    if _settings.model_path is not None and getattr(server, "aigate_keeper", None) is None:
        from backends.chatglm.engine.launcher import Keeper

        server.aigate_keeper = Keeper(_settings.engine())
        server.aigate_keeper.start()


def pre_fork(server, worker):
    """Workers fork from the master's imports: freeze those objects out of the garbage collector, whose
    passes would otherwise write to (and so copy) every page of them in every worker."""
    gc.freeze()


def post_worker_init(worker):
    """Streams still running when a stopping worker's graceful timeout ends are told so (web/streams.py)."""
    from web.context import state
    from web.streams import end_streams_before_the_kill

    end_streams_before_the_kill(worker, state(worker.wsgi).streams, graceful_timeout)


def child_exit(server, worker):
    """A dead worker's live gauges (active streams) must stop counting, under any of the file names
    it used (web/metrics.py renames them after a fault)."""
    from prometheus_client import multiprocess

    for pid in (worker.pid, f"{worker.pid}g*"):
        try:
            multiprocess.mark_process_dead(pid, _metrics_dir)
        except OSError as exc:
            server.log.warning("cannot remove the metrics files of worker %s: %s", worker.pid, exc)


def on_exit(server):
    keeper = getattr(server, "aigate_keeper", None)
    if keeper is not None:  # after the workers: their last streams are done with it
        keeper.stop()
    if _metrics_temporary:
        shutil.rmtree(_metrics_dir, ignore_errors=True)
