"""The adversarial suite on a real PostgreSQL: whatever SQL a tenant sends through
the binding (reader_pg), it sees its subtree's rows only, writes nothing, and every
statement stops at its time limit; each refusal is one line."""

from __future__ import annotations

import time

import psycopg
import pytest

from cfi_pipelines.tenancy import reader_pg
from cfi_pipelines.tenancy.binding import Refused, derive_password
from tests.tenancy.conftest import SECRET, TENANTS

pytestmark = pytest.mark.postgres

VIEWS = ("cfi_stocks", "cfi_operations", "cfi_invoices", "cfi_campaigns")
TIMEOUT_S = 0.5

# Reads that must return the tenant's subtree only (a tenant_id column is checked).
READS = [
    "SELECT tenant_id FROM {v}",
    "SELECT tenant_id FROM {v} WHERE tenant_id = 999 OR 1=1",
    "SELECT tenant_id FROM {v} WHERE tenant_id IN (SELECT descendant FROM cfi_tenant_closure)",
    "SELECT tenant_id FROM {v} WHERE tenant_id IN "
    "(SELECT descendant FROM cfi_tenant_closure WHERE ancestor = 1)",
    "SELECT tenant_id FROM {v} UNION ALL SELECT descendant FROM cfi_tenant_closure",
    "SELECT tenant_id FROM {v} WHERE tenant_id = ANY (ARRAY(SELECT generate_series(1, 100)))",
    "WITH x AS (SELECT * FROM {v}) SELECT tenant_id FROM x",
    "TABLE {v}",
    "SELECT tenant_id FROM {v} WHERE 1 / (tenant_id - 9) IS NOT NULL OR true",
]
# Statements refused outright (a one-line reason), whatever the tenant.
REFUSED = [
    "SELECT 1; DELETE FROM cfi_stocks",
    "SELECT 1; COMMIT; SET ROLE cfi_tenant_1; SELECT * FROM cfi_stocks",
    "RESET ROLE",
    "SET ROLE cfi_tenant_20",
    "SET SESSION AUTHORIZATION cfi_tenant_1",
    "SELECT set_config('role', 'cfi_tenant_20', false)",
    "SELECT set_config('role', 'cfi_refresher', false)",
    "SELECT set_config('session_authorization', 'cfi', false)",
    "COPY cfi_stocks TO '/tmp/cfi_stocks.csv'",
    "COPY (SELECT * FROM cfi_stocks) TO STDOUT",
    "SELECT lo_from_bytea(0, 'x')",
    "SELECT lo_import('/etc/hostname')",
    "SELECT lo_export(1, '/tmp/x')",
    "SELECT pg_read_file('/etc/hostname')",
    "SELECT pg_ls_dir('.')",
    "SELECT * FROM dblink('dbname=postgres', 'SELECT 1') AS t(x int)",
    "SELECT dblink_connect('x', 'dbname=postgres user=cfi_refresher password=refresher')",
    "SELECT * FROM cfi_stocks__staging",
    "SELECT * FROM cfi_refresh_log",
    "INSERT INTO cfi_stocks SELECT * FROM cfi_stocks",
    "UPDATE cfi_invoices SET paid = 0",
    "DELETE FROM cfi_campaigns",
    "TRUNCATE cfi_operations",
    "WITH d AS (DELETE FROM cfi_stocks RETURNING *) SELECT * FROM d",
    "SELECT * FROM cfi_stocks FOR UPDATE",
    "CREATE TABLE sneaky AS SELECT * FROM cfi_stocks",
    "CREATE TEMP TABLE sneaky (id int)",
    "DROP TABLE cfi_stocks",
    "ALTER TABLE cfi_stocks DISABLE ROW LEVEL SECURITY",
    "ALTER TABLE cfi_stocks NO FORCE ROW LEVEL SECURITY",
    "DROP POLICY cfi_tenant_rows ON cfi_stocks",
    "ALTER ROLE CURRENT_USER BYPASSRLS",
    "GRANT cfi_tenant_reader TO cfi_tenant_1",
    "DO $$ BEGIN PERFORM 1; END $$",
    "CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    "SELECT pg_advisory_lock(hashtext('cfi_tenants'))",
    "SELECT pg_try_advisory_xact_lock(1)",
    "SELECT pg_sleep(60)",
    "SELECT set_config('statement_timeout', '0', false), pg_sleep(60)",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r",
]


