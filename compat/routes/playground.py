"""GET /: the playground page (static HTML, CSS and JavaScript shipped in the repository)."""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, send_from_directory

STATIC = Path(__file__).resolve().parent.parent.parent / "static"
bp = Blueprint("playground", __name__)


@bp.get("/")
def playground():
    return send_from_directory(STATIC, "playground.html")
