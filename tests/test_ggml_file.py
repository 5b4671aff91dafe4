"""The model-file check turns every known chatglm.cpp crash on a bad file into one clear error.

Each corruption below is one that makes chatglm-cpp 0.4.2 abort, segfault, read out of bounds
or fail with a misleading error (shared notes on chatglm.cpp, section 6).
"""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest

from backends.ggml_file import CONFIG_V2, ModelFileError, read_model_file

HEADER = 4 + 4 + 4  # magic, model type, config version


def config_offset_of(field: int) -> int:
    return HEADER + struct.calcsize("<" + "7ifif3i"[:field])


def test_the_demo_model_passes_and_loads(demo_model):
    info = read_model_file(demo_model)
    assert info.config.max_length == 1024 and info.config.vocab_size >= info.tokenizer_pieces + 9
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
