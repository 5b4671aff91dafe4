"""The floor for benchmark 2: the least a Flask + gevent gateway can cost. One `requests` call
per request, passed straight through: no validation, no mapping, no error handling.

    UPSTREAM=http://127.0.0.1:PORT/client/v4/accounts/ID/ai/run TOKEN=... \\
        gunicorn -k gevent -w 1 -b 127.0.0.1:PORT 'floor:app'      (from bench/)
"""

import os

import requests
from flask import Flask, Response, request

app = Flask(__name__)
session = requests.Session()
session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=1000))
UPSTREAM = os.environ["UPSTREAM"]
HEADERS = {"Authorization": "Bearer " + os.environ["TOKEN"]}


@app.get("/health")
def health():
    return "ok"


@app.post("/v1/chat/completions")
def chat():
    body = request.get_json()
    upstream = session.post(f"{UPSTREAM}/{body['model']}", json={"messages": body["messages"],
                            "stream": bool(body.get("stream"))}, headers=HEADERS, stream=True)
    return Response(upstream.iter_content(chunk_size=None), status=upstream.status_code,
                    content_type=upstream.headers.get("Content-Type"))
