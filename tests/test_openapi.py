"""The API against its own description: schemathesis sends generated requests (valid and invalid)
to every operation of a live gunicorn and checks each answer against the document /openapi.json
serves (openapi.yaml with the request schemas of compat/wire.py's declarations). Embeddings, reranking,
speech recognition, speech and images go through the fake Cloudflare (tests/fake_media.py)."""

from __future__ import annotations

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.fake_cloudflare import cloudflare_env
from web.routes.openapi import document

API_KEY = "sk-openapi-test"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT_MODEL, EMBEDDING_MODEL = "chatglm3-demo", "@cf/baai/bge-small-en-v1.5"  # as named in the examples
# Responses go to the fake Workers AI model: the same road and codec, without a generation's CPU for each case.
SERVED = {"/v1/chat/completions": CHAT_MODEL, "/v1/completions": CHAT_MODEL, "/v1/embeddings": EMBEDDING_MODEL,
          "/v1/responses": "@cf/fake/chat", "/v1/messages": "@cf/fake/chat",
          "/v1/messages/count_tokens": "@cf/fake/chat", "/v1/rerank": "@cf/baai/bge-reranker-base",
          "/v1/audio/transcriptions": "@cf/openai/whisper", "/v1/audio/speech": "@cf/deepgram/aura-1",
          "/v1/images/generations": "@cf/stabilityai/stable-diffusion-xl-base-1.0",
          "/v1/responses/input_tokens": CHAT_MODEL, "/v1/tokenize": CHAT_MODEL, "/v1/detokenize": CHAT_MODEL}
SHORT = 16  # the most tokens a valid case asks for
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]
EXAMPLES = 25  # fuzzed cases per operation, besides the document's examples and schemathesis' coverage cases

# Built at collection time (schemathesis makes one test per operation from it); the first test
# checks that the live /openapi.json is this same document.
schema = schemathesis.openapi.from_dict(document())
schema.config.update(headers=AUTH)


@pytest.fixture(scope="module")
def server(server_factory, demo_model, fake):
    return server_factory(CHATGLM_MODEL=str(demo_model), CHATGLM_MODEL_ID=CHAT_MODEL, API_KEYS=API_KEY,
                          **cloudflare_env(fake), CLOUDFLARE_MODELS="@cf/fake/chat",
                          CLOUDFLARE_EMBEDDING_MODELS="@cf/fake/bge", MODEL_ALIASES=f"{EMBEDDING_MODEL}=@cf/fake/bge")


def test_the_served_description_is_the_document_and_valid(server):
    r = requests.get(server.base_url + "/openapi.json", timeout=10)  # no key: it is outside /v1/
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json"
    assert r.json() == document()
    schemathesis.openapi.from_dict(r.json()).validate()  # against the OpenAPI 3.1 meta-schema


@schema.parametrize()
# The generator's own health checks: the chat body is deep, and 2 cores generate it slowly.
@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
def test_every_answer_matches_the_description(case, server):
    if case.meta is not None and case.meta.generation.mode.is_positive and isinstance(case.body, dict):
        aim_at_a_served_model(case.operation.path, case.body)
    response = case.call(base_url=server.base_url, timeout=30)
    case.validate_response(response, checks=CHECKS)
    if 400 <= response.status_code < 500:  # whatever the client got wrong, the SDKs can read why
        error = response.json()["error"]
        anthropic = case.operation.path.startswith("/v1/messages")  # Anthropic's shape there
        fields = {"message", "type"} if anthropic else {"message", "type", "param", "code"}
        assert set(error) == fields and error["message"], response.text


def aim_at_a_served_model(path: str, body: dict) -> None:
    """Point a valid body at the route's served model (a generated name is almost never one, so
    every valid request would end at a 404) and ask for a short answer: the server clamps any
    max_tokens to the context's room, but that many tokens take many seconds on 2 busy cores,
    and lengths are not under test here."""
    if path not in SERVED:
        return
    body["model"] = SERVED[path]
    if path == "/v1/responses":
        body["max_output_tokens"] = min(body.get("max_output_tokens") or SHORT, SHORT)
    elif path == "/v1/messages":
        body["max_tokens"] = min(body.get("max_tokens") or SHORT, SHORT)
    elif SERVED[path] == CHAT_MODEL:
        body["max_tokens"] = min(body.get("max_tokens") or SHORT, SHORT)
        if body.get("max_completion_tokens") is not None:
            body["max_completion_tokens"] = min(body["max_completion_tokens"], SHORT)
