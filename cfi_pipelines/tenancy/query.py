"""``cfi-pipelines query --tenant CODE "SQL"``: one read as a tenant, through the
binding of the common DB's engine (the same one MyCfia uses).

Cost: one indexed lookup of the tenant, then what the reader's query costs,
bounded by the time limit and the row cap.
"""

from __future__ import annotations

from sqlalchemy.engine import make_url

from cfi_pipelines.db import engine_for
from cfi_pipelines.tenancy import reader_pg, reader_sqlite
from cfi_pipelines.tenancy.binding import (
    DEFAULT_MAX_ROWS,
    DEFAULT_TIMEOUT_S,
    ReadResult,
    Refused,
    derive_password,
    lookup_tenant,
)


def read_as_tenant(
    common_url: str,
    code: str,
    sql: str,
    *,
    secret: str | None,
    max_rows: int = DEFAULT_MAX_ROWS,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> ReadResult:
    """Run one read ``sql`` as tenant ``code`` through the binding of the common DB's
    engine; the rows (at most ``max_rows``) or :class:`Refused`."""
    if max_rows < 1 or timeout_s <= 0:
        raise Refused("--max-rows and --timeout must be positive")
    backend = make_url(common_url).get_backend_name()
    tenant_id, role = lookup_tenant(engine_for(common_url), code)
    if backend == "sqlite":
        columns, rows, truncated = reader_sqlite.read(
            common_url, tenant_id, sql, max_rows=max_rows, timeout_s=timeout_s
        )
        binding = "sqlite reference reader (authorizer + per-tenant TEMP views)"
    elif backend == "postgresql":
        if not secret:
            raise Refused(
                "CFI_TENANT_SECRET is not set: the tenant roles' passwords derive from it; "
                "set it to the value the refresh and MyCfia use"
            )
        columns, rows, truncated = reader_pg.read(
            common_url, role, derive_password(secret, role), sql,
            max_rows=max_rows, timeout_s=timeout_s,
        )  # fmt: skip
        binding = f"postgresql login role {role} (forced row-level security)"
    else:
        raise Refused(
            f"query --tenant is not available on {backend}: on SQL Server the binding is "
            "sp_set_session_context (see deploy/sql/sqlserver_row_level_security.sql)"
        )
    return ReadResult(code, tenant_id, binding, columns, rows, truncated)


def _cell(value: object) -> str:
    return "" if value is None else str(value).replace("\t", " ").replace("\n", " ")


def report(
    common_url: str,
    code: str,
    sql: str,
    *,
    secret: str | None,
    max_rows: int = DEFAULT_MAX_ROWS,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    as_json: bool = False,
) -> int:
    """``cfi-pipelines query``: print the rows (tab-separated with a header, or JSON),
    or one line ``refused: <why>`` on stderr. 0 when the read ran, else 1."""
    import json

    import click

    try:
        r = read_as_tenant(
            common_url, code, sql, secret=secret, max_rows=max_rows, timeout_s=timeout_s
        )
    except Refused as exc:
        click.echo(f"refused: {exc}", err=True)
        return 1
    if as_json:
        doc = {
            "tenant": r.tenant_code,
            "tenant_id": r.tenant_id,
            "binding": r.binding,
            "columns": r.columns,
            "rows": [dict(zip(r.columns, row, strict=False)) for row in r.rows],
            "truncated": r.truncated,
        }
        click.echo(json.dumps(doc, default=str, indent=2))
        return 0
    click.echo("\t".join(r.columns))
    for row in r.rows:
        click.echo("\t".join(_cell(v) for v in row))
    more = f", truncated at --max-rows {max_rows}" if r.truncated else ""
    rows = f"{len(r.rows)} row{'' if len(r.rows) == 1 else 's'}"
    click.echo(f"({rows} as {r.tenant_code}, tenant {r.tenant_id}{more})", err=True)
    return 0
