"""The refresh's SQL self-test (views/selftest.py): run for real on SQLite and on
PostgreSQL, compiled for SQL Server (which cannot run here)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import mssql

from cfi_pipelines.db import create_engine
from cfi_pipelines.views.selftest import PREFIX, compiled_statements, run_selftest

STEPS = [
    "create_staging", "bulk_load", "indexes", "statistics", "upsert",
    "grant_copy", "tenant_policy", "swap", "swap_result", "cleanup",
]  # fmt: skip


def _scratch_left(engine) -> list[str]:
    return [t for t in sa.inspect(engine).get_table_names() if t.startswith(PREFIX)]


def test_every_step_passes_on_sqlite_and_cleans_up(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'common.db'}")
    results = run_selftest(engine)
    assert [r.step for r in results] == STEPS
    assert all(r.ok for r in results), results
    assert "ON CONFLICT" in next(r.detail for r in results if r.step == "upsert")
    assert _scratch_left(engine) == []


@pytest.mark.postgres
def test_every_step_passes_on_postgres_with_copy_and_grants(pg_url):
    engine = create_engine(pg_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'mycfia_readonly')"
            " THEN CREATE ROLE mycfia_readonly LOGIN; END IF; END $$"
        )
    results = {r.step: r for r in run_selftest(engine)}
    assert list(results) == STEPS
    assert all(r.ok for r in results.values()), results
    assert "COPY FROM STDIN" in results["bulk_load"].detail
    assert "SELECT to mycfia_readonly" in results["grant_copy"].detail
    assert results["statistics"].detail.startswith("ANALYZE")
    assert _scratch_left(engine) == []
    engine.dispose()


def test_a_failing_step_is_reported_and_the_tables_are_still_dropped(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'common.db'}")
    token = "deadbeef"
    with engine.begin() as conn:  # the staging name is taken: create fails half-way
        conn.exec_driver_sql(f"CREATE TABLE {PREFIX}{token}_staging (x int)")
    results = {r.step: r for r in run_selftest(engine, token=token)}
    assert not results["create_staging"].ok
    assert "already exists" in results["create_staging"].detail
    assert results["upsert"].detail == "not run (an earlier step failed)"
    assert results["cleanup"].ok
    assert _scratch_left(engine) == []


def test_sql_server_statements_compile_to_merge_sp_rename_and_update_statistics():
    sql = compiled_statements(mssql.dialect())
    assert sql["upsert"][0].startswith(f"MERGE [{PREFIX}000000] WITH (HOLDLOCK)")
    assert sql["upsert"][0].rstrip().endswith(";")
    assert all("sp_rename" in s for s in sql["swap"])
    assert sql["analyze"] == [f"UPDATE STATISTICS {PREFIX}000000_staging"]
    assert "sys.database_permissions" in sql["grant_copy"][0]
    assert sql["create"][0].startswith(f"CREATE TABLE {PREFIX}000000_staging")
    assert "NUMERIC(14, 2)" in sql["create"][0]
