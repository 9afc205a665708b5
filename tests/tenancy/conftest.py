"""A common DB on a real PostgreSQL set up as in production: the tables owned by a
non-superuser refresher, deploy/sql/postgresql_readonly.sql and
postgresql_row_level_security.sql applied by a superuser, the tenant roles created
by the refresh."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from cfi_pipelines.db import create_engine
from cfi_pipelines.model import cfi_common as common
from cfi_pipelines.tenancy.binding import derive_password
from cfi_pipelines.views.refresh import refresh_view
from cfi_pipelines.views.spec import VIEWS

SQL = Path(__file__).resolve().parents[2] / "deploy" / "sql"
SECRET = "tenant-secret-for-tests"
REFRESHER = "cfi_refresher"
TENANTS = ("CFI", "NORD", "NORD-01", "NORD-02", "SUD")
"""The root, a parent (region), a leaf store, its sibling store, the region's sibling."""


@dataclass
class RlsDb:
    url: str  # the refresher's URL (CFI_COMMON_URL in production)
    superuser_url: str
    source: sa.Engine
    common: sa.Engine  # as the refresher
    port: int
    dbname: str

    def superuser(self) -> psycopg.Connection:
        u = sa.engine.make_url(self.superuser_url)
        return psycopg.connect(
            host=u.host, port=u.port, dbname=u.database, user=u.username,
            password=u.password, autocommit=True,
        )  # fmt: skip

    def as_tenant(self, code: str) -> psycopg.Connection:
        role = self.role(code)
        return psycopg.connect(
            host="127.0.0.1", port=self.port, dbname=self.dbname, user=role,
            password=derive_password(SECRET, role),
        )  # fmt: skip

    def role(self, code: str) -> str:
        with self.superuser() as su:
            return su.execute(
                "SELECT role_name FROM cfi_tenants WHERE code = %s", (code,)
            ).fetchone()[0]

    def subtree(self, code: str) -> set[int]:
        with self.superuser() as su:
            return {
                r[0]
                for r in su.execute(
                    "SELECT c.descendant FROM cfi_tenant_closure c JOIN cfi_tenants t "
                    "ON t.tenant_id = c.ancestor WHERE t.code = %s",
                    (code,),
                )
            }

    def count(self, table: str, code: str | None = None) -> int:
        where = ""
        if code is not None:
            where = f" WHERE tenant_id IN ({','.join(map(str, self.subtree(code)))})"
        with self.superuser() as su:
            return su.execute(f"SELECT count(*) FROM {table}{where}").fetchone()[0]


def install_rls(superuser_url: str, *, dblink: bool = False) -> None:
    eng = create_engine(superuser_url)
    try:
        with eng.begin() as conn:
            if dblink:
                conn.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS dblink")
            conn.exec_driver_sql((SQL / "postgresql_readonly.sql").read_text())
            conn.exec_driver_sql((SQL / "postgresql_row_level_security.sql").read_text())
    finally:
        eng.dispose()


@pytest.fixture
def rls_db(pg_dbs, postgres, monkeypatch) -> Iterator[RlsDb]:
    """The views refreshed by a non-superuser refresher, RLS installed, roles synced."""
    monkeypatch.setenv("CFI_TENANT_SECRET", SECRET)
    url = sa.engine.make_url(pg_dbs.common_url)
    with psycopg.connect(
        host="127.0.0.1", port=postgres.port, dbname=url.database, user=url.username,
        password=url.password, autocommit=True,
    ) as su:  # fmt: skip
        if not su.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (REFRESHER,)).fetchone():
            su.execute(f"CREATE ROLE {REFRESHER} LOGIN PASSWORD 'refresher'")
        su.execute(f'ALTER DATABASE "{url.database}" OWNER TO {REFRESHER}')
        su.execute(f"ALTER SCHEMA public OWNER TO {REFRESHER}")
        for table in common.metadata.tables:
            su.execute(f'ALTER TABLE "{table}" OWNER TO {REFRESHER}')
    refresher_url = url.set(username=REFRESHER, password="refresher").render_as_string(
        hide_password=False
    )
    engine = create_engine(refresher_url)
    for spec in VIEWS:
        refresh_view(spec, pg_dbs.source, engine, mode="full")
    install_rls(pg_dbs.common_url, dblink=True)
    # the next refresh creates the roles (as it would in production)
    refresh_view(VIEWS[0], pg_dbs.source, engine, mode="full")
    yield RlsDb(
        refresher_url, pg_dbs.common_url, pg_dbs.source, engine, postgres.port, url.database
    )
    engine.dispose()
