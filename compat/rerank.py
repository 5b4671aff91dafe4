"""/v1/rerank's body -> backends.media.RerankRequest, and a Ranking -> its answer (the Jina / Cohere
shape that llama.cpp, vLLM and LiteLLM answer with)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from backends.media import Ranking, RerankRequest
from compat import media_wire, wire
from compat.requests import Limits, check_chars


@dataclass(frozen=True)
class RerankCall:
    request: RerankRequest
    return_documents: bool


def parse_rerank(body: Any, limits: Limits) -> RerankCall:
    call = wire.read(body, media_wire.RerankRequest)
    documents = tuple(d if isinstance(d, str) else d.text for d in call.documents)
    check_chars(len(call.query) + sum(len(d) for d in documents), limits, "documents")
    request = RerankRequest(call.model, call.query, documents, call.top_n)
    return RerankCall(request, call.return_documents is not False)


def rerank_answer(call: RerankCall, model: str, ranking: Ranking) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    for r in ranking.results:
        result: dict[str, Any] = {"index": r.index, "relevance_score": r.score}
        if call.return_documents:
            result["document"] = {"text": call.request.documents[r.index]}
        results.append(result)
    return {"id": "rerank-" + secrets.token_hex(12), "object": "list", "model": model, "results": results,
            "usage": {"prompt_tokens": ranking.prompt_tokens, "total_tokens": ranking.prompt_tokens}}
