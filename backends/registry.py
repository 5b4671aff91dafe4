"""Model id or alias -> the backend that serves it."""

from __future__ import annotations

from dataclasses import dataclass, replace

from backends.base import Backend, ModelInfo


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

    def models(self) -> list[ModelInfo]:
        served = [m for b in self.backends for m in b.models()]
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
