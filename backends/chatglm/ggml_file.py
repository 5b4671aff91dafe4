"""Read and check a chatglm.cpp GGML model file before chatglm.cpp sees it.

chatglm.cpp trusts its input: a file cut short inside the tensor data kills the process with
SIGABRT, a vocabulary smaller than the tokenizer reads past the embedding table, and a path that
is not a file is taken for a Hugging Face model to convert (``No module named 'torch'``). Walking
the header, the tokenizer and the tensor table here turns each of those into one clear line.
"""

from __future__ import annotations

import binascii
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sentencepiece

MAGIC = b"ggml"
CHATGLM2, CHATGLM3, CHATGLM4, CHATGLM4V = 2, 3, 4, 1004  # chatglm.cpp's ModelType
MODEL_TYPE_NAMES = {1: "ChatGLM-6B", CHATGLM2: "ChatGLM2-6B", CHATGLM3: "ChatGLM3-6B", CHATGLM4: "GLM-4",
                    CHATGLM4V: "GLM-4V"}
SERVED = (CHATGLM2, CHATGLM3, CHATGLM4, CHATGLM4V)
ALIGN = 16
# The special tokens each tokenizer appends after its ordinary pieces, in id order.
SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop",
                  "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")  # ChatGLM3 (sentencepiece)
CHATGLM2_SPECIAL_TOKENS = SPECIAL_TOKENS[:5]
GLM4_SPECIAL_TOKENS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                       "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                       "<|begin_of_video|>", "<|end_of_video|>")  # GLM-4 and GLM-4V (tiktoken-style BPE)
FAMILY_SPECIAL_TOKENS = {CHATGLM2: CHATGLM2_SPECIAL_TOKENS, CHATGLM3: SPECIAL_TOKENS, CHATGLM4: GLM4_SPECIAL_TOKENS,
                         CHATGLM4V: GLM4_SPECIAL_TOKENS}

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
F32, F16, Q4_0, Q8_0 = 0, 1, 2, 8
PREFIX = "past_key_values"  # the one tensor chatglm.cpp reads by its shape; the weights it copies by byte size

# Config records after the version field (chatglm.h): V1GQA and V2.
CONFIG_V1 = struct.Struct("<12i")  # dtype vocab hidden heads layers ffn max_len bos eos pad sep kv_heads
CONFIG_V2 = struct.Struct("<7ifif3i")  # dtype vocab hidden heads kv layers ffn eps virt theta max_len eos pad
# GLM-4V's vision record, after CONFIG_V2: dtype hidden image_size channels ffn eps heads layers positions patch scale
VISION_CONFIG = struct.Struct("<5if4if")


