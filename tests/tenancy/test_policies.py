"""Policies in place and checked: doctor on each engine, the pipeline's own probe reads
under forced row-level security, the selftest step, and the SQL Server script and swap
statements (compiled: no SQL Server runs here)."""

from __future__ import annotations

import re

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.dialects.mssql import pyodbc

from cfi_pipelines.ops.doctor import check_tenancy
from cfi_pipelines.ops.kpis import _read_latency_kpi
from cfi_pipelines.ops.metrics import PROBE_LIMIT, probe_query, probe_tenant
from cfi_pipelines.tenancy.policies import mssql_swap_statements
from cfi_pipelines.tenancy.roles import sync_tenants
from cfi_pipelines.views.selftest import compiled_statements, run_selftest
from tests.tenancy.conftest import SQL, install_rls

MSSQL = pyodbc.dialect()


@pytest.mark.postgres
def test_doctor_on_postgres_before_and_after_the_script(pg_dbs):
    with pg_dbs.common.connect() as conn:
        (check,) = check_tenancy(conn)
    assert check.status == "FAIL" and "postgresql_row_level_security.sql" in check.detail
    assert "cfi_stocks" in check.detail and check.variable == "CFI_COMMON_URL"
    install_rls(pg_dbs.common_url)
    sync_tenants(pg_dbs.source, pg_dbs.common, None)
    with pg_dbs.common.connect() as conn:
        checks = check_tenancy(conn)
    assert [c.status for c in checks] == ["OK", "OK"], checks
    assert "forced" in checks[0].detail and "21/21 tenants" in checks[1].detail


@pytest.mark.postgres
def test_doctor_names_a_reading_account_that_bypasses_the_policies(rls_db):
    role = rls_db.role("SUD")
    with rls_db.superuser() as su:
        su.execute(f"ALTER ROLE {role} BYPASSRLS")
    try:
        with rls_db.common.connect() as conn:
            checks = check_tenancy(conn)
        bad = [c for c in checks if c.status == "FAIL"]
        assert len(bad) == 1 and role in bad[0].detail and "NOBYPASSRLS" in bad[0].detail
    finally:
        with rls_db.superuser() as su:
            su.execute(f"ALTER ROLE {role} NOBYPASSRLS")


@pytest.mark.postgres
def test_the_pipelines_own_probe_reads_see_every_tenant_under_forced_rls(rls_db):
    """metrics and kpis read as the refresher (the tables' owner): FORCE applies to it,
    its own policy (cfi_refresher_rows) lets it read every row."""
    with rls_db.common.connect() as conn:
        assert conn.scalar(sa.text("SELECT current_user")) == "cfi_refresher"
        tenant = probe_tenant(conn)
        assert tenant == 1  # the root: the closure is visible in full to the refresher
        for view in ("stocks", "invoices"):
            assert len(conn.execute(probe_query(view, tenant)).all()) == PROBE_LIMIT
        kpi = _read_latency_kpi(conn)
        assert kpi.value is not None and len(kpi.details["per_view_s"]) == 4
        assert conn.scalar(sa.text("SELECT count(*) FROM cfi_stocks")) == rls_db.count("cfi_stocks")


@pytest.mark.postgres
def test_selftest_copies_the_policy_onto_the_staging_table(rls_db):
    steps = {r.step: r for r in run_selftest(rls_db.common)}
    assert steps["tenant_policy"].ok, steps["tenant_policy"].detail
    assert "forced" in steps["tenant_policy"].detail
    assert all(r.ok for r in steps.values()), steps


