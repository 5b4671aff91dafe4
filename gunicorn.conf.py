"""gunicorn settings for aigate, from the environment (or .env): gunicorn -c gunicorn.conf.py wsgi:application

No preload: each worker imports the app after gevent has patched it, and loads the model then
(the weights are a shared mmap, so N workers cost about one copy). The configuration is checked
here first, in the master, so a bad setting or model file stops the server with one clear line
instead of a crash loop of workers.
"""

import sys

import app as _app
from settings import ConfigError, load_settings

try:
    _settings = load_settings()
    _app.check_config(_settings)
except ConfigError as _exc:
    sys.exit(f"aigate: configuration error: {_exc}")

bind = f"{_settings.host}:{_settings.port}"
workers = _settings.workers
worker_class = "gevent"
worker_connections = _settings.worker_connections
timeout = _settings.timeout  # the worker's heartbeat waits out the longest single model step
graceful_timeout = _settings.graceful_timeout
keepalive = _settings.keepalive
loglevel = _settings.log_level
accesslog = "-"
errorlog = "-"
preload_app = False
# gunicorn 27's control socket defaults to one path per user: two servers would fight over it.
control_socket_disable = True

# aigate's own loggers (the root) and gunicorn's error log to stderr, the access log to stdout,
# each line once.
logconfig_dict = {
    "root": {"level": loglevel.upper(), "handlers": ["error_console"]},
    "loggers": {
        "gunicorn.error": {"level": loglevel.upper(), "handlers": ["error_console"], "propagate": False,
                           "qualname": "gunicorn.error"},
        "gunicorn.access": {"level": "INFO", "handlers": ["console"], "propagate": False,
                            "qualname": "gunicorn.access"},
    },
}
