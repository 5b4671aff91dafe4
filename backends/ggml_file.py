"""Read and check a chatglm.cpp GGML model file before chatglm.cpp sees it.

chatglm.cpp trusts its input: a file cut short inside the tensor data kills the process with
SIGABRT, a vocabulary smaller than the tokenizer reads past the embedding table, and a path that
is not a file is taken for a Hugging Face model to convert (``No module named 'torch'``). Walking
the header, the tokenizer and the tensor table here turns each of those into one clear line.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import sentencepiece

MAGIC = b"ggml"
CHATGLM3 = 3
MODEL_TYPE_NAMES = {1: "ChatGLM-6B", 2: "ChatGLM2-6B", 3: "ChatGLM3-6B", 4: "GLM-4", 1004: "GLM-4V"}
ALIGN = 16
# The special tokens ChatGLM3's tokenizer appends after the sentencepiece pieces, in id order.
SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop",
                  "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")

# ggml type -> (elements per block, bytes per block)
GGML_TYPES: dict[int, tuple[int, int]] = {
    0: (1, 4),     # F32
    1: (1, 2),     # F16
    2: (32, 18),   # Q4_0
    3: (32, 20),   # Q4_1
    6: (32, 22),   # Q5_0
    7: (32, 24),   # Q5_1
    8: (32, 34),   # Q8_0
}
F32, F16 = 0, 1

# Config records after the version field (chatglm.h): V1GQA and V2.
CONFIG_V1 = struct.Struct("<12i")  # dtype vocab hidden heads layers ffn max_len bos eos pad sep kv_heads
CONFIG_V2 = struct.Struct("<7ifif3i")  # dtype vocab hidden heads kv layers ffn eps virt theta max_len eos pad


class ModelFileError(ValueError):
    """The file is not a ChatGLM3 GGML model chatglm.cpp can load safely."""


@dataclass(frozen=True)
class ModelConfig:
    dtype: int
    vocab_size: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    intermediate_size: int
    num_virtual_tokens: int
    max_length: int
    eos_token_id: int


@dataclass(frozen=True)
class ModelFile:
    path: Path
    config: ModelConfig
    tokenizer_pieces: int  # ids at or above this are special tokens or padding

    @property
    def special_token_ids(self) -> dict[str, int]:
        return {name: self.tokenizer_pieces + i for i, name in enumerate(SPECIAL_TOKENS)}


def expected_tensors(c: ModelConfig) -> dict[str, tuple[tuple[int, ...], int]]:
    """name -> (shape in torch order, ggml type) of every tensor a ChatGLM3 model has."""
    head_dim = c.hidden_size // c.num_attention_heads
    qkv_rows = c.hidden_size + 2 * c.num_key_value_heads * head_dim
    h, ffn, t = c.hidden_size, c.intermediate_size, c.dtype
    tensors: dict[str, tuple[tuple[int, ...], int]] = {
        "transformer.embedding.word_embeddings.weight": ((c.vocab_size, h), t)}
    for i in range(c.num_hidden_layers):
        p = f"transformer.encoder.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": ((h,), F32),
            p + "self_attention.query_key_value.weight": ((qkv_rows, h), t),
            p + "self_attention.query_key_value.bias": ((qkv_rows,), F32),
            p + "self_attention.dense.weight": ((h, h), t),
            p + "post_attention_layernorm.weight": ((h,), F32),
            p + "mlp.dense_h_to_4h.weight": ((2 * ffn, h), t),
            p + "mlp.dense_4h_to_h.weight": ((h, ffn), t),
        })
    tensors["transformer.encoder.final_layernorm.weight"] = ((h,), F32)
    tensors["transformer.output_layer.weight"] = ((c.vocab_size, h), t)
    return tensors


def tensor_nbytes(shape: tuple[int, ...], ggml_type: int) -> int:
    block, size = GGML_TYPES[ggml_type]
    count = 1
    for d in shape:
        count *= d
    if shape[-1] % block:
        raise ModelFileError(f"a row of {shape[-1]} elements does not fill whole blocks of type {ggml_type}")
    return count // block * size


class _Reader:
    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise ModelFileError(f"file ends inside the {what} (truncated download?)")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: struct.Struct, what: str) -> tuple:
        return fmt.unpack(self.take(fmt.size, what))

    def int32(self, what: str) -> int:
        return struct.unpack("<i", self.take(4, what))[0]


def read_model_file(path: str | os.PathLike[str]) -> ModelFile:
    """Check everything chatglm.cpp would trip on; return the config, or raise ModelFileError."""
    p = Path(path)
    if not p.exists():
        raise ModelFileError(f"{p}: no such file")
    if not p.is_file():
        raise ModelFileError(f"{p}: not a regular file (point it at the converted .bin file)")
    try:
        return _parse(p, memoryview(_map(p)))
    except OSError as exc:
        raise ModelFileError(f"{p}: cannot read: {exc.strerror}") from None
    except ModelFileError as exc:
        raise ModelFileError(f"{p}: {exc}") from None


def _map(p: Path) -> mmap.mmap:
    with open(p, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ModelFileError("the file is empty")
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _parse(p: Path, data: memoryview) -> ModelFile:
    r = _Reader(data)
    if bytes(r.take(4, "header")) != MAGIC:
        raise ModelFileError("not a GGML model (bad magic); convert it with chatglm_cpp.convert")
    model_type = r.int32("header")
    if model_type != CHATGLM3:
        name = MODEL_TYPE_NAMES.get(model_type, f"unknown type {model_type}")
        raise ModelFileError(f"a {name} model; aigate serves ChatGLM3 models")
    version = r.int32("header")
    if version == 1:
        dtype, vocab, hidden, heads, layers, ffn, max_len, _bos, eos, _pad, _sep, kv = r.unpack(CONFIG_V1, "config")
        virtual = 0
    elif version == 2:
        dtype, vocab, hidden, heads, kv, layers, ffn, _eps, virtual, _theta, max_len, eos, _pad = r.unpack(
            CONFIG_V2, "config")
    else:
        raise ModelFileError(f"config version {version} is unknown (chatglm.cpp reads 1 and 2)")
    config = ModelConfig(dtype, vocab, hidden, heads, kv, layers, ffn, virtual, max_len, eos)
    _check_config(config)

    proto = bytes(r.take(r.int32("tokenizer"), "tokenizer"))
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(proto)
    except (RuntimeError, OSError) as exc:
        raise ModelFileError(f"the tokenizer is corrupt ({exc})") from None
    pieces = sp.get_piece_size()
    if vocab < pieces + len(SPECIAL_TOKENS):
        raise ModelFileError(f"vocab_size {vocab} is smaller than the tokenizer's {pieces} pieces "
                             f"+ {len(SPECIAL_TOKENS)} special tokens")
    if not 0 <= eos < pieces:
        raise ModelFileError(f"eos_token_id {eos} is not a tokenizer piece")

    _check_tensors(r, config)
    return ModelFile(p, config, pieces)


def _check_config(c: ModelConfig) -> None:
    if c.dtype not in GGML_TYPES:
        raise ModelFileError(f"weight type {c.dtype} is unknown")
    positive = ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads",
                "num_hidden_layers", "intermediate_size", "max_length")
    for name in positive:
        if getattr(c, name) <= 0:
            raise ModelFileError(f"config {name} = {getattr(c, name)} is not positive")
    if c.hidden_size % c.num_attention_heads or c.num_attention_heads % c.num_key_value_heads:
        raise ModelFileError("config heads do not divide hidden_size evenly")
    if c.num_virtual_tokens < 0:
        raise ModelFileError("config num_virtual_tokens is negative")


def _check_tensors(r: _Reader, config: ModelConfig) -> None:
    expected = expected_tensors(config)
    seen: set[str] = set()
    while r.pos < len(r.data):
        name_len = r.int32("tensor table")
        if not 0 < name_len <= 256:
            raise ModelFileError(f"tensor name length {name_len} at byte {r.pos - 4} is corrupt")
        name = bytes(r.take(name_len, "tensor table")).decode("utf-8", "replace")
        ndim = r.int32("tensor table")
        if not 0 < ndim <= 4:
            raise ModelFileError(f"tensor {name} has {ndim} dimensions")
        shape = tuple(r.int32("tensor table") for _ in range(ndim))
        ggml_type = r.int32("tensor table")
        if name == "past_key_values" and config.num_virtual_tokens > 0:
            want_type = F16
        elif name not in expected:
            raise ModelFileError(f"unexpected tensor {name!r} (not a ChatGLM3 weight, or a corrupt name)")
        else:
            want_shape, want_type = expected[name]
            if shape != want_shape:
                raise ModelFileError(f"tensor {name} has shape {list(shape)}, the config implies {list(want_shape)}")
        if ggml_type != want_type:
            raise ModelFileError(f"tensor {name} has type {ggml_type}, expected {want_type}")
        if name in seen:
            raise ModelFileError(f"tensor {name} appears twice")
        if any(d <= 0 for d in shape):
            raise ModelFileError(f"tensor {name} has an empty dimension")
        seen.add(name)
        start = (r.pos + ALIGN - 1) // ALIGN * ALIGN
        r.pos = start
        r.take(tensor_nbytes(shape, ggml_type), f"data of tensor {name}")
    missing = [n for n in expected if n not in seen]
    if config.num_virtual_tokens > 0 and "past_key_values" not in seen:
        missing.append("past_key_values")
    if missing:
        raise ModelFileError(f"{len(missing)} tensors are missing, first {missing[0]} (truncated file?)")
