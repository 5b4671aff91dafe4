"""A ChatGLM2/3 GGML file (chatglm.cpp's format) as a GGUF file for llama.cpp's `chatglm` architecture: the same
weights, byte for byte (the block formats are ggml's in both), under llama.cpp's tensor names, with the tokenizer's
pieces as an SPM vocabulary padded to the model's rows. For benchmark 13, so that llama.cpp runs the very model
chatglm.cpp runs; not a general converter (no GLM-4 tokenizer, no P-tuning prefix).

    python bench/ggml_to_gguf.py MODEL.bin OUT.gguf
"""

from __future__ import annotations

import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from common import ROOT  # noqa: F401  (puts the project's root on sys.path)

from backends.chatglm.ggml_file import (
    ALIGN,
    CHATGLM2,
    CHATGLM3,
    FAMILY_SPECIAL_TOKENS,
    ModelFile,
    read_model_file,
    read_sentencepiece,
    tensor_nbytes,
)

GGUF_ALIGN = 32
U32, I32, F32, BOOL, STRING, ARRAY = 4, 5, 6, 7, 8, 9
NORMAL, UNKNOWN, CONTROL, UNUSED, BYTE = 1, 2, 3, 5, 6

NAMES = {
    "transformer.embedding.word_embeddings.weight": "token_embd.weight",
    "transformer.encoder.final_layernorm.weight": "output_norm.weight",
    "transformer.output_layer.weight": "output.weight",
}
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attention.query_key_value.weight": "attn_qkv.weight",
    "self_attention.query_key_value.bias": "attn_qkv.bias",
    "self_attention.dense.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.dense_h_to_4h.weight": "ffn_up.weight",  # gate rows then up rows: the order llama.cpp's SwiGLU splits
    "mlp.dense_4h_to_h.weight": "ffn_down.weight",
}


def gguf_name(name: str) -> str:
    if name in NAMES:
        return NAMES[name]
    prefix = "transformer.encoder.layers."
    layer, _, rest = name.removeprefix(prefix).partition(".")
    return f"blk.{layer}.{LAYER_NAMES[rest]}"


def tensors(model: ModelFile) -> Iterator[tuple[str, tuple[int, ...], int, int]]:
    """(name, shape in torch order, ggml type, data offset) of each tensor, in file order."""
    with open(model.path, "rb") as f:
        offset, size = model.tokenizer_span
        f.seek(offset + size)
        end = os.fstat(f.fileno()).st_size
        while f.tell() < end:
            (length,) = struct.unpack("<i", f.read(4))
            name = f.read(length).decode()
            (ndim,) = struct.unpack("<i", f.read(4))
            *shape, ggml_type = struct.unpack(f"<{ndim + 1}i", f.read(4 * (ndim + 1)))
            data = (f.tell() + ALIGN - 1) // ALIGN * ALIGN
            yield name, tuple(shape), ggml_type, data
            f.seek(data + tensor_nbytes(tuple(shape), ggml_type))


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def _kv(key: str, kind: int, value: object) -> bytes:
    out = _string(key) + struct.pack("<I", kind)
    if kind == STRING:
        return out + _string(str(value))
    if kind == ARRAY:
        item_kind, items = value  # type: ignore[misc]
        out += struct.pack("<IQ", item_kind, len(items))
        if item_kind == STRING:
            return out + b"".join(_string(s) for s in items)
        return out + struct.pack(f"<{len(items)}{'f' if item_kind == F32 else 'i'}", *items)
    return out + struct.pack({U32: "<I", I32: "<i", F32: "<f", BOOL: "<?"}[kind], value)


def vocabulary(model: ModelFile) -> tuple[list[str], list[float], list[int]]:
    sp = read_sentencepiece(model)
    pieces, scores, kinds = [], [], []
    for i in range(sp.get_piece_size()):
        pieces.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        kinds.append(BYTE if sp.is_byte(i) else CONTROL if sp.is_control(i) else UNKNOWN if sp.is_unknown(i)
                     else NORMAL)
    for special in FAMILY_SPECIAL_TOKENS[model.model_type]:
        pieces.append(special)
        scores.append(0.0)
        kinds.append(CONTROL)
    while len(pieces) < model.config.vocab_size:  # the rows past the tokenizer (never chosen: zero logits)
        pieces.append(f"[PAD{len(pieces)}]")
        scores.append(0.0)
        kinds.append(UNUSED)
    return pieces, scores, kinds


def convert(source: Path, out: Path) -> Path:
    model = read_model_file(source)
    if model.model_type not in (CHATGLM2, CHATGLM3) or model.config.num_virtual_tokens:
        raise SystemExit("only ChatGLM2/3 files without a prefix")
    c = model.config
    head = c.hidden_size // c.num_attention_heads
    pieces, scores, kinds = vocabulary(model)
    arch = "chatglm"
    meta = [
        _kv("general.architecture", STRING, arch),
        _kv("general.name", STRING, source.stem),
        _kv("general.alignment", U32, GGUF_ALIGN),
        _kv(f"{arch}.context_length", U32, c.max_length),
        _kv(f"{arch}.embedding_length", U32, c.hidden_size),
        _kv(f"{arch}.feed_forward_length", U32, c.intermediate_size),
        _kv(f"{arch}.block_count", U32, c.num_hidden_layers),
        _kv(f"{arch}.attention.head_count", U32, c.num_attention_heads),
        _kv(f"{arch}.attention.head_count_kv", U32, c.num_key_value_heads),
        _kv(f"{arch}.attention.layer_norm_rms_epsilon", F32, 1e-5),
        _kv(f"{arch}.rope.dimension_count", U32, head // 2),  # ChatGLM ropes half of each head
        _kv(f"{arch}.rope.freq_base", F32, 10000.0),
        _kv("tokenizer.ggml.model", STRING, "llama"),
        _kv("tokenizer.ggml.tokens", ARRAY, (STRING, pieces)),
        _kv("tokenizer.ggml.scores", ARRAY, (F32, scores)),
        _kv("tokenizer.ggml.token_type", ARRAY, (I32, kinds)),
        _kv("tokenizer.ggml.eos_token_id", U32, c.eos_token_id),
        _kv("tokenizer.ggml.add_bos_token", BOOL, False),  # the benchmark sends token ids: nothing is added
    ]
    table = list(tensors(model))
    infos, offset = [], 0
    for name, shape, ggml_type, _data in table:
        ne = tuple(reversed(shape))
        infos.append(_string(gguf_name(name)) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, ggml_type, offset))
        offset += (tensor_nbytes(shape, ggml_type) + GGUF_ALIGN - 1) // GGUF_ALIGN * GGUF_ALIGN
    tmp = out.with_suffix(".tmp")
    with open(source, "rb") as src, open(tmp, "wb") as dst:
        dst.write(b"GGUF" + struct.pack("<IQQ", 3, len(table), len(meta)))
        dst.write(b"".join(meta) + b"".join(infos))
        _pad(dst)
        for _name, shape, ggml_type, data in table:
            src.seek(data)
            left = tensor_nbytes(shape, ggml_type)
            while left:
                block = src.read(min(left, 64 << 20))
                dst.write(block)
                left -= len(block)
            _pad(dst)
    os.replace(tmp, out)
    return out


def _pad(f: BinaryIO) -> None:
    f.write(b"\0" * (-f.tell() % GGUF_ALIGN))


if __name__ == "__main__":
    print(convert(Path(sys.argv[1]), Path(sys.argv[2])))
