"""ggml's block formats for weights, in numpy: a float32 matrix to the bytes of a Q4_0, Q8_0, F16 or F32
tensor, rounded as chatglm.cpp's convert.py quantizes (round half to even, like torch.round).

Q4_0: per 32 values an f16 scale d (the value of largest magnitude / -8) and 16 bytes of 4-bit codes
q = round(x / d + 8) in 0..15, value j in the low nibble of byte j and value j + 16 in its high nibble.
Q8_0: per 32 values an f16 scale d (largest magnitude / 127) and 32 int8 codes round(x / d).
Vectorised over whole blocks: a 6B-shaped file (3.5 GB of Q4_0) is written in minutes, not hours.
"""

from __future__ import annotations

import numpy as np

from backends.chatglm.ggml_file import F16, F32, GGML_TYPES, Q4_0, Q8_0

BLOCK = 32


def _blocks(x: np.ndarray) -> np.ndarray:
    if x.shape[-1] % BLOCK:
        raise ValueError(f"a row of {x.shape[-1]} values does not fill whole blocks of {BLOCK}")
    return np.ascontiguousarray(x, np.float32).reshape(-1, BLOCK)


def _scale_bytes(d: np.ndarray) -> np.ndarray:
    return d.astype(np.float16).view(np.uint8).reshape(-1, 2)


def quantize_q4_0(x: np.ndarray) -> np.ndarray:
    """The Q4_0 bytes of ``x`` (rows of whole blocks), 18 bytes a block."""
    b = _blocks(x)
    rows = np.arange(len(b))
    d = b[rows, np.abs(b).argmax(axis=1)] / np.float32(-8)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    q = np.clip(np.rint(b * inv[:, None] + np.float32(8)), 0, 15).astype(np.uint8)
    out = np.empty((len(b), 2 + BLOCK // 2), np.uint8)
    out[:, :2] = _scale_bytes(d)
    out[:, 2:] = q[:, :BLOCK // 2] | (q[:, BLOCK // 2:] << 4)
    return out


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """The Q8_0 bytes of ``x`` (rows of whole blocks), 34 bytes a block."""
    b = _blocks(x)
    d = np.abs(b).max(axis=1) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    out = np.empty((len(b), 2 + BLOCK), np.uint8)
    out[:, :2] = _scale_bytes(d)
    out[:, 2:] = np.clip(np.rint(b * inv[:, None]), -128, 127).astype(np.int8).view(np.uint8)
    return out


def encode(x: np.ndarray, ggml_type: int) -> np.ndarray:
    """``x`` as the bytes of a tensor of ``ggml_type`` (F32, F16, Q4_0 or Q8_0)."""
    if ggml_type == F32:
        return np.ascontiguousarray(x, np.float32).view(np.uint8)
    if ggml_type == F16:
        return np.ascontiguousarray(x, np.float16).view(np.uint8)
    if ggml_type == Q4_0:
        return quantize_q4_0(x)
    if ggml_type == Q8_0:
        return quantize_q8_0(x)
    raise ValueError(f"ggml type {ggml_type} is not one the demo writer encodes (known: {sorted(GGML_TYPES)})")


def dequantize(data: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 values a Q4_0 or Q8_0 tensor's bytes stand for (the tests' check of the encoder)."""
    size = GGML_TYPES[ggml_type][1]
    blocks = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8).reshape(-1, size)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    if ggml_type == Q4_0:
        qs = blocks[:, 2:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32) - 8
    elif ggml_type == Q8_0:
        q = blocks[:, 2:].view(np.int8).astype(np.float32)
    else:
        raise ValueError(f"ggml type {ggml_type} is not quantized")
    return (q * d).reshape(shape)
