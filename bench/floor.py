"""The floor for benchmark 2: the least a Flask + gevent gateway can cost. The request's bytes go to
the upstream as they came and the upstream's bytes come back as they are: no JSON parsing, no
validation, no mapping, no error handling, one `requests` session that does not re-read the
environment on each call. The model is fixed by the URL (a gateway that reads it must parse).

    UPSTREAM=http://127.0.0.1:PORT/client/v4/accounts/ID/ai/run/@cf/fake/chat TOKEN=... \\
        gunicorn -k gevent -w 1 -b 127.0.0.1:PORT 'floor:app'      (from bench/)
"""

import os

import requests
from flask import Flask, Response, request

app = Flask(__name__)
session = requests.Session()
session.trust_env = False  # proxies and CA bundle: none on loopback, and not looked up per call
session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=1000))
UPSTREAM = os.environ["UPSTREAM"]
HEADERS = {"Authorization": "Bearer " + os.environ["TOKEN"], "Content-Type": "application/json"}


@app.get("/health")
def health():
    return "ok"


@app.post("/v1/chat/completions")
def chat():
    upstream = session.post(UPSTREAM, data=request.get_data(), headers=HEADERS)
    return Response(upstream.content, status=upstream.status_code, content_type=upstream.headers.get("Content-Type"))
