"""Any OpenAI-compatible server as a backend (UPSTREAMS_FILE): config, transport, normalise, pool, media,
backend.

Only ``config`` is imported by the gunicorn master (settings); transport, media and backend import
requests, which must come after gevent has patched the worker.
"""
