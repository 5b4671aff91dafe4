"""The model-file check turns every known chatglm.cpp crash on a bad file into one clear error.

Each corruption below is one that makes chatglm-cpp 0.4.2 abort, segfault, read out of bounds
or fail with a misleading error (shared notes on chatglm.cpp, section 6).
"""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest

from backends.chatglm.ggml_file import (
    ALIGN,
    CONFIG_V2,
    F16,
    VISION_CONFIG,
    ModelFileError,
    read_model_file,
    tensor_nbytes,
)
from tests.conftest import TEST_CONTEXT

HEADER = 4 + 4 + 4  # magic, model type, config version


def config_offset_of(field: int) -> int:
    return HEADER + struct.calcsize("<" + "7ifif3i"[:field])


def test_the_demo_model_passes_and_loads(demo_model):
    info = read_model_file(demo_model)
    assert info.config.max_length == TEST_CONTEXT and info.config.vocab_size >= info.tokenizer_pieces + 9
    assert info.special_token_ids["<|assistant|>"] == info.tokenizer_pieces + 7
    code = f"import chatglm_cpp; p = chatglm_cpp.Pipeline({str(demo_model)!r}); print(p.model.config.vocab_size)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == str(info.config.vocab_size)


def corrupt(demo: bytes, kind: str) -> bytes:
    if kind == "truncated-half":
        return demo[: len(demo) // 2]
    if kind == "truncated-tail":
        return demo[:-100]
    if kind == "zeros-appended":
        return demo + b"\0" * 7
    if kind == "empty":
        return b""
    if kind == "text":
        return b"this is not a model\n"
    if kind == "bad-type":
        return demo[:4] + struct.pack("<i", 99) + demo[8:]
    if kind == "bad-version":
        return demo[:8] + struct.pack("<i", 7) + demo[12:]
    if kind == "small-vocab":
        at = HEADER + 4
        return demo[:at] + struct.pack("<i", 600) + demo[at + 4:]
    if kind == "flipped-name":
        at = demo.index(b"transformer.encoder.final_layernorm")
        return demo[:at] + b"X" + demo[at + 1:]
    if kind == "tokenizer-cut":
        return demo[: HEADER + CONFIG_V2.size + 4 + 50]
    if kind == "bad-tokenizer":
        at = HEADER + CONFIG_V2.size + 4
        return demo[:at] + b"\xff" * 64 + demo[at + 64:]
    raise AssertionError(kind)


KINDS = ["truncated-half", "truncated-tail", "zeros-appended", "empty", "text", "bad-type", "bad-version",
         "small-vocab", "flipped-name", "tokenizer-cut", "bad-tokenizer"]


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_files_are_refused_with_the_path(tmp_path, demo_model, kind):
    path = tmp_path / f"{kind}.bin"
    path.write_bytes(corrupt(demo_model.read_bytes(), kind))
    with pytest.raises(ModelFileError) as err:
        read_model_file(path)
    message = str(err.value)
    assert message.startswith(str(path)) and "\n" not in message


def test_missing_tensor_is_refused(tmp_path, demo_model):
    """chatglm.cpp loads a file without output_layer and later fails on nan logits."""
    data = demo_model.read_bytes()
    at = data.index(b"transformer.output_layer.weight") - 4
    (tmp_path / "m.bin").write_bytes(data[:at])
    with pytest.raises(ModelFileError, match="missing"):
        read_model_file(tmp_path / "m.bin")


def test_non_files_are_refused(tmp_path):
    with pytest.raises(ModelFileError, match="no such file"):
        read_model_file(tmp_path / "nope.bin")
    with pytest.raises(ModelFileError, match="not a regular file"):
        read_model_file(tmp_path)


def test_a_truncated_file_really_would_abort_chatglm(tmp_path, demo_model):
    """Why the check exists: without it, this file kills the process."""
    path = tmp_path / "cut.bin"
    path.write_bytes(demo_model.read_bytes()[:-100])
    out = subprocess.run([sys.executable, "-c", f"import chatglm_cpp; chatglm_cpp.Pipeline({str(path)!r})"],
                         capture_output=True, timeout=60)
    assert out.returncode < 0  # killed by a signal (SIGABRT)


# -- files as chatglm.cpp's convert.py writes them (issue 23, 11) -----------------------------------------------

def tensor_table(data: bytes, vision: bool) -> tuple[bytes, list[tuple[str, tuple[int, ...], int, bytes]]]:
    """The bytes before the tensors, and each tensor's name, shape, type and data, in file order."""
    at = HEADER + CONFIG_V2.size + (VISION_CONFIG.size if vision else 0)
    at += 4 + struct.unpack_from("<i", data, at)[0]  # the tokenizer
    head, tensors = data[:at], []
    while at < len(data):
        (n,), at = struct.unpack_from("<i", data, at), at + 4
        name, at = data[at:at + n].decode(), at + n
        (ndim,), at = struct.unpack_from("<i", data, at), at + 4
        *shape, kind = struct.unpack_from(f"<{ndim + 1}i", data, at)
        at = (at + 4 * (ndim + 1) + ALIGN - 1) // ALIGN * ALIGN
        size = tensor_nbytes(tuple(shape), kind)
        tensors.append((name, tuple(shape), kind, data[at:at + size]))
        at += size
    return head, tensors


def write_table(path, head: bytes, tensors: list[tuple[str, tuple[int, ...], int, bytes]]) -> None:
    out = bytearray(head)
    for name, shape, kind, blob in tensors:
        out += struct.pack(f"<i{len(name)}si", len(name), name.encode(), len(shape))
        out += struct.pack(f"<{len(shape) + 1}i", *shape, kind)
        out += b"\0" * (-len(out) % ALIGN) + blob
    path.write_bytes(bytes(out))


def loads_in_chatglm_cpp(path) -> bool:
    code = f"import chatglm_cpp; chatglm_cpp.Pipeline({str(path)!r})"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60).returncode == 0


