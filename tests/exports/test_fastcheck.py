"""The compiled target check agrees with jsonschema, row for row."""

from __future__ import annotations

import itertools

import pytest

from cfi_pipelines.exports import document
from cfi_pipelines.exports.fastcheck import Unsupported, compile_check

VALID = {
    "client_reference": "C000001",
    "email": "client1@example.fr",
    "phone": "+33 6 12 34 56 78",
    "segment": "all",
    "first_name": "Camille",
    "last_name": "Martin",
    "personalisation": {"city": "Lyon", "offer": "10%"},
}

# Values that sit on, or just across, every boundary of $defs/target.
ODD_VALUES = [
    None,
    True,
    0,
    1.5,
    [],
    ["a"],
    {},
    {"a": "b"},
    "",
    "x",
    "C1",
    "C1\n",
    "..",
    "a/b",
    "_x",
    "A" * 64,
    "A" * 65,
    "é",
    "x\x00",
    "x\x07y",
    "tab\there",
    "=HYPERLINK(1)",
    "a@b.fr",
    "a@b",
    "a b@c.fr",
    "a@@b.fr",
    "x" * 200,
    "x" * 201,
    "y" * 249 + "@b.fr",
    "y" * 250 + "@b.fr",
    "+33 6 12 34 56 78",
    "12345",
    "123456",
    "1" * 20,
    "1" * 21,
    "(0)1-23.45",
]
PERSONALISATIONS = [
    {},
    {"a b": "x"},
    {"_ok": "x"},
    {"9bad": "x"},
    {"k": 1},
    {"k": None},
    {"k": "x" * 500},
    {"k": "x" * 501},
    {"k": "line\nbreak"},
    {f"k{i}": "v" for i in range(20)},
    {f"k{i}": "v" for i in range(21)},
    {"k" * 64: "v"},
    {"k" * 65: "v"},
]


def corpus() -> list[object]:
    cases: list[object] = [VALID, {}, [], "x", None, 3]
    for field in VALID:
        without = {k: v for k, v in VALID.items() if k != field}
        cases.append(without)
        for value in ODD_VALUES:
            cases.append({**VALID, field: value})
    for p in PERSONALISATIONS:
        cases.append({**VALID, "personalisation": p})
    cases.append({**VALID, "unknown": "x"})
    cases.append({"client_reference": "C1", "phone": "0612345678"})
    cases.append({"client_reference": "C1", "email": "a@b.fr"})
    cases.append({"client_reference": "C1"})
    # pairs of odd values across two fields, to exercise anyOf and short-circuits
    for a, b in itertools.product(["email", "phone", "client_reference"], repeat=2):
        for va, vb in itertools.product(ODD_VALUES[::5], repeat=2):
            cases.append({**{k: v for k, v in VALID.items() if k not in (a, b)}, a: va, b: vb})
    return cases


def test_compiled_check_agrees_with_jsonschema_on_the_corpus():
    _, validator = document.validators()
    check = compile_check(validator.schema)
    cases = corpus()
    verdicts = [(validator.is_valid(c), check(c)) for c in cases]
    disagreements = [c for c, (slow, fast) in zip(cases, verdicts, strict=True) if slow != fast]
    assert not disagreements
    # the corpus really exercises both answers
    assert sum(slow for slow, _ in verdicts) > 50
    assert sum(not slow for slow, _ in verdicts) > 200


def test_the_shipped_target_schema_is_compiled_not_left_to_jsonschema():
    _, validator = document.validators()
    assert document.target_check() is not validator.is_valid
    assert document.target_is_valid(VALID)
    assert not document.target_is_valid({**VALID, "email": "=1+1"})


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "format": "email"},
        {"$ref": "#/$defs/x"},
        {"enum": [1, 2]},
        {"properties": {"a": {"const": 1}}},
        {"type": "complex"},
    ],
)
def test_uncompiled_keywords_are_refused_not_ignored(schema):
    with pytest.raises(Unsupported):
        compile_check(schema)


@pytest.mark.parametrize(
    "schema, instance, expected",
    [
        ({"type": "integer"}, 1.0, True),
        ({"type": "integer"}, True, False),
        ({"type": "number"}, False, False),
        ({"type": ["string", "null"]}, None, True),
        ({"type": ["string", "null"]}, 1, False),
        ({"minLength": 2}, 5, True),  # string keywords ignore other types
        ({"required": ["a"]}, "not an object", True),
        ({"allOf": [{"maxLength": 3}, {"minLength": 2}]}, "abcd", False),
        ({"additionalProperties": False, "properties": {"a": True}}, {"a": 1, "b": 2}, False),
        ({"minProperties": 1}, {}, False),
        (False, 1, False),
    ],
)
def test_keyword_semantics_match_jsonschema(schema, instance, expected):
    from jsonschema import Draft202012Validator

    assert Draft202012Validator(schema).is_valid(instance) is expected
    assert compile_check(schema)(instance) is expected


def test_all_of_several_object_schemas_keeps_the_type():
    schema = {
        "type": "object",
        "allOf": [
            {"properties": {"a": {"type": "string"}}},
            {"properties": {"b": {"type": "integer"}}},
        ],
    }
    check = compile_check(schema)
    assert check({"a": "x", "b": 1})
    assert not check({"a": 1})
    assert not check({"b": "x"})
    assert not check("not an object")
