"""Token bytes against chatglm.cpp's own encoder, per family: the ids it gives any text spell that text
exactly; special tokens sit at chatglm.cpp's ids, marked special; padding is empty. And the grammar
tokenizer's sentinel encode, with and without a dummy prefix."""

from __future__ import annotations

import pytest

from backends.chatglm.demo_model import write_demo_model
from backends.chatglm.engine.model import Model
from backends.chatglm.engine.vocab import SPECIAL, GrammarTokenizer, token_bytes
from backends.chatglm.ggml_file import FAMILY_SPECIAL_TOKENS, read_model_file

TEXTS = ["hello world", "你好 🚀 Ünïcødé\n\n{\"a\": [1, true, null]}", " x", "\n", "tool_call(city=\"Paris\")",
         "\t\x01 \\u00e9 ~`|"]


@pytest.fixture(scope="module", params=["chatglm2_model", "demo_model", "glm4_model"])
def model(request) -> Model:
    return Model(read_model_file(request.getfixturevalue(request.param)), 256, slots=1)


def test_the_ids_of_any_text_spell_it_exactly(model):
    tokens = token_bytes(model.file)
    assert len(tokens) == model.file.config.vocab_size
    for text in TEXTS:
        assert b"".join(tokens[i] for i in model._encode(text)) == text.encode()


def test_special_tokens_are_marked_at_chatglm_cpps_ids_and_padding_is_empty(model):
    tokens = token_bytes(model.file)
    specials = FAMILY_SPECIAL_TOKENS[model.file.model_type]
    for name, i in model.file.special_token_ids.items():
        assert tokens[i] == SPECIAL + name.encode()
    assert all(tokens[i].startswith(SPECIAL) for i in model._end_ids)
    assert set(tokens[model.file.tokenizer_pieces + len(specials):]) <= {b""}
    assert all(t for t in tokens[:model.file.tokenizer_pieces])  # every ordinary piece has bytes


def test_the_grammar_tokenizer_encodes_text_exactly(model):
    tokens = token_bytes(model.file)
    g = GrammarTokenizer(tokens, model._encode, model._end_ids)
    assert not g.dummy_prefix  # the demo tokenizers add no space in front
    assert g.eos_token_id in model._end_ids and set(model._end_ids) <= set(g.special_token_ids)
    for text in TEXTS:
        assert g.spell(g(text.encode())) == text.encode()


def test_a_dummy_prefix_is_detected_and_kept_out_of_encoded_text(model):
    """Real ChatGLM2/3 tokenizers put sentencepiece's space in front of every encode: "a" is " a"."""
    tokens = token_bytes(model.file)
    space = tokens.index(b" ")

    def encode(text: str) -> list[int]:
        return [space, *model._encode(text)]

    g = GrammarTokenizer(tokens, encode, model._end_ids)
    assert g.dummy_prefix
    for text in TEXTS:
        assert g.spell(g(text.encode())) == text.encode()


@pytest.mark.parametrize("family", ["chatglm3", "glm4"])
def test_vocab_pieces_makes_a_tokenizer_of_that_size_that_still_maps_exactly(tmp_path, family):
    """A bench's real-size vocabulary (demo_model's vocab_pieces): thousands of distinct tokens, not ~1,000
    padded, and chatglm.cpp's encoder still spells text exactly with them."""
    path = write_demo_model(tmp_path / "big.bin", family=family, vocab_pieces=6000, hidden_size=32, num_heads=2,
                            num_kv_heads=1, ffn_size=64, num_layers=1, max_length=256)
    model = Model(read_model_file(path), 128, slots=1)
    tokens = token_bytes(model.file)
    assert 5900 <= model.file.tokenizer_pieces <= 6000
    assert len({t for t in tokens if t and not t.startswith(SPECIAL)}) >= 5800
    for text in TEXTS:
        assert b"".join(tokens[i] for i in model._encode(text)) == text.encode()
