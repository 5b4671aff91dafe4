"""The image decoders on their own (backends/chatglm/image_pool.py): a decode's memory is bounded in its helper,
a helper that dies or is killed is replaced, and the pool's helpers are few and reused."""

from __future__ import annotations

import base64
import io
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from backends.base import ImageInput, ImageTooLarge, InvalidImage
from backends.chatglm.image_pool import ImagePool


def png(image: Image.Image) -> ImageInput:
    out = io.BytesIO()
    image.save(out, "PNG")
    return ImageInput(base64.b64encode(out.getvalue()).decode())


RED = png(Image.new("RGB", (40, 30), (200, 30, 30)))


@pytest.fixture
def pool() -> Iterator[ImagePool]:
    pool = ImagePool(seconds=10, max_pixels=16_000_000, wait_seconds=30, helpers=2)
    yield pool
    pool.close()


def pixels(pool: ImagePool, image: ImageInput = RED, size: int = 8) -> bytes:
    return base64.b64decode(pool.decode(image, size, "messages[0]"))


def test_an_image_becomes_the_pixels_the_engine_takes(pool):
    assert pixels(pool) == bytes([200, 30, 30]) * 64
    with pytest.raises(InvalidImage) as err:
        pool.decode(ImageInput(base64.b64encode(b"not an image").decode()), 8, "messages[3]")
    assert err.value.param == "messages[3]" and "not a readable image" in err.value.message
    with pytest.raises(ImageTooLarge):
        ImagePool(seconds=10, max_pixels=64 * 64, wait_seconds=30).decode(png(Image.new("L", (65, 64))), 8, "x")


def test_a_decode_past_its_memory_bound_is_a_400_and_the_helper_goes_on():
    # 100 MB of address space: a helper starts in about 30; a 4000 x 4000 image wants more than 100
    tight = ImagePool(seconds=30, max_pixels=16_000_000, wait_seconds=30, memory=100 * 2**20)
    try:
        with pytest.raises(ImageTooLarge) as err:
            tight.decode(png(Image.new("RGB", (4000, 4000))), 8, "messages[0]")
        assert "more memory" in err.value.message and err.value.param == "messages[0]"
        assert pixels(tight) == bytes([200, 30, 30]) * 64  # the same helper, still bounded, decodes the next
        assert (tight.decoded, tight.killed) == (2, 0)
    finally:
        tight.close()


def test_a_helper_killed_from_outside_is_replaced(pool):
    pixels(pool)
    (helper,) = pool._idle
    os.kill(helper.process.pid, signal.SIGKILL)
    helper.process.wait()
    assert pixels(pool) == bytes([200, 30, 30]) * 64
    assert [h.process.pid for h in pool._idle] != [helper.process.pid]


def test_at_most_so_many_helpers_decode_at_once_and_each_is_reused(pool):
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda: results.append(pixels(pool))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [bytes([200, 30, 30]) * 64] * 6
    assert len(pool._idle) <= 2 and pool._running == len(pool._idle)


def test_a_helper_has_none_of_the_workers_secrets(monkeypatch):
    monkeypatch.setenv("API_KEYS", "sk-secret")
    monkeypatch.setenv("CLOUDFLARE_API_TOKEN", "cf-secret")
    pool = ImagePool(seconds=10, max_pixels=16_000_000, wait_seconds=30)
    try:
        pixels(pool)
        (helper,) = pool._idle
        environment = Path(f"/proc/{helper.process.pid}/environ").read_bytes()
        assert b"secret" not in environment and b"PATH=" in environment
    finally:
        pool.close()
