"""Building and validating exports against a real SQLite MyCfia DB."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest

from cfi_pipelines.db import create_engine
from cfi_pipelines.devtools.seed_mycfia import add_campaign, default_targets, valid_content
from cfi_pipelines.exports import CSV_COLUMNS, CampaignNotExportable, build_export, neutralise
from cfi_pipelines.model import mycfia


@pytest.fixture
def engine(tmp_path):
    eng = create_engine(f"sqlite:///{tmp_path / 'mycfia.db'}")
    mycfia.metadata.create_all(eng)
    yield eng
    eng.dispose()


def build(engine, campaign_id: int, outbox: Path):
    with engine.begin() as conn:
        return build_export(conn, campaign_id, outbox)


def test_valid_campaign_builds_three_consistent_files(engine, tmp_path):
    with engine.begin() as conn:
        add_campaign(conn, 7, tenant_code="T042", revision=3, targets=default_targets(5))
    bundle = build(engine, 7, tmp_path / "out")
    assert bundle.valid, bundle.error_text()
    assert bundle.directory == tmp_path / "out" / "T042"
    assert sorted(p.name for p in bundle.directory.iterdir()) == [
        "campaign_7_r3.csv",
        "campaign_7_r3.json",
        "campaign_7_r3.manifest.json",
    ]
    doc = json.loads((bundle.directory / "campaign_7_r3.json").read_text())
    assert doc["schema_version"] == "campaign_export.v1"
    assert doc["campaign"]["tenant_code"] == "T042"
    assert doc["targets"] == {"file": "campaign_7_r3.csv", "count": 5, "columns": list(CSV_COLUMNS)}
    raw = (bundle.directory / "campaign_7_r3.csv").read_bytes()
    assert raw.startswith(",".join(CSV_COLUMNS).encode() + b"\r\n")
    rows = list(csv.reader(raw.decode("utf-8").splitlines()))
    assert len(rows) == 6 and rows[1][:4] == ["7", "3", "1", "C000001"]
    manifest = json.loads((bundle.directory / "campaign_7_r3.manifest.json").read_text())
    assert manifest["row_count"] == 5
    for kind in ("json", "csv"):
        data = (bundle.directory / manifest["files"][kind]["name"]).read_bytes()
        assert manifest["files"][kind]["sha256"] == hashlib.sha256(data).hexdigest()
        assert manifest["files"][kind]["bytes"] == len(data)


def test_rebuilding_the_same_revision_is_byte_identical(engine, tmp_path):
    with engine.begin() as conn:
        add_campaign(conn, 8)
    first = build(engine, 8, tmp_path / "a")
    second = build(engine, 8, tmp_path / "b")
    for kind in ("json", "csv", "manifest"):
        assert first.local_path(kind).read_bytes() == second.local_path(kind).read_bytes()


def test_draft_and_missing_campaigns_are_not_exportable(engine, tmp_path):
    with engine.begin() as conn:
        add_campaign(conn, 9, status="draft")
    with pytest.raises(CampaignNotExportable, match="campaign 9 r1 is 'draft'"):
        build(engine, 9, tmp_path)
    with pytest.raises(CampaignNotExportable, match="campaign 404 does not exist"):
        build(engine, 404, tmp_path)


@pytest.mark.parametrize(
    "cell, expected",
    [
        ("=SUM(A1)", "'=SUM(A1)"),
        ("+cmd|' /C calc'!A0", "'+cmd|' /C calc'!A0"),
        ("-2+3", "'-2+3"),
        ("@SUM(1)", "'@SUM(1)"),
        ("\tx", "'\tx"),
        ("\rx", "'\rx"),
        ("+33 6 12 34 56 78", "+33 6 12 34 56 78"),
        ("-12.5", "-12.5"),
        ("Lyon", "Lyon"),
        ("", ""),
    ],
)
def test_neutralise(cell, expected):
    assert neutralise(cell) == expected


def test_formula_in_personalisation_is_neutralised_in_csv(engine, tmp_path):
    targets = default_targets(1)
    targets[0]["personalisation"] = {"note": "=1+1"}  # inside JSON: starts with '{', harmless
    targets[0]["last_name"] = "@risk"
    with engine.begin() as conn:
        add_campaign(conn, 10, targets=targets)
    bundle = build(engine, 10, tmp_path)
    assert bundle.valid, bundle.error_text()
    rows = list(csv.DictReader(bundle.local_path("csv").read_text(encoding="utf-8").splitlines()))
    assert rows[0]["last_name"] == "'@risk"
    assert json.loads(rows[0]["personalisation"]) == {"note": "=1+1"}


def _content(**changes):
    content = valid_content()
    for key, value in changes.items():
        if value is None:
            content.pop(key)
        else:
            content[key] = value
    return content


BAD = {
    "missing budget": (
        {"content": _content(budget=None)},
        "/campaign",
        "'budget' is a required property",
    ),
    "wrong type": (
        {"content": _content(budget={"amount": "lots", "currency": "EUR"})},
        "/campaign/budget/amount",
        "is not of type 'number'",
    ),
    "absurd budget": (
        {"content": _content(budget={"amount": 1e15, "currency": "EUR"})},
        "/campaign/budget/amount",
        "more than the maximum",
    ),
    "absurd message": (
        {"content": _content(messages=[{"segment": "all", "body": "x" * 50_000}])},
        "/campaign/messages/0/body",
        "50000 characters long",
    ),
    "path in tenant code": (
        {"tenant_code": "../etc"},
        "/campaign/tenant_code",
        "is not allowed here",
    ),
    "separator in tenant code": (
        {"tenant_code": "a/b"},
        "/campaign/tenant_code",
        "is not allowed here",
    ),
    "control char in name": ({"name": "Promo\x07"}, "/campaign/name", "control character"),
    # Python's "$" also matches before a final newline; the schema's ECMA "$" must not
    "trailing newline in tenant code": (
        {"tenant_code": "T001\n"},
        "/campaign/tenant_code",
        "control character",
    ),
    "not JSON": ({"content": "{not json"}, "/campaign/content", "is not valid JSON"),
    "unknown segment": (
        {"content": _content(messages=[{"segment": "vip", "body": "hi"}])},
        "/campaign/messages/0/segment",
        "unknown segment 'vip'",
    ),
    "target without contact": (
        {"targets": [{"client_reference": "C1"}]},
        "/targets/0",
        "needs an email or a phone",
    ),
    "target email formula": (
        {"targets": [{"client_reference": "C1", "email": "=HYPERLINK(1)"}]},
        "/targets/0/email",
        "is not allowed here",
    ),
    "target ref with dots": (
        {"targets": [{"client_reference": "..", "email": "a@b.fr"}]},
        "/targets/0/client_reference",
        "is not allowed here",
    ),
    "no targets": ({"targets": []}, "/targets/count", "less than the minimum"),
    "bad personalisation key": (
        {
            "targets": [
                {"client_reference": "C1", "email": "a@b.fr", "personalisation": {"a b": "x"}}
            ]
        },
        "/targets/0/personalisation",
        "is not allowed here",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_campaign_is_rejected_with_pointer_and_no_file(engine, tmp_path, kind):
    kwargs, where, why = BAD[kind]
    with engine.begin() as conn:
        add_campaign(conn, 20, **kwargs)
    out = tmp_path / "out"
    bundle = build(engine, 20, out)
    assert not bundle.valid
    assert any(e.pointer == where and why in e.message for e in bundle.errors), bundle.errors
    assert "campaign 20 r1" in bundle.error_text()
    assert not [p for p in out.rglob("*") if p.is_file()]  # nothing written, not even temp files


def test_non_utf8_text_is_reported_not_crashing(engine, tmp_path):
    with engine.begin() as conn:
        add_campaign(conn, 21, targets=default_targets(2))
        # SQLite keeps whatever bytes it is given: a Latin-1 'é' sneaks in.
        conn.exec_driver_sql(
            "UPDATE campaign_targets SET last_name = CAST(X'4DE96C616E6965' AS TEXT) WHERE position = 2"
        )
    bundle = build(engine, 21, tmp_path)
    assert [str(e) for e in bundle.errors] == [
        "/targets/1/last_name: is not valid UTF-8 text (byte 0xe9 at offset 1)"
    ]


def test_errors_are_all_counted_but_bounded(engine, tmp_path):
    targets = [{"client_reference": f"C{i}"} for i in range(500)]
    with engine.begin() as conn:
        add_campaign(conn, 22, targets=targets)
    bundle = build(engine, 22, tmp_path)
    assert bundle.error_count == 500
    assert len(bundle.errors) == 50
    assert bundle.error_text(limit=3).endswith("... and 497 more")


def test_large_campaign_streams(engine, tmp_path):
    with engine.begin() as conn:
        add_campaign(conn, 23, targets=default_targets(5_000))
    bundle = build(engine, 23, tmp_path)
    assert bundle.valid and bundle.row_count == 5_000
    with open(bundle.local_path("csv"), newline="", encoding="utf-8") as f:
        assert sum(1 for _ in csv.reader(f)) == 5_001


def test_schema_is_draft_2020_12():
    from jsonschema import Draft202012Validator

    from cfi_pipelines.schemas import load_schema

    schema = load_schema()
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_schema_patterns_anchor_at_the_very_end_like_ecma():
    from jsonschema import Draft202012Validator

    from cfi_pipelines.schemas import with_ecma_anchors

    pattern = {"type": "string", "pattern": "^[A-Z0-9]+$"}
    assert Draft202012Validator(pattern).is_valid("T001\n")  # Python's re: the trap
    assert not Draft202012Validator(with_ecma_anchors(pattern)).is_valid("T001\n")
    assert Draft202012Validator(with_ecma_anchors(pattern)).is_valid("T001")
    assert with_ecma_anchors({"pattern": "^a\\$"}) == {"pattern": "^a\\$"}  # an escaped $ stays