class ModelFileError(ValueError):
    """The file is not a GGML model of a family aigate serves that chatglm.cpp can load safely."""


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
class VisionConfig:
    dtype: int
    hidden_size: int
    image_size: int
    in_channels: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    num_positions: int
    patch_size: int

    @property
    def image_tokens(self) -> int:
        """Positions an image takes in the text model (chatglm.cpp's num_vision_tokens, boi and eoi)."""
        return (self.image_size // self.patch_size // 2) ** 2 + 2


@dataclass(frozen=True)
class ModelFile:
    path: Path
    config: ModelConfig
    tokenizer_pieces: int  # ids at or above this are special tokens or padding
    model_type: int = CHATGLM3
    vision: VisionConfig | None = None  # GLM-4V only
    tokenizer_span: tuple[int, int] = (0, 0)  # where the tokenizer lies in the file (offset, size)

    @property
    def family_name(self) -> str:
        return MODEL_TYPE_NAMES[self.model_type]

    @property
    def special_token_ids(self) -> dict[str, int]:
        names = FAMILY_SPECIAL_TOKENS[self.model_type]
        return {name: self.tokenizer_pieces + i for i, name in enumerate(names)}


def expected_tensors(c: ModelConfig, vision: VisionConfig | None = None) -> dict[str, tuple[tuple[int, ...], int]]:
    """name -> (shape in torch order, ggml type) of every tensor of a ChatGLM2/3 or GLM-4(V) model (one
    architecture; GLM-4V adds its vision tower), as chatglm.cpp 0.4.2's convert.py writes them: in its
    order, each with its checkpoint's shape."""
    head_dim = c.hidden_size // c.num_attention_heads
    qkv_rows = c.hidden_size + 2 * c.num_key_value_heads * head_dim
    h, ffn, t = c.hidden_size, c.intermediate_size, c.dtype
    tensors: dict[str, tuple[tuple[int, ...], int]] = {}
    if c.num_virtual_tokens > 0:  # a P-tuning v2 prefix: [layers * 2, kv heads, virtual tokens, head size]
        tensors[PREFIX] = ((2 * c.num_hidden_layers, c.num_key_value_heads, c.num_virtual_tokens, head_dim), F16)
    if vision is not None:
        tensors.update(vision_tensors(c, vision))
    tensors["transformer.embedding.word_embeddings.weight"] = ((c.vocab_size, h), t)
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


def vision_tensors(c: ModelConfig, v: VisionConfig) -> dict[str, tuple[tuple[int, ...], int]]:
    """GLM-4V's vision tower (chatglm.cpp's ChatGLM4VConverter), with its checkpoint's shapes: the class
    embedding is [1, hidden], boi and eoi [1, 1, hidden] (chatglm.cpp's own tensors are 1-d)."""
    vh, vt, h = v.hidden_size, v.dtype, c.hidden_size
    p = "transformer.vision."
    tensors: dict[str, tuple[tuple[int, ...], int]] = {
        p + "patch_embedding.cls_embedding": ((1, vh), F16),
        p + "patch_embedding.proj.weight": ((vh, v.in_channels, v.patch_size, v.patch_size), F16),
        p + "patch_embedding.proj.bias": ((vh,), F32),
        p + "patch_embedding.position_embedding.weight": ((v.num_positions, vh), F32)}
    for i in range(v.num_hidden_layers):
        q = f"{p}transformer.layers.{i}."
        tensors.update({
            q + "input_layernorm.weight": ((vh,), F32), q + "input_layernorm.bias": ((vh,), F32),
            q + "attention.query_key_value.weight": ((3 * vh, vh), vt),
            q + "attention.query_key_value.bias": ((3 * vh,), F32),
            q + "attention.dense.weight": ((vh, vh), vt), q + "attention.dense.bias": ((vh,), F32),
            q + "mlp.fc1.weight": ((v.intermediate_size, vh), vt), q + "mlp.fc1.bias": ((v.intermediate_size,), F32),
            q + "mlp.fc2.weight": ((vh, v.intermediate_size), vt), q + "mlp.fc2.bias": ((vh,), F32),
            q + "post_attention_layernorm.weight": ((vh,), F32), q + "post_attention_layernorm.bias": ((vh,), F32)})
    tensors.update({
        p + "conv.weight": ((h, vh, 2, 2), F16), p + "conv.bias": ((h,), F32),
        p + "linear_proj.linear_proj.weight": ((h, h), vt),
        p + "linear_proj.norm1.weight": ((h,), F32), p + "linear_proj.norm1.bias": ((h,), F32),
        p + "linear_proj.gate_proj.weight": ((c.intermediate_size, h), vt),
        p + "linear_proj.dense_h_to_4h.weight": ((c.intermediate_size, h), vt),
        p + "linear_proj.dense_4h_to_h.weight": ((h, c.intermediate_size), vt),
        p + "boi": ((1, 1, h), F16), p + "eoi": ((1, 1, h), F16)})
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

    def unpack(self, fmt: struct.Struct, what: str) -> tuple[Any, ...]:
        return fmt.unpack(self.take(fmt.size, what))

    def int32(self, what: str) -> int:
        return int(struct.unpack("<i", self.take(4, what))[0])


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
    if model_type not in SERVED:
        name = MODEL_TYPE_NAMES.get(model_type, f"unknown type {model_type}")
        raise ModelFileError(f"a {name} model; aigate serves ChatGLM2, ChatGLM3, GLM-4 and GLM-4V models")
    version = r.int32("header")
    if version == 1 and model_type in (CHATGLM2, CHATGLM3):
        dtype, vocab, hidden, heads, layers, ffn, max_len, _bos, eos, _pad, _sep, kv = r.unpack(CONFIG_V1, "config")
        virtual = 0
    elif version == 2:
        dtype, vocab, hidden, heads, kv, layers, ffn, _eps, virtual, _theta, max_len, eos, _pad = r.unpack(
            CONFIG_V2, "config")
    else:
        raise ModelFileError(f"config version {version} is unknown (chatglm.cpp reads 1 and 2, GLM-4 only 2)")
    config = ModelConfig(dtype, vocab, hidden, heads, kv, layers, ffn, virtual, max_len, eos)
    _check_config(config)
    vision = _read_vision(r) if model_type == CHATGLM4V else None

    size = r.int32("tokenizer")
    span = (r.pos, size)
    tokenizer = bytes(r.take(size, "tokenizer"))
    pieces = (len(read_tiktoken_vocab(tokenizer)) if model_type in (CHATGLM4, CHATGLM4V)
              else _sentencepiece_size(tokenizer))
    specials = len(FAMILY_SPECIAL_TOKENS[model_type])
    if vocab < pieces + specials:
        raise ModelFileError(f"vocab_size {vocab} is smaller than the tokenizer's {pieces} pieces "
                             f"+ {specials} special tokens")
    if not 0 <= eos < pieces + specials:
        raise ModelFileError(f"eos_token_id {eos} is not a tokenizer piece")

    _check_tensors(r, config, vision)
    return ModelFile(p, config, pieces, model_type, vision, span)


def read_tokenizer_vocab(model: ModelFile) -> list[bytes]:
    """A GLM-4 file's token bytes by id (what the engine's byte-level detokenizer reads)."""
    return read_tiktoken_vocab(_tokenizer_blob(model))


def read_sentencepiece(model: ModelFile) -> sentencepiece.SentencePieceProcessor:
    """A ChatGLM2/3 file's tokenizer, the sentencepiece model chatglm.cpp loads from it."""
    return _sentencepiece(_tokenizer_blob(model))


def _tokenizer_blob(model: ModelFile) -> bytes:
    offset, size = model.tokenizer_span
    with open(model.path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def _sentencepiece(proto: bytes) -> sentencepiece.SentencePieceProcessor:
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(proto)
    except (RuntimeError, OSError) as exc:
        raise ModelFileError(f"the tokenizer is corrupt ({exc})") from None
    return sp


def _sentencepiece_size(proto: bytes) -> int:
    return int(_sentencepiece(proto).get_piece_size())


def read_tiktoken_vocab(text: bytes) -> list[bytes]:
    """GLM-4's tokenizer: one ``base64(token bytes) rank`` line per token, ranks exactly 0..N-1
    (chatglm.cpp numbers the special tokens from N on). Returns the token bytes by id."""
    tokens: dict[int, bytes] = {}
    for number, line in enumerate(text.split(b"\n"), 1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            token, rank = binascii.a2b_base64(fields[0], strict_mode=True), int(fields[1])
            if len(fields) != 2 or rank in tokens or not token:
                raise ValueError
        except (ValueError, IndexError, binascii.Error):
            raise ModelFileError(f"the tokenizer is corrupt (line {number} is not 'base64 rank')") from None
        tokens[rank] = token
    if sorted(tokens) != list(range(len(tokens))) or not tokens:
        raise ModelFileError("the tokenizer is corrupt (its ranks are not 0..N-1)")
    return [tokens[i] for i in range(len(tokens))]


def _read_vision(r: _Reader) -> VisionConfig:
    dtype, hidden, image, channels, ffn, _eps, heads, layers, positions, patch, _scale = r.unpack(
        VISION_CONFIG, "vision config")
    v = VisionConfig(dtype, hidden, image, channels, ffn, heads, layers, positions, patch)
    if dtype not in GGML_TYPES:
        raise ModelFileError(f"vision weight type {dtype} is unknown")
    if min(hidden, image, channels, ffn, heads, layers, patch) <= 0 or hidden % heads or (hidden // heads) % 4:
        raise ModelFileError("the vision config is corrupt (sizes not positive, or heads do not divide it)")
    if channels != 3 or image % (2 * patch) or positions != (image // patch) ** 2 + 1:
        raise ModelFileError("the vision config is inconsistent (3 channels, a patch grid of even size, "
                             "one position per patch + 1)")
    return v


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
    if (c.hidden_size // c.num_attention_heads) % 4:  # chatglm.cpp aborts on such a head size
        raise ModelFileError("config head size (hidden_size / num_attention_heads) is not a multiple of 4")
    if c.num_virtual_tokens < 0:
        raise ModelFileError("config num_virtual_tokens is negative")


def _check_tensors(r: _Reader, config: ModelConfig, vision: VisionConfig | None) -> None:
    expected = expected_tensors(config, vision)
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
        if name not in expected:
            raise ModelFileError(f"unexpected tensor {name!r} (not a weight of this model family, or a corrupt name)")
        want_shape, want_type = expected[name]
        if ggml_type != want_type:
            raise ModelFileError(f"tensor {name} has type {ggml_type}, expected {want_type}")
        if name in seen:
            raise ModelFileError(f"tensor {name} appears twice")
        if any(d <= 0 for d in shape):
            raise ModelFileError(f"tensor {name} has an empty dimension")
        # chatglm.cpp copies a weight by its byte size whatever its shape (convert.py writes the checkpoint's,
        # GLM-4V's [1, hidden] class embedding for chatglm.cpp's [hidden]); it views the prefix by its shape.
        if name == PREFIX:
            if shape != want_shape:
                raise ModelFileError(f"tensor {name} has shape {list(shape)}, the config implies {list(want_shape)}")
        elif tensor_nbytes(shape, ggml_type) != tensor_nbytes(want_shape, want_type):
            raise ModelFileError(f"tensor {name} has shape {list(shape)} ({tensor_nbytes(shape, ggml_type)} bytes), "
                                 f"the config implies {list(want_shape)} "
                                 f"({tensor_nbytes(want_shape, want_type)} bytes)")
        seen.add(name)
        start = (r.pos + ALIGN - 1) // ALIGN * ALIGN
        r.pos = start
        r.take(tensor_nbytes(shape, ggml_type), f"data of tensor {name}")
    missing = [n for n in expected if n not in seen]
    if missing:
        raise ModelFileError(f"{len(missing)} tensors are missing, first {missing[0]} (truncated file?)")
