"""Write a small random-weight GGML model of any family aigate serves (ChatGLM3 by default:
aigate's embedded default and test model; ChatGLM2, GLM-4 and GLM-4V for their tests and benches),
laid out as chatglm.cpp's convert.py writes a real one (its order, each tensor its checkpoint's shape).

Real weights cannot ship with aigate, but the whole server path (tokenizer, chat template,
chatglm.cpp's forward pass, sampling, the GGML loader) can still run for real on a model made
here: a tokenizer trained on the text below (sentencepiece for ChatGLM2/3; for GLM-4 a byte-level
BPE of our own in tiktoken's file format), and weights drawn so that greedy decoding walks a long
chain of tokens (so answers read as varied words, not one repeated token) and, by default,
reaches end-of-text after a sentence or so.
"""

from __future__ import annotations

import base64
import io
import itertools
import os
import re
import string
import struct
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece

from backends.chatglm.ggml_file import (
    ALIGN,
    CHATGLM2,
    CHATGLM3,
    CHATGLM4,
    CHATGLM4V,
    CONFIG_V2,
    F16,
    FAMILY_SPECIAL_TOKENS,
    MAGIC,
    Q4_0,
    Q8_0,
    VISION_CONFIG,
    ModelConfig,
    VisionConfig,
    expected_tensors,
)
from backends.chatglm.ggml_quants import encode

CORPUS = """\
aigate is a small server that speaks the OpenAI API and answers with a model that runs on your own machine.
It streams every token as soon as the model writes it, and it counts the tokens of the prompt and the answer.
The quick brown fox jumps over the lazy dog while the cat sleeps near the warm window in the afternoon sun.
A river runs through the old town, past the market, the library, the bakery and the small stone bridge.
People ask questions about science, history, music, cooking, travel, programming and the weather tomorrow.
Python is a programming language that lets you work quickly and integrate systems more effectively.
The answer depends on the question: sometimes it is short, sometimes it takes a few sentences to explain.
Mountains, forests, lakes and deserts cover the land; oceans and seas cover most of the planet.
Numbers like one, two, three, four, five, six, seven, eight, nine and ten are easy to count.
Hello! How are you today? I am fine, thank you. What would you like to know about the world?
The train leaves the station at nine in the morning and arrives in the city before noon.
Good software is simple, tested, fast and pleasant to use; bad software surprises its users.
你好，我是一个运行在你自己电脑上的语言模型。今天天气很好，我们去公园散步吧。
人工智能可以回答问题、写文章、翻译语言，也可以帮助程序员写代码。
北京是中国的首都，上海是一个很大的城市，长江是中国最长的河流。
我喜欢读书、听音乐、喝茶和学习新的知识。这个模型的权重是随机的，所以它说的话没有意义。
春天花开，夏天下雨，秋天叶落，冬天下雪。一年有四个季节，每个季节都很美。
请把真正的模型文件路径写进配置，然后重新启动服务器。
"""

# The context of the demo model aigate writes when no backend is configured: what today's agents need
# (Codex CLI's first prompt is ~20,700 tokens, Claude Code's ~20,000). It costs little: no position table
# (RoPE), and the KV cache of the small architecture is 512 bytes a token (16 MB for the whole context).
DEMO_MAX_LENGTH = 32768
PAD_TO = 64  # round the vocabulary up like real ChatGLM3 (65024): ids past the tokenizer are padding
DEFAULT_EOS_EVERY = 96  # end-of-text after at most this many tokens of the chain: answers of a sentence or two


def train_tokenizer(vocab_size: int = 1000, extra_pieces: tuple[str, ...] = ()) -> bytes:
    """A BPE sentencepiece model with byte fallback, trained on CORPUS (deterministic). Like
    ChatGLM3's, it keeps text as written (no normalisation, no space added in front), so newlines
    and spaces survive a round trip: ChatGLM3's turns and tool calls are line-based."""
    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines() * 4),
        model_writer=out,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        hard_vocab_limit=False,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        user_defined_symbols=["\n", *extra_pieces],
        num_threads=1,
        minloglevel=2,
    )
    return out.getvalue()


@dataclass(frozen=True)
class Tokenizer:
    """What the writer needs of a trained tokenizer."""

    blob: bytes  # as stored in the file
    pieces: int  # ordinary ids 0..pieces-1; the family's special tokens follow
    ordinary: list[int]  # ids a chain may walk: whole pieces of text (no bytes, controls or unknown)
    ids: dict[str, int]  # piece text -> id, for scripts
    eos: int
    pad: int


