"""Every token id's exact bytes, read from the model file, and the tokenizer object llguidance reads.

chatglm.cpp gives no vocabulary access, and its ``decode([id])`` is not a token's bytes (ChatGLM3 drops a
first piece's leading space and special-token text, ChatGLM2 rewrites punctuation beside CJK, byte pieces
decode to invalid UTF-8). The tokenizer blob chatglm.cpp loads is in the file, so the bytes come from it:
sentencepiece's pieces for ChatGLM2/3, the tiktoken ranks for GLM-4(V). Special tokens follow the pieces in
chatglm.cpp's numbering, as ``b"\\xff" + name`` (llguidance's mark of a special token: no grammar's text can
produce one); ids past them are padding, ``b""``, which llguidance never allows.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import sentencepiece

from backends.chatglm.ggml_file import (
    CHATGLM4,
    CHATGLM4V,
    FAMILY_SPECIAL_TOKENS,
    ModelFile,
    read_sentencepiece,
    read_tokenizer_vocab,
)

SPECIAL = b"\xff"
Encode = Callable[[str], list[int]]  # the model's own encoder: ordinary text -> ids, no special tokens


def token_bytes(file: ModelFile) -> list[bytes]:
    """The bytes of every id below ``config.vocab_size``."""
    pieces = (read_tokenizer_vocab(file) if file.model_type in (CHATGLM4, CHATGLM4V)
              else sentencepiece_bytes(read_sentencepiece(file)))
    tokens = pieces + [SPECIAL + name.encode() for name in FAMILY_SPECIAL_TOKENS[file.model_type]]
    return tokens + [b""] * (file.config.vocab_size - len(tokens))


def sentencepiece_bytes(sp: sentencepiece.SentencePieceProcessor) -> list[bytes]:
    """A sentencepiece model's pieces as bytes: ``<0xE4>`` byte pieces as that byte, ``▁`` as a space,
    control and unknown pieces (``<unk>``, ``<s>``, ``</s>``) as special tokens."""
    out = []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            out.append(bytes([int(piece[3:5], 16)]))
        elif sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            out.append(SPECIAL + piece.encode())
        else:
            out.append(piece.replace("\u2581", " ").encode())
    return out


class GrammarTokenizer:
    """What ``llguidance.TokenizerWrapper`` reads: the token bytes, the end ids, and an encoder of text
    written mid-answer (llguidance uses it only for forced tokens; masks depend on ``tokens`` alone).

    Real ChatGLM2/3 tokenizers add sentencepiece's dummy prefix: ``encode("abc")`` means " abc". As
    llguidance's own llama.cpp bridge does, text is encoded behind a sentinel (a control byte that is a
    token of its own and begins no other token) and the sentinel's ids are dropped, so the ids spell the
    text exactly. ``dummy_prefix`` says whether the model's encoder adds that space (a model then starts
    its turns with it: grammars allow it)."""

    bos_token_id = None

    def __init__(self, tokens: list[bytes], encode: Encode, end_ids: Collection[int]) -> None:
        self.tokens = tokens
        self.eos_token_id = min(end_ids)
        self.special_token_ids = [i for i, t in enumerate(tokens) if t.startswith(SPECIAL)]
        self._encode = encode
        self.dummy_prefix = self.spell(encode("a")) != b"a"
        self._sentinel = _sentinel(tokens)
        if self.spell(self(b"a")) != b"a" or self.spell(self(b" a\n")) != b" a\n":
            self._sentinel = None  # the encoder splits the sentinel oddly: encode plainly

    def spell(self, ids: list[int]) -> bytes:
        return b"".join(self.tokens[i] for i in ids)

    def __call__(self, text: bytes) -> list[int]:
        decoded = text.decode("utf-8", "replace")
        if self._sentinel is None:
            return self._encode(decoded)
        ids = self._encode(self._sentinel + decoded)
        mark = self._sentinel.encode()
        at = next((k for k, i in enumerate(ids) if self.tokens[i] == mark), None)
        return self._encode(decoded) if at is None else ids[at + 1:]


def _sentinel(tokens: list[bytes]) -> str | None:
    """A control byte that is a token and the start of no other token, or None."""
    starts: dict[int, int] = {}
    for t in tokens:
        if t and not t.startswith(SPECIAL):
            starts[t[0]] = starts.get(t[0], 0) + 1
    singles = {t[0] for t in tokens if len(t) == 1}
    return next((chr(b) for b in range(1, 32) if b in singles and starts.get(b) == 1), None)
