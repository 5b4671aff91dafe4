"""Incremental decoding with the demo model's real tokenizer (chatglm.cpp's sentencepiece)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.chatglm.engine.model import Detokenizer


@pytest.fixture(scope="module")
def tokenizer(demo_model):
    import chatglm_cpp

    return chatglm_cpp.Pipeline(str(demo_model)).tokenizer


PIECES = 1000  # the demo tokenizer's size (checked below): ids 3.. are bytes and ordinary pieces


def test_pieces(tokenizer, demo_model):
    from backends.chatglm.ggml_file import read_model_file

    assert read_model_file(demo_model).tokenizer_pieces == PIECES


def run(tokenizer, ids):
    d = Detokenizer(tokenizer.decode)
    parts = [d.add(i) for i in ids]
    return parts, "".join(parts) + d.flush()


def test_spaces_between_words_survive(tokenizer):
    ids = tokenizer.encode("the quick brown fox", 100)[2:]
    parts, text = run(tokenizer, ids)
    assert text == tokenizer.decode(ids) == "the quick brown fox"
    assert all(parts)


def test_multibyte_characters_wait_for_their_last_byte(tokenizer):
    ids = tokenizer.encode("é", 100)[2:]  # byte fallback: <0xC3> <0xA9>
    assert len(ids) >= 2
    parts, text = run(tokenizer, ids)
    assert text.endswith("é") and "\ufffd" not in "".join(parts)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(3, PIECES - 1), max_size=30))
def test_pieces_add_up_to_the_whole_decode(tokenizer, ids):
    assert run(tokenizer, ids)[1] == tokenizer.decode(ids)
