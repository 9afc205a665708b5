"""The read-only account of deploy/sql/postgresql_readonly.sql, proven on a real
PostgreSQL: it reads the views, cannot write, and keeps its SELECT across refreshes
(the swap replaces the table object)."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from cfi_pipelines.model import cfi_common as common
from cfi_pipelines.views.refresh import refresh_view
from cfi_pipelines.views.spec import VIEWS, get_view

pytestmark = pytest.mark.postgres

VIEW_TABLES = (common.cfi_stocks, common.cfi_view_status, common.cfi_refresh_log)
GRANTS = Path(__file__).resolve().parents[2] / "deploy" / "sql" / "postgresql_readonly.sql"


def _as_readonly(pg_dbs, postgres):
    url = sa.engine.make_url(pg_dbs.common_url)
    return psycopg.connect(
        host="127.0.0.1",
        port=postgres.port,
        dbname=url.database,
        user="mycfia_readonly",
        password="ro-secret",
    )


def test_readonly_account_reads_cannot_write_and_survives_refreshes(pg_dbs, postgres):
    for spec in VIEWS:
        refresh_view(spec, pg_dbs.source, pg_dbs.common)
    with pg_dbs.common.begin() as conn:
        conn.exec_driver_sql(GRANTS.read_text())
        conn.exec_driver_sql("ALTER ROLE mycfia_readonly PASSWORD 'ro-secret'")

    with _as_readonly(pg_dbs, postgres) as ro:
        assert ro.execute("SELECT count(*) FROM cfi_stocks").fetchone()[0] == 9984
        assert ro.execute("SELECT count(*) FROM cfi_tenant_closure").fetchone()[0] > 0
        ro.rollback()
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):  # first line of defence
            ro.execute("DELETE FROM cfi_stocks")
        ro.rollback()
        # even with the read-only default lifted, the grants refuse every write
        ro.execute("SET default_transaction_read_only = off")
        ro.commit()
        for stmt in (
            "DELETE FROM cfi_stocks",
            "UPDATE cfi_invoices SET paid = 0",
            "INSERT INTO cfi_view_status (view) VALUES ('x')",
            "CREATE TABLE sneaky (id int)",
            "DROP TABLE cfi_campaigns",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                ro.execute(stmt)
            ro.rollback()

    # full and incremental refreshes rebuild or change the tables: SELECT must stay
    refresh_view(get_view("stocks"), pg_dbs.source, pg_dbs.common, mode="full")
    refresh_view(get_view("invoices"), pg_dbs.source, pg_dbs.common, mode="incremental")
    with _as_readonly(pg_dbs, postgres) as ro:
        assert ro.execute("SELECT count(*) FROM cfi_stocks").fetchone()[0] == 9984
        assert ro.execute("SELECT count(*) FROM cfi_invoices").fetchone()[0] == 1000
        ro.rollback()
        ro.execute("SET default_transaction_read_only = off")
        ro.commit()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            ro.execute("DELETE FROM cfi_stocks")
        ro.rollback()
        with pytest.raises(psycopg.errors.Error):  # not granted: MyCfia sees only the read model
            ro.execute("SELECT * FROM cfi_stocks__staging")


# --------------------------------------------------------------------------- hardening
# Each test below fails against the script without the matching statement.


def _install_readonly(pg_dbs) -> None:
    """The stocks view filled, the other tables created empty, the script applied."""
    refresh_view(get_view("stocks"), pg_dbs.source, pg_dbs.common, mode="full")
    with pg_dbs.common.begin() as conn:
        conn.exec_driver_sql(GRANTS.read_text())
        conn.exec_driver_sql("ALTER ROLE mycfia_readonly PASSWORD 'ro-secret'")


def _superuser(pg_dbs, postgres):
    url = sa.engine.make_url(pg_dbs.common_url)
    return psycopg.connect(
        host="127.0.0.1",
        port=postgres.port,
        dbname=url.database,
        user=url.username,
        password=url.password,
        autocommit=True,
    )


def _readonly_large_objects(pg_dbs, postgres) -> int:
    with _superuser(pg_dbs, postgres) as su:
        return su.execute(
            "SELECT count(*) FROM pg_largeobject_metadata "
            "WHERE lomowner = 'mycfia_readonly'::regrole"
        ).fetchone()[0]


LARGE_OBJECT_WRITES = (
    "SELECT lo_create(0)",
    "SELECT lo_creat(-1)",
    "SELECT lo_from_bytea(0, 'exfiltrated')",
    "SELECT lo_put({oid}, 0, 'x')",
    "SELECT lo_open({oid}, 131072)",  # INV_WRITE, then lowrite/lo_truncate
    "SELECT lowrite(0, 'x')",
    "SELECT lo_truncate(0, 0)",
    "SELECT lo_unlink({oid})",
    "SELECT lo_import('/etc/hostname')",
)


def test_readonly_account_cannot_write_large_objects(pg_dbs, postgres):
    """D9: large objects are no tables; lo_create & co. worked even read-only."""
    _install_readonly(pg_dbs)
    with _superuser(pg_dbs, postgres) as su:
        oid = su.execute("SELECT lo_from_bytea(0, 'owned by the refresher')").fetchone()[0]
    with _as_readonly(pg_dbs, postgres) as ro:
        for lift_read_only in (False, True):
            if lift_read_only:
                ro.execute("SET default_transaction_read_only = off")
                ro.commit()
            for stmt in LARGE_OBJECT_WRITES:
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    ro.execute(stmt.format(oid=oid))
                ro.rollback()
    assert _readonly_large_objects(pg_dbs, postgres) == 0
    with _superuser(pg_dbs, postgres) as su:
        assert bytes(su.execute("SELECT lo_get(%s)", (oid,)).fetchone()[0]) == (
            b"owned by the refresher"
        )
        # the owner of the tables (the refresher) keeps the functions
        owner = su.execute(
            "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = 'cfi_stocks'::regclass"
        ).fetchone()[0]
        assert su.execute(
            "SELECT has_function_privilege(%s, 'lo_create(oid)', 'EXECUTE')", (owner,)
        ).fetchone()[0]


TEMP_WRITES = (
    "CREATE TEMP TABLE t AS SELECT * FROM cfi_stocks",
    "CREATE TEMPORARY TABLE t (id int)",
    "CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    "CREATE TEMP VIEW v AS SELECT 1 AS x",
)


def test_readonly_account_cannot_create_temporary_objects(pg_dbs, postgres):
    """D10: PUBLIC had TEMPORARY on the database: temp tables and pg_temp functions."""
    _install_readonly(pg_dbs)
    with _as_readonly(pg_dbs, postgres) as ro:
        ro.execute("SET default_transaction_read_only = off")
        ro.commit()
        for stmt in TEMP_WRITES:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                ro.execute(stmt)
            ro.rollback()
        db = ro.info.dbname
    with _superuser(pg_dbs, postgres) as su:
        assert not su.execute(
            "SELECT has_database_privilege('mycfia_readonly', %s, 'TEMPORARY')", (db,)
        ).fetchone()[0]
        assert su.execute(
            "SELECT has_database_privilege('mycfia_readonly', %s, 'CONNECT')", (db,)
        ).fetchone()[0]


def test_readonly_account_lifting_its_own_read_only_default_still_cannot_write(pg_dbs, postgres):
    """D11: the account may ALTER ROLE itself out of default_transaction_read_only
    (PostgreSQL lets every role set its own defaults); the privileges are the barrier
    and must refuse every write, on every table, and every other way to store data."""
    _install_readonly(pg_dbs)
    try:
        with _as_readonly(pg_dbs, postgres) as ro:
            ro.execute("SET default_transaction_read_only = off")
            ro.commit()
            # allowed: no grant can stop a role from setting its own defaults
            ro.execute("ALTER ROLE mycfia_readonly SET default_transaction_read_only = off")
            ro.commit()
        with _as_readonly(pg_dbs, postgres) as ro:
            assert ro.execute("SHOW default_transaction_read_only").fetchone()[0] == "off"
            assert ro.execute("SELECT count(*) FROM cfi_stocks").fetchone()[0] == 9984
            ro.rollback()
            tables = [
                r[0]
                for r in ro.execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
                )
            ]
            ro.rollback()
            assert {t.name for t in VIEW_TABLES} <= set(tables)
            writes = [
                stmt.format(t=t)
                for t in tables
                for stmt in (
                    'DELETE FROM "{t}"',
                    'INSERT INTO "{t}" DEFAULT VALUES',
                    'TRUNCATE "{t}"',
                    'ALTER TABLE "{t}" ADD COLUMN x int',
                    'DROP TABLE "{t}"',
                    'CREATE INDEX ON "{t}" ((1))',
                )
            ]
            writes += [f'UPDATE "{t}" SET {c} = {c}' for t, c in _first_columns(ro, tables)]
            writes += [
                "CREATE TABLE sneaky (id int)",
                "CREATE SCHEMA sneaky",
                "CREATE VIEW sneaky AS SELECT 1",
                *TEMP_WRITES,
                *(s.format(oid=0) for s in LARGE_OBJECT_WRITES[:3]),
            ]
            for stmt in writes:
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    ro.execute(stmt)
                ro.rollback()
            with (
                pytest.raises(psycopg.errors.InsufficientPrivilege),
                ro.cursor().copy("COPY cfi_stocks FROM STDIN") as cp,
            ):
                cp.write_row([None] * 3)
            ro.rollback()
        assert _readonly_large_objects(pg_dbs, postgres) == 0
    finally:
        with pg_dbs.common.begin() as conn:
            conn.exec_driver_sql(
                "ALTER ROLE mycfia_readonly SET default_transaction_read_only = on"
            )


def _first_columns(ro, tables):
    rows = ro.execute(
        "SELECT DISTINCT ON (table_name) table_name, column_name FROM information_schema.columns "
        "WHERE table_schema = 'public' ORDER BY table_name, ordinal_position"
    ).fetchall()
    ro.rollback()
    return [(t, f'"{c}"') for t, c in rows if t in tables]


def test_readonly_account_sessions_idle_in_transaction_are_cut(pg_dbs, postgres):
    """D12 (database side): a forgotten open transaction keeps an ACCESS SHARE lock
    that blocks the refresh's swap; the role's sessions are cut after a while."""
    _install_readonly(pg_dbs)
    with _as_readonly(pg_dbs, postgres) as ro:
        value = ro.execute("SHOW idle_in_transaction_session_timeout").fetchone()[0]
    assert value not in ("0", "0ms")
    assert value == "30s"
