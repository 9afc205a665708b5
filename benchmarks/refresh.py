"""Full and incremental refresh of the stocks view against the native paths and the peers.

    python benchmarks/refresh.py --rows 1000000 [--backend sqlite|postgresql|both]
        [--repeat 3] [--seed sql|python] [--no-peers | --peers sling,dlt,pandas]
        [--workdir DIR]

Seeds CFI's source DB once per backend (scale = rows / 10,000, one scale being
~10k stock rows; ``--seed sql``, the default, generates the stocks tables inside
the database with ``seed_source_fast``: 10M rows in minutes; ``--seed python`` is
the demo seed of every table), then times, each in its own child process so that
its peak RSS is its own:

- ours, empty:      ``refresh_view(mode="full")`` into an empty common DB
- ours, populated:  the same into the now populated common DB (the nightly case)
- ours + reader:    the same while a reader counts the live view every 50 ms (fails
                    if a count is not the complete view)
- (a) pandas:       ``pd.read_sql`` of the same query + ``DataFrame.to_sql``
- (b) native:       the database's own fastest copy of the same query into a bare
                    table (SQLite: ATTACH + INSERT…SELECT; PostgreSQL: COPY (query)
                    TO STDOUT piped into COPY FROM STDIN, psycopg 3), and (b) followed
                    by the view's three indexes: the floor of any refresh that must
                    index what it loads
- sling:            ``sling run`` (the sling-linux-amd64 binary) from the SQL view
                    ``stocks_v`` (the same query), ``full-refresh``, then
                    ``incremental`` on ``source_updated_at``
- dlt:              ``sql_table(backend="pyarrow")`` of ``stocks_v``, ``replace``, then
                    ``merge`` with ``dlt.sources.incremental("source_updated_at")``
                    (SQLite through dlt's sqlalchemy destination)
- incremental:      after 1 % of the stock rows changed (quantity and updated_at),
                    ours (``mode="incremental"``: the ``updated_at`` path), sling's and
                    dlt's, ``--repeat`` rounds
- apply (PostgreSQL): on the same change, ``refresh_view`` (auto) taking the exact
                    path: the source runs on its own server with ``wal_level=logical``
                    and CFI's DBA script (publication, REPLICA IDENTITY FULL), so the
                    full refreshes record a slot position and the round applies the
                    decoded changes by key (``views/apply.py``). Its own server: the
                    slot decodes only the source's WAL, not the loads into the common DB
                    (in production the two are different servers too). SQLite has no
                    change log: its incremental is the timestamp path

Peers that are not installed are skipped with a note (they are no dependency of
the project). Key measurements run ``--repeat`` times: medians are printed. Our
refreshes print a per-step breakdown (the refresh module's steps wrapped with
timers from here). Then the ratios against the targets: ours/((b)+indexes) ≤ 1.1,
incremental/full and apply/full ≤ 0.10, best peer/ours ≥ 2 (full and incremental),
sling incremental/ours apply ≥ 2, peak RSS < 150 MB.

Measured on a quiet machine (3 Dec 2026, commit ecbfcd0; see the README's Benchmarks):

- 1M, PostgreSQL: full 7.34 s, (b)+indexes 7.09 s (1.04x), sling 14.53 s (1.98x);
  incremental 0.57 s (0.077), apply 0.62 s (0.085), sling incremental 1.45 s (2.6x /
  2.3x); apply steps: changes 0.18 s, relay 0.15 s, delete 0.14 s, keys 0.07 s.
- 1M, SQLite: full 6.18 s, (b)+indexes 4.86 s, sling 168.0 s (27.2x); incremental 0.53 s
  (0.086), sling incremental 3.50 s (6.6x). SQLite's full refresh moves 4.5-7.2 s from
  run to run here (same code).

Before (commit 720a030, quiet machine):

- 1M, PostgreSQL: full 8.07 s, (b)+indexes 8.80 s (0.92x), sling 19.30 s (2.4x);
  incremental 1.08 s (0.134), apply 1.41 s (0.175), sling incremental 2.17 s (2.0x / 1.5x).
- 1M, SQLite: full 5.78 s, (b)+indexes 5.91 s (0.98x), sling 199.5 s; incremental 0.83 s
  (0.144), sling incremental 4.20 s (5.0x).
- 10M, PostgreSQL: full 76.1 s, (b)+indexes 82.8 s (0.92x), sling 220.3 s (2.9x);
  incremental 14.0 s, apply 16.3 s, sling incremental 15.6 s; apply peak RSS 438 MB.

Measured at 1M stock rows (``--peers sling --repeat 3``; 2 cores shared, ``uptime`` load):

- PostgreSQL (load 3.6-4.1): full 10.6 s, incremental 1.15 s, apply 1.44 s, sling's
  incremental 2.57 s: incr/full 0.108, apply/full 0.135, sling/incr 2.2x, sling/apply
  1.8x. Load 1.5-4.2 (before the apply's read-ahead): full 7.79 s, incremental 0.90 s,
  apply 1.22 s, sling 1.99 s. The apply's steps: relay (keyed rows, binary COPY) 0.54 s,
  capture.changes 0.39 s, delete_existing 0.19 s, affected_keys 0.12 s.
- SQLite (load 4-11): full 20.5 s, incremental 1.03 s, sling's incremental 7.34 s:
  incr/full 0.050, sling/incr 7.1x.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STOCK_ROWS_PER_SCALE = 10_000
CHANGED_SHARE = 100  # one stock row in CHANGED_SHARE changes before the incremental refresh
TARGETS = {
    "ours/((b)+idx)": 1.1,
    "(a)/ours": 5.0,
    "incr/full": 0.10,
    "peer/ours": 2.0,
    "rss_mb": 150.0,
}


# --------------------------------------------------------------------------- children
# Each measurement runs in a fresh interpreter: ``--child NAME --source URL --target URL``
# prints one JSON line {seconds, rows, rss_mb}. Imports are inside the functions so
# that a measurement's RSS holds only what it needs.


def peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stocks_sql(dialect) -> str:
    """The stocks view's full query, as plain SQL for ``dialect``."""
    from cfi_pipelines.views.spec import get_view

    spec = get_view("stocks")
    query = spec.query().params(**spec.params())
    return str(query.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))