def synthetic_pieces(count: int) -> list[str]:
    """Made-up pieces for a vocabulary of real size (a bench of the grammar's token mask, whose cost grows
    with the number of distinct tokens): CJK characters, and words of 2-4 letters bare, after a space and
    capitalised, interleaved."""
    def words() -> Iterator[str]:
        return ("".join(p) for n in (2, 3, 4) for p in itertools.product(string.ascii_lowercase, repeat=n))

    kinds = [(chr(0x4E00 + i) for i in range(20_000)), (" " + w for w in words()), words(),
             (w.title() for w in words())]
    pool = (p for group in itertools.zip_longest(*kinds) for p in group if p is not None)
    return list(itertools.islice(pool, count))


def sentencepiece_tokenizer(extra_pieces: tuple[str, ...], vocab_pieces: int = 0) -> Tokenizer:
    proto = train_tokenizer(extra_pieces=extra_pieces)
    sp = sentencepiece.SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto)
    known = {sp.id_to_piece(i) for i in range(sp.get_piece_size())}
    pool = [p.replace(" ", "\u2581") for p in synthetic_pieces(2 * vocab_pieces)] if vocab_pieces else []
    pool = [p for p in pool if p not in known]
    more = 0
    for _ in range(4):  # the pieces added leave fewer merges to learn: add what is still missing
        if sp.get_piece_size() >= vocab_pieces:
            break
        more += vocab_pieces - sp.get_piece_size()
        proto = train_tokenizer(vocab_pieces, (*extra_pieces, *pool[:more]))
        sp.LoadFromSerializedProto(proto)
    pieces = sp.get_piece_size()
    ordinary = [i for i in range(pieces) if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i))]
    return Tokenizer(proto, pieces, ordinary, {sp.id_to_piece(i): i for i in range(pieces)}, sp.eos_id(),
                     max(sp.pad_id(), 0))


# Pre-tokenisation for training only (chatglm.cpp splits with GLM-4's own RE2 pattern when encoding).
_WORDS = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d{1,3}| ?[^\s\w]+[\r\n]*|\s*[\r\n]+|\s+")


def train_bpe(merges: int = 700, extra_tokens: tuple[str, ...] = ()) -> list[bytes]:
    """A byte-level BPE in tiktoken's sense, trained on CORPUS (deterministic): the 256 bytes, then
    each merge of the most frequent adjacent pair, in order (a token's rank is its id), then
    ``extra_tokens`` (a script's pieces) that the merges did not make."""
    words = Counter(tuple(bytes([b]) for b in w.encode()) for w in _WORDS.findall(CORPUS))
    vocab = [bytes([b]) for b in range(256)]
    known = set(vocab)
    for _ in range(merges):
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        (a, b), _count = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        vocab.append(a + b)
        known.add(a + b)
        merged: Counter[tuple[bytes, ...]] = Counter()
        for word, n in words.items():
            out: list[bytes] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    vocab += [t.encode() for t in dict.fromkeys(extra_tokens) if t.encode() not in known]
    return vocab


def bpe_tokenizer(extra_pieces: tuple[str, ...], vocab_pieces: int = 0) -> Tokenizer:
    vocab = train_bpe(extra_tokens=extra_pieces)
    if vocab_pieces:  # appended after the merges, as a script's pieces are
        known = set(vocab)
        more = [p.encode() for p in synthetic_pieces(vocab_pieces + len(known)) if p.encode() not in known]
        vocab += more[:max(vocab_pieces - len(vocab), 0)]
    blob = b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(vocab))
    ids, ordinary = {}, []
    for i, t in enumerate(vocab):
        try:
            text = t.decode()
        except UnicodeDecodeError:  # part of a character: decodes only beside its other bytes
            continue
        ids[text] = i
        if text.isprintable() or text == "\n":
            ordinary.append(i)
    return Tokenizer(blob, len(vocab), ordinary, ids, eos=len(vocab), pad=len(vocab))  # <|endoftext|>


# Weights are drawn and written a slice of rows at a time (about 4 MB of float32), so that a model of real
# size (a 6B-shaped bench model is 24 GB as float32) is written without holding more than its two vocabulary
# tables in memory. The draws are the same as one whole-tensor draw: numpy's generator fills sequentially.
CHUNK_VALUES = 1 << 20

Chunks = Iterator[np.ndarray]