def test_the_glm4v_demo_is_laid_out_as_convert_py_writes_it(glm4v_model):
    _head, tensors = tensor_table(glm4v_model.read_bytes(), vision=True)
    shapes = {name: shape for name, shape, _kind, _blob in tensors}
    assert shapes["transformer.vision.patch_embedding.cls_embedding"] == (1, 64)  # the checkpoint's [1, hidden]
    assert shapes["transformer.vision.boi"] == shapes["transformer.vision.eoi"] == (1, 1, 128)
    assert tensors[0][0] == "transformer.vision.patch_embedding.cls_embedding"  # vision first, as convert.py
    assert tensors[-1][0] == "transformer.output_layer.weight"
    assert read_model_file(glm4v_model).vision is not None and loads_in_chatglm_cpp(glm4v_model)


VISION_VECTORS = ("transformer.vision.patch_embedding.cls_embedding", "transformer.vision.boi",
                  "transformer.vision.eoi")


@pytest.mark.parametrize("layout", ["chatglm.cpp's own 1-d", "same bytes, odd shape"])
def test_every_shape_chatglm_cpp_loads_passes(tmp_path, glm4v_model, layout):
    """chatglm.cpp copies each weight by its byte size: any shape of the right size loads."""
    head, tensors = tensor_table(glm4v_model.read_bytes(), vision=True)
    reshape = {"chatglm.cpp's own 1-d": lambda s: (s[-1],), "same bytes, odd shape": lambda s: (2, s[-1] // 2)}[layout]
    path = tmp_path / "m.bin"
    write_table(path, head, [(n, reshape(s) if n in VISION_VECTORS else s, k, b) for n, s, k, b in tensors])
    assert read_model_file(path).vision is not None and loads_in_chatglm_cpp(path)


def test_a_weight_of_the_wrong_size_is_refused_as_chatglm_cpp_would(tmp_path, glm4v_model):
    head, tensors = tensor_table(glm4v_model.read_bytes(), vision=True)
    grown = [(n, (1, 1, 130), k, b + b"\0" * 4) if n == "transformer.vision.boi" else (n, s, k, b)
             for n, s, k, b in tensors]
    path = tmp_path / "m.bin"
    write_table(path, head, grown)
    with pytest.raises(ModelFileError, match=r"transformer.vision.boi has shape \[1, 1, 130\] \(260 bytes\)"):
        read_model_file(path)
    assert not loads_in_chatglm_cpp(path)


def test_a_p_tuning_prefix_must_have_the_shape_chatglm_cpp_views(tmp_path, demo_model):
    """past_key_values is read through views of its own shape: the one tensor whose shape must match."""
    data = demo_model.read_bytes()
    config = list(CONFIG_V2.unpack_from(data, HEADER))
    config[8] = 2  # num_virtual_tokens
    head, tensors = tensor_table(data, vision=False)
    head = head[:HEADER] + CONFIG_V2.pack(*config) + head[HEADER + CONFIG_V2.size:]
    layers, kv, head_size = config[5], config[4], config[2] // config[3]
    shape = (2 * layers, kv, 2, head_size)
    prefix = ("past_key_values", shape, F16, b"\0" * tensor_nbytes(shape, F16))
    path = tmp_path / "m.bin"
    write_table(path, head, [prefix, *tensors])
    assert read_model_file(path).config.num_virtual_tokens == 2
    flat = (kv, 2, head_size, 2 * layers)  # the same bytes, another shape
    write_table(path, head, [("past_key_values", flat, F16, prefix[3]), *tensors])
    with pytest.raises(ModelFileError, match="past_key_values has shape"):
        read_model_file(path)
