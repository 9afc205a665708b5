"""Freshness of the read cache under the product's own automation (run on demand).

    python benchmarks/freshness.py [--active-minutes 10] [--idle-minutes 10]
                                   [--change-every 20] [--scale 1]

Starts ``cfi-pipelines dev`` (the embedded servers + ``dagster dev`` with its
schedules and sensors) in a fresh temporary CFI_HOME, waits for the UI and the
first refresh of the four views, then changes CFI's source DB every
``--change-every`` s for ``--active-minutes`` (each round: a few stock quantity
updates, one stock row inserted, one deleted, and every few rounds a product's
unit_price), then leaves the source idle for ``--idle-minutes``. Meanwhile it
polls the cache (``cfi_stocks``, ``cfi_view_status``) every 0.5 s and measures:

- the latency of each change, source commit -> first poll that shows it;
- the age of each view as readers see it (now - source_snapshot_at), active and idle;
- the runs launched (Dagster instance), start-up / active / idle, per job;
- CPU of the daemon + code server (and of the whole dev session) while idle.

Prints each figure against its target; exit 0 when every target is met, 1 otherwise.
The dev session (its whole process tree) is stopped at the end, always.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sqlalchemy as sa  # noqa: E402

from cfi_pipelines.clock import utcnow  # noqa: E402
from cfi_pipelines.db import create_engine  # noqa: E402
from cfi_pipelines.model import cfi_source as src  # noqa: E402

BIN = Path(sys.executable).parent
VIEWS = ("stocks", "operations", "invoices", "campaigns")
POLL_S = 0.5
UPDATES_PER_ROUND = 3
PRICE_EVERY_ROUNDS = 3
READY_TIMEOUT_S = 240.0  # the UI answers
FIRST_REFRESH_TIMEOUT_S = 420.0  # every view refreshed once, no run in flight
STOP_WAIT_S = 30.0
TICKS = os.sysconf("SC_CLK_TCK")

# targets
UPDATE_P95_S, UPDATE_MAX_S = 60.0, 120.0
DELETE_MAX_S = 15 * 60.0
VIEW_AGE_MAX_S = 5 * 60.0
IDLE_RUNS_MAX = 1
IDLE_CPU_MAX_PCT = 5.0


def say(msg: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- dev session


@dataclass
class DevSession:
    home: Path
    url: str
    proc: subprocess.Popen
    log: Path

    def tail(self, n: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-n:]
        return ""


def graphql_ready(url: str) -> bool:
    req = urllib.request.Request(
        f"{url}/graphql",
        data=json.dumps({"query": "{ version }"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=2.0) as resp:
            return resp.status == 200 and json.loads(resp.read())["data"]["version"] is not None
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError):
        return False


def child_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CFI_")}
    env.pop("DAGSTER_HOME", None)
    env.update(CFI_HOME=str(home), CFI_SFTP_PORT=str(free_port()))
    return env


def start_dev(home: Path, workdir: Path) -> DevSession:
    port = free_port()
    log = workdir / "dev.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "cfi-pipelines"), "dev", "--port", str(port), "--api-port", "0"],
            env=child_env(home),
            cwd=workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: stopped as a whole at the end
        )
    return DevSession(home, f"http://127.0.0.1:{port}", proc, log)


def processes_of(home: Path) -> list[int]:
    """Live processes whose environment has ``CFI_HOME=home`` (this benchmark's)."""
    marker = f"CFI_HOME={home}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    pids.append(int(entry.name))
    return pids


def stop_dev(session: DevSession) -> None:
    """SIGTERM the dev session's group (as Ctrl-C would), then SIGKILL whatever is left."""
    if session.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(session.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            session.proc.wait(timeout=STOP_WAIT_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(session.proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        session.proc.wait(timeout=10)
    for pid in processes_of(session.home):  # dagster dev runs in a session of its own
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(os.getpgid(pid), signal.SIGKILL)


# --------------------------------------------------------------------------- CPU via /proc


def proc_table() -> dict[int, dict]:
    """pid -> {ppid, cmd, cpu (utime+stime+cutime+cstime, s)} of every live process."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ticks = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
            out[int(entry.name)] = {"ppid": int(fields[1]), "cmd": cmd, "cpu": ticks / TICKS}
    return out


def role_of(cmd: str) -> str | None:
    if "dagster-webserver" in cmd or "dagster_webserver" in cmd:
        return "webserver"
    if "dagster-daemon" in cmd or "dagster_daemon" in cmd or "dagster._daemon" in cmd:
        return "daemon"
    if " code-server " in cmd or " api grpc " in cmd:
        return "code server"
    return None


def cpu_snapshot(root: int) -> dict[int, tuple[str, float]]:
    """pid -> (role, cpu s) of ``root`` and its descendants; a process without a role of its
    own takes its nearest ancestor's ('other' when none)."""
    table = proc_table()
    children: dict[int, list[int]] = {}
    for pid, p in table.items():
        children.setdefault(p["ppid"], []).append(pid)
    out: dict[int, tuple[str, float]] = {}
    stack = [(root, "other")] if root in table else []
    while stack:
        pid, inherited = stack.pop()
        role = role_of(table[pid]["cmd"]) or inherited
        out[pid] = (role, table[pid]["cpu"])
        stack.extend((c, role) for c in children.get(pid, ()))
    return out


def cpu_delta(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds per role between two snapshots (a process that appeared counts from 0;
    one that ended and was reaped is in its parent's cutime)."""
    per: dict[str, float] = {}
    for pid, (role, cpu) in after.items():
        start = before.get(pid, (role, 0.0))[1]
        per[role] = per.get(role, 0.0) + max(0.0, cpu - start)
    return per


# --------------------------------------------------------------------------- changes


@dataclass
class Change:
    kind: str  # update / insert / delete / price
    key: tuple  # (product_id, warehouse_id) or (product_id,)
    expect: object  # update: quantity; price: unit_price
    committed: float  # monotonic
    visible: float | None = None

    @property
    def latency(self) -> float | None:
        return None if self.visible is None else self.visible - self.committed


@dataclass
class Writer:
    """Changes CFI's source DB the way CFI's application would (updated_at = naive UTC now)."""

    engine: sa.Engine
    rng: random.Random
    changes: list[Change] = field(default_factory=list)
    freed: list[tuple[int, int, int]] = field(default_factory=list)  # (tenant, product, wh)
    rounds: int = 0

    def busy(self) -> tuple[set, set]:
        pending = [c for c in self.changes if c.visible is None]
        keys = {c.key for c in pending if c.kind != "price"}
        products = {c.key[0] for c in pending}
        return keys, products

    def round(self) -> None:
        self.rounds += 1
        keys, busy_products = self.busy()
        now = utcnow()
        sl, p, w, mv = src.stock_levels, src.products, src.warehouses, src.stock_movements
        made: list[Change] = []
        with self.engine.begin() as conn:
            n = conn.execute(sa.select(sa.func.max(sl.c.id))).scalar_one()

            def pick(k: int) -> list:
                rows = []
                for _ in range(50):
                    if len(rows) >= k:
                        break
                    row = conn.execute(
                        sa.select(sl.c.id, sl.c.product_id, sl.c.warehouse_id, sl.c.quantity)
                        .where(sl.c.id >= self.rng.randint(1, n))
                        .order_by(sl.c.id)
                        .limit(1)
                    ).first()
                    if row is None:
                        continue
                    key = (row.product_id, row.warehouse_id)
                    if key in keys or row.product_id in busy_products:
                        continue
                    if any(r.id == row.id for r in rows):
                        continue
                    rows.append(row)
                return rows

            targets = pick(UPDATES_PER_ROUND + 1)
            for row in targets[:UPDATES_PER_ROUND]:
                qty = (row.quantity + self.rng.randint(1, 400)) % 1000
                conn.execute(
                    sa.update(sl).where(sl.c.id == row.id).values(quantity=qty, updated_at=now)
                )
                made.append(Change("update", (row.product_id, row.warehouse_id), qty, 0.0))
            # insert: a pair freed by an earlier (visible) delete, else a new warehouse
            if self.freed:
                tenant, pid, wid = self.freed.pop(0)
            else:
                tenant, pid = conn.execute(
                    sa.select(p.c.tenant_id, p.c.id)
                    .where(p.c.id.not_in(busy_products or {-1}))
                    .order_by(sa.func.random())
                    .limit(1)
                ).one()
                wid = conn.execute(sa.select(sa.func.max(w.c.id))).scalar_one() + 1
                conn.execute(
                    sa.insert(w).values(
                        id=wid,
                        tenant_id=tenant,
                        code=f"WH-BENCH-{wid}",
                        name=f"Entrepôt banc {wid}",
                        city="Lille",
                        updated_at=now,
                    )
                )
            qty = self.rng.randint(0, 500)
            conn.execute(
                sa.insert(sl).values(
                    id=n + 1,
                    tenant_id=tenant,
                    product_id=pid,
                    warehouse_id=wid,
                    quantity=qty,
                    reserved=0,
                    updated_at=now,
                )
            )
            made.append(Change("insert", (pid, wid), qty, 0.0))
            # delete (its movements first)
            if len(targets) > UPDATES_PER_ROUND:
                row = targets[UPDATES_PER_ROUND]
                conn.execute(sa.delete(mv).where(mv.c.stock_level_id == row.id))
                conn.execute(sa.delete(sl).where(sl.c.id == row.id))
                made.append(Change("delete", (row.product_id, row.warehouse_id), None, 0.0))
            # every few rounds: a product's price (reaches all its stock rows)
            if self.rounds % PRICE_EVERY_ROUNDS == 1:
                touched = {c.key[0] for c in made} | busy_products
                prod = conn.execute(
                    sa.select(p.c.id, p.c.unit_price)
                    .where(p.c.id.not_in(touched))
                    .where(sa.exists().where(sl.c.product_id == p.c.id))
                    .order_by(sa.func.random())
                    .limit(1)
                ).one()
                price = round(float(prod.unit_price) + self.rng.randint(1, 500) / 100, 2)
                conn.execute(
                    sa.update(p).where(p.c.id == prod.id).values(unit_price=price, updated_at=now)
                )
                made.append(Change("price", (prod.id,), price, 0.0))
        committed = time.monotonic()
        for c in made:
            c.committed = committed
        self.changes.extend(made)

    def on_visible(self, change: Change, tenant_of: dict) -> None:
        if change.kind == "delete" and change.key in tenant_of:
            self.freed.append((tenant_of[change.key], *change.key))


def tenant_by_key(engine: sa.Engine, keys: list[tuple]) -> dict[tuple, int]:
    out = {}
    with engine.connect() as conn:
        for pid, wid in keys:
            out[(pid, wid)] = conn.execute(
                sa.select(src.products.c.tenant_id).where(src.products.c.id == pid)
            ).scalar_one()
    return out


# --------------------------------------------------------------------------- cache polling


def parse_ts(value) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", ""))
    except ValueError:
        return None


class Cache:
    """Read-only polls of the common DB (sqlite3, stdlib: cheap, no ORM)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn: sqlite3.Connection | None = None

    def _c(self) -> sqlite3.Connection:
        if self.conn is None:
            self.conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)
        return self.conn

    def statuses(self) -> dict[str, datetime | None]:
        rows = self._c().execute('SELECT "view", source_snapshot_at FROM cfi_view_status')
        return {v: parse_ts(s) for v, s in rows.fetchall()}

    def visible(self, c: Change) -> bool:
        db = self._c()
        if c.kind == "price":
            rows = db.execute(
                "SELECT quantity, unit_price, stock_value FROM cfi_stocks WHERE product_id = ?",
                c.key,
            ).fetchall()
            return bool(rows) and all(
                abs(float(up) - c.expect) < 0.005 and abs(float(sv) - q * c.expect) < 0.011
                for q, up, sv in rows
            )
        row = db.execute(
            "SELECT quantity FROM cfi_stocks WHERE product_id = ? AND warehouse_id = ?", c.key
        ).fetchone()
        if c.kind == "update":
            return row is not None and row[0] == c.expect
        if c.kind == "insert":
            return row is not None
        return row is None  # delete

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


@dataclass
class Ages:
    active: dict[str, float] = field(default_factory=dict)
    idle: dict[str, float] = field(default_factory=dict)

    def add(self, phase: str, statuses: dict, now: datetime) -> None:
        into = self.active if phase == "active" else self.idle
        for view in VIEWS:
            snap = statuses.get(view)
            age = float("inf") if snap is None else (now - snap).total_seconds()
            into[view] = max(into.get(view, 0.0), age)


# --------------------------------------------------------------------------- runs


def run_records(dagster_home: Path) -> list:
    import dagster as dg

    instance = dg.DagsterInstance.from_config(str(dagster_home))
    try:
        return list(instance.get_run_records())
    finally:
        with contextlib.suppress(Exception):
            instance.dispose()


def runs_in_flight(dagster_home: Path) -> int:
    import dagster as dg

    instance = dg.DagsterInstance.from_config(str(dagster_home))
    try:
        return len(instance.get_run_records(filters=dg.RunsFilter(statuses=list(IN_FLIGHT()))))
    finally:
        with contextlib.suppress(Exception):
            instance.dispose()


def IN_FLIGHT():  # noqa: N802
    import dagster as dg

    return (
        dg.DagsterRunStatus.QUEUED,
        dg.DagsterRunStatus.NOT_STARTED,
        dg.DagsterRunStatus.STARTING,
        dg.DagsterRunStatus.STARTED,
    )


# --------------------------------------------------------------------------- report


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def fmt_s(v: float | None) -> str:
    if v is None or v != v:
        return "—"
    if v == float("inf"):
        return "never"
    return f"{v:.1f} s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--active-minutes", type=float, default=10.0)
    ap.add_argument("--idle-minutes", type=float, default=10.0)
    ap.add_argument("--change-every", type=float, default=20.0)
    ap.add_argument("--scale", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the temporary CFI_HOME")
    args = ap.parse_args()
    active_s, idle_s = args.active_minutes * 60, args.idle_minutes * 60
    deadline = time.monotonic() + READY_TIMEOUT_S + FIRST_REFRESH_TIMEOUT_S + active_s + idle_s
    deadline += 120  # reporting

    def on_term(signum, frame):  # SIGTERM/SIGHUP: leave through the finally
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with it ignored
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    work = Path(tempfile.mkdtemp(prefix="cfi-freshness-"))
    home = work / "cfi"
    dagster_home = home / "dagster"
    session: DevSession | None = None
    cache = Cache(home / "cfi_common.db")
    rng = random.Random(args.seed)
    writer: Writer | None = None
    ages = Ages()
    t: dict[str, float] = {}  # monotonic marks
    wall: dict[str, datetime] = {}  # UTC marks (run creation times)
    cpu: dict[str, dict] = {}
    records: list = []
    interrupted = False
    try:
        say(f"CFI_HOME {home}; seeding (scale {args.scale}) …")
        seeded = subprocess.run(
            [str(BIN / "cfi-pipelines"), "seed", "--scale", str(args.scale)],
            env=child_env(home),
            cwd=work,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if seeded.returncode != 0:
            raise RuntimeError(f"seed failed:\n{seeded.stdout[-2000:]}{seeded.stderr[-2000:]}")
        t["launch"], wall["launch"] = time.monotonic(), datetime.now(UTC)
        session = start_dev(home, work)
        say(f"cfi-pipelines dev (pid {session.proc.pid}) on {session.url}; waiting for the UI …")
        end = time.monotonic() + READY_TIMEOUT_S
        while not graphql_ready(session.url):
            if session.proc.poll() is not None:
                raise RuntimeError(f"cfi-pipelines dev exited early:\n{session.tail()}")
            if time.monotonic() > end:
                raise RuntimeError(f"the UI did not answer in {READY_TIMEOUT_S:.0f}s")
            time.sleep(POLL_S)
        t["ui"] = time.monotonic()
        say(f"UI ready after {t['ui'] - t['launch']:.1f} s; waiting for the first refreshes …")
        end = time.monotonic() + FIRST_REFRESH_TIMEOUT_S
        while True:
            with contextlib.suppress(sqlite3.Error):
                st = cache.statuses()
                if all(st.get(v) for v in VIEWS) and runs_in_flight(dagster_home) == 0:
                    break
            if time.monotonic() > end:
                raise RuntimeError("the views were not all refreshed at start-up in time")
            time.sleep(2.0)
        t["active"], wall["active"] = time.monotonic(), datetime.now(UTC)
        say(f"start-up done after {t['active'] - t['launch']:.1f} s; changing the source …")

        writer = Writer(create_engine(f"sqlite:///{home / 'cfi_source.db'}"), rng)
        tenant_of: dict = {}
        next_round = t["active"]
        t["idle"] = t["active"] + active_s
        t["end"] = t["idle"] + idle_s
        phase = "active"
        last_note = 0.0
        while (now := time.monotonic()) < t["end"] and now < deadline:
            if session.proc.poll() is not None:
                raise RuntimeError(f"cfi-pipelines dev exited:\n{session.tail()}")
            if phase == "active" and now >= t["idle"]:
                phase = "idle"
                wall["idle"] = datetime.now(UTC)
                cpu["idle_start"] = cpu_snapshot(session.proc.pid)
                say(f"idle: no more changes for {args.idle_minutes:g} min")
            if phase == "active" and now >= next_round:
                writer.round()
                deleted = [c.key for c in writer.changes[-6:] if c.kind == "delete"]
                tenant_of.update(tenant_by_key(writer.engine, deleted))
                next_round += args.change_every
            try:
                st = cache.statuses()
                ages.add(phase, st, utcnow())
                for c in writer.changes:
                    if c.visible is None and cache.visible(c):
                        c.visible = time.monotonic()
                        writer.on_visible(c, tenant_of)
            except sqlite3.Error as exc:  # a swap in progress: next poll
                say(f"poll: {exc}")
            if now - last_note > 60:
                pending = sum(c.visible is None for c in writer.changes)
                say(f"{phase}: {len(writer.changes)} changes, {pending} not yet visible")
                last_note = now
            time.sleep(max(0.0, POLL_S - (time.monotonic() - now)))
        wall["end"] = datetime.now(UTC)
        if "idle_start" in cpu:
            cpu["idle_end"] = cpu_snapshot(session.proc.pid)
        records = run_records(dagster_home)
    except KeyboardInterrupt as exc:
        interrupted = True
        say(f"interrupted ({str(exc) or 'Ctrl-C'}): stopping …")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # the clean-up must not be interrupted
        cache.close()
        if session is not None:
            say("stopping cfi-pipelines dev (whole process group) …")
            stop_dev(session)
            left = processes_of(home)
            say(f"stopped; processes left: {left or 'none'}; log {session.log}")
    if interrupted or writer is None:
        say(f"work directory kept: {work}")
        return 1
    code = report(args, writer, ages, t, wall, cpu, records)
    if code == 0 and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        say(f"work directory kept (CFI_HOME, dev.log): {work}")
    return code


def report(args, writer: Writer, ages: Ages, t: dict, wall: dict, cpu: dict, records) -> int:
    rows: list[tuple[str, str, str, bool | None]] = []  # figure, value, target, met

    def latencies(kind: str | None) -> tuple[list[float], int]:
        cs = [c for c in writer.changes if kind is None or c.kind == kind]
        return [c.latency for c in cs if c.latency is not None], sum(c.latency is None for c in cs)

    print("\nchange-visibility latency (source commit -> first poll showing it)")
    print(f"  {'kind':8} {'n':>4} {'p50':>9} {'p95':>9} {'max':>9} {'never':>6}")
    for kind in (None, "update", "insert", "delete", "price"):
        lat, never = latencies(kind)
        print(
            f"  {kind or 'all':8} {len(lat) + never:>4} {fmt_s(pct(lat, 50)):>9} "
            f"{fmt_s(pct(lat, 95)):>9} {fmt_s(max(lat) if lat else None):>9} {never:>6}"
        )
    upd, upd_never = latencies("update")
    p95 = pct(upd, 95) if not upd_never else float("inf")
    mx = max(upd, default=float("nan")) if not upd_never else float("inf")
    rows.append(("update visible p95", fmt_s(p95), f"<= {UPDATE_P95_S:.0f} s", p95 <= UPDATE_P95_S))
    rows.append(("update visible max", fmt_s(mx), f"<= {UPDATE_MAX_S:.0f} s", mx <= UPDATE_MAX_S))
    dl, dl_never = latencies("delete")
    dmx = max(dl, default=float("nan")) if not dl_never else float("inf")
    rows.append(
        ("delete visible max", fmt_s(dmx), f"<= {DELETE_MAX_S / 60:.0f} min", dmx <= DELETE_MAX_S)
    )
    ins, ins_never = latencies("insert")
    imx = max(ins, default=float("nan")) if not ins_never else float("inf")
    rows.append(("insert visible max", fmt_s(imx), "(no target)", None))
    pr, pr_never = latencies("price")
    rows.append(
        (
            "price reached every stock row",
            f"{len(pr)}/{len(pr) + pr_never} (max {fmt_s(max(pr, default=None))})",
            "all",
            pr_never == 0 and len(pr) > 0,
        )
    )

    print("\nview age as readers see it (max of now - source_snapshot_at over polls)")
    print(f"  {'view':11} {'active':>9} {'idle':>9}")
    for v in VIEWS:
        print(f"  {v:11} {fmt_s(ages.active.get(v)):>9} {fmt_s(ages.idle.get(v)):>9}")
    worst = max([*ages.active.values(), *ages.idle.values()], default=float("nan"))
    rows.append(
        ("view age max (all views)", fmt_s(worst), f"<= {VIEW_AGE_MAX_S / 60:.0f} min",
         worst <= VIEW_AGE_MAX_S)
    )  # fmt: skip

    phases = {"start-up": [], "active": [], "idle": []}
    for r in records:
        created = r.create_timestamp
        if created.tzinfo is None:
            created = created.replace(tzinfo=UTC)
        if created < wall["active"]:
            phases["start-up"].append(r)
        elif created < wall.get("idle", wall["end"]):
            phases["active"].append(r)
        else:
            phases["idle"].append(r)
    print("\nruns launched (by creation time)")
    for name, rs in phases.items():
        by_job: dict[str, int] = {}
        for r in rs:
            by_job[r.dagster_run.job_name] = by_job.get(r.dagster_run.job_name, 0) + 1
        jobs = ", ".join(f"{j} {n}" for j, n in sorted(by_job.items())) or "none"
        print(f"  {name:9} {len(rs):>4}  {jobs}")
    if phases["idle"]:
        print("  runs launched while idle:")
        for r in sorted(phases["idle"], key=lambda r: r.create_timestamp):
            tags = r.dagster_run.tags
            origin = {
                k: tags[k]
                for k in (
                    "dagster/sensor_name",
                    "dagster/schedule_name",
                    "cfi/trigger",
                    "cfi/views",
                )
                if k in tags
            }
            print(
                f"    {r.create_timestamp:%H:%M:%S} {r.dagster_run.run_id[:8]} "
                f"{r.dagster_run.job_name} {r.dagster_run.status.value} {origin}"
            )
    n_idle = len(phases["idle"])
    rows.append(("runs launched while idle", str(n_idle), f"<= {IDLE_RUNS_MAX}",
                 n_idle <= IDLE_RUNS_MAX))  # fmt: skip

    if "idle_start" in cpu and "idle_end" in cpu:
        span = (wall["end"] - wall["idle"]).total_seconds()
        per = cpu_delta(cpu["idle_start"], cpu["idle_end"])
        print(f"\nCPU while idle ({span:.0f} s), % of one core")
        for role in sorted(per):
            print(f"  {role:12} {per[role]:7.1f} s  {100 * per[role] / span:5.1f} %")
        total = sum(per.values())
        print(f"  {'dev session':12} {total:7.1f} s  {100 * total / span:5.1f} %")
        dc = per.get("daemon", 0.0) + per.get("code server", 0.0)
        dc_pct = 100 * dc / span
        rows.append(("idle CPU daemon + code server", f"{dc_pct:.1f} %",
                     f"< {IDLE_CPU_MAX_PCT:.0f} %", dc_pct < IDLE_CPU_MAX_PCT))  # fmt: skip
        rows.append(("idle CPU whole dev session", f"{100 * total / span:.1f} %", "(info)", None))
    else:
        rows.append(("idle CPU daemon + code server", "not measured", "< 5 %", False))

    print(
        f"\nphases: start-up {t['active'] - t['launch']:.0f} s (UI after "
        f"{t['ui'] - t['launch']:.0f} s), active {args.active_minutes:g} min "
        f"({writer.rounds} rounds every {args.change_every:g} s), idle {args.idle_minutes:g} min"
    )
    print("\n  figure                              value                      target     met")
    for name, value, target, met in rows:
        mark = "—" if met is None else ("yes" if met else "NO")
        print(f"  {name:35} {value:26} {target:10} {mark}")
    ok = all(met is not False for *_, met in rows)
    print("\nall targets met" if ok else "\nsome targets MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
