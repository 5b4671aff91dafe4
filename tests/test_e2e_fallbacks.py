"""MODEL_FALLBACKS end to end: failures before the first byte move the request to the next model."""

from __future__ import annotations

import openai
import pytest

from tests.fake_cloudflare import cloudflare_env

HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def server(server_factory, slow_model, fake):
    return server_factory(
        CHATGLM_MODEL=str(slow_model), MAX_QUEUE="0", **cloudflare_env(fake), CLOUDFLARE_RETRIES="0",
        CLOUDFLARE_MODELS="@cf/fake/429,@cf/fake/500,@cf/fake/chat,@cf/fake/5006",
        MODEL_FALLBACKS="@cf/fake/429=@cf/fake/500,@cf/fake/429=@cf/fake/chat,endless=@cf/fake/chat,"
                        "@cf/fake/5006=@cf/fake/chat", MAX_TOKENS_CEILING="@cf/fake/chat=64")


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_failures_fall_through_the_chain(client, fake, stream):
    tried = {m: len(fake.runs(m)) for m in ("@cf/fake/429", "@cf/fake/500", "@cf/fake/chat")}
    r = client.chat.completions.create(model="@cf/fake/429", messages=HELLO, stream=stream)
    if stream:
        chunks = list(r)
        model, text = chunks[0].model, "".join(c.choices[0].delta.content or "" for c in chunks)
    else:
        model, text = r.model, r.choices[0].message.content
    assert (model, text) == ("@cf/fake/chat", "You said: hello there")  # the answer says who answered
    assert {m: len(fake.runs(m)) - n for m, n in tried.items()} == {"@cf/fake/429": 1, "@cf/fake/500": 1,
                                                                    "@cf/fake/chat": 1}


def test_a_busy_local_model_falls_back_to_cloudflare(client, server, fake):
    stream = iter(client.chat.completions.create(model="endless", messages=HELLO, max_tokens=900, stream=True))
    next(stream)  # the only slot is taken, and no one may wait (MAX_QUEUE=0)
    r = client.chat.completions.with_raw_response.create(model="endless", messages=HELLO, max_tokens=500)
    assert r.parse().model == "@cf/fake/chat"
    assert fake.runs("@cf/fake/chat")[-1].body["max_tokens"] == 64  # the fallback's own ceiling
    two = client.completions.create(model="endless", prompt=["a", "b"], max_tokens=500)
    assert two.model == "@cf/fake/chat" and len(two.choices) == 2
    assert [run.body["max_tokens"] for run in fake.runs("@cf/fake/chat")[-2:]] == [64, 64]  # every prompt
    assert "model=@cf/fake/chat" in server.wait_for_log(f"id={r.headers['x-request-id']} ")
    rest = list(stream)
    assert rest[-1].choices[0].finish_reason == "length" and rest[0].model == "endless"


def test_a_bad_request_does_not_fall_back(client, fake):
    before = len(fake.runs("@cf/fake/chat"))
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="@cf/fake/5006", messages=HELLO)
    assert len(fake.runs("@cf/fake/chat")) == before
