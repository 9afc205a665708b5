"""A failed refresh says what failed: CFI's schema changed (which column, read by which
view) or which database is unreachable and which variable to check, in one whole line,
on `refresh` and in `status` (issue 16 items 4 and 6)."""

from __future__ import annotations

import pytest

from cfi_pipelines.cli import main
from cfi_pipelines.db import create_engine
from cfi_pipelines.definitions import build_defs
from cfi_pipelines.ops.runs import run_refresh, step_failures
from cfi_pipelines.views.diagnosis import DiagnosedFailure, diagnose
from cfi_pipelines.views.refresh import refresh_view
from cfi_pipelines.views.spec import get_view
from tests.fixtures.common import Databases
from tests.fixtures.http import free_port

SOURCE_HINT = "check CFI_SOURCE_URL (host, port, database, credentials)"


def refresh_command_failures(view: str) -> list[str]:
    """The lines `cfi-pipelines refresh VIEW` prints for its failed steps (``FAILED …``),
    with the definitions built from this test's environment."""
    return [f"FAILED {f}" for f in step_failures(run_refresh([view], defs=build_defs()))]


def _rename(dbs: Databases) -> None:
    with dbs.source.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE products RENAME COLUMN name TO label")


def test_a_renamed_column_is_a_schema_change_not_an_outage(sqlite_dbs: Databases):
    _rename(sqlite_dbs)
    with pytest.raises(DiagnosedFailure) as info:
        refresh_view(get_view("stocks"), sqlite_dbs.source, sqlite_dbs.common)
    d = info.value.diagnosis
    assert d.kind == "schema"
    assert d.message == "CFI's schema changed: products.name is missing (read by stocks)"
    assert [(x.table, x.column) for x in d.differences] == [("products", "name")]


def test_refresh_command_after_a_rename_names_the_column_in_one_line(sqlite_dbs: Databases, capsys):
    _rename(sqlite_dbs)
    (line,) = refresh_command_failures("stocks")
    assert "CFI's schema changed: products.name is missing (read by stocks)" in line
    assert "unreachable" not in line and "OperationalError" not in line
    main(["status"])
    out = capsys.readouterr().out
    (row,) = [x for x in out.splitlines() if x.startswith("stocks")]
    assert "last error: view stocks: CFI's schema changed: products.name is missing" in row


def test_refresh_command_with_the_source_down_names_the_variable_whole(
    sqlite_dbs: Databases, capsys, monkeypatch
):
    url = f"postgresql+psycopg://x@127.0.0.1:{free_port()}/nope"
    monkeypatch.setenv("CFI_SOURCE_URL", url)
    (line,) = refresh_command_failures("stocks")
    assert "CFI's source DB postgresql+psycopg://x@127.0.0.1:" in line
    assert SOURCE_HINT in line and "Traceback" not in line
    assert "dagster._core" not in line  # the description, not the exception's repr
    main(["status"])
    out = capsys.readouterr().out
    (row,) = [x for x in out.splitlines() if x.startswith("stocks")]
    assert SOURCE_HINT in row
    assert "sqlalche.me" not in out and "Background on this error" not in out  # no raw driver text


def test_the_common_db_down_names_its_variable(sqlite_dbs: Databases, tmp_path):
    gone = create_engine(f"postgresql+psycopg://x@127.0.0.1:{free_port()}/nope")
    try:
        with pytest.raises(Exception) as info:
            refresh_view(get_view("stocks"), sqlite_dbs.source, gone)
        d = diagnose(get_view("stocks"), sqlite_dbs.source, gone, info.value)
    finally:
        gone.dispose()
    assert d is not None and d.kind == "common_down"
    assert "check CFI_COMMON_URL (host, port, database, credentials)" in d.message
    assert "\n" not in d.message


def test_a_schema_change_falls_back_to_the_cfi_api_like_an_outage(sqlite_dbs: Databases):
    """The source answers, so the lag sensor's decision rests on the failed refreshes:
    past 15 min and 2 schema failures, the view is served from the CFI API."""
    from datetime import timedelta

    from cfi_pipelines.clock import utcnow
    from cfi_pipelines.sensors.lag import Probe, decide_view
    from cfi_pipelines.views.refresh import read_status

    refresh_view(get_view("stocks"), sqlite_dbs.source, sqlite_dbs.common)
    _rename(sqlite_dbs)
    for _ in range(2):
        with pytest.raises(DiagnosedFailure):
            refresh_view(get_view("stocks"), sqlite_dbs.source, sqlite_dbs.common, mode="full")
    row = read_status(sqlite_dbs.common)["stocks"]
    later = utcnow() + timedelta(minutes=16)
    decision = decide_view("stocks", row, source=Probe(True), now=later)
    assert decision.action == "fallback" and "2 refreshes failed" in decision.reason
