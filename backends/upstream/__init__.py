"""Any OpenAI-compatible server as a backend (UPSTREAMS_FILE): config, transport, normalise, pool, backend.

Only ``config`` is imported by the gunicorn master (settings); the rest imports requests, which
must come after gevent has patched the worker.
"""
