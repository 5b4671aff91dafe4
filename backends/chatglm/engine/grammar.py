"""What a constrained answer may say, as an llguidance grammar, and the token mask that keeps it there.

One Lark grammar per request shape (docs/plans/structured-outputs.md §4): JSON matching the response
format, a tool call in the family's own format (GLM-4: ``name\\n{json}``; ChatGLM3: ``name\\n```python\\n
tool_call(k=v, ...)\\n```````), or either. Each JSON Schema is first narrowed by ``tighten()`` to a subset
of its language with bounded whitespace and nesting, so a weak model cannot wander forever inside a valid
prefix; any output of the subset is valid for the schema. Compiled grammars are cached by their text (the
same schema again costs a copy, not a compile); each answer gets its own copy of the matcher.
"""

from __future__ import annotations

import json
import keyword
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
from llguidance import LLMatcher, LLTokenizer, TokenizerWrapper

from backends.base import ChatRequest, InvalidRequest, ToolsNotSupported
from backends.chatglm.engine.families import Family
from backends.chatglm.engine.vocab import GrammarTokenizer
from backends.chatglm.ggml_file import ModelFile

# At most one space or one newline wherever JSON allows whitespace. Indentation is left out: greedy on the
# random demo model, "\n" plus up to 32 of it took most of 400 tokens without closing a 7-key object, where
# this closed it in ~150 (a real model's pretty-printing is kept, flush left).
WHITESPACE = r"\x20|\n"
ANY_DEPTH = 6  # nesting of a value the schema leaves free (json_object, {}, an open map)
# A number the schema leaves unbounded is kept within this (no exponent then): a weak model wrote 6e+85572,
# which Python reads as inf and a tool call's arguments would re-dump as Infinity, which is not JSON.
NUMBER_BOUND = 10**15
CACHED_GRAMMARS = 64
_ANY = "aigate_any"
_ANNOTATIONS = {"title", "description", "default", "examples", "$comment", "deprecated", "readOnly", "writeOnly"}
# A parameters schema ChatGLM3 can take as keyword arguments: a closed object and nothing else to enforce.
_KWARGS_KEYS = _ANNOTATIONS | {"type", "properties", "required", "additionalProperties", "$defs", "definitions",
                               "$schema", "x-guidance"}
_TEXT_BRANCH = re.compile(rb" ?\n")  # an empty metadata line: the answer is text, not a call


def tighten(schema: Any, strict: bool) -> dict[str, Any]:
    """The schema narrowed to a subset of its language that llguidance compiles with bounds: objects with
    ``properties`` closed (extra keys were optional), values it leaves free (``{}``, ``true``, a missing
    ``items``, an open map) any JSON nested at most ANY_DEPTH deep, whitespace bounded; ``strict``: every
    keyword enforced (else what llguidance cannot enforce is ignored)."""
    out: dict[str, Any] = _narrow(schema if isinstance(schema, dict) else {})
    defs = dict(out.get("$defs", {}))
    defs.update(_any_defs())
    out["$defs"] = defs
    out["x-guidance"] = {"whitespace_pattern": WHITESPACE, "lenient": not strict}
    return out


def _any_defs() -> dict[str, Any]:
    scalar: list[dict[str, Any]] = [_bounded({"type": t}) for t in ("string", "number", "boolean", "null")]
    defs: dict[str, Any] = {f"{_ANY}{ANY_DEPTH}": {"anyOf": scalar}}
    for d in range(ANY_DEPTH):
        inner = {"$ref": f"#/$defs/{_ANY}{d + 1}"}
        defs[f"{_ANY}{d}"] = {"anyOf": [*scalar, {"type": "array", "items": inner},
                                        {"type": "object", "additionalProperties": inner}]}
    return defs


def _free(schema: Any) -> bool:
    return schema is True or (isinstance(schema, dict) and set(schema) <= _ANNOTATIONS)


