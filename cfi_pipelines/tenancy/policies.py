"""Row-level security that survives the refresh's swaps, and what doctor checks.

A full refresh builds a new table and renames it over the live one. Policies,
like grants, belong to the table object: :func:`copy_policies` gives the staging
table the live table's ``ENABLE``/``FORCE ROW LEVEL SECURITY`` and policies inside
the swap transaction, before the rename, so no reader ever sees a view without
them. On SQL Server the security policy's predicates are bound to the table
object too: :func:`mssql_swap_statements` adds the live table's predicates to the
staging table and removes them from the table swapped out.

Cost: O(policies) catalog reads per swap; :func:`inspect` reads the catalogs only.
"""

from __future__ import annotations

import sqlalchemy as sa

from cfi_pipelines.model import cfi_common as common
from cfi_pipelines.tenancy.binding import READER_GROUP, ROLE_PREFIX

PROTECTED_TABLES = (*(t.name for t in common.VIEW_TABLES.values()), "cfi_tenant_closure")
MSSQL_POLICY = "cfi_security.cfi_tenant_policy"


def copy_policies(conn: sa.Connection, live: str, staging: str) -> int:
    """PostgreSQL: give ``staging`` the row-level security of ``live``; the number
    of policies copied (0 when ``live`` has none). Run in the swap transaction."""
    if conn.dialect.name != "postgresql":
        return 0
    prep = conn.dialect.identifier_preparer
    flags = conn.execute(
        sa.text(
            "SELECT relrowsecurity, relforcerowsecurity FROM pg_class "
            "WHERE oid = to_regclass(quote_ident(:t))"
        ),
        {"t": live},
    ).first()
    if flags is None or not (flags[0] or flags[1]):
        return 0
    target = prep.quote(staging)
    if flags[0]:
        conn.exec_driver_sql(f"ALTER TABLE {target} ENABLE ROW LEVEL SECURITY")
    if flags[1]:
        conn.exec_driver_sql(f"ALTER TABLE {target} FORCE ROW LEVEL SECURITY")
    policies = conn.execute(
        sa.text(
            "SELECT policyname, permissive, roles, cmd, qual, with_check FROM pg_policies "
            "WHERE schemaname = current_schema() AND tablename = :t"
        ),
        {"t": live},
    ).all()
    for name, permissive, roles, cmd, qual, with_check in policies:
        to = ", ".join("PUBLIC" if r == "public" else prep.quote(r) for r in roles)
        stmt = f"CREATE POLICY {prep.quote(name)} ON {target} AS {permissive} FOR {cmd} TO {to}"
        if qual is not None:
            stmt += f" USING ({qual})"
        if with_check is not None:
            stmt += f" WITH CHECK ({with_check})"
        conn.exec_driver_sql(stmt)
    return len(policies)


def mssql_swap_statements(live: str, staging: str, old: str) -> tuple[str, str]:
    """SQL Server: (before the renames) add each predicate of ``live`` to ``staging``;
    (after them) drop the predicates from ``old``, the table swapped out (a
    schema-bound security policy would otherwise refuse its DROP)."""
    add = (
        "DECLARE @sql nvarchar(max) = N''; "
        "SELECT @sql = @sql + N'ALTER SECURITY POLICY ' "
        "+ QUOTENAME(OBJECT_SCHEMA_NAME(p.object_id)) + N'.' + QUOTENAME(OBJECT_NAME(p.object_id)) "
        "+ N' ADD ' + p.predicate_type_desc + N' PREDICATE ' "
        # sys.security_predicates shows "([schema].[fn]([col]))": ADD takes it bare
        "+ CASE WHEN LEFT(p.predicate_definition, 1) = N'(' "
        "THEN SUBSTRING(p.predicate_definition, 2, LEN(p.predicate_definition) - 2) "
        "ELSE p.predicate_definition END "
        f"+ N' ON dbo.' + QUOTENAME(N'{staging}') + N'; ' "
        f"FROM sys.security_predicates p WHERE p.target_object_id = OBJECT_ID(N'dbo.{live}'); "
        "EXEC sp_executesql @sql;"
    )
    drop = (
        "DECLARE @sql nvarchar(max) = N''; "
        "SELECT @sql = @sql + N'ALTER SECURITY POLICY ' "
        "+ QUOTENAME(OBJECT_SCHEMA_NAME(p.object_id)) + N'.' + QUOTENAME(OBJECT_NAME(p.object_id)) "
        "+ N' DROP ' + p.predicate_type_desc + N' PREDICATE ON dbo.' "
        f"+ QUOTENAME(N'{old}') + N'; ' "
        f"FROM sys.security_predicates p WHERE p.target_object_id = OBJECT_ID(N'dbo.{old}'); "
        "EXEC sp_executesql @sql;"
    )
    return add, drop


