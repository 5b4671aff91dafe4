"""The demo writer's q4_0 and q8_0 models: ggml's block layouts, files chatglm.cpp loads and generates from,
and a writer that streams (a 6B-shaped bench model must not be held in memory as float32)."""

from __future__ import annotations

import threading
import time
import tracemalloc
from pathlib import Path

import chatglm_cpp
import numpy as np
import pytest

from backends.chatglm import demo_model
from backends.chatglm.demo_model import write_demo_model
from backends.chatglm.ggml_file import F16, GGML_TYPES, Q4_0, Q8_0, read_model_file, tensor_nbytes
from backends.chatglm.ggml_quants import dequantize, encode, quantize_q4_0, quantize_q8_0


def test_q4_0_block_layout_is_ggmls():
    # One block: largest magnitude -8 (so the scale is exactly 1), value j in byte j's low nibble,
    # value j + 16 in its high nibble, each stored as value + 8.
    x = np.arange(32, dtype=np.float32) % 16 - 8
    block = quantize_q4_0(x[None, :])[0]
    assert block[:2].view(np.float16)[0] == 1.0
    assert list(block[2:]) == [(x[j] + 8).astype(int) | ((x[j + 16] + 8).astype(int) << 4) for j in range(16)]


def test_q8_0_block_layout_is_ggmls():
    x = np.linspace(-127, 127, 32, dtype=np.float32)
    block = quantize_q8_0(x[None, :])[0]
    assert block[:2].view(np.float16)[0] == 1.0
    assert list(block[2:].view(np.int8)) == list(np.rint(x).astype(np.int8))


# Q4_0's codes reach -8 steps but only +7: the value of largest magnitude sets the scale with its sign, so one of
# the opposite sign and about the same size is clipped by up to a step; everything else is rounded.
@pytest.mark.parametrize(("ggml_type", "steps", "worst"), [(Q4_0, 8, 1.0), (Q8_0, 127, 0.5)])
def test_quantized_values_are_within_a_rounding_of_the_originals(ggml_type, steps, worst):
    x = np.random.default_rng(1).standard_normal((64, 256)).astype(np.float32)
    data = encode(x, ggml_type)
    assert data.nbytes == tensor_nbytes(x.shape, ggml_type)
    back = dequantize(data, ggml_type, x.shape)
    step = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True) / steps
    error = np.abs(back - x).reshape(-1, 32)
    scale_rounding = steps * 2.0**-11  # the scale is stored as f16: the largest code carries its relative error
    assert (error <= step * (worst + scale_rounding) + 1e-6).all()
    assert (error <= step * (0.5 + scale_rounding) + 1e-6).mean() > 0.99
    assert np.abs(back - x).max() > 0  # it did quantize


def test_a_row_that_does_not_fill_whole_blocks_is_refused():
    with pytest.raises(ValueError, match="whole blocks"):
        encode(np.zeros((2, 40), np.float32), Q4_0)


@pytest.mark.parametrize("family", ["chatglm3", "glm4v"])
@pytest.mark.parametrize("dtype", ["q4_0", "q8_0"])
def test_a_quantized_demo_model_loads_and_generates(tmp_path, family, dtype):
    path = write_demo_model(tmp_path / f"{family}-{dtype}.bin", family=family, dtype=dtype, eos_every=0,
                            max_length=512)
    info = read_model_file(path)  # every tensor's type and size is what chatglm.cpp expects
    assert info.config.dtype == {"q4_0": Q4_0, "q8_0": Q8_0}[dtype]
    pipeline = chatglm_cpp.Pipeline(str(path))
    message = chatglm_cpp.ChatMessage(role="user", content="Hello! How are you today?")
    first = pipeline.chat([message], max_new_tokens=16, do_sample=False).content
    assert first and first == pipeline.chat([message], max_new_tokens=16, do_sample=False).content
    assert len(pipeline.tokenizer.encode(first, 512)) >= 8


def test_quantized_files_are_smaller_by_their_block_size(tmp_path):
    sizes = {dtype: write_demo_model(tmp_path / f"{dtype}.bin", dtype=dtype, hidden_size=256, ffn_size=512,
                                     num_layers=4, max_length=512).stat().st_size for dtype in ("f16", "q8_0", "q4_0")}
    # Almost all of the file is the matrices: 2 bytes a value in f16, 34/32 in q8_0, 18/32 in q4_0.
    assert sizes["q8_0"] / sizes["f16"] == pytest.approx(GGML_TYPES[Q8_0][1] / 32 / GGML_TYPES[F16][1], rel=0.05)
    assert sizes["q4_0"] / sizes["f16"] == pytest.approx(GGML_TYPES[Q4_0][1] / 32 / GGML_TYPES[F16][1], rel=0.08)