def _narrow(schema: Any) -> Any:
    if _free(schema):
        return {"$ref": f"#/$defs/{_ANY}0"}
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in ("properties", "patternProperties", "$defs", "definitions"):
        if isinstance(out.get(key), dict):
            out[key] = {k: _narrow(v) for k, v in out[key].items()}
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if isinstance(out.get(key), list):
            out[key] = [_narrow(s) for s in out[key]]
    types = out.get("type")
    is_object = types == "object" or "properties" in out
    if is_object and "additionalProperties" not in out and "patternProperties" not in out:
        names = out.get("properties", {})
        if names and set(out.get("required", ())) <= set(names):
            out["additionalProperties"] = False
        elif not names:
            out["additionalProperties"] = True  # an open map: narrowed below
    if "additionalProperties" in out:
        out["additionalProperties"] = _narrow(out["additionalProperties"])
    if types == "array" or "items" in out:
        out["items"] = _narrow(out.get("items", True))
    return _bounded(out)


def _bounded(schema: dict[str, Any]) -> dict[str, Any]:
    """A number or integer schema with NUMBER_BOUND where it has no bound of its own."""
    types = schema.get("type")
    if not ({"number", "integer"} & set(types if isinstance(types, list) else [types])):
        return schema
    if "minimum" not in schema and "exclusiveMinimum" not in schema:
        schema = {**schema, "minimum": -NUMBER_BOUND}
    if "maximum" not in schema and "exclusiveMaximum" not in schema:
        schema = {**schema, "maximum": NUMBER_BOUND}
    return schema


class GrammarCache:
    """Compiled grammars by their text (LRU); ``matcher()`` gives a fresh copy for one answer."""

    def __init__(self, tokenizer: LLTokenizer, size: int = CACHED_GRAMMARS) -> None:
        self._tokenizer = tokenizer
        self._size = size
        self._compiled: OrderedDict[str, LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def matcher(self, lark: str) -> LLMatcher | str:
        """A matcher at the grammar's start, or the library's error message."""
        with self._lock:
            template = self._compiled.get(lark)
            if template is not None:
                self._compiled.move_to_end(lark)
                return template.deep_copy()
        template = LLMatcher(self._tokenizer, LLMatcher.grammar_from_lark(lark), log_level=0)
        if template.is_error():
            return template.get_error()
        with self._lock:
            self._compiled[lark] = template
            while len(self._compiled) > self._size:
                self._compiled.popitem(last=False)
        return template.deep_copy()


class Constraint:
    """One answer's grammar state: the mask of the next token, then the token taken."""

    def __init__(self, matcher: LLMatcher, tokens: list[bytes], text_branch: bool) -> None:
        self._matcher = matcher
        self._tokens = tokens
        self._text_branch = text_branch  # the grammar's free-text alternative (auto with strict tools)
        self._start = b""  # the answer's first bytes, until the branch is known
        self.free = False  # the free-text branch was taken: every token is allowed from now on

    def fill(self, bitmask: np.ndarray) -> None:
        """Bit (i % 32) of word i // 32 set: token i is allowed next."""
        if bitmask.dtype != np.int32 or not bitmask.flags["C_CONTIGUOUS"]:
            raise ValueError("the bitmask must be a contiguous int32 array")
        self._matcher.unsafe_compute_mask_ptr(bitmask.ctypes.data, bitmask.nbytes)

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self._matcher.get_error()}")
        if self._text_branch and not self.free and len(self._start) < 2:
            self._start += self._tokens[token]
            self.free = bool(_TEXT_BRANCH.match(self._start))

    def forced(self) -> list[int]:
        """The tokens the grammar allows no alternative to from here (a key's name, `": "`), not yet taken:
        they need no sampling, and no forward pass each."""
        return [] if self.free else list(self._matcher.compute_ff_tokens())

    @property
    def done(self) -> bool:
        """The structure is complete (or an end token was taken): end the answer now."""
        return bool(self._matcher.is_stopped())


