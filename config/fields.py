"""A setting declared once: a field of a frozen dataclass whose metadata names its environment
variable, bound and one line of doc beside the default the field already holds.

`read_fields` parses and checks every declared field from an environment (its type says how:
a whole number, a number, a yes/no flag, a path, a comma-separated list, text; a setting too
rich for that brings its own parser); `table_rows` writes docs/configuration.md's settings table from
the same declarations. Every problem is a ConfigError naming the variable and the fix.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KEY = "aigate.setting"  # where a field's Declaration lives in its metadata


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable and the fix."""


@dataclass(frozen=True)
class Reading:
    """What a setting's own parser may look at besides its text."""

    env: Mapping[str, str]  # the whole environment (an upstreams file names variables of its own)
    got: Mapping[str, Any]  # the settings read so far, by attribute name (those of `uses` among them)


Parser = Callable[[str, Reading], Any]


@dataclass(frozen=True)
class Declaration:
    env: str  # the environment variable
    doc: str  # one line: the table's "meaning"
    shown: str | None = None  # the table's "default", when the default itself does not say it
    minimum: float | None = None
    parse: Parser | None = None  # text -> value, for what the field's type cannot say
    uses: tuple[str, ...] = ()  # fields `parse` reads (read before it; `parse` then runs even on empty text)
    also: tuple[str, ...] = ()  # other names for the variable, read when it is unset
    listed: bool = True  # a row of its own in the table (False: a second field read from another's variable)


def setting(env: str, default: Any, doc: str, *, shown: str | None = None, minimum: float | None = None,
            parse: Parser | None = None, uses: tuple[str, ...] = (), also: tuple[str, ...] = (),
            listed: bool = True, secret: bool = False) -> Any:
    """A dataclass field read from ``env``; empty or unset, it is ``default``. A ``secret`` one stays
    out of the object's repr."""
    return field(default=default, repr=not secret,
                 metadata={KEY: Declaration(env, doc, shown, minimum, parse, uses, also, listed)})


def declarations(cls: type) -> list[tuple[dataclasses.Field[Any], Declaration]]:
    return [(f, f.metadata[KEY]) for f in dataclasses.fields(cls) if KEY in f.metadata]


def read_fields(cls: type, env: Mapping[str, str]) -> dict[str, Any]:
    """Every declared field of ``cls`` read from ``env``: attribute name -> value. Fields whose
    parser uses others are read after the rest."""
    got: dict[str, Any] = {}
    for f, d, hint in _reading_order(cls):
        name, raw = _text(env, d)
        if d.parse is not None and (raw or d.uses):
            got[f.name] = d.parse(raw, Reading(env, got))
        elif not raw:
            got[f.name] = f.default
        else:
            got[f.name] = _by_type(name, raw, hint, d.minimum)
    return got


@functools.cache
def _reading_order(cls: type) -> tuple[tuple[dataclasses.Field[Any], Declaration, Any], ...]:
    """The declared fields with their types (resolved once: it is the slow part), those whose parser
    uses others last."""
    hints = typing.get_type_hints(cls)
    fields = [(f, d, hints[f.name]) for f, d in declarations(cls)]
    return (*(x for x in fields if not x[1].uses), *(x for x in fields if x[1].uses))


def _text(env: Mapping[str, str], d: Declaration) -> tuple[str, str]:
    """The variable that is set (the first of its names) and its text, stripped."""
    for name in (d.env, *d.also):
        raw = env.get(name, "").strip()
        if raw:
            return name, raw
    return d.env, ""


def _by_type(name: str, raw: str, hint: Any, minimum: float | None) -> Any:
    kinds = set(typing.get_args(hint)) - {type(None)} if isinstance(hint, types.UnionType) else {hint}
    kind = kinds.pop() if len(kinds) == 1 else hint
    if kind is bool:
        return flag(name, raw)
    if kind is int:
        return _number(name, raw, int, "a whole number", minimum)
    if kind is float:
        return _number(name, raw, float, "a number", minimum)
    if kind is Path:
        return Path(raw).expanduser()
    if kind is str:
        return raw
    if typing.get_origin(kind) is tuple and typing.get_args(kind) == (str, ...):
        return items(raw)
    raise TypeError(f"{name}: a {hint} setting needs a parser of its own")


def items(raw: str) -> tuple[str, ...]:
    """A comma-separated list, blanks dropped."""
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def flag(name: str, raw: str) -> bool:
    raw = raw.lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"{name}={raw!r} is not a yes/no value (use 1 or 0)")


def _number(name: str, raw: str, kind: Callable[[str], Any], what: str, minimum: float | None) -> Any:
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not {what}") from None
    if not math.isfinite(value):  # nan compares false with everything: it would slip past every check
        raise ConfigError(f"{name}={raw!r} is not {what} (a finite one)")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={value} is too small (at least {minimum:g})")
    return value


# docs/configuration.md's table -------------------------------------------------------------------------

TABLE_HEAD = ("| variable | meaning | default | at least |", "|---|---|---|---|")


def table_rows(cls: type, elsewhere: tuple[Declaration, ...] = ()) -> list[str]:
    """The configuration table, one row per variable, in declaration order; ``elsewhere`` are
    variables read outside ``cls`` (documented here all the same)."""
    rows = [*TABLE_HEAD]
    for f, d in declarations(cls):
        if d.listed:
            rows.append(_row(d, f.default))
    rows += [_row(d, None) for d in elsewhere]
    return rows


def _row(d: Declaration, default: Any) -> str:
    names = " (or ".join(f"`{n}`" for n in (d.env, *d.also)) + ")" * len(d.also)
    bound = f"`{d.minimum:g}`" if d.minimum is not None else ""
    cells = (names, d.doc, d.shown if d.shown is not None else shown_default(default), bound)
    if any("|" in cell or "\n" in cell for cell in cells):
        raise ValueError(f"{d.env}: a table cell may not hold '|' or a newline")
    return "| " + " | ".join(cells) + " |"


def shown_default(default: Any) -> str:
    if default is None:
        return "unset"
    if isinstance(default, bool):
        return "`1`" if default else "`0`"
    if isinstance(default, float):
        return f"`{default:g}`"
    if default in ("", ()):
        return "empty"
    if isinstance(default, tuple):
        return "`" + ",".join(map(str, default)) + "`"
    return f"`{default}`"
