"""CFI's source schema against what the views read: which table or column is missing.

A column renamed in CFI's DB (``products.name`` → ``label``) makes every refresh of
the views that read it fail. That is not an outage: this module names the
difference, for the refresh's failure message, ``doctor`` (``cfi_source:schema``) and
the ``schema`` asset check of each ``cfi_source/<table>`` asset.

What the views read is taken from their own queries (every source column the full
and incremental SELECTs, the change columns and the apply's dependencies use), so it
cannot drift from the specs. The source side is SQLAlchemy's inspector, the same on
SQLite, PostgreSQL and SQL Server. Cost: catalog reads only, one column listing per
source table compared (no table is scanned).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache

import sqlalchemy as sa
from sqlalchemy.sql import visitors

from cfi_pipelines.model import cfi_source as src
from cfi_pipelines.views.spec import VIEWS, ViewSpec


@dataclass(frozen=True)
class Difference:
    """One thing a view reads that CFI's DB does not have."""

    table: str
    column: str | None  # None: the whole table is missing
    views: tuple[str, ...]  # the views that read it

    @property
    def what(self) -> str:
        return f"table {self.table}" if self.column is None else f"{self.table}.{self.column}"

    def __str__(self) -> str:
        return f"{self.what} is missing (read by {', '.join(self.views)})"


def _source_columns(element: object) -> Iterable[sa.Column]:
    for node in visitors.iterate(element):  # type: ignore[arg-type]
        table = getattr(node, "table", None) if isinstance(node, sa.Column) else None
        if isinstance(table, sa.Table) and table.metadata is src.metadata:
            yield node


def _view_elements(spec: ViewSpec) -> Iterable[object]:
    yield spec.query()
    yield spec.query(incremental=True)
    yield from spec.change_columns
    for dep in spec.dependencies:
        yield from (dep.table.c[c] for c in dep.columns)
        if dep.lookup is not None:
            yield dep.lookup


@cache
def columns_read(
    views: tuple[ViewSpec, ...] = tuple(VIEWS),
) -> dict[str, dict[str, tuple[str, ...]]]:
    """``{source table: {column: views that read it}}``, from the views' own queries."""
    read: dict[str, dict[str, list[str]]] = {}
    for spec in views:
        for element in _view_elements(spec):
            for col in _source_columns(element):
                users = read.setdefault(col.table.name, {}).setdefault(col.name, [])
                if spec.name not in users:
                    users.append(spec.name)
    return {t: {c: tuple(v) for c, v in cols.items()} for t, cols in read.items()}


def tables_read(views: Iterable[ViewSpec] = VIEWS) -> list[str]:
    """The source tables some view reads, in a stable order."""
    return sorted(columns_read(tuple(views)))


def compare(
    conn: sa.Connection,
    views: Iterable[ViewSpec] = VIEWS,
    tables: Iterable[str] | None = None,
) -> list[Difference]:
    """What ``views`` read (restricted to ``tables``) that the connected DB lacks.

    Names compare case-insensitively (SQL Server's default collation). Cost: one
    catalog read per table (``Inspector.get_columns``).
    """
    wanted = columns_read(tuple(views))
    inspector = sa.inspect(conn)
    out: list[Difference] = []
    for table in sorted(tables if tables is not None else wanted):
        columns = wanted.get(table)
        if not columns:
            continue
        schema = src.metadata.tables[table].schema if table in src.metadata.tables else None
        try:
            have = {c["name"].lower() for c in inspector.get_columns(table, schema=schema)}
        except sa.exc.NoSuchTableError:
            users = sorted({v for vs in columns.values() for v in vs})
            out.append(Difference(table, None, tuple(users)))
            continue
        out += [
            Difference(table, column, users)
            for column, users in sorted(columns.items())
            if column.lower() not in have
        ]
    return out


def describe(differences: Iterable[Difference]) -> str:
    """One line: ``CFI's schema changed: products.name is missing (read by stocks); …``."""
    return "CFI's schema changed: " + "; ".join(str(d) for d in differences)
