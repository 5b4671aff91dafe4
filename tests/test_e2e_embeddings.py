"""/v1/embeddings end to end through the fake Cloudflare's embedding model."""

from __future__ import annotations

import base64
import struct

import pytest
import requests

from tests.fake_cloudflare import cloudflare_env, fake_embedding


@pytest.fixture(scope="module")
def server(server_factory, demo_model, fake):
    return server_factory(CHATGLM_MODEL=str(demo_model), **cloudflare_env(fake), CLOUDFLARE_MODELS="@cf/fake/chat",
                          CLOUDFLARE_EMBEDDING_MODELS="@cf/fake/bge",
                          MODEL_ALIASES="text-embedding-3-small=@cf/fake/bge")


@pytest.mark.parametrize("encoding", [None, "float", "base64"])  # the SDK asks for base64 when not told
def test_embeddings(client, fake, encoding):
    extra = {"encoding_format": encoding} if encoding else {}
    r = client.embeddings.create(model="@cf/fake/bge", input=["the quick fox", "a lazy dog"], **extra)
    assert [d.index for d in r.data] == [0, 1]
    vectors = [d.embedding for d in r.data]
    if encoding == "base64":  # asked for explicitly, the SDK hands the text over undecoded
        vectors = [list(struct.unpack("<8f", base64.b64decode(v))) for v in vectors]
    assert vectors == [fake_embedding("the quick fox"), fake_embedding("a lazy dog")]
    assert r.model == "@cf/fake/bge" and r.usage.prompt_tokens == r.usage.total_tokens > 0
    assert fake.runs("@cf/fake/bge")[-1].body == {"text": ["the quick fox", "a lazy dog"]}


def test_a_single_string_an_alias_and_large_batches(client, fake):
    aliased = client.embeddings.create(model="text-embedding-3-small", input="hi")
    assert aliased.data[0].embedding == fake_embedding("hi")
    before = len(fake.runs("@cf/fake/bge"))
    texts = [f"text {i}" for i in range(250)]
    r = client.embeddings.create(model="@cf/fake/bge", input=texts)
    assert [d.embedding for d in r.data] == [fake_embedding(t) for t in texts]
    assert [len(run.body["text"]) for run in fake.runs("@cf/fake/bge")[before:]] == [100, 100, 50]


def test_listed_beside_the_chat_models(client):
    assert {"@cf/fake/bge", "@cf/fake/chat", "demo"} <= {m.id for m in client.models.list()}


@pytest.mark.parametrize("body, status, param", [
    ({"model": "demo", "input": "x"}, 400, "model"),
    ({"model": "@cf/fake/bge"}, 400, "input"),
    ({"model": "@cf/fake/bge", "input": ""}, 400, "input"),
    ({"model": "@cf/fake/bge", "input": [[1, 2], []]}, 400, "input"),  # an empty list of token ids
    ({"model": "@cf/fake/bge", "input": "x", "encoding_format": "hex"}, 400, "encoding_format"),
    ({"model": "@cf/fake/bge", "input": "x", "dimensions": 4}, 400, "dimensions"),
    ({"model": "nope", "input": "x"}, 404, "model"),
])
def test_bad_embedding_requests(server, body, status, param):
    r = requests.post(server.v1 + "/embeddings", json=body, timeout=30)
    assert r.status_code == status and r.json()["error"]["param"] == param