def _row_chunks(shape: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
    """The shapes of the slices of rows (along the first axis) that a tensor is drawn in."""
    per_row = int(np.prod(shape[1:]))
    step = max(1, CHUNK_VALUES // max(per_row, 1))
    for start in range(0, shape[0], step):
        yield (min(step, shape[0] - start), *shape[1:])


def _slices(table: np.ndarray) -> Chunks:
    """A held table in slices of rows, so that encoding it needs no full-size temporaries."""
    at = 0
    for part in _row_chunks(table.shape):
        yield table[at:at + part[0]]
        at += part[0]


def _normal_table(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    table = np.empty(shape, np.float32)
    at = 0
    for part in _row_chunks(shape):
        table[at:at + part[0]] = rng.standard_normal(part)
        at += part[0]
    return table


def make_weights(c: ModelConfig, tok: Tokenizer, specials: tuple[str, ...], *, eos_every: int,
                 end_token: int, seed: int, script: tuple[int, ...] = (),
                 vision: VisionConfig | None = None) -> Iterator[tuple[str, Chunks]]:
    """Random weights whose greedy decoding follows a chain through the ordinary pieces: (name, its float32
    values in slices of rows) in the order they are drawn; take each tensor's slices before the next tensor.

    The residual stream carries each token's embedding to the output layer, whose row for token
    s(t) is the embedding of t: so the most likely next token after t is s(t), nudged by the
    (random, not tiny) attention layers, which makes the answer depend on the whole prompt.
    s walks every ordinary piece once; every ``eos_every``-th step goes to ``end_token`` instead
    (end-of-text, or a padding id to test the server's guard; ``eos_every`` 0: never, for long
    generations). Padding ids get a zero row, so they never win greedily.
    """
    rng = np.random.default_rng(seed)
    pieces = tok.pieces
    emb = _normal_table(rng, (c.vocab_size, c.hidden_size))
    chain = rng.permutation(tok.ordinary)
    out = np.zeros((c.vocab_size, c.hidden_size), np.float32)
    for i, piece in enumerate(chain):
        ends = eos_every and (i + 1) % eos_every == 0
        out[end_token if ends else chain[(i + 1) % len(chain)]] += emb[piece]
    # After the prompt's last token (<|assistant|>) and the other specials, start somewhere on the chain.
    for special in range(pieces, pieces + len(specials)):
        out[chain[rng.integers(len(chain))]] += emb[special]
    # A script: what the model says after <|assistant|>, whatever the prompt (each of its tokens
    # must be unique), drawn much stronger than the chain so that it always wins.
    if script:
        assistant = pieces + specials.index("<|assistant|>")
        for a, b in zip((assistant, *script), script):
            out[b] += 6 * emb[a]
    out *= 0.08

    def drawn(shape: tuple[int, ...]) -> Chunks:
        scale = 1.5 / np.sqrt(int(np.prod(shape[1:])))
        for part in _row_chunks(shape):
            yield (rng.standard_normal(part) * scale).astype(np.float32)

    tensors = expected_tensors(c, vision)
    # Drawn text first, then the vision tower (the order these weights were first drawn in), though
    # the file holds them in convert.py's order.
    for name in sorted(tensors, key=lambda n: n.startswith("transformer.vision.")):
        shape = tensors[name][0]
        if name.endswith("word_embeddings.weight"):
            yield name, _slices(emb)
        elif name.endswith("output_layer.weight"):
            yield name, _slices(out)
        elif all(d == 1 for d in shape[:-1]):  # a vector, though the checkpoint's may be [1, n] or [1, 1, n]
            norm = ("layernorm" in name or "norm1" in name) and name.endswith("weight")
            yield name, iter([np.full(shape, 1.0 if norm else 0.0, np.float32)])
        else:
            yield name, drawn(shape)


def in_file_order(drawn: Iterator[tuple[str, Chunks]], order: list[str]) -> Iterator[tuple[str, Chunks]]:
    """The drawn tensors in the file's order: each passed on as drawn when it is the next to write, else held
    until its turn (only GLM-4V's text weights wait, for its vision tower, and its demo models are small)."""
    waiting: dict[str, list[np.ndarray]] = {}
    want = iter(order)
    next_name = next(want, None)
    for name, chunks in drawn:
        if name != next_name:
            waiting[name] = list(chunks)
            continue
        yield name, chunks
        next_name = next(want, None)
        while next_name in waiting:
            yield next_name, iter(waiting.pop(next_name))
            next_name = next(want, None)
    if next_name is not None or waiting:
        raise AssertionError("the drawn tensors are not the file's tensors")


WEIGHT_TYPES = {"f16": F16, "q8_0": Q8_0, "q4_0": Q4_0}
FAMILY_IDS = {"chatglm2": CHATGLM2, "chatglm3": CHATGLM3, "glm4": CHATGLM4, "glm4v": CHATGLM4V}
# A GLM-4V vision tower as small as chatglm.cpp runs: a 56 px image in 14 px patches, 4 image tokens.
SMALL_VISION = dict(hidden_size=64, image_size=56, in_channels=3, intermediate_size=128, num_attention_heads=4,
                    num_hidden_layers=1, patch_size=14)


def write_demo_model(
    path: str | os.PathLike[str],
    *,
    family: str = "chatglm3",
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    ffn_size: int = 256,
    max_length: int = DEMO_MAX_LENGTH,
    eos_every: int = DEFAULT_EOS_EVERY,
    end_with_padding: bool = False,
    script: tuple[str, ...] = (),
    vocab_size: int | None = None,
    vocab_pieces: int = 0,
    seed: int = 0,
    dtype: str = "f16",
) -> Path:
    """Write the model atomically (a reader never sees half a file) and return its path. ``vocab_pieces``:
    the tokenizer's ordinary pieces made up to about this many with synthetic ones (a bench's real-size
    vocabulary; without it ~1,000 pieces are padded to ``vocab_size``, which a grammar's mask never sees).
    ``dtype``: the matrices' type, f16 or ggml's q8_0 or q4_0 blocks (the same draws, quantized as convert.py
    quantizes: every 2-D weight, the embeddings too; norms and biases stay f32)."""
    model_type = FAMILY_IDS[family]
    weight_type = WEIGHT_TYPES[dtype]
    specials = FAMILY_SPECIAL_TOKENS[model_type]
    extra = tuple(p for p in script if p not in specials)
    tok = (bpe_tokenizer(extra, vocab_pieces) if model_type in (CHATGLM4, CHATGLM4V)
           else sentencepiece_tokenizer(extra, vocab_pieces))
    pieces = tok.pieces
    vocab = max(vocab_size or 0, -(-(pieces + len(specials)) // PAD_TO) * PAD_TO)  # padded, as real models
    config = ModelConfig(weight_type, vocab, hidden_size, num_heads, num_kv_heads, num_layers, ffn_size, 0, max_length,
                         tok.eos)
    vision = None
    if model_type == CHATGLM4V:
        v = SMALL_VISION
        positions = (v["image_size"] // v["patch_size"]) ** 2 + 1
        vision = VisionConfig(weight_type, v["hidden_size"], v["image_size"], v["in_channels"], v["intermediate_size"],
                              v["num_attention_heads"], v["num_hidden_layers"], positions, v["patch_size"])
    end_token = vocab - 1 if end_with_padding else tok.eos
    script_ids = tuple(pieces + specials.index(p) if p in specials else tok.ids[p] for p in script)
    if len(set(script_ids)) != len(script_ids):
        raise ValueError("a script's pieces must all differ: the model picks the next token from the last one")
    weights = make_weights(config, tok, specials, eos_every=eos_every, end_token=end_token, seed=seed,
                           script=script_ids, vision=vision)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + struct.pack("<ii", model_type, 2))
            f.write(CONFIG_V2.pack(weight_type, vocab, hidden_size, num_heads, num_kv_heads, num_layers, ffn_size,
                                   1e-5, 0, 10000.0, max_length, tok.eos, tok.pad))
            if vision is not None:
                f.write(VISION_CONFIG.pack(vision.dtype, vision.hidden_size, vision.image_size, vision.in_channels,
                                           vision.intermediate_size, 1e-6, vision.num_attention_heads,
                                           vision.num_hidden_layers, vision.num_positions, vision.patch_size, 8.0))
            f.write(struct.pack("<i", len(tok.blob)) + tok.blob)
            tensors = expected_tensors(config, vision)
            for name, chunks in in_file_order(weights, list(tensors)):
                shape, ggml_type = tensors[name]
                encoded = name.encode()
                f.write(struct.pack(f"<i{len(encoded)}si", len(encoded), encoded, len(shape)))
                f.write(struct.pack(f"<{len(shape) + 1}i", *shape, ggml_type))
                f.write(b"\0" * (-f.tell() % ALIGN))
                for chunk in chunks:
                    f.write(encode(chunk, ggml_type).data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