def selftest_policy_copy(conn: sa.Connection, live: str, staging: str, token: str) -> str:
    """``doctor --selftest``: on scratch tables, give ``live`` a tenant policy and copy it
    onto ``staging`` exactly as the swap does; raises when the copy is not there."""
    dialect = conn.dialect.name
    prep = conn.dialect.identifier_preparer
    if dialect == "postgresql":
        q = prep.quote(live)
        conn.exec_driver_sql(f"ALTER TABLE {q} ENABLE ROW LEVEL SECURITY")
        conn.exec_driver_sql(f"ALTER TABLE {q} FORCE ROW LEVEL SECURITY")
        conn.exec_driver_sql(f"CREATE POLICY cfi_selftest ON {q} FOR SELECT USING (tenant_id = 1)")
        n = copy_policies(conn, live, staging)
        row = conn.execute(
            sa.text(
                "SELECT relrowsecurity AND relforcerowsecurity, "
                "(SELECT count(*) FROM pg_policy WHERE polrelid = c.oid) "
                "FROM pg_class c WHERE oid = to_regclass(quote_ident(:t))"
            ),
            {"t": staging},
        ).first()
        if n != 1 or row is None or not row[0] or row[1] != 1:
            raise AssertionError(
                f"the staging table got {row} (forced, policies), expected forced, 1"
            )
        return "row-level security (forced) and its policy copied onto the staging table"
    if dialect == "mssql":
        fn, policy = f"dbo.cfi_selftest_{token}_fn", f"dbo.cfi_selftest_{token}_policy"
        conn.exec_driver_sql(
            f"CREATE FUNCTION {fn}(@tenant_id int) RETURNS TABLE WITH SCHEMABINDING AS "
            "RETURN SELECT 1 AS allowed "
            "WHERE @tenant_id = CAST(SESSION_CONTEXT(N'cfi_selftest_tenant') AS int)"
        )
        conn.exec_driver_sql(
            f"CREATE SECURITY POLICY {policy} ADD FILTER PREDICATE {fn}(tenant_id) "
            f"ON dbo.{prep.quote(live)} WITH (STATE = ON, SCHEMABINDING = ON)"
        )
        try:
            add, drop = mssql_swap_statements(live, staging, live)
            conn.exec_driver_sql(add)
            conn.exec_driver_sql(drop)  # (run on live here: the table a swap sets aside)
            where = sa.text(
                "SELECT OBJECT_NAME(target_object_id) FROM sys.security_predicates "
                "WHERE object_id = OBJECT_ID(:p)"
            )
            targets = conn.execute(where, {"p": policy}).scalars().all()
            if targets != [staging]:
                raise AssertionError(f"the predicates are on {targets}, expected [{staging}]")
            counts = []
            for tenant in (1, 2):
                conn.exec_driver_sql(
                    f"EXEC sp_set_session_context N'cfi_selftest_tenant', {tenant}"
                )
                counts.append(
                    conn.scalar(sa.text(f"SELECT count(*) FROM dbo.{prep.quote(staging)}"))
                )
            if counts[0] == 0 or counts[1] != 0:
                raise AssertionError(f"rows seen as tenant 1 and 2: {counts}, expected n and 0")
        finally:
            conn.exec_driver_sql(f"DROP SECURITY POLICY {policy}")
            conn.exec_driver_sql(f"DROP FUNCTION {fn}")
        return "security predicate copied onto the staging table, filtering by session context"
    return f"not applicable on {dialect} (no row-level security; the reference reader binds)"


# --------------------------------------------------------------------------- doctor


