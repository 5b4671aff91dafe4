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


def test_the_document_carries_the_declarations_and_is_valid_openapi():
    import schemathesis

    from compat import answers, wire
    from web.routes.openapi import document

    doc = document()
    schemas = doc["components"]["schemas"]
    assert set(wire.schemas()) | set(answers.schemas()) <= set(schemas)
    assert schemas["ChatCompletionRequest"] == wire.schemas()["ChatCompletionRequest"]
    body = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    schemathesis.openapi.from_dict(doc).validate()  # against the OpenAPI 3.1 meta-schema


def test_a_schema_both_written_and_declared_is_refused(monkeypatch, tmp_path):
    from web.routes import openapi

    spec = tmp_path / "openapi.yaml"
    spec.write_text(openapi.SPEC.read_text(encoding="utf-8").replace(
        "  schemas:\n", "  schemas:\n    ChatCompletionRequest: {type: object}\n", 1), encoding="utf-8")
    monkeypatch.setattr(openapi, "SPEC", spec)
    with pytest.raises(ValueError, match="ChatCompletionRequest"):
        openapi.document()
