"""The layout is the architecture: each package is a layer, and imports only run down.

    app.py, wsgi.py, gunicorn.conf.py, passenger_wsgi.py   the entry points: build and run the app
    web/       the HTTP runtime: routes, the request context, keys, bodies, limits, the log, metrics, streams
    config/    the settings, declared once, and what they decide (policy)
    store/     state kept between requests (the Responses API's stored responses)
    compat/    the wire formats (OpenAI's, Anthropic's): bodies -> requests, events -> answers; no HTTP
    backends/  what answers: the local model (chatglm/), Workers AI (cloudflare/), upstreams (upstream/)

Read statically (every import, typing-only ones included), so a layer broken only for mypy breaks
this too. Also: no circle of imports anywhere, and no backend imports another backend's package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENTRY = ("app", "wsgi", "gunicorn.conf", "passenger_wsgi")
LAYERS = ["web", "config", "store", "compat", "backends"]  # top to bottom
BACKENDS = ("backends.chatglm", "backends.cloudflare", "backends.upstream")  # side by side: none imports another
NO_HTTP = ("compat", "config", "store", "backends")  # layers that know nothing of Flask or WSGI


def modules() -> dict[str, Path]:
    found = {name: ROOT / f"{name}.py" for name in ENTRY}
    for layer in LAYERS:
        for path in (ROOT / layer).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = modules()


def imports(name: str) -> set[str]:
    """The project modules ``name`` imports (``from pkg import mod`` counts as pkg.mod when that is a module)."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in found if m in MODULES}


GRAPH = {name: imports(name) for name in MODULES}


def layer(name: str) -> int:
    top = name.split(".")[0]
    return LAYERS.index(top) if top in LAYERS else -1  # the entry points sit above every layer


def test_every_import_runs_down_the_layers():
    up = [f"{m} -> {d}" for m, deps in GRAPH.items() for d in deps if layer(d) < layer(m)]
    assert not up, "imports back up a layer:\n" + "\n".join(sorted(up))


def test_no_backend_imports_another():
    across = [f"{m} -> {d}" for m, deps in GRAPH.items() for d in deps for b in BACKENDS
              if (m + ".").startswith(b + ".") and d.startswith("backends.")
              and any((d + ".").startswith(o + ".") for o in BACKENDS if o != b)]
    assert not across, "\n".join(across)


def test_only_the_runtime_knows_http():
    http = [f"{name} -> {dep}" for name, path in MODULES.items() if name.split(".")[0] in NO_HTTP
            for dep in ("flask", "werkzeug", "gunicorn")
            if any(m == dep or m.startswith(dep + ".") for m in _external(path))]
    assert not http, "\n".join(http)


def _external(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def test_no_circle():
    done: set[str] = set()
    path: list[str] = []

    def visit(name: str) -> None:
        if name in path:
            pytest.fail("a circle of imports: " + " -> ".join(path[path.index(name):] + [name]))
        if name in done:
            return
        path.append(name)
        for dep in sorted(GRAPH[name]):
            if not dep.startswith(name + "."):  # a package importing its own modules closes no circle
                visit(dep)
        path.pop()
        done.add(name)

    for name in sorted(MODULES):
        visit(name)


def test_the_root_holds_only_the_entry_points():
    loose = sorted(p.name for p in ROOT.glob("*.py"))
    assert loose == sorted(f"{m}.py" for m in ENTRY), loose