def _session(rls_db, code: str, timeout_s: float = TIMEOUT_S) -> reader_pg.TenantSession:
    role = rls_db.role(code)
    return reader_pg.connect(rls_db.url, role, derive_password(SECRET, role), timeout_s=timeout_s)


@pytest.fixture
def tenants(rls_db):
    """{code: (open tenant session, subtree)} for the parent, leaf and siblings."""
    out = {code: (_session(rls_db, code), rls_db.subtree(code)) for code in TENANTS}
    yield out
    for session, _ in out.values():
        session.close()


def _run(session: reader_pg.TenantSession, sql: str, max_rows: int = 100_000):
    return session.read(sql, max_rows=max_rows)


def test_every_tenant_reads_its_subtree_only(rls_db, tenants):
    assert tenants["NORD-01"][1] < tenants["NORD"][1] < tenants["CFI"][1]
    assert not tenants["NORD-01"][1] & tenants["NORD-02"][1]
    assert not tenants["NORD"][1] & tenants["SUD"][1]
    for code, (conn, subtree) in tenants.items():
        seen = 0
        for view in VIEWS:
            expected = rls_db.count(view, code)
            seen += expected
            for template in READS:
                sql = template.format(v=view)
                cols, rows, truncated = _run(conn, sql)
                ids = [r[cols.index("tenant_id")] for r in rows] if "tenant_id" in cols else []
                assert set(ids) <= subtree, (code, sql)
                exact = "UNION" not in template and "ancestor = 1" not in template
                if exact:
                    assert len(rows) == expected, (code, sql)
        assert seen > 0, code  # every tenant of the suite has rows of its own
        # the closure and the role map show the tenant's own subtree and line
        cols, rows, _ = _run(conn, "SELECT ancestor, descendant FROM cfi_tenant_closure")
        assert {r[1] for r in rows} == subtree and {r[0] for r in rows} == {min(subtree)}
        cols, rows, _ = _run(conn, "SELECT code FROM cfi_tenants")
        assert rows == [(code,)]


def test_a_cross_join_of_the_views_is_filtered_or_stopped(rls_db, tenants):
    sql = (
        "SELECT count(*), count(DISTINCT a.tenant_id), max(a.tenant_id), max(b.tenant_id), "
        "max(c.tenant_id), max(d.tenant_id) "
        "FROM cfi_stocks a, cfi_invoices b, cfi_operations c, cfi_campaigns d"
    )
    for code in ("NORD-01", "CFI"):
        conn, subtree = tenants[code]
        try:
            _, rows, _ = _run(conn, sql)
        except Refused as exc:
            assert "time limit" in str(exc)
            continue
        n, _, *maxes = rows[0]
        assert all(m is None or m in subtree for m in maxes)
        assert n == (
            rls_db.count("cfi_stocks", code)
            * rls_db.count("cfi_invoices", code)
            * rls_db.count("cfi_operations", code)
            * rls_db.count("cfi_campaigns", code)
        )


def test_every_attack_is_refused_in_one_line_and_writes_nothing(rls_db, tenants):
    before = {v: rls_db.count(v) for v in VIEWS}
    for code, (conn, _) in tenants.items():
        for sql in REFUSED:
            t0 = time.monotonic()
            try:
                _run(conn, sql)
            except Refused as exc:
                message = str(exc)
            else:
                raise AssertionError(f"{code}: accepted {sql}")
            assert message and "\n" not in message, (code, sql, message)
            assert time.monotonic() - t0 < 30, (code, sql)  # never the 60 s asked for
            if "pg_sleep" in sql or "RECURSIVE" in sql:
                assert "time limit" in message
            if "dblink" in sql or "advisory" in sql or "lo_" in sql or "pg_read_file" in sql:
                assert "permission denied for function" in message, (sql, message)
        # the connection is still bound to the same tenant after all that
        cols, rows, _ = _run(conn, "SELECT current_user, session_user")
        assert rows == [(rls_db.role(code), rls_db.role(code))]
    assert {v: rls_db.count(v) for v in VIEWS} == before
    with rls_db.superuser() as su:
        assert (
            su.execute(
                "SELECT count(*) FROM pg_largeobject_metadata "
                "WHERE pg_get_userbyid(lomowner) LIKE 'cfi_tenant%'"
            ).fetchone()[0]
            == 0
        )
        for view in VIEWS:  # still enabled, forced and with its policies
            flags = su.execute(
                "SELECT relrowsecurity, relforcerowsecurity FROM pg_class WHERE relname = %s",
                (view,),
            ).fetchone()
            assert flags == (True, True)


