"""chatglm.cpp through the local engine (backends/chatglm/engine/): this process never calls into the model.
The engine runs the chat template, the token loop and the line; this backend forwards each request
over the engine's socket and passes its events on. A request's images (GLM-4V) are decoded only when
the engine's line has taken it, and then in a helper process (image_pool.py), never in this process's
event loop. It also has the model's tokenizer (backends/tokens.py), which the engine runs."""

from __future__ import annotations

import logging
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from backends.base import Caller, ChatRequest, Embeddings, Event, ModelInfo, NotSupportedByModel, UnsupportedContent
from backends.chatglm.engine.client import EngineClient, LaterImages
from backends.chatglm.ggml_file import ModelFile
from backends.chatglm.image_pool import ImagePool
from backends.tokens import PromptTokens

log = logging.getLogger(__name__)

_LOAD_POLL_SECONDS = 0.1


@dataclass(frozen=True)
class LocalFile:
    """A local model as configured: its id, its file (read and checked) and its context."""

    id: str
    file: ModelFile
    context: int


class ChatGLMBackend:
    name = "chatglm"

    def __init__(self, models: Sequence[LocalFile], *, owned_by: str, engine: EngineClient,
                 max_image_pixels: int = 16_000_000, image_decode_seconds: float = 5.0,
                 image_wait_seconds: float = 60.0) -> None:
        """``models``, the engine's default first."""
        self.engine = engine
        self._vision = {m.id: m.file.vision for m in models}
        self.images = None if not any(self._vision.values()) else ImagePool(
            seconds=image_decode_seconds, max_pixels=max_image_pixels, wait_seconds=image_wait_seconds)
        # prompt and answer share each model's context
        self._infos = [ModelInfo(m.id, owned_by, int(m.file.path.stat().st_mtime), images=m.file.vision is not None,
                                 open_ended_tokens=m.context, shared_context=True) for m in models]

    def load(self) -> None:
        """Wait until the engine has loaded the default model (starting it, where that is this process's job)."""
        self.engine.ensure_started()
        while True:
            status = self.engine.status()
            if status and status["error"]:
                raise RuntimeError(status["error"])
            if status and status["loaded"]:
                log.info("the local engine (pid %s) serves %s", status["pid"], ", ".join(m.id for m in self._infos))
                self._note(status)
                return
            time.sleep(_LOAD_POLL_SECONDS)  # cooperative under gevent

    def _note(self, status: dict[str, Any]) -> None:
        """What each model honours (known from its build and family) and its state, as the engine says."""
        said = {m["id"]: m for m in status.get("models", ())}
        default = {"controls": status.get("controls", ()), "constrains": status.get("constrains")}
        self._infos = [replace(info, controls=frozenset(said.get(info.id, default)["controls"]),
                               structured_outputs=bool(said.get(info.id, default)["constrains"]),
                               status=said.get(info.id, {}).get("state")) for info in self._infos]

    def readiness(self) -> str | None:
        status = self.engine.status()
        if status is None:
            if self.engine.foreign is not None:  # not ours: nothing is sent to it (the log says who)
                return "the local engine is not running: another user's process holds its address"
            return "the local engine is not running (it is being started)"
        if not status["loaded"]:
            return status["error"] or f"model {self._infos[0].id} is loading"
        self._note(status)
        failed = [m for m in status.get("models", ()) if m["state"] == "failed"]
        if failed:  # the others serve, but this one is configured and cannot: said until a load succeeds
            return "; ".join(m["error"] or f"model {m['id']} failed to load" for m in failed)
        return None

    def stats(self) -> dict[str, float]:
        status = self.engine.status() or {}
        return {"generations_running": status.get("running", 0), "requests_waiting": status.get("waiting", 0)}

    def models(self) -> list[ModelInfo]:
        return self._infos

    def models_now(self) -> list[ModelInfo]:
        """The models with the engine's word, asked now, on which are loaded (/v1/models)."""
        status = self.engine.status()
        if status is not None and "models" in status:
            self._note(status)
        return self._infos

    def embed(self, model: str, inputs: list[str], caller: Caller | None = None) -> Embeddings:
        raise NotSupportedByModel(f"{model} is a chat model and makes no embeddings; use an embedding model "
                             "(Cloudflare's @cf/baai/bge-*).", param="model")

    def tokenize(self, request: ChatRequest) -> PromptTokens:
        answer = self.engine.tokenize(request)
        return PromptTokens(answer["tokens"], answer["positions"], answer["context"])

    def detokenize(self, model: str, tokens: list[int]) -> str:
        return self.engine.detokenize(tokens, model)

    def chat(self, request: ChatRequest, caller: Caller | None = None) -> Generator[Event, None, None]:
        images = self._later_images(request) if any(m.images for m in request.messages) else None
        yield from self.engine.generate(request, None if caller is None else caller.client_stream, images)

    def _later_images(self, request: ChatRequest) -> LaterImages:
        """The request's images, to be decoded once the engine's line has taken it (a bad image must
        not reach the engine: each is checked as it is decoded)."""
        vision = self._vision.get(request.model)
        if vision is None or self.images is None:
            raise UnsupportedContent(f"{request.model} takes text only; send the request without images.",
                                     param="messages")
        pool, size = self.images, vision.image_size
        return LaterImages(size, lambda: [pool.decode(image, size, f"messages[{i}]")
                                          for i, m in enumerate(request.messages) for image in m.images])
