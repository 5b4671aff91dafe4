"""Token ids where text is taken (compat/token_ids.py): cl100k_base, OpenAI's own, from shipped ranks."""

from __future__ import annotations

import inspect

import pytest
from tiktoken_ext import openai_public

from compat.errors import APIError
from compat.token_ids import PATTERN, cl100k, texts


def test_the_shipped_ranks_are_cl100k_base_as_tiktoken_declares_it():
    encoding = cl100k()
    assert PATTERN in inspect.getsource(openai_public.cl100k_base)  # OpenAI's pattern, as tiktoken has it
    assert encoding.n_vocab == 100277 and encoding.encode("hello world") == [15339, 1917]
    assert encoding.decode(encoding.encode("naïve café, 你好\n\tdef f(): pass")) == "naïve café, 你好\n\tdef f(): pass"


def test_token_ids_are_read_as_their_text_and_text_is_left_alone():
    assert texts([15339, 1917], "input") == ["hello world"]
    assert texts([[15339], [1917]], "input") == ["hello", " world"]
    assert texts([[100257]], "prompt") == ["<|endoftext|>"]
    for raw in ("hello", ["hello"], [], [[1], "x"], [1, [2]], [True], [1.0], None):
        assert texts(raw, "input") is None  # text, or what the field's declaration refuses


@pytest.mark.parametrize(("raw", "where", "said"), [([15339, 100261], "input[1]", "100261 is not a token id"),
                                                   ([[1], [2, -5]], "input[1][1]", "-5 is not"),
                                                   ([[1], [2 ** 70]], "input[1][0]", str(2 ** 70)),
                                                   ([[1], []], "input[1]", "an empty list")])
def test_an_id_that_is_not_one_is_a_400_naming_it(raw, where, said):
    with pytest.raises(APIError) as err:
        texts(raw, "input")
    assert (err.value.status, err.value.param, err.value.code) == (400, "input", "invalid_value")
    assert f"'{where}'" in err.value.message and said in err.value.message
