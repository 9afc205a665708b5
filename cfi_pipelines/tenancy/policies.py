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
        "+ N' ADD ' + p.predicate_type_desc + N' PREDICATE ' + p.predicate_definition "
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


# --------------------------------------------------------------------------- doctor


def inspect(conn: sa.Connection) -> list[tuple[bool, str]]:
    """``[(ok, detail)]``: the policies are in place and forced on the views and the
    closure, no reading account can bypass them, and which binding is in use."""
    dialect = conn.dialect.name
    if dialect == "sqlite":
        return [
            (
                True,
                "SQLite has no row-level security: the binding is the reference reader "
                "(`cfi-pipelines query --tenant`: authorizer, per-tenant TEMP views, "
                "query-only connection, time limit, row cap)",
            )
        ]
    if dialect == "postgresql":
        return _inspect_pg(conn)
    if dialect == "mssql":
        return _inspect_mssql(conn)
    return [(False, f"no tenant binding for {dialect}")]


def _inspect_pg(conn: sa.Connection) -> list[tuple[bool, str]]:
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
                False,
                "row-level security is not enabled, forced and with its policy on "
                f"{', '.join(missing)}: run deploy/sql/postgresql_row_level_security.sql "
                "as a superuser on the common DB",
            )
        ]
    out = [(True, f"row-level security enabled, forced, policy cfi_tenant_rows on "
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
        out.append((False, f"reading accounts that bypass row-level security: "
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
            roles == tenants,
            f"binding: one login role per tenant ({roles}/{tenants} tenants have theirs"
            + (
                "; the next refresh creates the others, given CREATEROLE)"
                if roles != tenants
                else ")"
            ),
        )
    )
    return out


def _inspect_mssql(conn: sa.Connection) -> list[tuple[bool, str]]:
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
                False,
                f"no enabled security policy filters {', '.join(missing)}: run "
                "deploy/sql/sqlserver_row_level_security.sql on the common DB",
            )
        ]
    return [
        (True, "security policy cfi_tenant_policy filters the 4 views"),
        (True, "binding: sp_set_session_context @key=N'tenant_id', @read_only=1"),
    ]