def child_baseline(source: str, target: str) -> tuple[float, int]:
    import cfi_pipelines.views.refresh  # noqa: F401  (what every measurement imports)
    from cfi_pipelines.db import create_engine

    with create_engine(source).connect() as conn:
        conn.exec_driver_sql("SELECT 1")
    return 0.0, 0


STEPS: dict[str, list[float]] = {}
"""Per-step [seconds, calls] of the last measurement (wrapped refresh functions)."""

_STEP_NAMES = (
    "init_common",
    "read_status",
    "_table_exists",
    "_read_closure",
    "_write_closure",
    "_high_watermark",
    "stale_keys",
    "deleted_keys",
    "delete_keys",
    "_count",
    "_count_matching",
    "_upsert",
    "_record_success",
    "_build_indexes",
    "_swap_with_retries",
    "_drop_table",
    "sync_after_refresh",
    "exact_capture",
    "_take_position",
    "read_positions",
    "affected_keys",
    "recompute",
    "relay",
    "_count_keys",
    "_delete_existing",
    "insert_rows",
    "write_position",
)
TIMED_METHODS = {
    # class -> methods: the capture's own reads (the slot), timed the same way
    "cfi_pipelines.views.capture.pg_logical.PgLogicalCapture": ("changes", "release"),
}
TIMED_STEPS = {
    # module attribute -> step label; wrapped from here, production code untouched. Each
    # step module calls the names it imported, so every module holding one is wrapped.
    f"cfi_pipelines.views.{m}": _STEP_NAMES
    for m in ("refresh", "status", "load", "swap", "incremental", "apply")
}  # fmt: skip


def _time_steps() -> None:
    """Wrap the refresh's steps so that each call adds its time to STEPS.

    Nested steps (a count inside another step) are counted in both."""
    import functools
    import importlib

    targets = [(importlib.import_module(m), names, "") for m, names in TIMED_STEPS.items()]
    for path, names in TIMED_METHODS.items():
        module_name, _, cls = path.rpartition(".")
        targets.append((getattr(importlib.import_module(module_name), cls), names, "capture."))
    for module, names, prefix in targets:
        for name in names:
            fn = getattr(module, name, None)
            if fn is None:
                continue

            label = prefix + name.lstrip("_")

            def wrap(fn=fn, name=label):
                @functools.wraps(fn)
                def timed(*a, **kw):
                    t = time.perf_counter()
                    try:
                        return fn(*a, **kw)
                    finally:
                        acc = STEPS.setdefault(name, [0.0, 0])
                        acc[0] += time.perf_counter() - t
                        acc[1] += 1

                return timed

            setattr(module, name, wrap())
        loader_factory = module.__dict__.get("source_loader")
        if loader_factory is not None and not hasattr(loader_factory, "__timed__"):

            def timed_factory(*a, _f=loader_factory, **kw):
                load = _f(*a, **kw)

                def timed_load(table):
                    t = time.perf_counter()
                    try:
                        return load(table)
                    finally:
                        acc = STEPS.setdefault("load", [0.0, 0])
                        acc[0] += time.perf_counter() - t
                        acc[1] += 1

                return timed_load

            timed_factory.__timed__ = True
            module.source_loader = timed_factory


