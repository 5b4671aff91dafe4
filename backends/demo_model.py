"""Write a small random-weight ChatGLM3 GGML model: aigate's embedded default and test model.

Real weights cannot ship with aigate, but the whole server path (tokenizer, chat template,
chatglm.cpp's forward pass, sampling, the GGML loader) can still run for real on a model made
here: a sentencepiece tokenizer trained on the text below, and weights drawn so that greedy
decoding walks a long chain of tokens (so answers read as varied words, not one repeated token)
and, by default, reaches end-of-text after a sentence or so.
"""

from __future__ import annotations

import io
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import sentencepiece

from backends.ggml_file import (ALIGN, CHATGLM3, CONFIG_V2, F16, MAGIC, SPECIAL_TOKENS, ModelConfig,
                                expected_tensors)

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


def make_weights(c: ModelConfig, sp: sentencepiece.SentencePieceProcessor, *, eos_every: int,
                 end_token: int, seed: int, script: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
    """Random weights whose greedy decoding follows a chain through the ordinary pieces.

    The residual stream carries each token's embedding to the output layer, whose row for token
    s(t) is the embedding of t: so the most likely next token after t is s(t), nudged by the
    (random, not tiny) attention layers, which makes the answer depend on the whole prompt.
    s walks every ordinary piece once; every ``eos_every``-th step goes to ``end_token`` instead
    (end-of-text, or a padding id to test the server's guard; ``eos_every`` 0: never, for long
    generations). Padding ids get a zero row, so they never win greedily.
    """
    rng = np.random.default_rng(seed)
    pieces = sp.get_piece_size()
    emb = rng.standard_normal((c.vocab_size, c.hidden_size)).astype(np.float32)
    ordinary = [i for i in range(pieces) if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i))]
    chain = rng.permutation(ordinary)
    out = np.zeros((c.vocab_size, c.hidden_size), np.float32)
    for i, tok in enumerate(chain):
        ends = eos_every and (i + 1) % eos_every == 0
        out[end_token if ends else chain[(i + 1) % len(chain)]] += emb[tok]
    # After the prompt's last token (<|assistant|>) and the other specials, start somewhere on the chain.
    for special in range(pieces, pieces + len(SPECIAL_TOKENS)):
        out[chain[rng.integers(len(chain))]] += emb[special]
    # A script: what the model says after <|assistant|>, whatever the prompt (each of its tokens
    # must be unique), drawn much stronger than the chain so that it always wins.
    if script:
        assistant = pieces + SPECIAL_TOKENS.index("<|assistant|>")
        for a, b in zip((assistant, *script), script):
            out[b] += 6 * emb[a]
    out *= 0.08

    weights: dict[str, np.ndarray] = {}
    for name, (shape, _type) in expected_tensors(c).items():
        if name.endswith("word_embeddings.weight"):
            weights[name] = emb
        elif name.endswith("output_layer.weight"):
            weights[name] = out
        elif len(shape) == 1:
            weights[name] = np.full(shape, 1.0 if "layernorm" in name else 0.0, np.float32)
        else:
            weights[name] = (rng.standard_normal(shape) * (1.5 / np.sqrt(shape[1]))).astype(np.float32)
    return weights


def write_demo_model(
    path: str | os.PathLike[str],
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    ffn_size: int = 256,
    max_length: int = 1024,
    eos_every: int = DEFAULT_EOS_EVERY,
    end_with_padding: bool = False,
    script: tuple[str, ...] = (),
    vocab_size: int | None = None,
    seed: int = 0,
) -> Path:
    """Write the model atomically (a reader never sees half a file) and return its path."""
    proto = train_tokenizer(extra_pieces=tuple(p for p in script if not p.startswith("<|")))
    sp = sentencepiece.SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto)
    pieces = sp.get_piece_size()
    vocab = max(vocab_size or 0, -(-(pieces + len(SPECIAL_TOKENS)) // PAD_TO) * PAD_TO)  # padded, as real models
    config = ModelConfig(F16, vocab, hidden_size, num_heads, num_kv_heads, num_layers, ffn_size, 0, max_length,
                         sp.eos_id())
    end_token = vocab - 1 if end_with_padding else sp.eos_id()
    script_ids = tuple(sp.piece_to_id(p) if not p.startswith("<|") else pieces + SPECIAL_TOKENS.index(p)
                       for p in script)
    if len(set(script_ids)) != len(script_ids):
        raise ValueError("a script's pieces must all differ: the model picks the next token from the last one")
    weights = make_weights(config, sp, eos_every=eos_every, end_token=end_token, seed=seed, script=script_ids)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + struct.pack("<ii", CHATGLM3, 2))
            f.write(CONFIG_V2.pack(F16, vocab, hidden_size, num_heads, num_kv_heads, num_layers, ffn_size,
                                   1e-5, 0, 10000.0, max_length, sp.eos_id(), sp.pad_id() if sp.pad_id() >= 0 else 0))
            f.write(struct.pack("<i", len(proto)) + proto)
            for name, (shape, ggml_type) in expected_tensors(config).items():
                data = weights[name].astype(np.float16 if ggml_type == F16 else np.float32)
                encoded = name.encode()
                f.write(struct.pack(f"<i{len(encoded)}si", len(encoded), encoded, len(shape)))
                f.write(struct.pack(f"<{len(shape) + 1}i", *shape, ggml_type))
                f.write(b"\0" * (-f.tell() % ALIGN))
                f.write(data.tobytes())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
