"""Change capture at CFI's volumes: what an idle tick costs, and what applying changes costs.

    python benchmarks/capture.py --rows 1000000 [--rows 10000000] [--gates 30]
        [--idle-seconds 60] [--mixed-minutes 0] [--skip-sqlite]

Per ``--rows`` (stock rows; ``seed_source_fast`` fills the stocks tables, 1 scale =
10,000 rows), on one PostgreSQL 15 started here with ``wal_level=logical`` and
autovacuum off (so that ``pg_stat_database.tup_returned`` counts only our reads), and on
SQLite:

- **idle gate**: the median time of one gate query on an idle source, for logical
  decoding (``pg_logical``), the counter gate (``pg_counters``), SQLite's
  ``data_version``, and, as the baseline, today's signature probe
  (``max(updated_at), count(*)`` of the 12 followed tables);
- **rows read per idle minute**: ``tup_returned`` of the source DB over
  ``--idle-seconds`` of gates at the sensor's pace (one per 10 s), scaled to a minute
  (the gate's engine is disposed before reading the counter, so its stats are flushed);
- **apply vs full**: 1 % of the stock rows updated (quantity only: ``updated_at``
  untouched), then ``refresh_view`` (auto: the apply path) against a full refresh of the
  same view, PostgreSQL → PostgreSQL and PostgreSQL → SQLite (the cache on SQLite; an
  SQLite *source* has no change log: its path is the incremental of benchmarks/refresh.py).

``--mixed-minutes N``: on the demo seed (every table), N minutes of mixed writes
(inserts, updates with and without ``updated_at``, deletes, children moving parent,
backdated writes, a product price change) applied every 10 s as the sensor would, then a
quiet source: each view must equal its defining query with no full refresh after the first.

Prints each figure against its target; exit 1 when one is missed.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sqlalchemy as sa  # noqa: E402

from cfi_pipelines.clock import utcnow  # noqa: E402
from cfi_pipelines.db import create_engine  # noqa: E402
from cfi_pipelines.devtools.postgres import TempPostgres  # noqa: E402
from cfi_pipelines.devtools.seed import seed_source, seed_source_fast  # noqa: E402
from cfi_pipelines.model import cfi_source as src  # noqa: E402
from cfi_pipelines.views.capture import choose_capture, forget_captures  # noqa: E402
from cfi_pipelines.views.capture.pg_counters import PgCounterCapture  # noqa: E402
from cfi_pipelines.views.capture.pg_logical import PgLogicalCapture  # noqa: E402
from cfi_pipelines.views.capture.timestamp import TimestampCapture  # noqa: E402
from cfi_pipelines.views.probe import source_tables  # noqa: E402
from cfi_pipelines.views.refresh import init_common, refresh_view  # noqa: E402
from cfi_pipelines.views.spec import VIEWS, get_view  # noqa: E402

ROWS_PER_SCALE = 10_000
TICK_S = 10.0
STATS_FLUSH_S = 11.0
"""A PostgreSQL 15 session publishes its statistics at most 10 s after it went idle."""
DBA_SQL = Path(__file__).resolve().parents[1] / "deploy/sql/postgresql_logical_decoding.sql"
TARGETS = {"gate_ms": 5.0, "rows_per_idle_min": 1_000, "apply/full": 0.10}
STOCKS = get_view("stocks")
misses: list[str] = []


def say(msg: str) -> None:
    print(msg, flush=True)


def check(name: str, value: float, target: float, *, fmt: str = "{:.3f}") -> None:
    ok = value <= target
    if not ok:
        misses.append(name)
    say(
        f"  {name:<44} {fmt.format(value):>12}  target ≤ {fmt.format(target)}  {'ok' if ok else 'MISSED'}"
    )


def dba_setup(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        raw = conn.connection.driver_connection
        raw.execute(DBA_SQL.read_text())
        raw.commit()


def tup_returned(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return conn.scalar(
            sa.text("SELECT tup_returned FROM pg_stat_database WHERE datname = current_database()")
        )


def median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def idle_reads_per_minute(make_capture, url: str, probe: sa.Engine, seconds: float) -> float:
    """tup_returned of the source while one gate runs per TICK_S for ``seconds``.

    The gate's connection is opened and used once first, and both sessions then wait
    out PostgreSQL's idle statistics flush (10 s): a new session's own catalog reads are
    not the idle cost. The gate's engine is disposed at the end (its session flushes)."""
    engine = create_engine(url)
    capture = make_capture(engine)
    position = capture.gate(None).position
    tup_returned(probe)
    time.sleep(STATS_FLUSH_S)
    before = tup_returned(probe)
    started, n = time.monotonic(), 0
    while True:
        position = capture.gate(position).position
        n += 1
        if time.monotonic() - started + TICK_S > seconds:
            break
        time.sleep(TICK_S)
    engine.dispose()  # the backend exits: its statistics are flushed
    time.sleep(1.0)
    reads = tup_returned(probe) - before
    return reads * 60.0 / max(seconds, TICK_S), n