def _warm_imports() -> None:
    """Import what the refresh imports lazily (the capture modules, and the settings, which
    import dagster: 1-2 s cold, already loaded in a Dagster run), as the baseline
    interpreter does for the rest: a cold import is a per-process cost, not the refresh's."""
    import importlib

    importlib.import_module("cfi_pipelines.settings")
    for name in ("pg_counters", "pg_logical", "sqlite", "timestamp"):
        importlib.import_module(f"cfi_pipelines.views.capture.{name}")


def child_ours(source: str, target: str, mode: str, expect: str | None = None) -> tuple[float, int]:
    from cfi_pipelines.db import create_engine
    from cfi_pipelines.views.refresh import refresh_view
    from cfi_pipelines.views.spec import get_view

    _time_steps()
    _warm_imports()
    src, tgt = create_engine(source), create_engine(target)
    started = time.perf_counter()
    result = refresh_view(get_view("stocks"), src, tgt, mode=mode)
    seconds = time.perf_counter() - started
    if result.mode != (expect or mode):
        raise SystemExit(f"asked for a {expect or mode} refresh, got {result.mode}")
    return seconds, result.loaded


def child_ours_reader(source: str, target: str) -> tuple[float, int]:
    """A full refresh while a reader counts the live view in a loop: the smallest
    count it saw must be the complete view (readers never see a partial one)."""
    import threading

    from cfi_pipelines.db import create_engine
    from cfi_pipelines.views.refresh import refresh_view
    from cfi_pipelines.views.spec import get_view

    spec = get_view("stocks")
    src, tgt = create_engine(source), create_engine(target)
    seen: list[int] = []
    done = threading.Event()

    def read() -> None:
        reader = create_engine(target)
        while not done.is_set():
            with reader.connect() as conn:
                seen.append(
                    conn.exec_driver_sql(f"SELECT count(*) FROM {spec.table_name}").scalar()
                )
            time.sleep(0.05)

    thread = threading.Thread(target=read)
    thread.start()
    started = time.perf_counter()
    try:
        result = refresh_view(spec, src, tgt, mode="full")
    finally:
        done.set()
        thread.join()
    seconds = time.perf_counter() - started
    if min(seen) != result.rows:
        raise SystemExit(f"a reader saw {min(seen)} rows of {result.rows}")
    STEPS["reads"] = [0.0, len(seen)]
    return seconds, min(seen)


# --------------------------------------------------------------------------- peers
# sling and dlt, read from a SQL view of the stocks query (``stocks_v`` in the source
# DB); not runtime dependencies: each is skipped with a note when not installed.

PEER_VIEW = "stocks_v"


def sling_binary() -> str | None:
    import importlib.util
    import os

    if os.environ.get("SLING_BINARY"):
        return os.environ["SLING_BINARY"]
    spec = importlib.util.find_spec("sling_linux_amd64")
    if spec is None or spec.origin is None:
        return None
    # the binary of the sling-linux-amd64 package (the `sling` wrapper would download one)
    found = sorted((Path(spec.origin).parent / "bin").glob("sling*"))
    return str(found[0]) if found else None


def dlt_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("dlt") is not None


def _plain_url(url: str) -> str:
    """A SQLAlchemy URL as sling wants it (postgresql://…?sslmode=disable, sqlite:///…)."""
    from sqlalchemy.engine import make_url

    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        return f"sqlite://{Path(u.database).resolve()}"
    return u.set(drivername="postgresql").render_as_string(hide_password=False) + "?sslmode=disable"


def _children_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


CHILD_EXTRA_RSS: list[float] = []


def child_sling(source: str, target: str, mode: str) -> tuple[float, int]:
    import os

    from cfi_pipelines.views.spec import get_view

    spec = get_view("stocks")
    table = "sling_stocks"
    cmd = [
        sling_binary(), "run", "--src-conn", "BENCH_SRC",
        "--src-stream", PEER_VIEW if "sqlite" in source else f"public.{PEER_VIEW}",
        "--tgt-conn", "BENCH_TGT", "--tgt-object", table if "sqlite" in target else f"public.{table}",
        "--mode", mode,
    ]  # fmt: skip
    if mode == "incremental":
        cmd += ["--primary-key", ",".join(spec.key), "--update-key", "source_updated_at"]
    env = {
        **os.environ,
        "BENCH_SRC": _plain_url(source),
        "BENCH_TGT": _plain_url(target),
        "SLING_THREADS": "1",
        "DISABLE_TELEMETRY": "true",
        "SLING_HOME_DIR": str(Path(os.environ.get("BENCH_WORKDIR", "/tmp")) / "sling"),
    }
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"sling failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    CHILD_EXTRA_RSS.append(_children_rss_mb())
    import re

    m = re.findall(r"inserted ([\d,]+) rows", proc.stdout + proc.stderr)
    return seconds, int(m[-1].replace(",", "")) if m else -1


