"""chatglm.cpp through the local engine (backends/chatglm/engine/): this process never calls into the model.
The engine runs the chat template, the token loop and the line; this backend forwards each request
over the engine's socket and passes its events on. A request's images (GLM-4V) are decoded only when
the engine's line has taken it, and then in a helper process (image_pool.py), never in this process's
event loop. It also has the model's tokenizer (backends/tokens.py), which the engine runs."""

from __future__ import annotations

import logging
import time
from collections.abc import Generator
from dataclasses import replace

from backends.base import Caller, ChatRequest, Embeddings, Event, ModelInfo, NotSupportedByModel, UnsupportedContent
from backends.chatglm.engine.client import EngineClient, LaterImages
from backends.chatglm.ggml_file import ModelFile
from backends.chatglm.image_pool import ImagePool
from backends.tokens import PromptTokens

log = logging.getLogger(__name__)

_LOAD_POLL_SECONDS = 0.1


class ChatGLMBackend:
    name = "chatglm"

    def __init__(self, model: ModelFile, *, model_id: str, owned_by: str, engine: EngineClient,
                 context: int, max_image_pixels: int = 16_000_000, image_decode_seconds: float = 5.0,
                 image_wait_seconds: float = 60.0) -> None:
        self.engine = engine
        self._vision = model.vision
        self.images = None if model.vision is None else ImagePool(
            seconds=image_decode_seconds, max_pixels=max_image_pixels, wait_seconds=image_wait_seconds)
        self._info = ModelInfo(model_id, owned_by, int(model.path.stat().st_mtime), images=model.vision is not None,
                               open_ended_tokens=context, shared_context=True)  # prompt and answer share the context

    def load(self) -> None:
        """Wait until the engine has loaded the model (starting it, where that is this process's job)."""
        self.engine.ensure_started()
        while True:
            status = self.engine.status()
            if status and status["error"]:
                raise RuntimeError(status["error"])
            if status and status["loaded"]:
                log.info("the local engine (pid %s) serves %s", status["pid"], self._info.id)
                # what the model honours is known once its engine has loaded it (its build, its family)
                self._info = replace(self._info, controls=frozenset(status.get("controls", ())),
                                     structured_outputs=bool(status.get("constrains")))
                return
            time.sleep(_LOAD_POLL_SECONDS)  # cooperative under gevent

    def readiness(self) -> str | None:
        status = self.engine.status()
        if status is None:
            if self.engine.foreign is not None:  # not ours: nothing is sent to it (the log says who)
                return "the local engine is not running: another user's process holds its address"
            return "the local engine is not running (it is being started)"
        if not status["loaded"]:
            return status["error"] or f"model {self._info.id} is loading"
        return None

    def stats(self) -> dict[str, float]:
        status = self.engine.status() or {}
        return {"generations_running": status.get("running", 0), "requests_waiting": status.get("waiting", 0)}

    def models(self) -> list[ModelInfo]:
        return [self._info]

    def embed(self, model: str, inputs: list[str], caller: Caller | None = None) -> Embeddings:
        raise NotSupportedByModel(f"{model} is a chat model and makes no embeddings; use an embedding model "
                             "(Cloudflare's @cf/baai/bge-*).", param="model")

    def tokenize(self, request: ChatRequest) -> PromptTokens:
        answer = self.engine.tokenize(request)
        return PromptTokens(answer["tokens"], answer["positions"], answer["context"])

    def detokenize(self, model: str, tokens: list[int]) -> str:
        return self.engine.detokenize(tokens)

    def chat(self, request: ChatRequest, caller: Caller | None = None) -> Generator[Event, None, None]:
        images = self._later_images(request) if any(m.images for m in request.messages) else None
        yield from self.engine.generate(request, None if caller is None else caller.client_stream, images)

    def _later_images(self, request: ChatRequest) -> LaterImages:
        """The request's images, to be decoded once the engine's line has taken it (a bad image must
        not reach the engine: each is checked as it is decoded)."""
        if self._vision is None or self.images is None:
            raise UnsupportedContent(f"{self._info.id} takes text only; send the request without images.",
                                     param="messages")
        pool, size = self.images, self._vision.image_size
        return LaterImages(size, lambda: [pool.decode(image, size, f"messages[{i}]")
                                          for i, m in enumerate(request.messages) for image in m.images])