def pg_round(pg: TempPostgres, rows: int, args) -> None:
    scale = max(1, rows // ROWS_PER_SCALE)
    n = f"{rows}"
    os.environ["CFI_CAPTURE_SLOT"] = f"bench_{n}"  # what refresh_view's capture_for reads
    forget_captures()
    s_url, c_url = pg.create_database(f"src{n}"), pg.create_database(f"common{n}")
    source, common = create_engine(s_url), create_engine(c_url)
    t = time.perf_counter()
    seed_source_fast(source, scale=scale, seed=1)
    dba_setup(source)
    with source.connect() as conn:
        got = conn.scalar(sa.select(sa.func.count()).select_from(src.stock_levels))
    say(f"\n== PostgreSQL, {got:,} stock rows (seeded in {time.perf_counter() - t:.0f} s)")
    init_common(common)
    tables = source_tables()
    logical = PgLogicalCapture(source, tables, slot=f"bench_{n}")
    logical.ensure()

    t = time.perf_counter()
    full = refresh_view(STOCKS, source, common, mode="full")
    full_s = time.perf_counter() - t
    for spec in VIEWS[1:]:  # every view has a position: the slot can be released
        refresh_view(spec, source, common, mode="full")
    logical.release([logical.gate("0/0").position])
    say(f"  full refresh of stocks (PG -> PG): {full_s:.2f} s, {full.rows:,} rows")

    pos = logical.gate(None).position
    counters = PgCounterCapture(source, tables)
    cpos = counters.gate(None).position
    stamp = TimestampCapture(source, tables)
    spos = stamp.gate(None).position

    def select_one() -> None:
        with source.connect() as conn:
            conn.execute(sa.text("SELECT 1")).all()

    floor = median_ms(select_one, args.gates)
    say(f"  floor: SELECT 1 through the same pool (ms)       {floor:>12.3f}  (machine load)")
    gate_logical = median_ms(lambda: logical.gate(pos), args.gates)
    gate_counters = median_ms(lambda: counters.gate(cpos), args.gates)
    gate_stamp = median_ms(lambda: stamp.gate(spos), max(3, args.gates // 5))
    check(f"idle gate pg_logical (ms) @ {got:,}", gate_logical, TARGETS["gate_ms"])
    check(f"idle gate pg_counters (ms) @ {got:,}", gate_counters, TARGETS["gate_ms"])
    say(
        f"  baseline: signature probe (ms) @ {got:,}       {gate_stamp:>12.1f}  "
        f"(logical is {gate_stamp / gate_logical:.0f}x cheaper)"
    )

    slot = logical.slot
    per_min, ticks = idle_reads_per_minute(
        lambda e: PgLogicalCapture(e, tables, slot=slot), s_url, source, args.idle_seconds
    )
    check(
        f"rows read/idle min pg_logical ({ticks} gates)",
        per_min,
        TARGETS["rows_per_idle_min"],
        fmt="{:,.0f}",
    )
    per_min, ticks = idle_reads_per_minute(
        lambda e: PgCounterCapture(e, tables), s_url, source, args.idle_seconds
    )
    say(
        f"  rows read/idle min pg_counters ({ticks} gates)  {per_min:>12,.0f}  (catalog rows of pg_stat_user_tables)"
    )
    per_min, ticks = idle_reads_per_minute(
        lambda e: TimestampCapture(e, tables), s_url, source, min(args.idle_seconds, 20)
    )
    say(f"  baseline: signature probe rows/idle min          {per_min:>12,.0f}")

    if args.only_gates:
        with source.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("SELECT pg_drop_replication_slot(:s)"), {"s": slot})
        source.dispose()
        common.dispose()
        return
    # apply 1 % vs full, PG -> PG and PG -> SQLite
    lite_dir = Path(tempfile.mkdtemp(prefix="cfi-capture-bench-"))
    lite = create_engine(f"sqlite:///{lite_dir}/common.db")
    init_common(lite)
    t = time.perf_counter()
    refresh_view(STOCKS, source, lite, mode="full")
    full_lite_s = time.perf_counter() - t
    say(f"  full refresh of stocks (PG -> SQLite): {full_lite_s:.2f} s")
    sl = src.stock_levels
    with source.begin() as conn:
        changed = conn.execute(
            sl.update().where(sl.c.id % 100 == 7).values(quantity=sl.c.quantity + 1)
        ).rowcount
    for name, target, full_time in (
        ("PG -> PG", common, full_s),
        ("PG -> SQLite", lite, full_lite_s),
    ):
        t = time.perf_counter()
        r = refresh_view(STOCKS, source, target)
        took = time.perf_counter() - t
        assert r.mode == "apply", r
        say(f"  apply of {changed:,} changed rows ({name}): {took:.2f} s, {r.keys:,} keys")
        check(f"apply/full ({name}) @ {got:,}", took / full_time, TARGETS["apply/full"])
    for spec in VIEWS[1:]:
        refresh_view(spec, source, common)
    with source.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("SELECT pg_drop_replication_slot(:s)"), {"s": slot})
    source.dispose()
    common.dispose()
    lite.dispose()


def sqlite_round(rows: int, args, workdir: Path) -> None:
    scale = max(1, rows // ROWS_PER_SCALE)
    source = create_engine(f"sqlite:///{workdir}/source_{rows}.db")
    seed_source_fast(source, scale=scale, seed=1)
    capture = choose_capture(source)
    pos = capture.gate(None).position
    gate = median_ms(lambda: capture.gate(pos), args.gates)
    say(f"\n== SQLite, {rows:,} stock rows")
    check(f"idle gate sqlite data_version (ms) @ {rows:,}", gate, TARGETS["gate_ms"])
    stamp = TimestampCapture(source, source_tables())
    spos = stamp.gate(None).position
    say(
        f"  baseline: signature probe (ms)                   {median_ms(lambda: stamp.gate(spos), 3):>12.1f}"
    )
    capture.close()
    source.dispose()


def _norm(row: tuple) -> tuple:
    """A row as the view means it: numbers to the cent (0 and 0.00 are the same money)."""
    return tuple(
        f"{float(v):.2f}"
        if isinstance(v, int | float | Decimal) and not isinstance(v, bool)
        else str(v)
        for v in row
    )


def mixed(pg: TempPostgres, minutes: float) -> None:
    """Mixed writes for ``minutes``, applied every TICK_S; then the views must be exact."""
    say(f"\n== {minutes:g} min of mixed writes on the demo seed (PostgreSQL, logical decoding)")
    s_url, c_url = pg.create_database("mixed_src"), pg.create_database("mixed_common")
    source, common = create_engine(s_url), create_engine(c_url)
    seed_source(source, scale=1, seed=3)
    dba_setup(source)
    init_common(common)
    os.environ["CFI_CAPTURE_SLOT"] = "bench_mixed"  # read by settings (capture_for)
    forget_captures()
    for spec in VIEWS:
        refresh_view(spec, source, common)
    rng = random.Random(5)
    sl, li, cr, p, sm, pay = (
        src.stock_levels,
        src.invoice_lines,
        src.campaign_results,
        src.products,
        src.stock_movements,
        src.payments,
    )
    with source.connect() as conn:
        invoice_ids = list(conn.scalars(sa.select(src.invoices.c.id)))
        campaign_ids = list(conn.scalars(sa.select(src.campaigns.c.id)))
    next_id = 50_000_000
    modes: dict[str, int] = {}
    end = time.monotonic() + minutes * 60
    while time.monotonic() < end:
        with source.begin() as conn:
            for _ in range(5):
                op = rng.randrange(8)
                now = utcnow()
                if op == 0:  # silent update
                    conn.execute(
                        sl.update()
                        .where(sl.c.id == rng.randrange(1, 10_000))
                        .values(quantity=rng.randrange(999))
                    )
                elif op == 1:  # backdated write
                    conn.execute(
                        sl.update()
                        .where(sl.c.id == rng.randrange(1, 10_000))
                        .values(reserved=0, updated_at=now - timedelta(seconds=30))
                    )
                elif op == 2:  # a line moves to another invoice
                    conn.execute(
                        li.update()
                        .where(li.c.id == rng.randrange(1, 5_000))
                        .values(invoice_id=rng.choice(invoice_ids), updated_at=now)
                    )
                elif op == 3:  # a line deleted
                    conn.execute(li.delete().where(li.c.id == rng.randrange(1, 5_000)))
                elif op == 4:  # a result inserted with an old stamp
                    next_id += 1
                    conn.execute(
                        cr.insert().values(
                            id=next_id,
                            campaign_id=rng.choice(campaign_ids),
                            measured_on=now.date(),
                            sent=10,
                            opened=5,
                            clicked=2,
                            converted=1,
                            revenue=12.5,
                            updated_at=now - timedelta(days=3),
                        )
                    )
                elif op == 5:  # a price change fans out
                    conn.execute(
                        p.update()
                        .where(p.c.id == rng.randrange(1, 500))
                        .values(unit_price=p.c.unit_price + 1)
                    )
                elif op == 6:  # a stock row deleted
                    victim = rng.randrange(1, 10_000)
                    conn.execute(sm.delete().where(sm.c.stock_level_id == victim))
                    conn.execute(sl.delete().where(sl.c.id == victim))
                else:  # a payment moves invoice
                    conn.execute(
                        pay.update()
                        .where(pay.c.id == rng.randrange(1, 2_000))
                        .values(invoice_id=rng.choice(invoice_ids))
                    )
        time.sleep(TICK_S / 5)
        if int(time.monotonic()) % int(TICK_S) < TICK_S / 5:
            for spec in VIEWS:
                r = refresh_view(spec, source, common)
                modes[r.mode] = modes.get(r.mode, 0) + 1
    for spec in VIEWS:  # the quiet source: the last tick
        r = refresh_view(spec, source, common)
        modes[r.mode] = modes.get(r.mode, 0) + 1
    exact = True
    for spec in VIEWS:
        q = spec.query().subquery()
        with source.connect() as conn:
            want = sorted(tuple(r) for r in conn.execute(sa.select(q), spec.params()))
        with common.connect() as conn:
            have = sorted(tuple(r) for r in conn.execute(sa.select(spec.table)))
        same = [_norm(r) for r in want] == [_norm(r) for r in have]
        exact &= same
        say(
            f"  {spec.name:<11} {'equals its defining query' if same else 'DIFFERS from its defining query'} ({len(have):,} rows)"
        )
    say(f"  refreshes by mode: {modes}")
    if not exact or modes.get("full", 0):
        misses.append("mixed writes")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, action="append", help="stock rows (repeatable)")
    ap.add_argument("--gates", type=int, default=30, help="gate calls per median")
    ap.add_argument("--idle-seconds", type=float, default=60.0)
    ap.add_argument("--mixed-minutes", type=float, default=0.0)
    ap.add_argument("--skip-sqlite", action="store_true")
    ap.add_argument("--only-gates", action="store_true", help="skip the apply measurements")
    ap.add_argument("--only-mixed", action="store_true", help="only the --mixed-minutes check")
    args = ap.parse_args()
    rows = args.rows or [1_000_000]
    settings = (
        "wal_level=logical",
        "max_replication_slots=8",
        "synchronous_commit=on",
        "autovacuum=off",
    )
    with TempPostgres(settings=settings) as pg, tempfile.TemporaryDirectory() as tmp:
        for n in [] if args.only_mixed else rows:
            pg_round(pg, n, args)
            if not args.skip_sqlite:
                sqlite_round(n, args, Path(tmp))
        if args.mixed_minutes:
            mixed(pg, args.mixed_minutes)
    say("\nall targets met" if not misses else f"\nMISSED: {', '.join(misses)}")
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
