"""Engines for the three databases, with the per-dialect settings they need.

SQLite runs in WAL mode with a busy timeout so that MyCfia's readers never wait
on a refresh; SQL Server gets ``fast_executemany``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url


def _sqlite_on_connect(dbapi_conn, _record) -> None:
    # Let SQLAlchemy issue BEGIN itself (pysqlite's implicit transactions defer it,
    # which breaks "BEGIN IMMEDIATE" and DDL inside a transaction).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _sqlite_on_begin(conn) -> None:
    conn.exec_driver_sql("BEGIN")


def create_engine(url: str) -> Engine:
    """An engine for ``url`` (any SQLAlchemy URL), tuned per dialect."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(parsed, connect_args={"timeout": 30})
        sa.event.listen(engine, "connect", _sqlite_on_connect)
        sa.event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    if backend == "mssql":
        return sa.create_engine(parsed, fast_executemany=True, pool_pre_ping=True)
    if backend == "postgresql" and parsed.get_driver_name() in ("psycopg2", "default"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return sa.create_engine(parsed, pool_pre_ping=True)


@lru_cache(maxsize=16)
def engine_for(url: str) -> Engine:
    """One shared engine per URL in a process (connections are pooled)."""
    return create_engine(url)


def redact(url: str) -> str:
    """The URL with its password hidden, for logs and errors."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL is reported by whoever uses it
        return "<unparsable URL>"
