"""`cfi-pipelines doctor`'s source:capture line: the change-capture mode and why, per engine."""

from __future__ import annotations

import pytest

from cfi_pipelines.ops.doctor import check_capture


def test_sqlite_says_data_version_and_what_it_does_not_see(sqlite_dbs):
    line = check_capture(sqlite_dbs.source)
    assert line.component == "source:capture" and line.status == "OK"
    assert line.detail.startswith("sqlite_data_version: ")
    assert "updated_at" in line.detail


@pytest.mark.postgres
def test_postgres_with_logical_decoding_is_exact(pg_logical_dbs):
    line = check_capture(pg_logical_dbs.source)
    assert line.status == "OK", line
    assert line.detail.startswith("pg_logical: wal_level is logical")
    assert "every committed insert, update and delete" in line.detail


@pytest.mark.postgres
def test_postgres_without_it_names_the_script(pg_dbs):
    line = check_capture(pg_dbs.source)
    assert line.status == "WARN" and line.variable == "CFI_SOURCE_URL"
    assert "wal_level is replica: counter gate" in line.detail
    assert "deploy/sql/postgresql_logical_decoding.sql" in line.detail
