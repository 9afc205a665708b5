"""Campaign-wide target checks (unique references) and C1 control characters,
against a real SQLite MyCfia DB, jsonschema and the compiled fast check."""

from __future__ import annotations

import csv
import io

import pytest
from jsonschema import Draft202012Validator

from cfi_pipelines.db import create_engine
from cfi_pipelines.devtools.seed_mycfia import add_campaign, default_targets
from cfi_pipelines.exports import build_export, document
from cfi_pipelines.exports.csvfile import needs_quoting, open_writer, write_rows
from cfi_pipelines.exports.fastcheck import compile_check
from cfi_pipelines.model import mycfia
from cfi_pipelines.schemas import load_schema, with_ecma_anchors


@pytest.fixture
def engine(tmp_path):
    eng = create_engine(f"sqlite:///{tmp_path / 'mycfia.db'}")
    mycfia.metadata.create_all(eng)
    yield eng
    eng.dispose()


def build(engine, campaign_id, outbox, targets):
    with engine.begin() as conn:
        add_campaign(conn, campaign_id, targets=targets)
        return build_export(conn, campaign_id, outbox)


def files_under(path):
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


# --- D6: duplicate client references -------------------------------------------------


def test_same_reference_with_different_emails_is_rejected_at_second_occurrence(engine, tmp_path):
    targets = default_targets(3)
    targets[2]["client_reference"] = targets[0]["client_reference"]  # C000001, other email
    assert targets[2]["email"] != targets[0]["email"]
    out = tmp_path / "out"
    bundle = build(engine, 30, out, targets)
    assert not bundle.valid
    assert [e.pointer for e in bundle.errors] == ["/targets/2/client_reference"]
    message = bundle.errors[0].message
    assert "duplicate client_reference 'C000001'" in message and "/targets/0" in message
    assert not files_under(out)  # nothing delivered, not even a temp file


def test_same_target_twice_is_rejected(engine, tmp_path):
    targets = default_targets(2)
    targets.insert(1, dict(targets[0]))  # the very same row again, at index 1
    bundle = build(engine, 31, tmp_path / "out", targets)
    assert [str(e) for e in bundle.errors] == [
        "/targets/1/client_reference: duplicate client_reference 'C000001': "
        "already used by /targets/0"
    ]


def test_every_further_duplicate_points_at_the_first(engine, tmp_path):
    targets = default_targets(4)
    for t in targets[1:]:
        t["client_reference"] = "C000001"
    bundle = build(engine, 32, tmp_path / "out", targets)
    assert bundle.error_count == 3
    assert [e.pointer for e in bundle.errors] == [
        f"/targets/{i}/client_reference" for i in (1, 2, 3)
    ]
    assert all(e.message.endswith("already used by /targets/0") for e in bundle.errors)


def test_unique_references_at_scale_are_valid_and_one_duplicate_is_found(engine, tmp_path):
    targets = default_targets(100_000)
    bundle = build(engine, 33, tmp_path / "ok", targets)
    assert bundle.valid and bundle.row_count == 100_000
    targets[99_999]["client_reference"] = targets[50_000]["client_reference"]
    bundle = build(engine, 34, tmp_path / "dup", targets)
    assert [e.pointer for e in bundle.errors] == ["/targets/99999/client_reference"]
    assert "/targets/50000" in bundle.errors[0].message


# --- D7: C1 controls and Unicode line/paragraph separators ---------------------------

FORBIDDEN = ["\x80", "\x85", "\x9b", "\x9f", "\u2028", "\u2029"]
ALLOWED = ["\x7e", "\xa0", "é", "\u2027", "\u202a"]


def schema_defs():
    return with_ecma_anchors(load_schema())["$defs"]


@pytest.mark.parametrize("name", ["line", "text"])
@pytest.mark.parametrize("char", FORBIDDEN)
def test_line_and_text_reject_c1_and_separators(name, char):
    subschema = schema_defs()[name]
    value = f"Mar{char}tin"
    assert not Draft202012Validator(subschema).is_valid(value)
    assert not compile_check(subschema)(value)


@pytest.mark.parametrize("name", ["line", "text"])
@pytest.mark.parametrize("char", ALLOWED)
def test_line_and_text_still_accept_their_neighbours(name, char):
    subschema = schema_defs()[name]
    value = f"Mar{char}tin"
    assert Draft202012Validator(subschema).is_valid(value)
    assert compile_check(subschema)(value)


@pytest.mark.parametrize("char", FORBIDDEN)
@pytest.mark.parametrize("field", ["first_name", "last_name", "personalisation"])
def test_target_row_fast_path_and_jsonschema_agree(char, field):
    _, validator = document.validators()
    row = default_targets(1)[0]
    if field == "personalisation":
        row["personalisation"] = {"city": f"Ly{char}on"}
    else:
        row[field] = f"Mar{char}tin"
    assert not validator.is_valid(row)
    assert not document.target_is_valid(row)  # the compiled check used for 100k rows
    errors = list(validator.iter_errors(row))
    assert [document.describe(e) for e in errors] == ["contains a control character"]


def test_nel_in_a_target_name_is_rejected_and_never_written(engine, tmp_path):
    targets = default_targets(2)
    targets[1]["first_name"] = "Mar\u0085tin"
    out = tmp_path / "out"
    bundle = build(engine, 35, out, targets)
    assert [str(e) for e in bundle.errors] == [
        "/targets/1/first_name: contains a control character"
    ]
    assert not files_under(out)


def test_nel_in_campaign_name_is_rejected(engine, tmp_path):
    with engine.begin() as conn:
        add_campaign(conn, 36, name="Promo\u2028été")
        bundle = build_export(conn, 36, tmp_path / "out")
    assert [str(e) for e in bundle.errors] == ["/campaign/name: contains a control character"]


@pytest.mark.parametrize("char", [*FORBIDDEN, "\x00", "\x1f", "\x7f", "\x0b", "\x0c", "\x1c"])
def test_csv_quotes_every_cell_with_a_control_or_separator(char):
    assert needs_quoting(f"a{char}b")
    stream = io.StringIO(newline="")
    write_rows(stream, [["1", f"Mar{char}tin", "plain"]])
    body = stream.getvalue().split("\r\n", 1)[1]
    # quoted, so a reader that splits lines on NEL/U+2028 (str.splitlines...) cannot
    # cut the row in two unquoted halves
    assert body == f'1,"Mar{char}tin",plain\r\n'
    assert list(csv.reader(io.StringIO(body, newline=""))) == [["1", f"Mar{char}tin", "plain"]]


def test_csv_writer_used_by_build_export_quotes_them_too():
    stream = io.StringIO(newline="")
    open_writer(stream).writerow(["x\u2029y", "plain", 3])
    assert stream.getvalue() == '"x\u2029y",plain,3\r\n'
    assert not needs_quoting("Martin") and not needs_quoting("é\xa0x")