def inspect(conn: sa.Connection) -> list[tuple[str, str]]:
    """``[(status, detail)]`` (``OK``/``WARN``/``FAIL``): the policies are in place and forced on the views and the
    closure, no reading account can bypass them, and which binding is in use."""
    dialect = conn.dialect.name
    if dialect == "sqlite":
        return [
            (
                "OK",
                "SQLite has no row-level security: the binding is the reference reader "
                "(`cfi-pipelines query --tenant`: authorizer, per-tenant TEMP views, "
                "query-only connection, time limit, row cap)",
            )
        ]
    if dialect == "postgresql":
        return _inspect_pg(conn)
    if dialect == "mssql":
        return _inspect_mssql(conn)
    return [("FAIL", f"no tenant binding for {dialect}")]


def _inspect_pg(conn: sa.Connection) -> list[tuple[str, str]]:
    rows = conn.execute(
        sa.text(
            "SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity, "
            "EXISTS (SELECT 1 FROM pg_policy p WHERE p.polrelid = c.oid "
            "        AND p.polname = 'cfi_tenant_rows') "
            "FROM pg_class c WHERE c.oid = ANY(ARRAY(SELECT to_regclass(quote_ident(t)) "
            "FROM unnest(CAST(:tables AS text[])) t))"
        ),
        {"tables": list(PROTECTED_TABLES)},
    ).all()
    state = {r[0]: r[1:] for r in rows}
    missing = [t for t in PROTECTED_TABLES if not all(state.get(t, (False,) * 3))]
    if missing:
        return [
            (
                "FAIL",
                "tenant isolation is not enforced by the database: no forced row-level "
                f"security with its policy on {', '.join(missing)}: run deploy/sql/postgresql_row_level_security.sql "
                "as a superuser on the common DB",
            )
        ]
    out = [("OK", f"row-level security enabled, forced, policy cfi_tenant_rows on "
                  f"{len(PROTECTED_TABLES)} tables")]  # fmt: skip
    bypass = (
        conn.execute(
            sa.text(
                "SELECT r.rolname FROM pg_roles r WHERE (r.rolsuper OR r.rolbypassrls) AND ("
                "  (left(r.rolname, length(:prefix)) = :prefix AND r.rolname <> :group) "
                "  OR r.rolname = 'mycfia_readonly' "
                "  OR EXISTS (SELECT 1 FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid "
                "             WHERE m.member = r.oid AND g.rolname = :group AND NOT m.admin_option))"
            ),
            {"prefix": ROLE_PREFIX, "group": READER_GROUP},
        )
        .scalars()
        .all()
    )
    if bypass:
        out.append(("FAIL", f"reading accounts that bypass row-level security: "
                           f"{', '.join(bypass)}: ALTER ROLE … NOSUPERUSER NOBYPASSRLS"))  # fmt: skip
    counts = conn.execute(
        sa.text(
            "SELECT (SELECT count(*) FROM cfi_tenants), "
            "(SELECT count(*) FROM cfi_tenants t JOIN pg_roles r ON r.rolname = t.role_name "
            " WHERE r.rolcanlogin)"
        )
    ).first()
    tenants, roles = counts or (0, 0)
    out.append(
        (
            "OK" if roles == tenants else "WARN",
            f"binding: one login role per tenant ({roles}/{tenants} tenants have theirs"
            + (
                "; the next refresh creates the others, given CREATEROLE)"
                if roles != tenants
                else ")"
            ),
        )
    )
    return out


def _inspect_mssql(conn: sa.Connection) -> list[tuple[str, str]]:
    rows = conn.execute(
        sa.text(
            "SELECT OBJECT_NAME(p.target_object_id), sp.is_enabled "
            "FROM sys.security_policies sp JOIN sys.security_predicates p "
            "ON p.object_id = sp.object_id WHERE p.predicate_type_desc = 'FILTER'"
        )
    ).all()
    enabled = {name for name, on in rows if on}
    missing = [t for t in PROTECTED_TABLES if t != "cfi_tenant_closure" and t not in enabled]
    if missing:
        return [
            (
                "FAIL",
                f"no enabled security policy filters {', '.join(missing)}: run "
                "deploy/sql/sqlserver_row_level_security.sql on the common DB",
            )
        ]
    return [
        ("OK", "security policy cfi_tenant_policy filters the 4 views"),
        ("OK", "binding: sp_set_session_context @key=N'tenant_id', @read_only=1"),
    ]
