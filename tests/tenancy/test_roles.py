"""The tenant roles' sync after each refresh (tenancy/roles.py): with CFI's tenants
unchanged, a refresh issues no role DDL, and after the first check no query on the
map or the roles at all; a new tenant still gets its login role at the next refresh
(real PostgreSQL, the refresher a non-superuser as in production)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

import pytest
import sqlalchemy as sa

from cfi_pipelines.model import cfi_source as src
from cfi_pipelines.tenancy import reader_pg
from cfi_pipelines.tenancy.binding import derive_password, role_name
from cfi_pipelines.tenancy.roles import forget_synced, sync_tenants
from cfi_pipelines.views.refresh import refresh_view
from cfi_pipelines.views.spec import VIEWS
from tests.tenancy.conftest import SECRET

pytestmark = pytest.mark.postgres

ROLE_DDL = re.compile(r"\b(CREATE|ALTER|DROP)\s+ROLE\b", re.IGNORECASE)
TENANT_STATE = re.compile(r"\bcfi_tenants\b|\bpg_roles\b", re.IGNORECASE)


@contextmanager
def statements(engine: sa.Engine) -> Iterator[list[str]]:
    """Every SQL statement the engine sends while the block runs."""
    seen: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        seen.append(statement)

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)


def test_an_incremental_refresh_with_unchanged_tenants_issues_no_role_ddl(rls_db):
    forget_synced()  # as a new process: the first refresh checks the map and the roles
    with statements(rls_db.common) as first:
        result = refresh_view(VIEWS[0], rls_db.source, rls_db.common, mode="incremental")
    assert result.mode == "incremental"
    assert not [s for s in first if ROLE_DDL.search(s)], first
    checked = [s for s in first if TENANT_STATE.search(s)]
    assert checked and all(s.lstrip().upper().startswith("SELECT") for s in checked), checked
    # the next ones: the same tenants (and secret) as last synced, the common DB untouched
    for spec in VIEWS:
        with statements(rls_db.common) as seen:
            refresh_view(spec, rls_db.source, rls_db.common, mode="incremental")
        assert not [s for s in seen if ROLE_DDL.search(s) or TENANT_STATE.search(s)], seen
    again = sync_tenants(rls_db.source, rls_db.common, SECRET)
    assert not again.checked and again.roles_managed and again.roles_created == 0


def test_a_new_tenant_gets_its_role_at_the_next_incremental_refresh(rls_db):
    refresh_view(VIEWS[0], rls_db.source, rls_db.common, mode="incremental")  # remembered
    with rls_db.source.begin() as conn:
        parent = conn.scalar(sa.select(src.tenants.c.id).where(src.tenants.c.code == "NORD"))
        new_id = conn.scalar(sa.select(sa.func.max(src.tenants.c.id))) + 1
        conn.execute(
            src.tenants.insert().values(
                id=new_id, code="NORD-99", name="Nouveau magasin", parent_id=parent,
                updated_at=datetime(2026, 1, 1),
            )
        )  # fmt: skip
    with statements(rls_db.common) as seen:
        refresh_view(VIEWS[0], rls_db.source, rls_db.common, mode="incremental")
    role = role_name(new_id)
    assert [s for s in seen if ROLE_DDL.search(s)], seen  # the new tenant's role, created
    with rls_db.superuser() as su:
        assert su.execute(
            "SELECT rolcanlogin, rolbypassrls FROM pg_roles WHERE rolname = %s", (role,)
        ).fetchone() == (True, False)
    with reader_pg.connect(
        rls_db.url, role, derive_password(SECRET, role), timeout_s=5
    ) as session:  # it logs in and sees its own line, and no one else's rows
        assert session.read("SELECT code FROM cfi_tenants", max_rows=5)[1] == [("NORD-99",)]
        assert session.read("SELECT count(*) FROM cfi_stocks", max_rows=1)[1] == [(0,)]
