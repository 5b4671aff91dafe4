"""docs/architecture.md's page on a streamed local chat names, at each step, a module and its functions:
each one must exist, so the page cannot drift from the code unnoticed."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STEP = re.compile(r"^\s*(?:in|out|engine)?\s*(\S+\.py)\s+((?:[A-Za-z_][\w.]*(?:, )?)+)")


def steps() -> list[tuple[str, list[str]]]:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    page = doc[doc.index("## A streamed local chat, step by step"):]
    block = page[page.index("```") + 3:]
    block = block[:block.index("```")]
    found = []
    for line in block.splitlines():
        match = STEP.match(line)
        if match:
            found.append((match.group(1), [n for n in match.group(2).split(", ") if n]))
    return found


def defined(path: Path) -> set[str]:
    """Every function, class and Class.method defined in the file, nested functions included."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            names.add(node.name)
            names.update(f"{node.name}.{f.name}" for f in node.body if isinstance(f, ast.FunctionDef))
        elif isinstance(node, ast.FunctionDef):
            names.add(node.name)
    return names


def test_every_step_names_a_module_and_functions_that_exist():
    found = steps()
    assert len(found) >= 20, found  # the page is there and was read
    missing = [f"{module}: {name}" for module, names in found
               for name in names if name not in defined(ROOT / module)]
    assert not missing, missing
