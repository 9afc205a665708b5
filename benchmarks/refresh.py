"""Full and incremental refresh of the stocks view against the naive and the native paths.

    python benchmarks/refresh.py --rows 1000000 [--backend sqlite|postgresql|both]

Seeds CFI's source DB once per backend (scale = rows / 10,000, one scale being
~10k stock rows), then times, each in its own child process so that its peak RSS
is its own:

- ours, empty:      ``refresh_view(mode="full")`` into an empty common DB
- ours, populated:  the same into the now populated common DB (the nightly case)
- (a) pandas:       ``pd.read_sql`` of the same query + ``DataFrame.to_sql``
- (b) native:       the database's own fastest copy of the same query into a bare
                    table (SQLite: ATTACH + INSERT…SELECT; PostgreSQL: COPY (query)
                    TO STDOUT piped into COPY FROM STDIN, psycopg 3)
- incremental:      ``refresh_view(mode="incremental")`` after 1 % of the stock
                    rows changed (quantity and updated_at)

plus, for information, (b) followed by the view's three indexes: the floor of any
refresh that must index what it loads.

and prints seconds, rows/s, peak RSS (VmHWM) and the ratios against the targets:
ours/(b) ≤ 1.5, (a)/ours ≥ 5, incremental/full ≤ 0.10, peak RSS < 150 MB.
"""

from __future__ import annotations

import argparse
import json
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
TARGETS = {"ours/(b)": 1.5, "(a)/ours": 5.0, "incr/full": 0.10, "rss_mb": 150.0}


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


def child_ours(source: str, target: str, mode: str) -> tuple[float, int]:
    from cfi_pipelines.db import create_engine
    from cfi_pipelines.views.refresh import refresh_view
    from cfi_pipelines.views.spec import get_view

    src, tgt = create_engine(source), create_engine(target)
    started = time.perf_counter()
    result = refresh_view(get_view("stocks"), src, tgt, mode=mode)
    seconds = time.perf_counter() - started
    if result.mode != mode:
        raise SystemExit(f"asked for a {mode} refresh, got {result.mode}")
    return seconds, result.loaded


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
    "ours-incremental": lambda s, t: child_ours(s, t, "incremental"),
    "pandas": child_pandas,
    "native": child_native,
    "native-indexed": lambda s, t: child_native(s, t, indexed=True),
}


