"""A burst of validated campaigns on the production topology, measured end to end.

    python benchmarks/exports_burst.py [--campaigns 1000] [--steady 5]

Starts, all on 127.0.0.1 and all stopped in ``finally``: a temporary PostgreSQL as
the Dagster instance storage (``deploy/dagster.yaml``: queued run coordinator and its
limits), a real OpenSSH sshd as CFI's drop (tests/fixtures/sshd.py), the code location
served by ``dagster code-server start`` and referenced by a workspace.yaml
``grpc_server`` entry, and ``dagster-daemon run`` with only validated_campaigns_sensor
on. Then inserts N validated campaigns at once into MyCfia's SQLite DB and waits
until the drop holds them all; then, in steady state, one campaign a minute.

Prints the drain time (first insert -> last manifest), p50/p95 of validation ->
delivery (``delivered_at - validated_at``; the manifest's mtime agrees), lost,
duplicate and partial files, the runs by job. Exit 0 when the targets are met:
burst drained <= 15 min, steady p95 <= 60 s, 0 lost, 0 duplicate, 0 .part.
Timing is noisy on a shared 2-core machine: read it as an order of magnitude.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sqlalchemy as sa  # noqa: E402

from cfi_pipelines.db import create_engine  # noqa: E402
from cfi_pipelines.devtools.postgres import PASSWORD, SUPERUSER, TempPostgres  # noqa: E402
from cfi_pipelines.devtools.seed_mycfia import add_campaign, default_targets  # noqa: E402
from cfi_pipelines.model import mycfia  # noqa: E402
from tests.fixtures.sshd import Sshd, free_port, keygen  # noqa: E402

BIN = Path(sys.executable).parent
DRAIN_TARGET = 15 * 60.0
STEADY_P95_TARGET = 60.0
SENSOR = "validated_campaigns_sensor"


def now_naive() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class Stack:
    """Every process and server of the run; :meth:`stop` ends what was started."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.pg: TempPostgres | None = None
        self.sshd: Sshd | None = None
        self.env: dict[str, str] = {}

    def start(self) -> None:
        w = self.work
        self.pg = TempPostgres().start()
        self.pg.create_database("dagster")
        keys = w / "keys"
        keys.mkdir()
        self.sshd = Sshd(
            workdir=w, host_key=keygen(keys / "host"), client_key=keygen(keys / "client")
        )
        self.sshd.start()
        drop = w / "drop"
        drop.mkdir()
        home = w / "dagster_home"
        home.mkdir()
        shutil.copy(ROOT / "deploy" / "dagster.yaml", home / "dagster.yaml")
        self.mycfia_url = f"sqlite:///{w / 'mycfia.db'}"
        engine = create_engine(self.mycfia_url)
        mycfia.metadata.create_all(engine)
        engine.dispose()
        grpc_port = free_port()
        (w / "workspace.yaml").write_text(
            "load_from:\n"
            "  - grpc_server:\n"
            "      host: 127.0.0.1\n"
            f"      port: {grpc_port}\n"
            "      location_name: cfi_pipelines\n"
        )
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("CFI_", "MYCFIA_", "DAGSTER_"))
        }
        env.update(
            PYTHONPATH=str(ROOT),
            DAGSTER_HOME=str(home),
            DAGSTER_PG_HOST="127.0.0.1",
            DAGSTER_PG_PORT=str(self.pg.port),
            DAGSTER_PG_USER=SUPERUSER,
            DAGSTER_PG_PASSWORD=PASSWORD,
            DAGSTER_PG_DB="dagster",
            CFI_HOME=str(w / "cfi_home"),
            MYCFIA_URL=self.mycfia_url,
            CFI_SOURCE_URL=f"sqlite:///{w / 'cfi_source.db'}",
            CFI_COMMON_URL=f"sqlite:///{w / 'cfi_common.db'}",
            CFI_ENV="production",
            CFI_SFTP_HOST="127.0.0.1",
            CFI_SFTP_PORT=str(self.sshd.port),
            CFI_SFTP_USER=self.sshd.user,
            CFI_SFTP_KEY=str(self.sshd.client_key),
            CFI_SFTP_KNOWN_HOSTS=str(self.sshd.known_hosts),
            CFI_SFTP_DIR=str(drop),
            CFI_AUTOMATION="off",  # every other schedule/sensor off: only ours is started
        )
        self.env, self.drop, self.home = env, drop, home
        self.spawn(
            "code-server",
            [str(BIN / "dagster"), "code-server", "start", "-m", "cfi_pipelines.definitions",
             "-h", "127.0.0.1", "-p", str(grpc_port)],
        )  # fmt: skip
        deadline = time.monotonic() + 180
        while True:
            probe = subprocess.run(
                [str(BIN / "dagster"), "api", "grpc-health-check", "-p", str(grpc_port)],
                env=env, capture_output=True, text=True,
            )  # fmt: skip
            if probe.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("code server did not start:\n" + self.tail("code-server"))
            time.sleep(1)
        self.spawn("daemon", [str(BIN / "dagster-daemon"), "run", "-w", str(w / "workspace.yaml")])
        subprocess.run(
            [str(BIN / "dagster"), "sensor", "start", SENSOR, "-w", str(w / "workspace.yaml")],
            env=env, check=True, capture_output=True,
        )  # fmt: skip

    def spawn(self, name: str, args: list[str]) -> None:
        log = open(self.work / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs.append((name, proc))

    def tail(self, name: str, n: int = 40) -> str:
        path = self.work / f"{name}.log"
        return "\n".join(path.read_text().splitlines()[-n:]) if path.exists() else ""

    def stop(self) -> None:
        for _name, proc in reversed(self.procs):  # daemon first, then the code server + runs
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)  # its own session: it and its run workers
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        if self.sshd is not None:
            self.sshd.stop()
        if self.pg is not None:
            self.pg.stop()


