"""bandit over the server's code: no finding left unexplained (an explained one carries a nosec
comment saying why). pip-audit needs PyPI's vulnerability service, so it is `make audit`, not a test."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT

CODE = ["app.py", "wsgi.py", "passenger_wsgi.py", "gunicorn.conf.py", "web", "config", "store", "compat", "backends",
        "scripts"]


def test_bandit_finds_nothing_unexplained(tmp_path):
    out = tmp_path / "bandit.json"  # a file: bandit may draw a progress bar on stdout
    subprocess.run([sys.executable, "-m", "bandit", "-r", "-f", "json", "-o", str(out), *CODE], cwd=ROOT,
                   capture_output=True, text=True)
    report = json.loads(out.read_text())
    assert report["results"] == [], [(r["test_id"], r["filename"], r["line_number"]) for r in report["results"]]
    assert report["metrics"]["_totals"]["loc"] > 2000  # it read the code, not an empty list