def run_child(name: str, source: str, target: str) -> dict:
    """Run measurement ``name`` in a fresh interpreter; its {seconds, rows, rss_mb}."""
    proc = subprocess.run(
        [sys.executable, __file__, "--child", name, "--source", source, "--target", target],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"measurement {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- setup


@dataclass
class Databases:
    source: str
    common: str  # where our refresh writes
    scratch: str  # where (a) and (b) write
    reset_common: Callable[[], None]  # empties the common DB


def _seed(url: str, scale: int) -> dict[str, int]:
    from cfi_pipelines.db import create_engine
    from cfi_pipelines.devtools.seed import seed_source

    engine = create_engine(url)
    counts = seed_source(engine, scale=scale)
    engine.dispose()
    return counts


def sqlite_databases(workdir: Path, scale: int) -> Databases:
    source = workdir / f"source-{scale}.db"
    marker = source.with_suffix(".seeded")
    if not marker.exists():  # reused across runs when --workdir is given
        source.unlink(missing_ok=True)
        _seed(f"sqlite:///{source}", scale)
        marker.touch()
    common, scratch = workdir / "common.db", workdir / "scratch.db"

    def reset() -> None:
        for p in workdir.glob("common.db*"):
            p.unlink()

    for p in workdir.glob("scratch.db*"):
        p.unlink()
    return Databases(f"sqlite:///{source}", f"sqlite:///{common}", f"sqlite:///{scratch}", reset)


def postgres_databases(stack: ExitStack, scale: int) -> Databases:
    import psycopg

    from cfi_pipelines.devtools.postgres import PASSWORD, SUPERUSER, TempPostgres

    pg = stack.enter_context(TempPostgres())
    source, scratch = pg.create_database("cfi_source"), pg.create_database("cfi_scratch")
    _seed(source, scale)

    def reset() -> None:
        with psycopg.connect(
            host="127.0.0.1", port=pg.port, user=SUPERUSER, password=PASSWORD,
            dbname="postgres", autocommit=True,
        ) as conn:  # fmt: skip
            conn.execute('DROP DATABASE IF EXISTS "cfi_common"')
            conn.execute('CREATE DATABASE "cfi_common"')

    return Databases(source, pg.url("cfi_common"), scratch, reset)


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


def measure(backend: str, dbs: Databases) -> dict[str, dict]:
    out: dict[str, dict] = {}

    def run(label: str, child: str, target: str) -> None:
        out[label] = r = run_child(child, dbs.source, target)
        rate = r["rows"] / r["seconds"] if r["seconds"] else 0
        print(
            f"  {label:<22} {r['seconds']:8.2f} s {rate:>12,.0f} rows/s "
            f"{r['rss_mb']:7.1f} MB  ({r['rows']:,} rows)",
            flush=True,
        )

    run("baseline interpreter", "baseline", dbs.common)
    dbs.reset_common()
    run("ours full, empty", "ours-full", dbs.common)
    run("ours full, populated", "ours-full", dbs.common)
    run("(b) native copy", "native", dbs.scratch)
    run("(b) + view's indexes", "native-indexed", dbs.scratch)
    run("(a) pandas", "pandas", dbs.scratch)
    changed = change_stock_rows(dbs.source)
    print(f"  ({changed:,} stock rows changed)")
    run("ours incremental 1 %", "ours-incremental", dbs.common)
    return out


def ratios(r: dict[str, dict]) -> dict[str, float]:
    full = r["ours full, populated"]["seconds"]
    ours_rss = max(r[k]["rss_mb"] for k in r if k.startswith("ours"))
    return {
        "ours/(b)": full / r["(b) native copy"]["seconds"],
        "ours empty/(b)": r["ours full, empty"]["seconds"] / r["(b) native copy"]["seconds"],
        "ours/((b)+idx)": full / r["(b) + view's indexes"]["seconds"],
        "(a)/ours": r["(a) pandas"]["seconds"] / full,
        "incr/full": r["ours incremental 1 %"]["seconds"] / full,
        "rss_mb": ours_rss,
    }


def print_table(results: dict[str, dict[str, dict]]) -> None:
    backends = list(results)
    labels = list(next(iter(results.values())))
    head = f"{'measurement':<22}" + "".join(
        f" | {b + ' s':>10} {'rows/s':>11} {'RSS MB':>7}" for b in backends
    )
    print("\n" + head + "\n" + "-" * len(head))
    for label in labels:
        cells = ""
        for b in backends:
            m = results[b][label]
            rate = f"{m['rows'] / m['seconds']:,.0f}" if m["seconds"] else "-"
            cells += f" | {m['seconds']:10.2f} {rate:>11} {m['rss_mb']:7.1f}"
        print(f"{label:<22}{cells}")
    print("\n" + f"{'ratio (target)':<22}" + "".join(f" | {b:>31}" for b in backends))
    computed = {b: ratios(results[b]) for b in backends}
    for name, (fmt, target, ok) in {
        "ours/(b)": ("{:.2f}x", "≤ 1.5", lambda v: v <= TARGETS["ours/(b)"]),
        "ours empty/(b)": ("{:.2f}x", "info", None),
        "ours/((b)+idx)": ("{:.2f}x", "info", None),
        "(a)/ours": ("{:.1f}x", "≥ 5", lambda v: v >= TARGETS["(a)/ours"]),
        "incr/full": ("{:.3f}", "≤ 0.10", lambda v: v <= TARGETS["incr/full"]),
        "rss_mb": ("{:.0f} MB", "< 150 MB", lambda v: v < TARGETS["rss_mb"]),
    }.items():
        label = f"{name} ({target})"
        cells = ""
        for b in backends:
            v = computed[b][name]
            verdict = "" if ok is None else (" ok" if ok(v) else " MISS")
            cells += f" | {fmt.format(v) + verdict:>31}"
        print(f"{label:<22}{cells}")
    print("(ours = full refresh into the populated common DB; RSS = peak of our refreshes)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="stock rows (approx.)")
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--workdir", type=Path, help="keep SQLite files here (reuses the seed)")
    parser.add_argument("--child", choices=CHILDREN, help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        seconds, rows = CHILDREN[args.child](args.source, args.target)
        print(json.dumps({"seconds": seconds, "rows": rows, "rss_mb": peak_rss_mb()}))
        return 0

    scale = max(1, round(args.rows / STOCK_ROWS_PER_SCALE))
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    results: dict[str, dict[str, dict]] = {}
    with ExitStack() as stack:
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cfi-bench-"))
        workdir.mkdir(parents=True, exist_ok=True)
        if not args.workdir:
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
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
            results[backend] = measure(backend, dbs)
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
