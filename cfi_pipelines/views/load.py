"""Filling a work table of the common DB from CFI's source: the staging and delta
tables (a bare copy of the view's table), the fastest load path the two databases
offer (:func:`source_loader`), the view's indexes, statistics and counts, and the
refresh's own write transactions (:func:`_begin`).

Costs: a full load reads the view's query over the whole source (O(table)); an
incremental one reads the rows changed since the watermark (O(changes), through the
``updated_at`` indexes). Counts scan the table they count (O(table)).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from cfi_pipelines.db import (
    BATCH_ROWS,
    WRITE_OPTION,
    copy_into_postgres,
    insert_rows,
    write_transaction,
)
from cfi_pipelines.views.spec import ViewSpec

SQLITE_REFRESH_CACHE_KIB = 32 * 1024
"""SQLite page cache (KiB) of the refresh's own write transactions (see :func:`_begin`):
bounded, so that memory stays flat (peak RSS < 150 MB whatever the row count)."""

COPY_CHUNK_BYTES = 128 * 1024
"""Bytes per write of the PostgreSQL→PostgreSQL COPY relay (psycopg's largest unsplit write)."""


def coalesced(blocks: Iterable[bytes | memoryview]) -> Iterator[bytes]:
    """``COPY … TO``'s blocks joined into writes of at least :data:`COPY_CHUNK_BYTES`.

    COPY TO hands out one row per block, and each write into a ``COPY … FROM`` is a round
    of psycopg's wait loop: written in chunks, a relay costs per MB, not per row."""
    chunk = bytearray()
    for block in blocks:
        chunk += block
        if len(chunk) >= COPY_CHUNK_BYTES:
            yield bytes(chunk)
            chunk = bytearray()
    if chunk:
        yield bytes(chunk)


Loader = Callable[[sa.Table], int]
"""Fills a staging table (given as a Table object) and returns its row count."""


def _schema_for(engine_or_conn) -> str | None:
    # SQLite: the staging table must be named in "main" so that the
    # schema_translate_map used by the ATTACH path does not move it.
    return "main" if engine_or_conn.dialect.name == "sqlite" else None


def _work_table(spec: ViewSpec, suffix: str, schema: str | None) -> sa.Table:
    """A bare copy of the view's table (no indexes), named ``<table>__<suffix>``."""
    md = sa.MetaData()
    return sa.Table(
        f"{spec.table_name}__{suffix}",
        md,
        *(sa.Column(c.name, c.type, nullable=c.nullable) for c in spec.table.columns),
        schema=schema,
    )


def _index_statements(spec: ViewSpec, table: sa.Table, token: str) -> list[sa.Index]:
    """The key's unique index and the lookup indexes, named per refresh.

    Index names are unique per database on SQLite and PostgreSQL and a renamed
    table keeps its index names, so each build uses fresh names.
    """
    base = spec.table_name
    out = [sa.Index(f"ux_{base}_key_{token}", *(table.c[k] for k in spec.key), unique=True)]
    for cols in spec.indexes:
        out.append(sa.Index(f"ix_{base}_{'_'.join(cols)}_{token}", *(table.c[c] for c in cols)))
    return out


@contextmanager
def _begin(engine: Engine) -> Iterator[sa.Connection]:
    """``engine.begin()`` for the refresh's own writes.

    SQLite: Debian and others build it with SECURE_DELETE on, which zeroes every
    page a DROP or an overwrite frees: dropping the old 1M-row view wrote ~180 MB
    to the WAL (~1.9 s). FAST only zeroes what costs no extra I/O. The view holds
    no secret the source does not, and durability is unchanged.

    Also on SQLite: a page cache of :data:`SQLITE_REFRESH_CACHE_KIB` for the
    transaction (the default 2 MB), given back afterwards. Index builds sort in
    the cache before spilling to temporary files, and an upsert of 1 % of a 10M-row
    view touches pages all over the table and its three indexes: with 2 MB, every
    page was read again and dirty pages spilled to the WAL mid-transaction (the
    upsert of 100k rows took 7.6 s of the 13 s incremental at 10M rows).
    """
    with write_transaction(engine) as conn, _sqlite_write_settings(conn):
        yield conn


@contextmanager
def _sqlite_write_settings(conn: sa.Connection) -> Iterator[None]:
    """SQLite: :func:`_begin`'s secure-delete and page-cache settings on ``conn`` for the
    block, the cache given back afterwards. Other databases: nothing."""
    if conn.dialect.name != "sqlite":
        yield
        return
    conn.exec_driver_sql("PRAGMA secure_delete = FAST")
    default_cache = conn.exec_driver_sql("PRAGMA cache_size").scalar()
    conn.exec_driver_sql(f"PRAGMA cache_size = -{SQLITE_REFRESH_CACHE_KIB}")
    try:
        yield
    finally:
        conn.exec_driver_sql(f"PRAGMA cache_size = {default_cache}")


def _analyze_sql(dialect: str, table: sa.Table, preparer) -> str | None:
    name = preparer.format_table(table)
    return {
        "sqlite": f"ANALYZE {name}",
        "postgresql": f"ANALYZE {name}",
        "mssql": f"UPDATE STATISTICS {name}",
    }.get(dialect)


def _table_exists(conn: sa.Connection, name: str) -> bool:
    return sa.inspect(conn).has_table(name)


def _count(conn: sa.Connection, table: sa.Table) -> int:
    return conn.scalar(sa.select(sa.func.count()).select_from(table)) or 0


def _count_matching(conn: sa.Connection, a: sa.Table, b: sa.Table, key: tuple[str, ...]) -> int:
    on = sa.and_(*(a.c[k] == b.c[k] for k in key))
    return conn.scalar(sa.select(sa.func.count()).select_from(a.join(b, on))) or 0


# --------------------------------------------------------------------------- loaders


def _sqlite_path(engine: Engine) -> str | None:
    url = make_url(str(engine.url))
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        return url.database
    return None


def _binary_select(sql: str, columns: list[sa.Column], dialect: sa.Dialect) -> str:
    """``sql`` with each column cast to the staging column's type: binary COPY needs the
    exact type on both sides (an int4 is not an int8 there). Casts drop the length and
    precision (``varchar``, ``numeric``): a cast to ``varchar(n)`` would truncate silently,
    while the staging column checks them on receive, as it does for text."""

    def base(t: sa.types.TypeEngine) -> str:
        if isinstance(t, sa.String):
            return "varchar"
        if isinstance(t, sa.Numeric) and not isinstance(t, sa.Float):
            return "numeric"
        return t.compile(dialect=dialect)

    q = dialect.identifier_preparer.quote
    casts = ", ".join(f"CAST(q.{q(c.name)} AS {base(c.type)}) AS {q(c.name)}" for c in columns)
    return f"SELECT {casts} FROM ({sql}) AS q"


INDEX_DRIVEN_SETTINGS = ("enable_hashjoin", "enable_mergejoin", "jit")
"""PostgreSQL planner settings turned off for an incremental read (:func:`_index_driven`)."""


def _index_driven(conn: sa.Connection) -> None:
    """PostgreSQL source: the rest of this read transaction joins through indexes only.

    The incremental query names the changed rows through the ``updated_at`` indexes;
    the planner then estimated them from statistics that do not know the newest stamps
    (and from index entries of row versions not yet vacuumed: 70k for 10k changed
    rows) and chose hash joins over sequential scans of stock_levels and products:
    1.5M rows read for 10k changed, 0.60 s. With hash and merge joins off the plan is
    nested loops over the primary keys (0.13 s), O(changes) whatever the estimates.
    JIT off too: disabled plan nodes carry costs that set off its compilation.
    Session-local settings (``SET LOCAL``), nothing changes on CFI's server."""
    if conn.dialect.name != "postgresql":
        return
    for name in INDEX_DRIVEN_SETTINGS:
        conn.execute(sa.text("SELECT set_config(:n, 'off', true)"), {"n": name})


def source_loader(
    spec: ViewSpec,
    source: Engine,
    target: Engine,
    *,
    incremental: bool,
    params: dict,
    freeze: bool = False,
) -> Loader:
    """The fastest way to fill a staging table with the view's query over ``source``.

    ``freeze``: the loader is the only writer of a table created for it (a full refresh's
    staging). PostgreSQL→PostgreSQL then empties it and copies in one transaction with
    ``COPY … (FREEZE)``: the rows are written frozen and all-visible, so the index
    builds, ANALYZE and the first readers do not rewrite every page to set hint bits,
    and autovacuum finds nothing to do on the table once it is live. Never for a table
    filled by several loads (the incremental's delta)."""
    query = spec.query(incremental=incremental)
    cols = spec.columns
    src_path, tgt_path = _sqlite_path(source), _sqlite_path(target)

    if src_path and tgt_path:
        # SQLite -> SQLite: one INSERT…SELECT across an ATTACHed file, no Python in the loop.
        def load(staging: sa.Table) -> int:
            with target.connect() as conn:
                raw = conn.connection.dbapi_connection
                # read-only: the refresh cannot write into CFI's DB, nor lock it for writing
                src_uri = f"{Path(src_path).resolve().as_uri()}?mode=ro"
                raw.execute("ATTACH DATABASE ? AS cfi_src", (src_uri,))
                default_cache = raw.execute("PRAGMA main.cache_size").fetchone()[0]
                raw.execute(f"PRAGMA main.cache_size = -{SQLITE_REFRESH_CACHE_KIB}")
                try:
                    conn = conn.execution_options(
                        schema_translate_map={None: "cfi_src"}, **{WRITE_OPTION: True}
                    )
                    with conn.begin():
                        res = conn.execute(sa.insert(staging).from_select(cols, query), params)
                    return res.rowcount
                finally:
                    conn.rollback()
                    raw.execute("DETACH DATABASE cfi_src")
                    raw.execute(f"PRAGMA main.cache_size = {default_cache}")

        return load

    if source.dialect.name == "postgresql" and target.dialect.name == "postgresql":
        # PostgreSQL -> PostgreSQL: COPY TO STDOUT streamed into COPY FROM STDIN, in the
        # binary format (no numbers or timestamps printed then parsed again).
        sql = str(
            query.params(**params).compile(
                dialect=source.dialect, compile_kwargs={"literal_binds": True}
            )
        )

        def load(staging: sa.Table) -> int:
            prep = target.dialect.identifier_preparer
            col_list = ", ".join(prep.quote(c) for c in cols)
            name = prep.format_table(staging)
            typed = _binary_select(sql, [staging.c[c] for c in cols], target.dialect)
            with source.connect() as sconn, write_transaction(target) as tconn:
                if incremental:
                    _index_driven(sconn)
                s_raw = sconn.connection.driver_connection
                t_raw = tconn.connection.driver_connection
                if freeze:  # FREEZE needs the table emptied in the COPY's own transaction
                    tconn.exec_driver_sql(f"TRUNCATE {name}")
                options = "FORMAT BINARY, FREEZE" if freeze else "FORMAT BINARY"
                with s_raw.cursor() as scur, t_raw.cursor() as tcur:
                    with (
                        scur.copy(f"COPY ({typed}) TO STDOUT (FORMAT BINARY)") as out,
                        tcur.copy(f"COPY {name} ({col_list}) FROM STDIN ({options})") as into,
                    ):
                        for chunk in coalesced(out):
                            into.write(chunk)
                    return tcur.rowcount  # "COPY n"

        return load

    # Portable path: stream rows from the source, bulk-write them (COPY on PostgreSQL,
    # fast_executemany on SQL Server, batched executemany elsewhere).
    def load(staging: sa.Table) -> int:
        with source.connect() as sconn, write_transaction(target) as tconn:
            if incremental:
                _index_driven(sconn)
            result = sconn.execution_options(stream_results=True, yield_per=BATCH_ROWS).execute(
                query, params
            )
            rows = (tuple(r) for r in result)
            if tconn.dialect.name == "postgresql":
                return copy_into_postgres(tconn, staging, cols, rows)
            return insert_rows(tconn, staging, rows, cols)

    return load