def child_dlt(source: str, target: str, disposition: str) -> tuple[float, int]:
    import os

    import dlt
    from dlt.sources.sql_database import sql_table
    from sqlalchemy.engine import make_url

    from cfi_pipelines.views.spec import get_view

    spec = get_view("stocks")
    workdir = Path(os.environ.get("BENCH_WORKDIR", "/tmp"))
    u = make_url(source)
    src_url = (
        f"sqlite:///{u.database}"
        if u.get_backend_name() == "sqlite"
        else u.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    )
    t = make_url(target)
    if t.get_backend_name() == "sqlite":
        destination = dlt.destinations.sqlalchemy(credentials=f"sqlite:///{t.database}")
    else:
        destination = dlt.destinations.postgres(credentials=_plain_url(target))
    resource = sql_table(credentials=src_url, table=PEER_VIEW, backend="pyarrow", chunk_size=50_000)
    if disposition == "merge":
        resource.apply_hints(
            primary_key=list(spec.key), incremental=dlt.sources.incremental("source_updated_at")
        )
    pipeline = dlt.pipeline(
        pipeline_name=f"bench_{disposition}_{t.get_backend_name()}",
        pipelines_dir=str(workdir / "dlt"),
        destination=destination,
        dataset_name="dlt_bench",
    )
    started = time.perf_counter()
    info = pipeline.run(resource, write_disposition=disposition, table_name=f"dlt_{disposition}")
    seconds = time.perf_counter() - started
    info.raise_on_failed_jobs()
    rows = pipeline.last_trace.last_normalize_info.row_counts.get(f"dlt_{disposition}", 0)
    return seconds, rows


def child_pandas(source: str, target: str) -> tuple[float, int]:
    import pandas as pd

    from cfi_pipelines.db import create_engine

    src, tgt = create_engine(source), create_engine(target)
    sql = stocks_sql(src.dialect)
    started = time.perf_counter()
    df = pd.read_sql(sql, src)
    df.to_sql("bench_pandas", tgt, if_exists="replace", index=False)
    return time.perf_counter() - started, len(df)


def _bare_table_ddl(dialect, name: str) -> str:
    import sqlalchemy as sa
    from sqlalchemy.schema import CreateTable

    from cfi_pipelines.views.spec import get_view

    cols = get_view("stocks").table.columns
    table = sa.Table(name, sa.MetaData(), *(sa.Column(c.name, c.type) for c in cols))
    return str(CreateTable(table).compile(dialect=dialect))


def index_ddl() -> list[str]:
    """The stocks view's indexes, on the bare table ``bench_native``."""
    from cfi_pipelines.views.spec import get_view

    spec = get_view("stocks")
    out = [f"CREATE UNIQUE INDEX bench_key ON bench_native ({', '.join(spec.key)})"]
    for i, cols in enumerate(spec.indexes):
        out.append(f"CREATE INDEX bench_ix{i} ON bench_native ({', '.join(cols)})")
    return out