def insert(engine: sa.Engine, ids: range, targets: int) -> None:
    rows = default_targets(targets)
    with engine.begin() as conn:
        stamp = now_naive()
        for cid in ids:
            add_campaign(conn, cid, tenant_code=f"T{cid % 7:03d}", targets=rows, updated_at=stamp)


def delivered(engine: sa.Engine, ids: range) -> dict[int, tuple[datetime, datetime]]:
    c, e = mycfia.campaigns.c, mycfia.campaign_exports.c
    with engine.connect() as conn:
        q = (
            sa.select(e.campaign_id, c.validated_at, e.delivered_at)
            .join_from(mycfia.campaign_exports, mycfia.campaigns, c.id == e.campaign_id)
            .where(e.status == "delivered", e.campaign_id.between(ids.start, ids.stop - 1))
        )
        return {cid: (v, d) for cid, v, d in conn.execute(q)}


def wait_for(engine, ids: range, timeout: float) -> dict[int, tuple[datetime, datetime]]:
    deadline = time.monotonic() + timeout
    last = -1
    while True:
        got = delivered(engine, ids)
        if len(got) != last:
            print(f"  {time.strftime('%H:%M:%S')} delivered {len(got)}/{len(ids)}", flush=True)
            last = len(got)
        if len(got) == len(ids) or time.monotonic() > deadline:
            return got
        time.sleep(2)


