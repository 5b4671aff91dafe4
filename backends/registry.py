"""Model id or alias -> the backend that serves it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

from backends.base import Backend, ModelInfo


@runtime_checkable
class LiveModels(Protocol):
    """A backend whose models' state changes (local models loaded on demand): asked afresh when listed."""

    def models_now(self) -> list[ModelInfo]: ...


@dataclass(frozen=True)
class Route:
    backend: Backend
    model_id: str  # the backend's own id (an alias resolved)
    info: ModelInfo  # what the model declares it can do


class Registry:
    """Asks the backends each time: a backend's list may change (Cloudflare discovery)."""

    def __init__(self, backends: list[Backend], aliases: dict[str, str]) -> None:
        self.backends = backends
        self.aliases = aliases

    def models(self, now: bool = False) -> list[ModelInfo]:
        """Every model and alias; ``now``: each local model's state as its engine says now (for listing)."""
        served = [m for b in self.backends for m in (b.models_now() if now and isinstance(b, LiveModels)
                                                     else b.models())]
        by_id = {m.id: m for m in served}
        return served + [replace(by_id[target], id=alias)
                         for alias, target in self.aliases.items() if target in by_id]

    def resolve(self, name: str) -> Route | None:
        target = self.aliases.get(name, name)
        for backend in self.backends:
            for info in backend.models():
                if info.id == target:
                    return Route(backend, target, info)
        return None
