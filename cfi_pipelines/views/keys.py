"""How the apply names view rows: keys, key predicates, and each view's dependencies.

A :class:`Dependency` says how a change of one source table reaches a view's keys; the
predicates restrict a query to a set of keys through the key index, with the fewest bound
parameters each dialect allows. No database access here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY

Keys = Sequence[tuple]
"""View keys (tuples in the order of :attr:`ViewSpec.key`) a keyed query is restricted to."""


def key_predicate(
    columns: Sequence[sa.ColumnElement], keys: Keys, dialect: str | None = None
) -> sa.ColumnElement:
    """``columns`` equal to one of ``keys``, served by the unique key index.

    PostgreSQL: one array parameter per key column (``= ANY``, or a row-value ``IN`` over
    ``unnest``): a few parameters whatever the number of keys. SQLite: an ``IN`` list (of
    row values for a composite key). SQL Server, or no ``dialect``: an ``IN`` list, or an
    ``OR`` of ``AND``s (it has no row-value ``IN``)."""
    if dialect == "postgresql":
        arrays = [
            sa.bindparam(None, [k[i] for k in keys], type_=ARRAY(c.type), unique=True)
            for i, c in enumerate(columns)
        ]
        if len(columns) == 1:
            return columns[0] == sa.func.any(arrays[0])
        return sa.tuple_(*columns).in_(sa.select(*(sa.func.unnest(a) for a in arrays)))
    if len(columns) == 1:
        return columns[0].in_([k[0] for k in keys])
    if dialect == "sqlite":
        return sa.tuple_(*columns).in_([tuple(k) for k in keys])
    return sa.or_(
        sa.false(), *(sa.and_(*(c == v for c, v in zip(columns, k, strict=True))) for k in keys)
    )


def keys_per_query(dialect: str | None) -> int:
    """How many keys one :func:`key_predicate` should carry on ``dialect``."""
    return {"postgresql": 20_000, "sqlite": 2_000}.get(dialect or "", 400)


@dataclass(frozen=True)
class Dependency:
    """How a change of one source table reaches a view's keys (used by the apply).

    ``columns``: the columns of the changed row (new and old image) that name what it
    affects. Without ``lookup`` they *are* the view key (in key order: the driving table,
    or a child naming its parent). With ``lookup`` they are values to look up on the
    source, through an index, to find the view keys (a product whose price changed →
    its stock rows): a SELECT of the key columns with an expanding ``values`` parameter.
    A NULL value (a campaign without operation) affects nothing.
    """

    table: sa.Table
    columns: tuple[str, ...]
    lookup: sa.Select | None = None


VALUES = sa.bindparam("values", expanding=True)
"""The changed rows' values a :attr:`Dependency.lookup` is run with."""
