"""Where each view stands in its source's change log: ``cfi_capture_state`` (common DB).

One row per view: the capture mode and the opaque position (:mod:`cfi_pipelines.views.capture`)
its data has applied up to. Written in the transaction that changes the view's rows
(the apply), or right after a full refresh's swap with the position it took before
reading the source (a crash in between leaves an older position: replayed, idempotent).
Reads and writes touch one row per view.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cfi_pipelines.clock import utcnow
from cfi_pipelines.db import write_transaction
from cfi_pipelines.model import cfi_common as common

T = common.cfi_capture_state


def read_positions(engine_or_conn: Engine | sa.Connection, mode: str | None = None) -> dict:
    """``{view: position}`` (of ``mode`` only when given); {} before the table exists."""
    q = sa.select(T.c.view, T.c.position)
    if mode is not None:
        q = q.where(T.c.mode == mode)
    if isinstance(engine_or_conn, sa.Connection):
        return dict(engine_or_conn.execute(q).tuples().all())
    with engine_or_conn.connect() as conn:
        if not sa.inspect(conn).has_table(T.name):
            return {}
        return dict(conn.execute(q).tuples().all())


def read_modes(engine: Engine) -> dict[str, tuple[str, str]]:
    """``{view: (mode, position)}``."""
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table(T.name):
            return {}
        return {v: (m, p) for v, m, p in conn.execute(sa.select(T.c.view, T.c.mode, T.c.position))}


def write_position(conn: sa.Connection, view: str, mode: str, position: str) -> None:
    """Record ``view`` as applied up to ``position`` (inside the caller's transaction)."""
    values = {"mode": mode, "position": position, "updated_at": utcnow()}
    if conn.execute(T.update().where(T.c.view == view).values(**values)).rowcount == 0:
        conn.execute(T.insert().values(view=view, **values))


def store_position(engine: Engine, view: str, mode: str, position: str) -> None:
    with write_transaction(engine) as conn:
        write_position(conn, view, mode, position)


def forget_positions(engine: Engine, mode: str) -> int:
    """Drop every position of ``mode`` (its change log was lost): each view then needs a
    full refresh before it can apply changes again. Rows removed."""
    with write_transaction(engine) as conn:
        return conn.execute(T.delete().where(T.c.mode == mode)).rowcount or 0