class Grammars:
    """A model's grammar machinery, built once per model: llguidance's tokenizer over the token bytes and
    the cache of compiled grammars."""

    def __init__(self, file: ModelFile, family: Family, tokens: list[bytes], encode: Callable[[str], list[int]],
                 end_ids: frozenset[int]) -> None:
        self.family = family
        self.tokens = tokens
        self._grammar_tokenizer = GrammarTokenizer(tokens, encode, end_ids)
        self.tokenizer = LLTokenizer(TokenizerWrapper(self._grammar_tokenizer), n_vocab=len(tokens),
                                     eos_token=sorted(end_ids))
        self.cache = GrammarCache(self.tokenizer)

    @property
    def dummy_prefix(self) -> bool:
        """The model's turns start " \\n " (a sentencepiece dummy prefix): the reply splitter drops it."""
        return self._grammar_tokenizer.dummy_prefix

    def constraint(self, request: ChatRequest) -> Constraint | None:
        """The answer's constraint, or None when nothing constrains it. InvalidRequest when a schema cannot
        compile, ToolsNotSupported for a forced call the family or a raw prompt cannot make."""
        lark = answer_grammar(self.family, request, self.dummy_prefix)
        if lark is None:
            return None
        matcher = self.cache.matcher(lark)
        if isinstance(matcher, str):
            raise _compile_error(request, matcher)
        return Constraint(matcher, self.tokens, text_branch=lark.startswith(_TEXT_START))


_TEXT_START = "// text or a call\n"


def answer_grammar(family: Family, request: ChatRequest, dummy_prefix: bool) -> str | None:
    """The Lark grammar of the answer (plan §4's table), or None: free text."""
    sp = '" "? ' if dummy_prefix else ""
    raw = request.prompt is not None or not family.metadata_line
    tools = request.tools if request.tool_choice != "none" else ()
    forced = request.tool_choice == "required" or request.forced_tool is not None
    if forced and (raw or family.tools is None):
        where = "a raw prompt" if request.prompt is not None else f"{family.name} models"
        raise ToolsNotSupported(f"{where} cannot call tools; send the request without tool_choice",
                                param="tool_choice")
    if forced and not request.tools:
        raise InvalidRequest("tool_choice asks for a tool call, but the request has no tools", param="tool_choice")
    if request.forced_tool is not None:
        tools = tuple(t for t in request.tools if t.name == request.forced_tool)
        if not tools:
            raise InvalidRequest(f"tool_choice names {request.forced_tool!r}, which is not one of the tools",
                                 param="tool_choice")
    fmt = request.response_format
    body = None
    if fmt is not None:
        schema = fmt.schema if fmt.schema is not None else {"type": "object"}
        body = _json(tighten(schema, fmt.strict))
    if raw:
        return None if body is None else f"start: {sp}{body}\n"
    meta = f'{sp}"\\n" {sp}'
    calls = () if family.tools is None else tools
    if body is None and not forced and not any(t.strict for t in calls):
        calls = ()  # auto, nothing strict: free text, a call read as today
    if body is None and not calls:
        return None
    rules: list[str] = []
    alternatives = [] if forced else ([f"{meta}{body}"] if body is not None else [f"{meta}TEXT"])
    for i, tool in enumerate(calls):
        alternatives.append(f"call{i}")
        rules += _call_rules(family, f"call{i}", tool.name, tool.parameters, tool.strict, sp)
    head = _TEXT_START if body is None and not forced else ""
    text = ["TEXT: /(.|\\n)*/"] if head else []
    return head + "\n".join([f"start: {' | '.join(alternatives)}", *rules, *text]) + "\n"


def _json(schema: dict[str, Any]) -> str:
    return "%json" + json.dumps(schema, ensure_ascii=False)