def test_the_writer_streams_the_layers(tmp_path, monkeypatch):
    # Layers of 4 x (1536 x 1024 + 1024 x 1024 + 4096 x 1024 + 1024 x 2048) float32 values = 142 MB if held;
    # written slice by slice, the peak is the two small vocabulary tables and a few slices.
    monkeypatch.setattr(demo_model, "CHUNK_VALUES", 1 << 16)
    tracemalloc.start()
    try:
        path: Path = write_demo_model(tmp_path / "big.bin", dtype="q4_0", hidden_size=1024, ffn_size=2048,
                                      num_heads=8, num_layers=4, max_length=512)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    tables = 2 * read_model_file(path).config.vocab_size * 1024 * 4
    assert peak < tables + 24 * 2**20


def smaps(path: Path) -> dict[str, int]:
    """This process's memory (kB) in the mapping of ``path`` and, for the whole process, its anonymous huge pages."""
    got = {"file_rss": 0, "huge": 0}
    mapping = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if not line[0].isupper():  # a mapping's header: address range, permissions, ..., path
            mapping = fields[-1] == str(path)
        elif fields[0] == "Rss:" and mapping:
            got["file_rss"] += int(fields[1])
        elif fields[0] == "AnonHugePages:":
            got["huge"] += int(fields[1])
    return got


def aigate_build() -> int:
    """The +aigate.N of this chatglm-cpp (0: a stock one)."""
    _, _, n = chatglm_cpp.__version__.partition("+aigate.")
    return int(n or 0)


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux's /proc/PID/smaps")
@pytest.mark.skipif(aigate_build() < 5, reason="a chatglm-cpp before aigate's build 5 (+aigate.5) keeps both copies")
def test_repacked_weights_count_once_in_memory_and_sit_in_huge_pages(tmp_path):
    # aigate's build copies q4_0 matrices at load into ggml's repacked layout: the mapped file's copy is then let go
    # (it would count a second time in the resident memory), and the copy asks for transparent huge pages.
    path = write_demo_model(tmp_path / "q4.bin", dtype="q4_0", hidden_size=1024, ffn_size=4096, num_heads=8,
                            num_layers=4, max_length=512)
    before = smaps(path)["huge"]
    pipeline = chatglm_cpp.Pipeline(str(path))
    pipeline.chat([chatglm_cpp.ChatMessage(role="user", content="Hello")], max_new_tokens=2, do_sample=False)
    after = smaps(path)
    size_kb = path.stat().st_size // 1024
    # what stays mapped: the embedding table (read by rows, a few of them) and the small vectors
    assert after["file_rss"] < 0.25 * size_kb, (after, size_kb)
    if "[never]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text():
        assert after["huge"] - before >= 0.25 * size_kb, (after, before, size_kb)  # most of the matrices
    del pipeline


@pytest.mark.skipif(aigate_build() < 8, reason="a chatglm-cpp before +aigate.8 loads holding the GIL")
def test_a_load_lets_the_other_threads_run(tmp_path):
    # The engine loads a model on demand beside the others' streams (a 6B file: ~9 s of reading and repacking,
    # during which the other threads had stalled); the load now runs without the GIL.
    path = write_demo_model(tmp_path / "q4.bin", dtype="q4_0", hidden_size=1024, ffn_size=4096, num_heads=8,
                            num_layers=8, max_length=512)
    stop = threading.Event()
    stall = [0.0]

    def tick() -> None:  # the longest gap between two of its turns
        last = time.perf_counter()
        while not stop.is_set():
            now = time.perf_counter()
            stall[0] = max(stall[0], now - last)
            last = now
            time.sleep(0.001)

    loads = []
    ticker = threading.Thread(target=tick)
    ticker.start()
    try:
        for _ in range(3):
            started = time.perf_counter()
            chatglm_cpp.Pipeline(str(path))
            loads.append(time.perf_counter() - started)
    finally:
        stop.set()
        ticker.join()
    assert stall[0] < 0.5 * min(loads), (stall[0], loads)  # holding the GIL, it would stall for a whole load
