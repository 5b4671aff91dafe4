"""GLM-4V end to end: image content parts through gunicorn and the official SDK to the real
chatglm.cpp vision tower (a small generated one), the 400s for images that cannot be read, and the
decoding of an image: after the engine's line has taken the request, off the worker's event loop,
within IMAGE_DECODE_SECONDS."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator

import numpy as np
import openai
import pytest
import requests
from PIL import Image

from backends.base import ChatRequest, Message
from backends.chatglm.engine import protocol
from backends.chatglm.engine.client import EngineClient, connect
from tests.fake_cloudflare import cloudflare_env
from tests.test_ggml_file import tensor_table

MAX_IMAGE_BYTES = 20_000
TEXT_ONLY = "@cf/fake/chat"
DECODE_SECONDS = 0.5


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    out = io.BytesIO()
    image.save(out, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(out.getvalue()).decode()


RED = data_url(Image.new("RGB", (40, 30), (200, 30, 30)))
NOISE = data_url(Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 120, 3), np.uint8)))


def ask(url: str, text: str = "What is in the picture?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


@pytest.fixture(scope="module")
def server(server_factory, glm4v_model, fake):
    # Beside the local GLM-4V (a file laid out as chatglm.cpp's convert.py writes one), a model without vision.
    # One slot and one place in line, so that two requests fill the line; a short bound on decoding.
    return server_factory(CHATGLM_MODEL=str(glm4v_model), MAX_IMAGE_BYTES=str(MAX_IMAGE_BYTES),
                          MODEL_ALIASES="gpt-4o=glm4v", GENERATION_SLOTS="1", MAX_QUEUE="1",
                          IMAGE_DECODE_SECONDS=str(DECODE_SECONDS), **cloudflare_env(fake, CLOUDFLARE_MODELS=TEXT_ONLY))


def test_the_model_says_it_reads_images(server, client, glm4v_model):
    assert client.models.retrieve("glm4v").model_extra["capabilities"]["images"] is True
    assert client.models.retrieve("gpt-4o").model_extra["capabilities"]["images"] is True
    # the server started on a file with convert.py's shapes (issue 23, 11: it refused them)
    shapes = {name: shape for name, shape, *_ in tensor_table(glm4v_model.read_bytes(), vision=True)[1]}
    assert shapes["transformer.vision.patch_embedding.cls_embedding"] == (1, 64)
    assert shapes["transformer.vision.boi"] == (1, 1, 128)


def test_a_base64_png_is_answered(client):
    text_only = client.chat.completions.create(model="glm4v", messages=[{"role": "user", "content": "What is in "
                                                                        "the picture?"}], max_tokens=3)
    r = client.chat.completions.create(model="gpt-4o", messages=ask(RED), temperature=0, max_tokens=12)
    assert r.choices[0].message.content and r.usage.completion_tokens == 12
    # the image's 3 marker tokens stand for boi, the vision tower's 4 tokens and eoi: 3 more positions
    assert r.usage.prompt_tokens == text_only.usage.prompt_tokens + 3 + 3
    chunks = list(client.chat.completions.create(model="glm4v", messages=ask(RED), temperature=0, max_tokens=12,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    other = client.chat.completions.create(model="glm4v", messages=ask(NOISE_SMALL), temperature=0, max_tokens=12)
    assert other.choices[0].message.content != r.choices[0].message.content  # the pixels reach the model
    after = client.chat.completions.create(model="glm4v", messages=[{"role": "user", "content": "hello"}],
                                           max_tokens=3)
    assert after.usage.prompt_tokens_details.cached_tokens == 0  # an image's cache is not taken for text


NOISE_SMALL = data_url(Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 20, 3), np.uint8)))


@pytest.mark.parametrize("url, code", [
    ("data:image/png;base64," + base64.b64encode(b"not an image at all").decode(), "invalid_image"),
    ("data:image/png;base64,@@@", "invalid_image"),
    (NOISE, "image_too_large"),
    ("https://example.com/cat.png", "image_url_not_supported"),
    ("file:///etc/passwd", "invalid_image"),
])
def test_bad_images_are_400s(client, url, code):
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="glm4v", messages=ask(url), max_tokens=3, stream=stream)
        assert err.value.code == code, err.value.message


def test_two_images_are_one_too_many(client):
    messages = ask(RED) + [{"role": "assistant", "content": "red"}] + ask(RED)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="glm4v", messages=messages, max_tokens=3)
    assert err.value.code == "too_many_images"


def test_text_only_models_refuse_image_parts_as_before(server_factory, glm4_model):
    text_only = openai.OpenAI(base_url=server_factory(CHATGLM_MODEL=str(glm4_model)).v1, api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        text_only.chat.completions.create(model="glm4", messages=ask(RED), max_tokens=3)
    assert err.value.code == "unsupported_content"
    assert text_only.models.retrieve("glm4").model_extra["capabilities"]["images"] is False


def test_the_responses_api_takes_input_image(client):
    def content(url: str) -> list[dict]:
        return [{"role": "user", "content": [{"type": "input_text", "text": "What is in the picture?"},
                                             {"type": "input_image", "image_url": url, "detail": "auto"}]}]

    chat = client.chat.completions.create(model="glm4v", messages=ask(RED), temperature=0, max_tokens=6)
    r = client.responses.create(model="glm4v", input=content(RED), temperature=0, max_output_tokens=6)
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    stored = client.responses.input_items.list(r.id)
    assert [p.type for p in stored.data[0].content] == ["input_text", "input_image"]
    for url, code in (("https://example.com/cat.png", "image_url_not_supported"),
                      ("data:image/png;base64," + base64.b64encode(b"no image").decode(), "invalid_image")):
        with pytest.raises(openai.BadRequestError) as err:
            client.responses.create(model="glm4v", input=content(url), max_output_tokens=3)
        assert err.value.code == code


def test_a_conversation_with_an_image_is_refused_by_a_model_without_vision(client, fake):
    """Issue 23, 10: continued with previous_response_id on a text model, the image was silently dropped."""
    def content(text: str) -> list[dict]:
        return [{"role": "user", "content": [{"type": "input_text", "text": text},
                                             {"type": "input_image", "image_url": RED}]}]

    r = client.responses.create(model="glm4v", input=content("What is in the picture?"), max_output_tokens=3)
    with pytest.raises(openai.BadRequestError) as first:
        client.responses.create(model=TEXT_ONLY, input=content("What is in the picture?"))
    sent = len(fake.runs(TEXT_ONLY))
    with pytest.raises(openai.BadRequestError) as later:
        client.responses.create(model=TEXT_ONLY, previous_response_id=r.id, input="And the colour?")
    assert later.value.code == first.value.code == "unsupported_content"
    assert later.value.message == first.value.message.replace("input[0]", "previous_response_id[0]")
    assert later.value.param == "previous_response_id[0].content[1].type"
    assert len(fake.runs(TEXT_ONLY)) == sent  # nothing reached the model
    again = client.responses.create(model="glm4v", previous_response_id=r.id, input="And the colour?",
                                    max_output_tokens=3)
    assert again.usage.input_tokens > r.usage.input_tokens  # on the vision model the conversation goes on


# -- decoding: off the event loop, after the line has taken the request, bounded (issue 23, 4) ----


@pytest.fixture(scope="module")
def slow_image() -> str:
    """2.7 KB of PNG, 16,000,000 x 1 pixels (within MAX_IMAGE_PIXELS): Pillow takes most of a second of
    CPU on it here (it resamples a row that long), past DECODE_SECONDS."""
    url = data_url(Image.new("P", (16_000_000, 1)))
    assert len(url) < MAX_IMAGE_BYTES
    return url


def engine_status(server) -> dict:
    status = EngineClient(server.engine_socket, None, 0).status()
    assert status is not None
    return status


def test_health_answers_at_once_while_an_image_decodes(server, client, slow_image):
    outcome: list[BaseException] = []

    def ask_slow() -> None:
        try:
            client.chat.completions.create(model="glm4v", messages=ask(slow_image), max_tokens=3)
        except openai.APIError as exc:
            outcome.append(exc)

    asked = engine_status(server)["images"]
    slow = threading.Thread(target=ask_slow)
    slow.start()
    polls: list[float] = []
    while slow.is_alive() or not polls:
        started = time.monotonic()
        assert requests.get(server.base_url + "/health", timeout=10).status_code == 200
        polls.append(time.monotonic() - started)
    slow.join()
    assert engine_status(server)["images"] == asked + 1  # the image was decoded (for as long as it was let)
    assert len(polls) >= 3 and max(polls) < 0.5, polls
    assert isinstance(outcome[0], openai.BadRequestError)


def test_an_image_that_takes_too_long_to_decode_is_a_400_and_the_next_is_decoded(server, client, slow_image):
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="glm4v", messages=ask(slow_image), max_tokens=3, stream=stream)
        assert err.value.code == "invalid_image" and err.value.param == "messages[0]"
        assert "took too long to decode" in err.value.message
    assert "image decoder (pid" in server.wait_for_log("killed: a decode took more than 0.5s")
    r = client.chat.completions.create(model="glm4v", messages=ask(RED), temperature=0, max_tokens=4)
    assert r.usage.completion_tokens == 4  # a new decoder took the killed one's place
    line_empties(server)  # the requests whose images failed left the line


def line_empties(server) -> None:
    deadline = time.monotonic() + 10
    while engine_status(server)["running"] or engine_status(server)["waiting"]:
        assert time.monotonic() < deadline, engine_status(server)


@pytest.fixture
def full_line(server) -> Iterator[None]:
    """The engine's one slot taken (by a reader that does not acknowledge its first event) and its one
    place in line too, both by connections of this test's own to the engine; let go afterwards."""
    request = ChatRequest(model="glm4v", messages=(Message("user", "hello"),), temperature=0, max_tokens=50)
    with connect(server.engine_socket) as generating, connect(server.engine_socket) as waiting:
        generating.sendall(protocol.encode(protocol.generate_request(request)))
        assert "text" in protocol.decode(generating.makefile("rb").readline())  # the engine waits for our ACK
        waiting.sendall(protocol.encode(protocol.generate_request(request)))
        deadline = time.monotonic() + 10
        while (engine_status(server)["running"], engine_status(server)["waiting"]) != (1, 1):
            assert time.monotonic() < deadline, engine_status(server)
        yield
    line_empties(server)  # the engine lets go of both at once


def test_a_request_the_line_refuses_costs_no_decode(server, client, slow_image, full_line):
    asked = engine_status(server)["images"]
    for image in (slow_image, RED):
        started = time.monotonic()
        with pytest.raises(openai.RateLimitError) as err:
            client.chat.completions.create(model="glm4v", messages=ask(image), max_tokens=3)
        assert err.value.code == "queue_full"
        assert time.monotonic() - started < 0.5  # decoding the slow image alone takes longer
    assert engine_status(server)["images"] == asked  # the worker was never asked for the pixels