def child_native(source: str, target: str, indexed: bool = False) -> tuple[float, int]:
    from sqlalchemy.engine import make_url

    from cfi_pipelines.db import create_engine

    dialect = create_engine(target).dialect
    sql = stocks_sql(dialect)
    ddl = _bare_table_ddl(dialect, "bench_native")
    if dialect.name == "sqlite":
        import sqlite3

        conn = sqlite3.connect(make_url(target).database, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("DROP TABLE IF EXISTS bench_native")
        conn.execute(ddl)
        started = time.perf_counter()
        # Unqualified names resolve to the attached source: the scratch DB has no such tables.
        conn.execute("ATTACH DATABASE ? AS cfi_src", (make_url(source).database,))
        conn.execute("BEGIN")
        rows = conn.execute(f"INSERT INTO bench_native {sql}").rowcount
        conn.execute("COMMIT")
        for ddl in index_ddl() if indexed else []:
            conn.execute(ddl)
        seconds = time.perf_counter() - started
        conn.close()
        return seconds, rows

    import psycopg

    def connect(url: str) -> psycopg.Connection:
        u = make_url(url)
        return psycopg.connect(
            host=u.host, port=u.port, user=u.username, password=u.password, dbname=u.database
        )

    with connect(source) as sconn, connect(target) as tconn:
        tconn.execute("DROP TABLE IF EXISTS bench_native")
        tconn.execute(ddl)
        tconn.commit()
        started = time.perf_counter()
        with (
            sconn.cursor() as scur,
            tconn.cursor() as tcur,
            scur.copy(f"COPY ({sql}) TO STDOUT") as out,
            tcur.copy("COPY bench_native FROM STDIN") as into,
        ):
            for block in out:
                into.write(block)
        tconn.commit()
        for ddl in index_ddl() if indexed else []:
            tconn.execute(ddl)
        tconn.commit()
        seconds = time.perf_counter() - started
        rows = tconn.execute("SELECT count(*) FROM bench_native").fetchone()[0]
    return seconds, rows


CHILDREN = {
    "baseline": child_baseline,
    "ours-full": lambda s, t: child_ours(s, t, "full"),
    "ours-full-reader": child_ours_reader,
    "sling-full": lambda s, t: child_sling(s, t, "full-refresh"),
    "sling-incremental": lambda s, t: child_sling(s, t, "incremental"),
    "dlt-replace": lambda s, t: child_dlt(s, t, "replace"),
    "dlt-merge": lambda s, t: child_dlt(s, t, "merge"),
    "ours-incremental": lambda s, t: child_ours(s, t, "incremental"),
    "ours-apply": lambda s, t: child_ours(s, t, "auto", expect="apply"),
    "pandas": child_pandas,
    "native": child_native,
    "native-indexed": lambda s, t: child_native(s, t, indexed=True),
}


SERVER_PIDS: list[int] = []
"""The benchmark's PostgreSQL postmasters (source, common), whose CPU (and their
children's) is measured."""


def _server_cpu_s() -> float:
    """CPU seconds of the PostgreSQL server so far: the postmaster, the backends it has
    reaped (cutime/cstime) and the ones alive (Linux /proc). 0 without a server."""
    if not SERVER_PIDS:
        return 0.0
    return sum(_postmaster_cpu_s(pid) for pid in SERVER_PIDS)


def _postmaster_cpu_s(server_pid: int) -> float:
    tick = os.sysconf("SC_CLK_TCK")

    def fields(pid: str) -> list[str] | None:
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        return text[text.rindex(")") + 2 :].split()  # after "pid (comm) "

    root = fields(str(server_pid)) or []
    total = sum(int(x) for x in root[11:15]) if root else 0  # utime stime cutime cstime
    for pid in filter(str.isdigit, os.listdir("/proc")):
        f = fields(pid)
        if f and f[1] == str(server_pid):  # ppid
            total += sum(int(x) for x in f[11:15])
    return total / tick


def run_child(name: str, source: str, target: str) -> dict:
    """Run measurement ``name`` in a fresh interpreter; its {seconds, rows, rss_mb, steps,
    cpu_s}. ``cpu_s``: CPU seconds of the child (and what it ran, e.g. sling) plus the
    PostgreSQL server's over the whole child, start-up included: on a shared machine
    it moves far less than the wall-clock time."""
    import resource

    server0 = _server_cpu_s()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(
        [sys.executable, __file__, "--child", name, "--source", source, "--target", target],
        capture_output=True,
        text=True,
    )
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"measurement {name} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    client = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    out["cpu_s"] = client + _server_cpu_s() - server0
    return out


# --------------------------------------------------------------------------- setup


@dataclass
class Databases:
    source: str
    common: str  # where our refresh writes
    scratch: str  # where (a) and (b) write
    reset_common: Callable[[], None]  # empties the common DB
    peer_target: Callable[[str], str]  # where a peer (sling, dlt) writes
    exact: bool = False  # the source has a change log (PostgreSQL logical decoding)


SEED_PATH = "sql"  # --seed: sql (seed_source_fast, stocks tables only) or python (seed_source)


DBA_LOGICAL_SQL = Path(__file__).resolve().parents[1] / "deploy/sql/postgresql_logical_decoding.sql"
SOURCE_SETTINGS = ("wal_level=logical", "max_replication_slots=8", "synchronous_commit=on")
"""The PostgreSQL source's server: logical decoding on (what CFI's DBA enables)."""


def _seed(url: str, scale: int, *, dba_sql: Path | None = None) -> dict[str, int]:
    from cfi_pipelines.db import create_engine
    from cfi_pipelines.devtools.seed import seed_source, seed_source_fast

    engine = create_engine(url)
    seed = seed_source_fast if SEED_PATH == "sql" else seed_source
    counts = seed(engine, scale=scale)
    with engine.begin() as conn:  # what the peers read: the stocks query as a SQL view
        conn.exec_driver_sql(f"CREATE VIEW {PEER_VIEW} AS {stocks_sql(engine.dialect)}")
    if dba_sql is not None:  # publication, REPLICA IDENTITY FULL, the reading role
        with engine.connect() as conn:
            raw = conn.connection.driver_connection
            raw.execute(dba_sql.read_text())
            raw.commit()
    engine.dispose()
    return counts


def sqlite_databases(workdir: Path, scale: int) -> Databases:
    source = workdir / f"source-{scale}-{SEED_PATH}.db"
    marker = source.with_suffix(".seeded")
    if not marker.exists():  # reused across runs when --workdir is given
        source.unlink(missing_ok=True)
        _seed(f"sqlite:///{source}", scale)
        marker.touch()
    common, scratch = workdir / "common.db", workdir / "scratch.db"

    def reset() -> None:
        for p in workdir.glob("common.db*"):
            p.unlink()

    for p in workdir.glob("scratch*.db*"):
        p.unlink()
    return Databases(
        f"sqlite:///{source}",
        f"sqlite:///{common}",
        f"sqlite:///{scratch}",
        reset,
        lambda peer: f"sqlite:///{workdir / f'scratch-{peer}.db'}",
    )


def postgres_databases(stack: ExitStack, scale: int) -> Databases:
    import psycopg

    from cfi_pipelines.devtools.postgres import PASSWORD, SUPERUSER, TempPostgres

    # CFI's source on its own server with logical decoding (the apply's slot then decodes
    # the source's WAL only, as in production); the common DB, scratch and peers on another
    source_pg = stack.enter_context(TempPostgres(settings=SOURCE_SETTINGS))
    pg = stack.enter_context(TempPostgres())
    for server in (source_pg, pg):
        SERVER_PIDS.append(int((server.root / "data" / "postmaster.pid").read_text().split()[0]))
    source, scratch = source_pg.create_database("cfi_source"), pg.create_database("cfi_scratch")
    _seed(source, scale, dba_sql=DBA_LOGICAL_SQL)

    def reset() -> None:
        with psycopg.connect(
            host="127.0.0.1", port=pg.port, user=SUPERUSER, password=PASSWORD,
            dbname="postgres", autocommit=True,
        ) as conn:  # fmt: skip
            conn.execute('DROP DATABASE IF EXISTS "cfi_common"')
            conn.execute('CREATE DATABASE "cfi_common"')

    peers = {p: pg.create_database(f"cfi_{p}") for p in ("sling", "dlt")}
    return Databases(source, pg.url("cfi_common"), scratch, reset, peers.__getitem__, exact=True)


def change_stock_rows(source: str) -> int:
    """Touch 1 % of the stock rows (quantity and updated_at), as a busy day would."""
    from cfi_pipelines.clock import utcnow
    from cfi_pipelines.db import create_engine
    from cfi_pipelines.model import cfi_source as src

    sl = src.stock_levels
    engine = create_engine(source)
    with engine.begin() as conn:
        changed = conn.execute(
            sl.update()
            .where(sl.c.id % CHANGED_SHARE == 0)
            .values(quantity=sl.c.quantity + 1, updated_at=utcnow())
        ).rowcount
    engine.dispose()
    return changed


# --------------------------------------------------------------------------- report


def _median(values: list[float]) -> float:
    import statistics

    return statistics.median(values)


PEERS = ("pandas", "sling", "dlt")


def measure(
    backend: str, dbs: Databases, repeat: int, peers: tuple[str, ...] = PEERS
) -> dict[str, dict]:
    """Every measurement; the key ones ``repeat`` times (their median is reported)."""
    out: dict[str, dict] = {}

    def run(label: str, child: str, target: str, times: int = 1) -> None:
        runs = [run_child(child, dbs.source, target) for _ in range(times)]
        r = dict(runs[-1])
        r["seconds"] = _median([x["seconds"] for x in runs])
        r["cpu_s"] = _median([x["cpu_s"] for x in runs])
        r["rss_mb"] = max(x["rss_mb"] for x in runs)
        r["all"] = [round(x["seconds"], 3) for x in runs]
        if runs[-1].get("steps"):  # median per step
            r["steps"] = {
                k: [_median([x["steps"].get(k, [0, 0])[0] for x in runs]), v[1]]
                for k, v in runs[-1]["steps"].items()
            }
        out[label] = r
        rate = r["rows"] / r["seconds"] if r["seconds"] else 0
        spread = f"  runs {r['all']}" if times > 1 else ""
        print(
            f"  {label:<24} {r['seconds']:8.2f} s {rate:>12,.0f} rows/s "
            f"{r['rss_mb']:7.1f} MB  cpu {r['cpu_s']:6.2f} s  ({r['rows']:,} rows){spread}",
            flush=True,
        )

    have_sling = "sling" in peers and sling_binary() is not None
    have_dlt = "dlt" in peers and dlt_available()
    if "sling" in peers and not have_sling:
        print("  (sling skipped: pip install sling sling-linux-amd64)")
    if "dlt" in peers and not have_dlt:
        print("  (dlt skipped: pip install 'dlt[sql_database,postgres]')")
    run("baseline interpreter", "baseline", dbs.common)
    dbs.reset_common()
    run("ours full, empty", "ours-full", dbs.common)
    run("ours full, populated", "ours-full", dbs.common, repeat)
    run("ours full + reader", "ours-full-reader", dbs.common)
    run("(b) native copy", "native", dbs.scratch, repeat)
    run("(b) + view's indexes", "native-indexed", dbs.scratch, repeat)
    if "pandas" in peers:
        run("(a) pandas", "pandas", dbs.scratch)
    if have_sling:
        # once: the peers are many times slower than the noise
        run("sling full-refresh", "sling-full", dbs.peer_target("sling"))
    if have_dlt:
        run("dlt replace", "dlt-replace", dbs.peer_target("dlt"))
        run("dlt merge, initial", "dlt-merge", dbs.peer_target("dlt"))
    incr: dict[str, list[dict]] = {}
    for i in range(repeat):
        changed = change_stock_rows(dbs.source)
        print(f"  ({changed:,} stock rows changed, round {i + 1}/{repeat})", flush=True)
        for label, child, target in (
            ("ours incremental 1 %", "ours-incremental", dbs.common),
            # the exact path on the same change (the slot's position: the last refresh)
            *([("ours apply 1 %", "ours-apply", dbs.common)] if dbs.exact else []),
            # the peers once (round 1): minutes each, many times the noise
            *([("sling incremental 1 %", "sling-incremental", dbs.peer_target("sling"))] if have_sling and i == 0 else []),
            *([("dlt merge 1 %", "dlt-merge", dbs.peer_target("dlt"))] if have_dlt and i == 0 else []),
        ):  # fmt: skip
            incr.setdefault(label, []).append(run_child(child, dbs.source, target))
    for label, runs in incr.items():
        r = dict(runs[-1])
        r["seconds"] = _median([x["seconds"] for x in runs])
        r["cpu_s"] = _median([x["cpu_s"] for x in runs])
        r["rss_mb"] = max(x["rss_mb"] for x in runs)
        r["all"] = [round(x["seconds"], 3) for x in runs]
        if runs[-1].get("steps"):
            r["steps"] = {
                k: [_median([x["steps"].get(k, [0, 0])[0] for x in runs]), v[1]]
                for k, v in runs[-1]["steps"].items()
            }
        out[label] = r
        print(
            f"  {label:<24} {r['seconds']:8.2f} s {r['rss_mb']:7.1f} MB "
            f"({r['rows']:,} rows)  runs {r['all']}",
            flush=True,
        )
    for label in ("ours full, populated", "ours incremental 1 %", "ours apply 1 %"):
        if label not in out:
            continue
        steps = out[label].get("steps") or {}
        print(f"  steps of {label} (median s, calls):")
        for k, (sec, calls) in sorted(steps.items(), key=lambda kv: -kv[1][0]):
            print(f"    {k:<18} {sec:8.3f} s  x{calls}")
    return out


def ratios(r: dict[str, dict]) -> dict[str, float | None]:
    full = r["ours full, populated"]["seconds"]
    incr = r["ours incremental 1 %"]["seconds"]
    ours_rss = max(r[k]["rss_mb"] for k in r if k.startswith("ours"))

    def best(*labels: str) -> float | None:
        times = [r[label]["seconds"] for label in labels if label in r]
        return min(times) if times else None

    peer_full = best("sling full-refresh", "dlt replace")
    peer_incr = best("sling incremental 1 %", "dlt merge 1 %")
    sling_incr = best("sling incremental 1 %")
    apply = best("ours apply 1 %")
    return {
        "ours/((b)+idx)": full / r["(b) + view's indexes"]["seconds"],
        "ours/(b)": full / r["(b) native copy"]["seconds"],
        "ours empty/(b)": r["ours full, empty"]["seconds"] / r["(b) native copy"]["seconds"],
        "(a)/ours": r["(a) pandas"]["seconds"] / full if "(a) pandas" in r else None,
        "incr/full": incr / full,
        "apply/full": apply / full if apply else None,
        "best peer/ours full": peer_full / full if peer_full else None,
        "best peer/ours incr": peer_incr / incr if peer_incr else None,
        "sling incr/ours incr": sling_incr / incr if sling_incr else None,
        "sling incr/ours apply": sling_incr / apply if sling_incr and apply else None,
        "rss_mb": ours_rss,
        **(
            {
                "cpu: ours/((b)+idx)": r["ours full, populated"]["cpu_s"]
                / r["(b) + view's indexes"]["cpu_s"],
                "cpu: sling/ours full": r["sling full-refresh"]["cpu_s"]
                / r["ours full, populated"]["cpu_s"],
            }
            if "sling full-refresh" in r and r["(b) + view's indexes"]["cpu_s"] > 0
            else {}
        ),
    }


def print_table(results: dict[str, dict[str, dict]]) -> None:
    backends = list(results)
    labels = list(dict.fromkeys(label for b in backends for label in results[b]))
    head = f"{'measurement':<24}" + "".join(
        f" | {b + ' s':>10} {'rows/s':>11} {'RSS MB':>7}" for b in backends
    )
    print("\n" + head + "\n" + "-" * len(head))
    for label in labels:
        cells = ""
        for b in backends:
            m = results[b].get(label)
            if m is None:
                cells += f" | {'-':>10} {'-':>11} {'-':>7}"
                continue
            rate = f"{m['rows'] / m['seconds']:,.0f}" if m["seconds"] and m["rows"] > 0 else "-"
            cells += f" | {m['seconds']:10.2f} {rate:>11} {m['rss_mb']:7.1f}"
        print(f"{label:<24}{cells}")
    print("\n" + f"{'ratio (target)':<30}" + "".join(f" | {b:>24}" for b in backends))
    computed = {b: ratios(results[b]) for b in backends}
    for name, (fmt, target, ok) in {
        "ours/((b)+idx)": ("{:.2f}x", "≤ 1.1", lambda v: v <= TARGETS["ours/((b)+idx)"]),
        "ours/(b)": ("{:.2f}x", "info", None),
        "ours empty/(b)": ("{:.2f}x", "info", None),
        "(a)/ours": ("{:.1f}x", "≥ 5", lambda v: v >= TARGETS["(a)/ours"]),
        "incr/full": ("{:.3f}", "≤ 0.10", lambda v: v <= TARGETS["incr/full"]),
        "apply/full": ("{:.3f}", "≤ 0.10", lambda v: v <= TARGETS["incr/full"]),
        "best peer/ours full": ("{:.1f}x", "≥ 2", lambda v: v >= TARGETS["peer/ours"]),
        "best peer/ours incr": ("{:.1f}x", "≥ 2", lambda v: v >= TARGETS["peer/ours"]),
        "sling incr/ours incr": ("{:.1f}x", "≥ 2", lambda v: v >= TARGETS["peer/ours"]),
        "sling incr/ours apply": ("{:.1f}x", "≥ 2", lambda v: v >= TARGETS["peer/ours"]),
        "rss_mb": ("{:.0f} MB", "< 150 MB", lambda v: v < TARGETS["rss_mb"]),
        "cpu: ours/((b)+idx)": ("{:.2f}x", "info", None),
        "cpu: sling/ours full": ("{:.1f}x", "info", None),
    }.items():
        label = f"{name} ({target})"
        cells = ""
        for b in backends:
            v = computed[b].get(name)
            if v is None:
                cells += f" | {'n/a':>24}"
                continue
            verdict = "" if ok is None else (" ok" if ok(v) else " MISS")
            cells += f" | {fmt.format(v) + verdict:>24}"
        print(f"{label:<30}{cells}")
    print(
        "(ours = full refresh into the populated common DB; times of repeated runs are medians;"
        " RSS = peak of our refreshes, of sling's process for sling; the machine is shared:"
        " timings are noisy)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="stock rows (approx.)")
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--workdir", type=Path, help="keep SQLite files here (reuses the seed)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of the key measurements")
    parser.add_argument(
        "--seed",
        choices=("sql", "python"),
        default="sql",
        help="sql: seed_source_fast (stocks tables, in the database); python: seed_source",
    )
    parser.add_argument("--no-peers", action="store_true", help="skip pandas, sling and dlt")
    parser.add_argument(
        "--peers",
        default=",".join(PEERS),
        help=f"comma-separated peers to run (default {','.join(PEERS)})",
    )
    parser.add_argument("--child", choices=CHILDREN, help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        seconds, rows = CHILDREN[args.child](args.source, args.target)
        rss = max([peak_rss_mb(), *CHILD_EXTRA_RSS])
        print(json.dumps({"seconds": seconds, "rows": rows, "rss_mb": rss, "steps": STEPS}))
        return 0

    global SEED_PATH
    SEED_PATH = args.seed
    scale = max(1, round(args.rows / STOCK_ROWS_PER_SCALE))
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    results: dict[str, dict[str, dict]] = {}
    with ExitStack() as stack:
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cfi-bench-"))
        workdir.mkdir(parents=True, exist_ok=True)
        os.environ["BENCH_WORKDIR"] = str(workdir)  # sling's and dlt's state
        if not args.workdir:
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        for peer_state in ("dlt", "sling"):  # a reused workdir: start the peers afresh
            shutil.rmtree(workdir / peer_state, ignore_errors=True)
        for backend in backends:
            print(
                f"{backend}: seeding scale {scale} (~{scale * STOCK_ROWS_PER_SCALE:,} stock rows)"
            )
            started = time.perf_counter()
            if backend == "sqlite":
                dbs = sqlite_databases(workdir, scale)
            else:
                dbs = postgres_databases(stack, scale)
            print(f"  seeded in {time.perf_counter() - started:.0f} s", flush=True)
            peers = () if args.no_peers else tuple(p for p in args.peers.split(",") if p)
            results[backend] = measure(backend, dbs, args.repeat, peers)
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
