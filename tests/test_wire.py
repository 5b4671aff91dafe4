"""The declared wire types answer every broken body as the hand-written parsers did: the same status,
`param` and `code` for each of the cases in tests/data/wire_cases.json (recorded from those parsers
by tests/make_wire_cases.py)."""

from __future__ import annotations

import json

import pytest

from tests.make_wire_cases import BASES, OUT, answer, cases

RECORDED = {json.dumps([name, where]): (status, param, code)
            for name, where, status, param, code in json.loads(OUT.read_text(encoding="utf-8"))}


def test_every_recorded_case_is_generated():
    assert {json.dumps([name, where]) for name, _, where, _ in cases()} == set(RECORDED)


@pytest.mark.parametrize("base", sorted(BASES))
def test_the_same_param_and_code_as_before(base):
    wrong = []
    for name, parser, where, body in cases():
        if name != base:
            continue
        got = answer(parser, body)
        if (got["status"], got.get("param"), got.get("code")) != RECORDED[json.dumps([name, where])]:
            wrong.append((where, json.dumps(body)[:300], got, RECORDED[json.dumps([name, where])]))
    assert not wrong, f"{len(wrong)} differ; first ones:\n" + "\n".join(map(str, wrong[:15]))