def test_the_database_holds_even_for_a_session_that_runs_raw_sql(rls_db, tenants):
    """A binding that forgot everything (no read-only transaction, no cursor): the
    database still refuses to change the tenant, to write, and to bypass the policy."""
    conn, subtree = tenants["NORD-01"][0].conn, tenants["NORD-01"][1]
    for stmt in (
        "SET ROLE cfi_tenant_1",
        "SET ROLE cfi_refresher",
        "SET SESSION AUTHORIZATION cfi_tenant_1",
        "SET SESSION AUTHORIZATION cfi",
        "SET row_security = off",  # off + a policy that applies = an error, never a bypass
        "SET default_transaction_read_only = off; DELETE FROM cfi_stocks",
        "COPY cfi_stocks TO '/tmp/x.csv'",
        "SELECT pg_read_file('/etc/hostname')",
        "SELECT lo_from_bytea(0, 'x')",
        "SELECT * FROM dblink('dbname=postgres', 'SELECT 1') AS t(x int)",
    ):
        try:
            conn.execute(stmt)
            if stmt.startswith("SET row_security"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute("SELECT count(*) FROM cfi_stocks")
                conn.execute("RESET row_security")
                continue
        except psycopg.errors.Error:
            continue
        raise AssertionError(f"accepted: {stmt}")
    for stmt in ("RESET ROLE", "SET ROLE NONE", "RESET SESSION AUTHORIZATION", "RESET ALL"):
        conn.execute(stmt)
        ids = {r[0] for r in conn.execute("SELECT DISTINCT tenant_id FROM cfi_invoices")}
        assert ids and ids <= subtree
    # the group role maps to no tenant: zero rows, not all rows
    conn.execute("SET ROLE cfi_tenant_reader")
    assert conn.execute("SELECT count(*) FROM cfi_stocks").fetchone()[0] == 0
    conn.execute("RESET ROLE")
    # the legacy shared account sees no tenant row any more
    with rls_db.superuser() as su:
        su.execute("ALTER ROLE mycfia_readonly PASSWORD 'ro'")
    with psycopg.connect(
        host="127.0.0.1", port=rls_db.port, dbname=rls_db.dbname, user="mycfia_readonly",
        password="ro",
    ) as ro:  # fmt: skip
        assert ro.execute("SELECT count(*) FROM cfi_invoices").fetchone()[0] == 0
        assert ro.execute("SELECT count(*) FROM cfi_view_status").fetchone()[0] == 4


def test_statistics_do_not_leak_other_tenants_values(tenants):
    conn, _ = tenants["NORD-01"]
    cols, rows, _ = _run(conn, "SELECT * FROM pg_stats WHERE tablename LIKE 'cfi_%'")
    assert rows == []


def test_the_policy_computes_the_subtree_once_and_uses_the_tenant_indexes(tenants):
    conn = tenants["NORD-01"][0].conn
    plan = "\n".join(
        r[0]
        for r in conn.execute(
            "EXPLAIN SELECT * FROM cfi_stocks WHERE sku = 'SKU-000001' ORDER BY warehouse_id"
        )
    )
    assert "InitPlan" in plan and "SubPlan" not in plan, plan  # once per statement
    assert "tenant_id = ANY" in plan and "Index" in plan, plan


def test_the_row_cap_and_refusals_through_the_binding(rls_db, tenants):
    session, _ = tenants["CFI"]
    cols, rows, truncated = session.read("SELECT * FROM cfi_stocks", max_rows=7)
    assert len(rows) == 7 and truncated and "tenant_id" in cols
    with pytest.raises(Refused, match="password|log in"):
        reader_pg.read(rls_db.url, "cfi_tenant_3", "wrong", "SELECT 1", max_rows=1, timeout_s=1)
    role = rls_db.role("NORD-01")
    _, rows, _ = reader_pg.read(
        rls_db.url, role, derive_password(SECRET, role), "SELECT count(*) FROM cfi_stocks",
        max_rows=1, timeout_s=1,
    )  # fmt: skip
    assert rows == [(rls_db.count("cfi_stocks", "NORD-01"),)]


def test_a_read_cannot_lift_the_limits_of_the_next_read_on_a_pooled_connection(rls_db, tenants):
    """Every read is rolled back: what it changed in the session (the time limit, the
    read-only default, the role) is gone before the next read on the same connection."""
    session, subtree = tenants["NORD"]
    role = rls_db.role("NORD")
    _, rows, _ = _run(session, "SELECT current_setting('statement_timeout'), "
                      "current_setting('default_transaction_read_only')")  # fmt: skip
    assert rows == [("500ms", "on")]  # set by the login itself
    _, rows, _ = _run(
        session,
        "SELECT set_config('statement_timeout', '0', false), "
        "set_config('default_transaction_read_only', 'off', false), "
        "set_config('role', 'cfi_tenant_reader', false), "
        "(SELECT count(*) FROM cfi_stocks)",
    )
    assert rows == [("0", "off", "cfi_tenant_reader", 0)]  # within that read: the group, 0 rows
    t0 = time.monotonic()
    with pytest.raises(Refused, match="time limit"):
        _run(session, "SELECT pg_sleep(60)")
    assert time.monotonic() - t0 < 30
    _, rows, _ = _run(session, "SELECT current_user, current_setting('statement_timeout'), "
                      "current_setting('default_transaction_read_only')")  # fmt: skip
    assert rows == [(role, "500ms", "on")]
    _, rows, _ = _run(session, "SELECT DISTINCT tenant_id FROM cfi_stocks")
    assert rows and {r[0] for r in rows} <= subtree


def test_the_guard_keeps_the_readers_query_as_written(rls_db, tenants):
    """Wrapped as a subquery, a query keeps its order, duplicate column names and a
    trailing comment; a per-read time limit other than the session's applies to that read."""
    session, _ = tenants["CFI"]
    sql = "SELECT sku, tenant_id, tenant_id FROM cfi_stocks ORDER BY sku DESC, tenant_id -- newest"
    cols, rows, truncated = session.read(sql + ";", max_rows=5)
    with rls_db.superuser() as su:
        want = [tuple(r) for r in su.execute(sql.split(" --")[0] + " LIMIT 5")]
    assert cols == ["sku", "tenant_id", "tenant_id"] and rows == want and truncated
    with _session(rls_db, "NORD-01", timeout_s=30) as slow:
        t0 = time.monotonic()
        with pytest.raises(Refused, match=r"time limit \(0.3 s\)"):
            slow.read("SELECT pg_sleep(60)", max_rows=1, timeout_s=0.3)
        assert time.monotonic() - t0 < 10
        _, rows, _ = slow.read("SELECT current_setting('statement_timeout')", max_rows=1)
        assert rows == [("30s",)]
    for sql in ("", " ; ", "SELECT 1; SELECT 2", "SELECT 'a\x00b'"):
        with pytest.raises(Refused) as exc:
            session.read(sql, max_rows=1)
        assert "\n" not in str(exc.value)
    assert session.read("VALUES (1), (2)", max_rows=1)[1:] == ([(1,)], True)


def test_a_repeated_read_is_prepared_and_follows_a_view_whose_columns_change(rls_db, tenants):
    session, subtree = tenants["NORD-01"]
    sql = "SELECT * FROM cfi_stocks ORDER BY sku LIMIT 3"
    first = session.read(sql, max_rows=10)
    for _ in range(3):
        assert session.read(sql, max_rows=10) == first
    _, prepared, _ = session.read("SELECT statement FROM pg_prepared_statements", max_rows=10)
    assert any("ORDER BY sku LIMIT 3" in s for (s,) in prepared), prepared
    with rls_db.superuser() as su:
        su.execute("ALTER TABLE cfi_stocks ADD COLUMN extra int")
    try:  # the prepared plan's row type changed: prepared again, read once more
        cols, rows, _ = session.read(sql, max_rows=10)
        assert cols == [*first[0], "extra"]
        assert rows and {r[cols.index("tenant_id")] for r in rows} <= subtree
    finally:
        with rls_db.superuser() as su:
            su.execute("ALTER TABLE cfi_stocks DROP COLUMN extra")
