"""PostgreSQL side of ``benchmarks/freshness.py`` (``--source postgresql``).

CFI's source on a PostgreSQL 15 started here with ``wal_level=logical`` (and autovacuum
off, so that ``pg_stat_database.tup_returned`` counts only what clients read), seeded at
volume: ``seed_source_fast`` for the stocks tables (``--rows`` stock rows, half as many
products), then the demo rows of the 10 other tables from ``seed_source`` at scale 1
(operations, invoices, campaigns … so that every view has rows). CFI's DBA script
``deploy/sql/postgresql_logical_decoding.sql`` is then run as the README says, and
``cfi-pipelines`` reads the source as the script's own account (``cfi_source_reader``:
SELECT + REPLICATION, not a superuser), so that the capture mode is chosen as in
production. The common DB (cache) is either the embedded SQLite or a PostgreSQL server
of its own (``--cache``): in production they are two servers, and a cache on the
source's server would write WAL there on every tick (the sensor's verified-current
updates), which the slot then has to decode: its catalog reads would count as reads of
an idle source.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import psycopg
import sqlalchemy as sa

from cfi_pipelines.db import create_engine
from cfi_pipelines.devtools.postgres import PASSWORD, SUPERUSER, TempPostgres
from cfi_pipelines.devtools.seed import seed_source, seed_source_fast
from cfi_pipelines.model import cfi_source as src

ROWS_PER_SCALE = 10_000
DBA_SQL = Path(__file__).resolve().parents[1] / "deploy/sql/postgresql_logical_decoding.sql"
READER = "cfi_source_reader"  # the DBA script's account
READER_PASSWORD = "bench-reader-only"
SERVER_SETTINGS = (
    "wal_level=logical",
    "max_replication_slots=8",
    "max_wal_senders=8",
    "autovacuum=off",
    "shared_buffers=256MB",
)
FAST_TABLES = {"tenants", "channels", "warehouses", "products", "stock_levels"}
SOURCE_DB, COMMON_DB = "cfi_source", "cfi_common"


def start_server() -> TempPostgres:
    """CFI's source server (logical decoding)."""
    return TempPostgres(settings=SERVER_SETTINGS).start()


def start_cache_server() -> TempPostgres:
    """The common DB's server (a server of its own, as in production)."""
    return TempPostgres(settings=("shared_buffers=256MB",)).start()


def seed(pg: TempPostgres, rows: int, seed: int) -> dict[str, int]:
    """Create and fill CFI's source DB; run the DBA script. Row counts per table."""
    url = pg.create_database(SOURCE_DB)
    engine = create_engine(url)
    counts = seed_source_fast(engine, scale=max(1, rows // ROWS_PER_SCALE), seed=seed)
    with tempfile.TemporaryDirectory(prefix="cfi-freshness-demo-") as tmp:
        demo = create_engine(f"sqlite:///{tmp}/demo.db")
        seed_source(demo, scale=1, seed=seed)
        with demo.connect() as read, engine.begin() as write:
            for table in src.metadata.sorted_tables:  # parents first
                if table.name in FAST_TABLES:
                    continue
                batch = [dict(r._mapping) for r in read.execute(sa.select(table))]
                if batch:
                    write.execute(table.insert(), batch)
                counts[table.name] = len(batch)
        demo.dispose()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("ANALYZE")
    with (
        engine.connect() as conn
    ):  # as CFI's DBA: psql -f deploy/sql/postgresql_logical_decoding.sql
        raw = conn.connection.driver_connection
        raw.execute(DBA_SQL.read_text())
        raw.execute(f"ALTER ROLE {READER} PASSWORD '{READER_PASSWORD}'")
        raw.commit()
    engine.dispose()
    return counts


def common_url(pg: TempPostgres) -> str:
    return pg.create_database(COMMON_DB)


def writer_url(pg: TempPostgres) -> str:
    """CFI's application writes as the tables' owner."""
    return pg.url(SOURCE_DB)


def reader_url(pg: TempPostgres) -> str:
    """What cfi-pipelines reads with (CFI_SOURCE_URL)."""
    return pg.url(SOURCE_DB, user=READER, password=READER_PASSWORD)


def libpq_url(url: str) -> str:
    return sa.engine.make_url(url).set(drivername="postgresql").render_as_string(False)


def tup_returned(pg: TempPostgres, database: str = SOURCE_DB) -> int:
    """Rows read in ``database`` since the server started (``pg_stat_database``), read
    from the ``postgres`` database so that the question itself is not counted."""
    with psycopg.connect(
        host="127.0.0.1", port=pg.port, user=SUPERUSER, password=PASSWORD, dbname="postgres"
    ) as conn:
        return conn.execute(
            "SELECT tup_returned FROM pg_stat_database WHERE datname = %s", (database,)
        ).fetchone()[0]


def wal_lsn(pg: TempPostgres) -> int:
    """The source server's current WAL insert position, in bytes."""
    with psycopg.connect(
        host="127.0.0.1", port=pg.port, user=SUPERUSER, password=PASSWORD, dbname="postgres"
    ) as conn:
        return conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()[0]


def slot_state(pg: TempPostgres) -> list[tuple]:
    """(slot, plugin, active, wal_status, confirmed_flush_lsn) of the source's slots."""
    with psycopg.connect(
        host="127.0.0.1", port=pg.port, user=SUPERUSER, password=PASSWORD, dbname=SOURCE_DB
    ) as conn:
        return conn.execute(
            "SELECT slot_name, plugin, active, wal_status, confirmed_flush_lsn::text "
            "FROM pg_replication_slots ORDER BY slot_name"
        ).fetchall()