@pytest.mark.postgres
def test_tenant_roles_follow_the_secret_and_cfis_tenants(rls_db, monkeypatch):
    role = rls_db.role("NORD-01")
    # a new secret: the next refresh sets every password again
    new = sync_tenants(rls_db.source, rls_db.common, "rotated-secret")
    assert new.passwords_set == 21 and new.roles_created == 0
    with pytest.raises(psycopg.OperationalError):
        rls_db.as_tenant("NORD-01").close()  # the old password no longer logs in
    from cfi_pipelines.tenancy.binding import derive_password

    with psycopg.connect(
        host="127.0.0.1", port=rls_db.port, dbname=rls_db.dbname, user=role,
        password=derive_password("rotated-secret", role),
    ) as conn:  # fmt: skip
        assert conn.execute("SELECT code FROM cfi_tenants").fetchall() == [("NORD-01",)]
        attrs = conn.execute(
            "SELECT rolsuper, rolbypassrls, rolcreaterole, rolcreatedb FROM pg_roles "
            "WHERE rolname = current_user"
        ).fetchone()
        assert attrs == (False, False, False, False)
    # a tenant gone from CFI loses LOGIN; its map line goes
    with rls_db.source.begin() as conn:
        conn.exec_driver_sql("DELETE FROM tenants WHERE code = 'EST-NEW'")
    gone = sync_tenants(rls_db.source, rls_db.common, "rotated-secret")
    assert gone.roles_disabled == 1 and gone.mapped == 1
    assert sync_tenants(rls_db.source, rls_db.common, "rotated-secret").mapped == 0  # in sync


def test_sqlserver_script_and_swap_statements():
    script = (SQL / "sqlserver_row_level_security.sql").read_text()
    batches = [b for b in re.split(r"^GO$", script, flags=re.M) if b.strip()]
    assert len(batches) == 6
    for view in ("cfi_stocks", "cfi_operations", "cfi_invoices", "cfi_campaigns"):
        assert f"fn_tenant_rows(tenant_id) ON dbo.{view}" in script
    assert "fn_tenant_closure_rows(ancestor) ON dbo.cfi_tenant_closure" in script
    assert "SESSION_CONTEXT(N'tenant_id')" in script and "@read_only = 1" in script
    assert "STATE = ON, SCHEMABINDING = ON" in script
    add, drop = mssql_swap_statements("cfi_stocks", "cfi_stocks__staging", "cfi_stocks__old")
    assert "OBJECT_ID(N'dbo.cfi_stocks')" in add and "QUOTENAME(N'cfi_stocks__staging')" in add
    assert " ADD " in add and "sys.security_predicates" in add and "sp_executesql" in add
    assert "OBJECT_ID(N'dbo.cfi_stocks__old')" in drop and " DROP " in drop
    # the swap runs them around its renames; the selftest compiles them for SQL Server
    assert compiled_statements(MSSQL)["tenant_policy"] == [
        *mssql_swap_statements("cfi_selftest_000000", "cfi_selftest_000000_staging",
                               "cfi_selftest_000000_old")
    ]  # fmt: skip
    assert "tenant_policy" not in compiled_statements(sa.create_engine("sqlite://").dialect)


def test_doctor_on_sqlite_names_the_reference_reader(sqlite_dbs):
    with sqlite_dbs.common.connect() as conn:
        (check,) = check_tenancy(conn)
    assert check.status == "OK" and "reference reader" in check.detail


class _MssqlCatalog:
    """A stand-in connection answering doctor's one catalog query as SQL Server would."""

    class dialect:  # noqa: N801 - mimics sa.Connection.dialect
        name = "mssql"

    def __init__(self, rows):
        self.rows = rows

    def execute(self, stmt):
        assert "sys.security_predicates" in str(stmt)
        rows = self.rows

        class Result:
            def all(self):
                return rows

        return Result()


def test_doctor_on_sqlserver_reads_the_security_policy():
    views = ["cfi_stocks", "cfi_operations", "cfi_invoices", "cfi_campaigns"]
    ok = check_tenancy(_MssqlCatalog([(v, True) for v in views]))
    assert [c.status for c in ok] == ["OK", "OK"] and "sp_set_session_context" in ok[1].detail
    (bad,) = check_tenancy(_MssqlCatalog([(v, v != "cfi_invoices") for v in views]))
    assert bad.status == "FAIL" and "cfi_invoices" in bad.detail
    assert "sqlserver_row_level_security.sql" in bad.detail
