"""Model id or alias -> the backend that serves it."""

from __future__ import annotations

from dataclasses import dataclass

from backends.base import Backend, ModelInfo


@dataclass(frozen=True)
class Route:
    backend: Backend
    model_id: str  # the backend's own id (an alias resolved)


class Registry:
    def __init__(self, backends: list[Backend], aliases: dict[str, str]) -> None:
        self._routes: dict[str, Route] = {}
        self._infos: dict[str, ModelInfo] = {}
        for backend in backends:
            for info in backend.models():
                self._routes[info.id] = Route(backend, info.id)
                self._infos[info.id] = info
        for alias, target in aliases.items():
            if target not in self._routes:
                raise ValueError(f"alias {alias}={target}: no configured model is called {target!r}")
            self._routes[alias] = self._routes[target]
            self._infos[alias] = ModelInfo(alias, self._infos[target].owned_by, self._infos[target].created)

    def resolve(self, name: str) -> Route | None:
        return self._routes.get(name)

    def models(self) -> list[ModelInfo]:
        return list(self._infos.values())

    def get(self, name: str) -> ModelInfo | None:
        return self._infos.get(name)
