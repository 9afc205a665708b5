"""Prove the refresh's SQL on a real common DB: every statement kind, in scratch tables.

SQL Server cannot run in the test suite, and production is SQL Server: this is
how an operator proves the dialect paths on theirs (``cfi-pipelines doctor
--selftest``). Every statement kind the refresh runs (:mod:`cfi_pipelines.views.load`,
``swap``, ``incremental``) is executed, with the same functions, on tables named ``cfi_selftest_<random>``
(a copy of a view's table definition; the live views are never touched):

create (staging table) → bulk load (``db.insert_rows``: COPY on PostgreSQL,
``fast_executemany`` on SQL Server) → indexes → statistics (``_analyze_sql``) →
upsert (``upsert_statement``: ON CONFLICT / MERGE) → grant copy
(``copy_grants_sql``) → swap (``swap_statements``: renames / ``sp_rename``).

On SQL Server, a last step proves Change Tracking's round trip (the capture mode of
CFI's source, :mod:`cfi_pipelines.views.capture.mssql`): a scratch table with a
primary key, tracked; an insert then a delete, each read back through the capture's
own ``CHANGETABLE(CHANGES …)`` statement with its key and I/D. It needs Change
Tracking on the database it runs on (the common DB); where it is off the step says
so and is skipped (``doctor`` checks CFI's source itself).

Each step commits (as the refresh does), and the scratch tables are dropped in a
``finally`` whatever happened. Plain functions, no Dagster.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from decimal import Decimal

import sqlalchemy as sa
from sqlalchemy.engine import Dialect, Engine

from cfi_pipelines.db import insert_rows, write_transaction
from cfi_pipelines.tenancy.policies import mssql_swap_statements, selftest_policy_copy
from cfi_pipelines.views.incremental import upsert_statement
from cfi_pipelines.views.load import _analyze_sql, _index_statements
from cfi_pipelines.views.spec import ViewSpec, get_view
from cfi_pipelines.views.swap import copy_grants_sql, swap_statements

PREFIX = "cfi_selftest_"
READONLY_ROLE = "mycfia_readonly"
"""Grantee of the grant-copy step when it exists (deploy/sql/*_readonly.sql)."""
VIEW = "stocks"
"""The view whose table definition is copied: a two-column key, money, dates."""


@dataclass(frozen=True)
class StepResult:
    step: str
    ok: bool
    detail: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ScratchTables:
    """The scratch copies of one view: ``live`` (with the view's indexes), ``staging``, ``old``."""

    spec: ViewSpec
    live: sa.Table
    staging: sa.Table
    old_name: str
    token: str

    @property
    def ct_name(self) -> str:
        """The Change Tracking round trip's table (SQL Server only)."""
        return f"{PREFIX}{self.token}_ct"

    @property
    def names(self) -> tuple[str, ...]:
        return (self.live.name, self.staging.name, self.old_name, self.ct_name)


def scratch_tables(token: str | None = None, view: str = VIEW) -> ScratchTables:
    """Tables ``cfi_selftest_<token>`` (+ ``_staging``, ``_old``) shaped like ``view``'s table."""
    token = token or secrets.token_hex(4)
    base = get_view(view)
    md = sa.MetaData()

    def copy(name: str) -> sa.Table:
        cols = (sa.Column(c.name, c.type, nullable=c.nullable) for c in base.table.columns)
        return sa.Table(name, md, *cols)

    live = copy(f"{PREFIX}{token}")
    staging = copy(f"{PREFIX}{token}_staging")
    spec = replace(base, table=live)
    return ScratchTables(spec, live, staging, f"{PREFIX}{token}_old", token)


def sample_rows(first: int, count: int) -> list[tuple]:
    """``count`` rows of the stocks view's shape, keys ``first…``, in column order."""
    at = datetime(2026, 1, 2, 3, 4, 5)
    return [
        (
            1,
            i,
            1,
            f"SKU{i}",
            f"product {i}",
            "selftest",
            "W1",
            "Paris",
            10,
            2,
            8,
            Decimal("1.50"),
            Decimal("15.00"),
            at,
        )
        for i in range(first, first + count)
    ]


def compiled_statements(dialect: Dialect, token: str = "000000") -> dict[str, list[str]]:
    """The SQL of every step for ``dialect``, without a server (what the tests check for mssql)."""
    from sqlalchemy.schema import CreateIndex, CreateTable

    t = scratch_tables(token)
    name = dialect.name
    prep = dialect.identifier_preparer
    grants = copy_grants_sql(name, t.live.name, t.staging.name)
    analyze = _analyze_sql(name, t.staging, prep)
    return {
        "create": [str(CreateTable(t.staging).compile(dialect=dialect)).strip()],
        "indexes": [
            str(CreateIndex(ix).compile(dialect=dialect))
            for ix in _index_statements(t.spec, t.staging, token)
        ],
        "analyze": [analyze] if analyze else [],
        "upsert": [
            str(upsert_statement(name, t.live, t.staging, t.spec.key).compile(dialect=dialect))
        ],
        "grant_copy": [grants] if grants else [],
        "swap": swap_statements(name, t.live.name, t.staging.name, t.old_name),
        **(
            {"tenant_policy": list(mssql_swap_statements(t.live.name, t.staging.name, t.old_name))}
            if name == "mssql"
            else {}
        ),
        **({"change_tracking": _ct_statements(dialect, t.ct_name)} if name == "mssql" else {}),
    }


def _ct_table(name: str) -> sa.Table:
    return sa.Table(
        name,
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("v", sa.Integer),
    )


def _ct_statements(dialect: Dialect, name: str) -> list[str]:
    from cfi_pipelines.views.capture.mssql import CURRENT_VERSION, changes_sql

    prep = dialect.identifier_preparer
    table = _ct_table(name)
    return [
        f"ALTER TABLE {prep.format_table(table)} ENABLE CHANGE_TRACKING",
        str(CURRENT_VERSION.compile(dialect=dialect)),
        str(changes_sql(table, prep).compile(dialect=dialect)),
    ]


def change_tracking_roundtrip(engine: Engine, name: str) -> tuple[bool, str]:
    """SQL Server: create ``name`` (a primary key), track it, insert key 42 and read it back
    as an ``I`` through CHANGETABLE, delete it and read a ``D`` with the key. ``(ok,
    detail)``; skipped (ok) when Change Tracking is off on this database."""
    from cfi_pipelines.views.capture.mssql import CURRENT_VERSION, changes_sql, row_change

    prep = engine.dialect.identifier_preparer
    table = _ct_table(name)

    def version() -> int | None:
        with engine.connect() as conn:
            v = conn.execute(CURRENT_VERSION).scalar()
            conn.rollback()
        return v

    def read(since: int) -> list:
        with engine.connect() as conn:
            rows = conn.execute(changes_sql(table, prep), {"since": since}).mappings().all()
            conn.rollback()
        return [row_change(table, r) for r in rows]

    if version() is None:
        return True, (
            "skipped: Change Tracking is off on this database (ALTER DATABASE CURRENT SET "
            "CHANGE_TRACKING = ON to prove the round trip here; doctor checks CFI's source)"
        )
    with write_transaction(engine) as conn:
        table.create(conn)
        conn.exec_driver_sql(f"ALTER TABLE {prep.format_table(table)} ENABLE CHANGE_TRACKING")
    v0 = version()
    with write_transaction(engine) as conn:
        conn.execute(table.insert().values(id=42, v=1))
    inserted, v1 = read(v0), version()
    with write_transaction(engine) as conn:
        conn.execute(table.delete().where(table.c.id == 42))
    deleted, v2 = read(v1), version()
    got = [(c.op, (c.new or c.old or {}).get("id")) for c in inserted + deleted]
    if got != [("I", 42), ("D", 42)]:
        return False, f"CHANGETABLE gave {got} for an insert then a delete of key 42"
    return True, f"insert then delete of key 42 read back as I, D (versions {v0} -> {v1} -> {v2})"


def describe_error(exc: BaseException) -> str:
    """One line: the driver's own message for database errors (no SQL dump, no link)."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.orig is not None:
        exc = exc.orig
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else repr(exc)}"


def _role_exists(conn: sa.Connection, role: str) -> bool:
    if conn.dialect.name == "postgresql":
        return bool(conn.scalar(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}))
    if conn.dialect.name == "mssql":
        return conn.scalar(sa.text("SELECT DATABASE_PRINCIPAL_ID(:r)"), {"r": role}) is not None
    return False


def _drop_all(engine: Engine, names: tuple[str, ...]) -> list[str]:
    """Drop whichever of ``names`` exist; returns the ones dropped."""
    prep = engine.dialect.identifier_preparer
    dropped = []
    with write_transaction(engine) as conn:
        have = set(sa.inspect(conn).get_table_names())
        for name in names:
            if name in have:
                conn.exec_driver_sql(f"DROP TABLE {prep.quote(name)}")
                dropped.append(name)
    return dropped


def run_selftest(engine: Engine, *, token: str | None = None) -> list[StepResult]:
    """Run every statement kind of the refresh on scratch tables of ``engine``; one result
    per step (a failed step stops the ones after it, reported as not run). Always cleans up."""
    t = scratch_tables(token)
    dialect = engine.dialect.name
    prep = engine.dialect.identifier_preparer
    key = t.spec.key
    results: list[StepResult] = []

    def create(conn: sa.Connection) -> str:
        t.live.create(conn)
        for ix in _index_statements(t.spec, t.live, t.token + "l"):
            ix.create(conn)
        insert_rows(conn, t.live, sample_rows(1, 3))
        t.staging.create(conn)
        return f"created {t.live.name} (3 rows, unique key) and {t.staging.name}"

    def bulk_load(conn: sa.Connection) -> str:
        n = insert_rows(conn, t.staging, sample_rows(2, 5))  # keys 2..6: 2 updates, 3 inserts
        path = (
            "COPY FROM STDIN"
            if dialect == "postgresql" and conn.dialect.driver == "psycopg"
            else "fast_executemany"
            if dialect == "mssql"
            else "executemany"
        )
        got = conn.scalar(sa.select(sa.func.count()).select_from(t.staging))
        if got != n:
            raise AssertionError(f"loaded {n} rows but the staging table has {got}")
        return f"{n} rows loaded into {t.staging.name} ({path})"

    def indexes(conn: sa.Connection) -> str:
        made = _index_statements(t.spec, t.staging, t.token)
        for ix in made:
            ix.create(conn)
        return f"{len(made)} indexes created"

    def statistics(conn: sa.Connection) -> str:
        sql = _analyze_sql(dialect, t.staging, prep)
        if not sql:
            return f"no statistics statement for {dialect}"
        if dialect == "sqlite":
            conn.exec_driver_sql("PRAGMA analysis_limit = 1000")
        conn.exec_driver_sql(sql)
        return sql

    def upsert(conn: sa.Connection) -> str:
        conn.execute(upsert_statement(dialect, t.live, t.staging, key))
        rows = conn.scalar(sa.select(sa.func.count()).select_from(t.live))
        if rows != 6:
            raise AssertionError(f"the upsert left {rows} rows, expected 6 (3 + 3 new)")
        kind = "MERGE" if dialect == "mssql" else "INSERT … ON CONFLICT DO UPDATE"
        return f"{kind}: 6 rows after upserting 5 (2 updated, 3 inserted)"

    def grant_copy(conn: sa.Connection) -> str:
        sql = copy_grants_sql(dialect, t.live.name, t.staging.name)
        if sql is None:
            return f"not applicable on {dialect} (no grants)"
        if _role_exists(conn, READONLY_ROLE):
            conn.exec_driver_sql(
                f"GRANT SELECT ON {prep.quote(t.live.name)} TO {prep.quote(READONLY_ROLE)}"
            )
        grants = conn.exec_driver_sql(sql).all()
        for grantee, privilege in grants:  # exactly what the refresh's swap does
            conn.exec_driver_sql(
                f"GRANT {privilege} ON {prep.quote(t.staging.name)} TO {prep.quote(grantee)}"
            )
        copied = conn.exec_driver_sql(copy_grants_sql(dialect, t.staging.name, t.live.name)).all()
        if sorted(map(tuple, copied)) != sorted(map(tuple, grants)):
            raise AssertionError(f"grants {grants} on the live copy, {copied} on the staging one")
        if not grants:
            return f"listed the grants (none: role {READONLY_ROLE} does not exist here)"
        return f"copied {', '.join(f'{p} to {g}' for g, p in grants)}"

    def swap(conn: sa.Connection) -> str:
        stmts = swap_statements(dialect, t.live.name, t.staging.name, t.old_name)
        for stmt in stmts:
            conn.exec_driver_sql(stmt)
        return f"{len(stmts)} renames in one transaction"

    def check_swap(conn: sa.Connection) -> str:
        have = set(sa.inspect(conn).get_table_names())
        if t.staging.name in have or t.old_name not in have or t.live.name not in have:
            raise AssertionError(f"after the swap the tables are {sorted(have & set(t.names))}")
        rows = conn.scalar(sa.select(sa.func.count()).select_from(t.live))
        if rows != 5:
            raise AssertionError(f"the swapped-in table has {rows} rows, expected the staging's 5")
        return "the staging copy is live (5 rows), the old one kept aside"

    steps = [
        ("create_staging", create),
        ("bulk_load", bulk_load),
        ("indexes", indexes),
        ("statistics", statistics),
        ("upsert", upsert),
        ("grant_copy", grant_copy),
        # row-level security copied onto the staging table as the swap does (tenancy)
        (
            "tenant_policy",
            lambda conn: selftest_policy_copy(conn, t.live.name, t.staging.name, t.token),
        ),
        ("swap", swap),
        ("swap_result", check_swap),
    ]
    try:
        failed = False
        for name, step in steps:
            if failed:
                results.append(StepResult(name, False, "not run (an earlier step failed)"))
                continue
            try:
                with write_transaction(engine) as conn:
                    detail = step(conn)
                results.append(StepResult(name, True, detail))
            except Exception as exc:  # reported, then the next steps are skipped
                failed = True
                results.append(StepResult(name, False, describe_error(exc)))
        if dialect == "mssql":  # its own transactions: versions move at commit
            try:
                results.append(
                    StepResult("change_tracking", *change_tracking_roundtrip(engine, t.ct_name))
                )
            except Exception as exc:
                results.append(StepResult("change_tracking", False, describe_error(exc)))
    finally:
        try:
            dropped = _drop_all(engine, t.names)
            results.append(
                StepResult("cleanup", True, f"dropped {', '.join(dropped) or 'nothing'}")
            )
        except Exception as exc:
            results.append(
                StepResult(
                    "cleanup",
                    False,
                    f"{describe_error(exc)}; drop the tables {PREFIX}{t.token}* by hand",
                )
            )
    return results
