"""A fast yes/no JSON Schema check, compiled from the schema, for per-row validation.

jsonschema's ``is_valid`` costs about 125 µs per target (a validator is
"evolved" for every keyword and subschema); 100k targets took 13 s. This module
compiles a subschema into plain closures that answer the same question, *valid
or not*, in a few microseconds. It never produces error messages: when a row is
invalid, the caller asks jsonschema for the errors (JSON pointer + message), so
messages are unchanged and only valid rows take the fast path.

Only the keywords below are compiled, with jsonschema's exact semantics (types
by ``isinstance``, bool is not a number, ``pattern`` is ``re.search``, lengths
in code points). Any other keyword makes :func:`compile_check` raise
:class:`Unsupported`, and the caller keeps jsonschema: a schema change can make
validation slower, never looser. ``tests/exports/test_fastcheck.py`` checks the
equivalence on a corpus of mutated targets.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Check = Callable[[Any], bool]

_ANNOTATIONS = frozenset({"description", "title", "$comment", "examples", "default"})
_SUPPORTED = _ANNOTATIONS | {
    "type",
    "properties",
    "additionalProperties",
    "required",
    "maxProperties",
    "minProperties",
    "propertyNames",
    "maxLength",
    "minLength",
    "pattern",
    "anyOf",
    "allOf",
}


class Unsupported(ValueError):
    """The schema uses a keyword this module does not compile."""


def _is_integer(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    return isinstance(v, int) or (isinstance(v, float) and v.is_integer())


_TYPES: dict[str, Check] = {
    "string": lambda v: isinstance(v, str),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "null": lambda v: v is None,
    "boolean": lambda v: isinstance(v, bool),
    "number": lambda v: isinstance(v, numbers.Number) and not isinstance(v, bool),
    "integer": _is_integer,
}


def _always(_: Any) -> bool:
    return True


def _never(_: Any) -> bool:
    return False


@dataclass
class _Conj:
    """A subschema as a conjunction of constraints; ``allOf`` merges into its parent."""

    never: bool = False
    types: list[tuple[str, ...]] = field(default_factory=list)  # each: one of these types
    min_len: int = 0
    max_len: float = math.inf
    patterns: list[Any] = field(default_factory=list)  # compiled regexes, re.search semantics
    required: set[str] = field(default_factory=set)
    min_props: int = 0
    max_props: float = math.inf
    objects: list[tuple[dict[str, Check], Check | None, Check | None]] = field(
        default_factory=list
    )  # (properties, additionalProperties, propertyNames)
    any_required: list[tuple[tuple[str, ...], ...]] = field(default_factory=list)
    any_of: list[tuple[Check, ...]] = field(default_factory=list)

    @property
    def only_required(self) -> bool:
        """True when the subschema says nothing but ``required``."""
        return self == _Conj(required=self.required)


def _collect(schema: Any, into: _Conj) -> None:
    if schema is True:
        return
    if schema is False:
        into.never = True
        return
    if not isinstance(schema, dict):
        raise Unsupported(f"not a schema: {schema!r}")
    unknown = set(schema) - _SUPPORTED
    if unknown:
        raise Unsupported(f"keywords not compiled: {sorted(unknown)}")
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        unknown_types = set(names) - set(_TYPES)
        if unknown_types:
            raise Unsupported(f"types not compiled: {sorted(unknown_types)}")
        into.types.append(tuple(names))
    into.min_len = max(into.min_len, schema.get("minLength", 0))
    into.max_len = min(into.max_len, schema.get("maxLength", math.inf))
    if "pattern" in schema:
        into.patterns.append(re.compile(schema["pattern"]))
    into.required.update(schema.get("required", ()))
    into.min_props = max(into.min_props, schema.get("minProperties", 0))
    into.max_props = min(into.max_props, schema.get("maxProperties", math.inf))
    if any(k in schema for k in ("properties", "additionalProperties", "propertyNames")):
        props = {k: compile_check(s) for k, s in schema.get("properties", {}).items()}
        extra = schema.get("additionalProperties", True)
        names_schema = schema.get("propertyNames", True)
        into.objects.append(
            (
                props,
                None if extra is True else compile_check(extra),
                None if names_schema is True else compile_check(names_schema),
            )
        )
    for sub in schema.get("allOf", ()):
        _collect(sub, into)
    if "anyOf" in schema:
        options = []
        for sub in schema["anyOf"]:
            conj = _Conj()
            _collect(sub, conj)
            options.append(conj)
        if all(o.only_required for o in options):
            into.any_required.append(tuple(tuple(sorted(o.required)) for o in options))
        else:
            into.any_of.append(tuple(_emit(o) for o in options))


def compile_check(schema: Any) -> Check:
    """``check(instance) -> bool``, True exactly when ``schema`` accepts ``instance``.

    ``schema`` must be self-contained (no ``$ref``): raises :class:`Unsupported` otherwise.
    """
    conj = _Conj()
    _collect(schema, conj)
    return _emit(conj)


def _emit(c: _Conj) -> Check:
    if c.never:
        return _never
    checks: list[Check] = []
    string_only = c.types == [("string",)]
    object_only = c.types == [("object",)]
    if not (string_only or object_only):
        for names in c.types:
            tests = tuple(_TYPES[n] for n in names)
            checks.append(tests[0] if len(tests) == 1 else _any_of(tests))
    string = _string_check(c, typed=string_only)
    if string is not None:
        checks.append(string)
    elif string_only:
        checks.append(_TYPES["string"])
    obj = _object_check(c, typed=object_only)
    if obj is not None:
        checks.append(obj)
    elif object_only:
        checks.append(_TYPES["object"])
    checks.extend(_any_of(options) for options in c.any_of)
    return _all(checks)


def _any_of(options: tuple[Check, ...]) -> Check:
    def check(v: Any) -> bool:
        for option in options:  # noqa: SIM110 - a plain loop beats any(<genexpr>) here
            if option(v):
                return True
        return False

    return check


def _all(checks: list[Check]) -> Check:
    if not checks:
        return _always
    if len(checks) == 1:
        return checks[0]
    items = tuple(checks)

    def check(v: Any) -> bool:
        for c in items:  # noqa: SIM110 - a plain loop beats all(<genexpr>) here
            if not c(v):
                return False
        return True

    return check


def _string_check(c: _Conj, typed: bool) -> Check | None:
    # String keywords ignore other types, unless the type is "string" (then fused).
    lo, hi = c.min_len, c.max_len
    searches = tuple(p.search for p in c.patterns)
    if not lo and hi == math.inf and not searches:
        return None
    other = not typed  # what a non-string gets
    if len(searches) == 1:
        (search,) = searches

        def check(v: Any) -> bool:
            if not isinstance(v, str):
                return other
            return lo <= len(v) <= hi and search(v) is not None

        return check

    def check_all(v: Any) -> bool:
        if not isinstance(v, str):
            return other
        if not lo <= len(v) <= hi:
            return False
        for search in searches:  # noqa: SIM110
            if search(v) is None:
                return False
        return True

    return check_all


def _object_check(c: _Conj, typed: bool) -> Check | None:
    # Object keywords ignore other types, unless the type is "object" (then fused).
    if not (c.required or c.min_props or c.max_props != math.inf or c.objects or c.any_required):
        return None
    other = not typed
    required = tuple(sorted(c.required))
    lo, hi = c.min_props, c.max_props
    any_required = tuple(c.any_required)
    if len(c.objects) == 1:
        props, extra, names = c.objects[0]
    elif not c.objects:
        props, extra, names = {}, None, None
    else:  # several property constraints (allOf of objects): rare, check them in turn
        nested = [_Conj(objects=[o]) for o in c.objects]
        parts = [_object_check(n, typed=False) for n in nested]
        rest = _object_check(
            _Conj(
                required=c.required,
                min_props=lo,
                max_props=hi,
                any_required=c.any_required,
            ),
            typed=typed,
        )
        if rest is None and typed:
            rest = _TYPES["object"]
        return _all([p for p in (rest, *parts) if p is not None])

    def check(v: Any) -> bool:
        if not isinstance(v, dict):
            return other
        if not lo <= len(v) <= hi:
            return False
        for name in required:
            if name not in v:
                return False
        for options in any_required:
            for option in options:
                for name in option:
                    if name not in v:
                        break
                else:
                    break  # this option holds
            else:
                return False
        for key, value in v.items():
            if names is not None and not names(key):
                return False
            sub = props.get(key)
            if sub is not None:
                if not sub(value):
                    return False
            elif extra is not None and not extra(value):
                return False
        return True

    return check
