"""Legacy /v1/completions end to end, both backends, with the openai SDK."""

from __future__ import annotations

import pytest
import requests

from tests.fake_cloudflare import cloudflare_env

CODE = "def fibonacci(n):\n    "


@pytest.fixture(scope="module")
def server(server_factory, slow_model, fake):
    return server_factory(CHATGLM_MODEL=str(slow_model), **cloudflare_env(fake), CLOUDFLARE_MODELS="@cf/fake/chat")


def test_completion_and_its_usage(client):
    r = client.completions.create(model="endless", prompt=CODE, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    (choice,) = r.choices
    assert choice.finish_reason == "length" and choice.index == 0 and choice.text
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 2
    assert client.completions.create(model="endless", prompt=CODE).usage.completion_tokens == 16  # OpenAI's default


def test_stream_equals_the_whole_answer(client):
    whole = client.completions.create(model="endless", prompt=CODE, max_tokens=30, temperature=0).choices[0].text
    chunks = list(client.completions.create(model="endless", prompt=CODE, max_tokens=30, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30


def test_echo_stop_and_several_prompts(client):
    plain = client.completions.create(model="endless", prompt=CODE, max_tokens=8, temperature=0).choices[0].text
    echoed = client.completions.create(model="endless", prompt=CODE, max_tokens=8, temperature=0, echo=True)
    assert echoed.choices[0].text == CODE + plain
    cut = plain[3:5]
    stopped = client.completions.create(model="endless", prompt=CODE, max_tokens=8, temperature=0, stop=cut)
    assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == (plain[:plain.index(cut)], "stop")
    both = client.completions.create(model="endless", prompt=[CODE, "The river"], max_tokens=4, temperature=0)
    assert [c.index for c in both.choices] == [0, 1] and both.choices[0].text == plain[:len(both.choices[0].text)]
    assert both.usage.completion_tokens == 8
    chunks = list(client.completions.create(model="endless", prompt=[CODE, "The river"], max_tokens=4,
                                            temperature=0, stream=True))
    for i in (0, 1):
        assert "".join(c.choices[0].text for c in chunks if c.choices[0].index == i) == both.choices[i].text


def test_suffix_is_accepted(client):
    r = client.completions.create(model="endless", prompt=CODE, suffix="\n    return a", max_tokens=3)
    assert r.usage.completion_tokens == 3


@pytest.mark.parametrize("body, param", [
    ({"model": "endless"}, "prompt"),
    ({"model": "endless", "prompt": []}, "prompt"),
    ({"model": "endless", "prompt": [[1, 2, 100261]]}, "prompt"),  # not a token id of cl100k_base
    ({"model": "endless", "prompt": "x", "logprobs": 6}, "logprobs"),  # at most 5
    ({"model": "endless", "prompt": "x", "logprobs": 2, "echo": True}, "logprobs"),  # prompt logprobs: not computed
    ({"model": "endless", "prompt": "x", "best_of": 3}, "best_of"),
    ({"model": "endless", "prompt": "x", "echo": "yes"}, "echo"),
    ({"model": "endless", "prompt": "x", "max_tokens": 0}, "max_tokens"),
])
def test_bad_completion_requests(server, body, param):
    r = requests.post(server.v1 + "/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_cloudflare_completion_uses_the_raw_prompt_form(client, fake):
    r = client.completions.create(model="@cf/fake/chat", prompt="Once upon a time", max_tokens=40)
    assert r.choices[0].text == "You said: Once upon a time"
    sent = fake.runs("@cf/fake/chat")[-1].body
    assert sent["prompt"] == "Once upon a time" and sent["raw"] is True and "messages" not in sent
    assert sent["max_tokens"] == 40
    chunks = list(client.completions.create(model="@cf/fake/chat", prompt="Once upon a time", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "You said: Once upon a time"
    assert fake.runs("@cf/fake/chat")[-1].body["max_tokens"] == 16