def _call_rules(family: Family, rule: str, name: str, parameters: dict[str, Any], strict: bool,
                sp: str) -> list[str]:
    params = dict(parameters) if parameters else {}
    params.setdefault("type", "object")
    schema = tighten(params, strict)
    literal = json.dumps(name)
    if family.byte_level:  # GLM-4: the name, then the arguments as JSON
        return [f'{rule}: {literal} "\\n" {_json(schema)}']
    args, rules = _kwargs(rule, schema, sp)
    return [f'{rule}: {sp}{literal} "\\n" {sp}"```python\\ntool_call(" {args} ")\\n```"', *rules]


def _kwargs(rule: str, schema: dict[str, Any], sp: str) -> tuple[str, list[str]]:
    """ChatGLM3's arguments: ``k=v, ...`` in schema order, optional ones skippable; ``**{json}`` when the
    names are not all Python keywords' names or the schema is more than a closed object."""
    props = schema.get("properties", {})
    if (set(schema) - _KWARGS_KEYS or schema.get("type") != "object" or schema.get("additionalProperties") is not False
            or not isinstance(props, dict)
            or not all(k.isidentifier() and not keyword.iskeyword(k) for k in props)):
        return f'"**" {_json(schema)}', []
    names = list(props)
    required = set(schema.get("required", ()))
    defs: dict[str, Any] = {k: schema[k] for k in ("$defs", "definitions") if k in schema}
    rules = []
    for i, key in enumerate(names):
        value = _value(props[key], defs, schema["x-guidance"])
        for first in (True, False):
            sep = "" if first else '", " '
            after = f"{rule}_{i + 1}_0" if i + 1 < len(names) else '""'
            alts = [f'{sep}"{key}=" {value} {after}']
            if key not in required:
                alts.append(f"{rule}_{i + 1}_{int(first)}" if i + 1 < len(names) else '""')
            rules.append(f"{rule}_{i}_{int(first)}: {' | '.join(alts)}")
    return (f"{rule}_0_1" if names else '""'), rules


def _value(schema: Any, defs: dict[str, Any], options: dict[str, Any]) -> str:
    """A keyword argument's value: Python's True/False/None for a plain boolean or null (as ChatGLM3 writes
    them), else JSON (its true, false and null read back as the same constants)."""
    kind = schema.get("type") if isinstance(schema, dict) and set(schema) - _ANNOTATIONS == {"type"} else None
    if kind == "boolean":
        return '("True" | "False")'
    if kind == "null":
        return '"None"'
    return _json({**(schema if isinstance(schema, dict) else {}), **defs, "x-guidance": options})


def _compile_error(request: ChatRequest, message: str) -> InvalidRequest:
    """The library's message, with the param of the schema that does not compile alone."""
    parts: list[tuple[str, Any, bool]] = []
    if request.response_format is not None and request.response_format.schema is not None:
        parts.append((request.response_format.param, request.response_format.schema, request.response_format.strict))
    parts += [(f"tools[{i}].function.parameters", t.parameters, t.strict) for i, t in enumerate(request.tools)]
    for param, schema, strict in parts:
        error = schema_error(schema, strict)
        if error:
            return InvalidRequest(f"The JSON schema cannot be enforced: {error}", param=param)
    return InvalidRequest(f"The JSON schema cannot be enforced: {_first_line(message)}",
                          param=parts[0][0] if parts else None)


def schema_error(schema: Any, strict: bool) -> str:
    """Why llguidance cannot compile this schema, or "" (no tokenizer needed: the worker can ask early)."""
    try:
        grammar = LLMatcher.grammar_from_json_schema(tighten(schema, strict))
    except ValueError as exc:
        return str(exc)
    return _first_line(LLMatcher.validate_grammar(grammar))


def _first_line(message: str) -> str:
    """llguidance's message without the grammar source it quotes under it."""
    line = message.strip().split("\n", 1)[0]
    return re.sub(r"^at \d+\(\d+\): ", "", line).removeprefix("failed to compile JSON schema: ")