def check_drop(drop: Path, ids: list[int]) -> dict[str, int]:
    """lost (no manifest), partial (.part left, or a final file not matching its manifest)."""
    manifests = {p.name: p for p in drop.rglob("*.manifest.json")}
    parts = [p for p in drop.rglob("*.part")]
    lost = bad = 0
    for cid in ids:
        m = manifests.get(f"campaign_{cid}_r1.manifest.json")
        if m is None:
            lost += 1
            continue
        for info in json.loads(m.read_text())["files"].values():
            data = (m.parent / info["name"]).read_bytes()
            if len(data) != info["bytes"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
                bad += 1
    return {"lost": lost, "part_files": len(parts), "mismatched": bad}


def dagster_counts(pg: TempPostgres) -> tuple[int, dict[str, int], dict[str, int]]:
    """(partitions delivered more than once, runs by job, runs by status) from PostgreSQL."""
    engine = create_engine(pg.url("dagster"))
    try:
        with engine.connect() as conn:
            dup = conn.execute(
                sa.text(
                    "SELECT count(*) FROM (SELECT partition FROM event_logs "
                    "WHERE dagster_event_type = 'ASSET_MATERIALIZATION' AND asset_key = :k "
                    "GROUP BY partition HAVING count(*) > 1) d"
                ),
                {"k": '["cfi_export", "campaign_delivery"]'},
            ).scalar()
            jobs = dict(
                conn.execute(sa.text("SELECT pipeline_name, count(*) FROM runs GROUP BY 1")).all()
            )
            statuses = dict(
                conn.execute(sa.text("SELECT status, count(*) FROM runs GROUP BY 1")).all()
            )
    finally:
        engine.dispose()
    return int(dup or 0), jobs, statuses


def latencies(got: dict[int, tuple[datetime, datetime]]) -> list[float]:
    return [(d - v).total_seconds() for v, d in got.values()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--campaigns", type=int, default=1000)
    parser.add_argument("--steady", type=int, default=5, help="campaigns, one a minute")
    parser.add_argument("--targets", type=int, default=20, help="targets per campaign")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cfi-burst-"))
    stack = Stack(work)
    ok = True
    try:
        t = time.monotonic()
        stack.start()
        print(f"stack up in {time.monotonic() - t:.0f}s (work dir {work})", flush=True)
        engine = create_engine(stack.mycfia_url)
        burst = range(1, args.campaigns + 1)
        started = time.monotonic()
        insert(engine, burst, args.targets)
        print(f"burst: {args.campaigns} campaigns validated at once", flush=True)
        got = wait_for(engine, burst, timeout=DRAIN_TARGET + 300)
        drain = time.monotonic() - started
        lat = latencies(got)
        print(
            f"burst drained in {drain:.0f}s (target <= {DRAIN_TARGET:.0f}s); "
            f"validation->delivery p50 {pct(lat, 0.5):.1f}s p95 {pct(lat, 0.95):.1f}s "
            f"max {max(lat, default=float('nan')):.1f}s",
            flush=True,
        )
        ok &= len(got) == args.campaigns and drain <= DRAIN_TARGET

        steady_lat: list[float] = []
        base = args.campaigns + 1
        for k in range(args.steady):
            one = range(base + k, base + k + 1)
            tick = time.monotonic()
            insert(engine, one, args.targets)
            got1 = wait_for(engine, one, timeout=120)
            steady_lat += latencies(got1)
            print(f"steady {k + 1}/{args.steady}: {latencies(got1)}", flush=True)
            time.sleep(max(0.0, 60 - (time.monotonic() - tick)))
        if args.steady:
            p95 = pct(steady_lat, 0.95)
            print(
                f"steady state ({args.steady}, one a minute): p50 {pct(steady_lat, 0.5):.1f}s "
                f"p95 {p95:.1f}s (target <= {STEADY_P95_TARGET:.0f}s)",
                flush=True,
            )
            ok &= len(steady_lat) == args.steady and p95 <= STEADY_P95_TARGET

        every = list(range(1, base + args.steady))
        drop = check_drop(stack.drop, every)
        time.sleep(3)
        dup, jobs, statuses = dagster_counts(stack.pg)
        with engine.connect() as conn:
            e = mycfia.campaign_exports.c
            attempts = conn.execute(sa.select(sa.func.count()).where(e.attempts > 1)).scalar()
        print(
            f"lost {drop['lost']}, duplicate deliveries {dup}, partial files "
            f"{drop['part_files']} .part + {drop['mismatched']} mismatched; "
            f"rows with more than one attempt: {attempts}"
        )
        print(f"runs by job {jobs}; by status {statuses}")
        ok &= drop["lost"] == 0 and dup == 0 and drop["part_files"] == 0 and drop["mismatched"] == 0
        engine.dispose()
    finally:
        stack.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("ALL TARGETS MET" if ok else "TARGET MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
