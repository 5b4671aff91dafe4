"""The configuration table of docs/configuration.md, written from the settings' declarations
(config.settings.Settings): python scripts/settings_table.py [--write]  (prints it, or rewrites it in
docs/configuration.md between its markers)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from config.settings import configuration_table  # noqa: E402

DOC = ROOT / "docs" / "configuration.md"
BEGIN = ("<!-- settings table: written by `make settings-table` from config/settings.py; edit the declarations, "
         "not this -->\n")
END = "<!-- end of settings table -->\n"


def written_table(text: str) -> str:
    """The table the document holds now, between its markers."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{DOC.name} has no settings table markers ({BEGIN.strip()} ... {END.strip()})")
    return text[start + len(BEGIN):end]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="rewrite the table in docs/configuration.md")
    args = parser.parse_args()
    table = configuration_table()
    if not args.write:
        sys.stdout.write(table)
        return
    text = DOC.read_text()
    old = written_table(text)
    DOC.write_text(text.replace(BEGIN + old + END, BEGIN + table + END, 1))
    print("docs/configuration.md: settings table " + ("unchanged" if old == table else "rewritten"))


if __name__ == "__main__":
    main()
