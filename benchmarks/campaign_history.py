"""A year of campaign history: the sensor, ``status`` and the UI before and after retention.

    python benchmarks/campaign_history.py [--campaigns 100000] [--work DIR] [--keep]

Builds, in a throwaway CFI_HOME: N campaigns in MyCfia's DB, spread over the last 365
days, with their exports (92 % delivered, 4 % rejected, 2 % failed, 2 % pending),
inserted with batched executemany; the Dagster instance holding their 'campaigns'
partitions as it would without retention, and a runless materialization of
``cfi_export/campaign_delivery`` per delivered campaign (so the UI's partition
statuses mean something). Then measures, before and after running
``campaign_partitions_retention`` until it has nothing left to remove:

- validated_campaigns_sensor, one tick at steady state (one new campaign): target < 1 s;
- ``cfi-pipelines status`` wall time (a subprocess): target < 2 s;
- the delivery asset page's partition statuses (GraphQL ``assetPartitionStatuses``,
  against ``dagster-webserver`` on this instance; first and second query): target < 3 s;
- the number of partitions (target: bounded, <= the retention cap).

Timings are wall-clock on whatever else the machine runs: read them as orders of
magnitude. They live here, never in the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCH = 5000
QUERY = """
query PartitionStatuses($assetKey: AssetKeyInput!) {
  assetNodeOrError(assetKey: $assetKey) {
    __typename
    ... on AssetNode {
      assetPartitionStatuses {
        __typename
        ... on DefaultPartitionStatuses { materializedPartitions failedPartitions }
      }
    }
  }
}
"""


def _timed(fn):
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def _status_of(i: int) -> str:
    r = i % 100
    return "rejected" if r < 4 else "failed" if r < 6 else "pending" if r < 8 else "delivered"


def seed(n: int, now) -> None:
    import sqlalchemy as sa

    from cfi_pipelines.db import create_engine
    from cfi_pipelines.devtools.seed_mycfia import valid_content
    from cfi_pipelines.model import mycfia
    from cfi_pipelines.settings import get_settings
    from cfi_pipelines.views.refresh import init_common

    s = get_settings()
    init_common(create_engine(s.common_url))
    engine = create_engine(s.mycfia_url)
    mycfia.metadata.create_all(engine)
    content = json.dumps(valid_content(), ensure_ascii=False)
    start = now - timedelta(days=365)
    step = timedelta(days=365) / n
    with engine.begin() as conn:
        for lo in range(1, n + 1, BATCH):
            ids = range(lo, min(lo + BATCH, n + 1))
            campaigns, exports = [], []
            for i in ids:
                at = start + step * i
                campaigns.append(
                    dict(id=i, tenant_id=1 + i % 50, tenant_code=f"T{1 + i % 50:03d}",
                         operation_id=None, operation_code=None, name=f"Campagne {i}",
                         channel="email", status="validated", revision=1, validated_at=at,
                         content=content, created_at=at, updated_at=at)
                )  # fmt: skip
                st = _status_of(i)
                done = at + timedelta(minutes=2)
                transient = st == "failed" and i % 2 == 0
                exports.append(
                    dict(campaign_id=i, revision=1, status=st, attempts=1 if st != "failed" else 4,
                         run_id=None, row_count=3, validated_at=at, requested_at=at,
                         delivered_at=done if st == "delivered" else None, updated_at=done,
                         manifest_path=f"/T{1 + i % 50:03d}/campaign_{i}_r1.manifest.json"
                         if st == "delivered" else None,
                         error="SFTP down" if st == "failed" else
                         "/budget: required" if st == "rejected" else None,
                         failure_kind=("transient" if transient else "permanent")
                         if st == "failed" else None,
                         transient_failures=30 if transient else None,
                         next_attempt_at=None)
                )  # fmt: skip
            conn.execute(sa.insert(mycfia.campaigns), campaigns)
            conn.execute(sa.insert(mycfia.campaign_exports), exports)
    engine.dispose()


FAST_SEED = {"on": False}
"""While seeding only: SQLite connections skip fsync (PRAGMA synchronous=OFF)."""


def _install_fast_seed() -> None:
    import sqlalchemy as sa

    @sa.event.listens_for(sa.engine.Engine, "connect")
    def _pragma(dbapi_conn, _record):  # noqa: ANN001
        if FAST_SEED["on"] and type(dbapi_conn).__module__.startswith("sqlite3"):
            dbapi_conn.execute("PRAGMA synchronous=OFF")


def seed_instance(instance, n: int, materialized: int | None = None) -> None:
    import dagster as dg

    from cfi_pipelines.assets.exports import DELIVERY_KEY

    for lo in range(1, n + 1, BATCH):
        instance.add_dynamic_partitions(
            "campaigns", [str(i) for i in range(lo, min(lo + BATCH, n + 1))]
        )
    first = 1 if materialized is None else max(1, n + 1 - materialized)
    for i in range(first, n + 1):  # the newest ``materialized`` campaigns
        if _status_of(i) == "delivered":
            instance.report_runless_asset_event(
                dg.AssetMaterialization(DELIVERY_KEY, partition=str(i))
            )


COUNTER = {"n": 0}


def sensor_tick(instance, n: int, now) -> float:
    """Seconds of one validated_campaigns_sensor tick at steady state: one new campaign."""
    import dagster as dg

    from cfi_pipelines.db import create_engine
    from cfi_pipelines.devtools.seed_mycfia import add_campaign
    from cfi_pipelines.exports.records import record_export
    from cfi_pipelines.resources.databases import DatabaseResource
    from cfi_pipelines.sensors.campaigns import CampaignCursor, build_campaigns_sensor
    from cfi_pipelines.settings import get_settings

    url = get_settings().mycfia_url
    engine = create_engine(url)
    cid = n + 1 + COUNTER["n"]
    COUNTER["n"] += 1
    with engine.begin() as conn:
        add_campaign(conn, cid, updated_at=now + timedelta(seconds=COUNTER["n"]))
    engine.dispose()
    cursor = CampaignCursor(since=now + timedelta(seconds=COUNTER["n"] - 1)).dump()
    sensor = build_campaigns_sensor()
    times = []
    for _ in range(3):
        ctx = dg.build_sensor_context(
            instance=instance, cursor=cursor, resources={"mycfia": DatabaseResource(url=url)}
        )
        seconds, result = _timed(lambda: sensor(ctx))  # noqa: B023
        assert [r.partition_key for r in result.run_requests] == [str(cid)], result
        times.append(seconds)
    engine = create_engine(url)
    with engine.begin() as conn:
        record_export(conn, cid, 1, status="delivered", delivered_at=now)
    engine.dispose()
    return statistics.median(times)


def status_in_process() -> float:
    from cfi_pipelines.ops.status import collect_status

    return statistics.median(_timed(collect_status)[0] for _ in range(3))


def status_wall(env: dict[str, str]) -> float:
    cli = Path(sys.executable).with_name("cfi-pipelines")
    times = []
    for _ in range(3):
        seconds, proc = _timed(
            lambda: subprocess.run([str(cli), "status", "--json"], env=env, capture_output=True,
                                   text=True, timeout=300)
        )  # fmt: skip
        assert proc.returncode in (0, 2), proc.stderr[-2000:]
        times.append(seconds)
    return statistics.median(times)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_webserver(env: dict[str, str], work: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    exe = Path(sys.executable).with_name("dagster-webserver")
    log = open(work / "webserver.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(exe), "-m", "cfi_pipelines.definitions", "-h", "127.0.0.1", "-p", str(port)],
        env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/server_info", timeout=2):
                break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"dagster-webserver exited: see {work / 'webserver.log'}"
                ) from None
            time.sleep(0.5)
    else:
        raise RuntimeError("dagster-webserver did not start in 180 s")
    graphql(url)  # the code location is loaded
    return proc, url


def graphql(url: str) -> tuple[float, int, int]:
    """Seconds of the partition-status query, materialized and failed counts (ranges)."""
    body = json.dumps(
        {"query": QUERY, "variables": {"assetKey": {"path": ["cfi_export", "campaign_delivery"]}}}
    ).encode()
    req = urllib.request.Request(
        f"{url}/graphql", data=body, headers={"Content-Type": "application/json"}
    )
    seconds, raw = _timed(lambda: urllib.request.urlopen(req, timeout=600).read())
    data = json.loads(raw)
    node = data["data"]["assetNodeOrError"]
    st = node.get("assetPartitionStatuses") or {}
    return (
        seconds,
        len(st.get("materializedPartitions") or []),
        len(st.get("failedPartitions") or []),
    )


REAL_DELETE_TICKS = 5
"""Ticks whose deletes are timed as the daemon applies them (fsync'd); later ones are
applied unsynced, only to get through a year's backlog quickly."""


def run_retention(instance, now) -> tuple[int, list[float], list[float]]:
    """Ticks of campaign_partitions_retention until it removes nothing (deletes applied
    one by one, as the sensor daemon does); returns ticks, plan seconds, delete seconds."""
    import dagster as dg

    from cfi_pipelines.resources.databases import DatabaseResource
    from cfi_pipelines.sensors.retention import build_retention_sensor
    from cfi_pipelines.settings import get_settings

    sensor = build_retention_sensor(clock=lambda: now)
    res = {"mycfia": DatabaseResource(url=get_settings().mycfia_url)}
    cursor, ticks, plans, deletes = None, 0, [], []
    while True:
        ctx = dg.build_sensor_context(instance=instance, cursor=cursor, resources=res)
        seconds, result = _timed(lambda: sensor(ctx))  # noqa: B023
        plans.append(seconds)
        cursor = result.cursor
        keys = [k for r in result.dynamic_partitions_requests or [] for k in r.partition_keys]
        if not keys:
            if json.loads(cursor)["after"] is None or len(plans) > 1000:
                break  # a whole pass found nothing more to remove
            continue
        ticks += 1
        FAST_SEED["on"] = ticks > REAL_DELETE_TICKS  # the daemon's cost: measured on the first
        started = time.perf_counter()
        for key in keys:
            if instance.has_dynamic_partition("campaigns", key):  # as the daemon does
                instance.delete_dynamic_partition("campaigns", key)
        if ticks <= REAL_DELETE_TICKS:
            deletes.append(time.perf_counter() - started)
    FAST_SEED["on"] = False
    return ticks, plans, deletes


def measure(label, instance, n, now, env, url) -> dict:
    out = {"partitions": len(instance.get_dynamic_partitions("campaigns"))}
    out["sensor_tick_s"] = sensor_tick(instance, n, now)
    out["status_s"] = status_wall(env)
    out["status_query_s"] = status_in_process()
    cold, mat, failed = graphql(url)
    warm, _, _ = graphql(url)
    out.update(graphql_first_s=cold, graphql_second_s=warm, materialized_ranges=mat,
               failed_ranges=failed)  # fmt: skip
    print(
        f"{label:<16} partitions {out['partitions']:>7}  sensor tick {out['sensor_tick_s']:.3f} s "
        f"(< 1)  status {out['status_s']:.2f} s (< 2; collect_status in process "
        f"{out['status_query_s']:.3f} s)  GraphQL partition statuses "
        f"{cold:.2f} s then {warm:.2f} s (< 3)  [{mat} materialized ranges]",
        flush=True,
    )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--campaigns", type=int, default=100_000)
    ap.add_argument("--work", type=Path, default=None, help="state directory (default: a temp dir)")
    ap.add_argument(
        "--materialized",
        type=int,
        default=None,
        help="record materializations for the newest N campaigns only (default: every delivered)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the state directory")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="cfi_history_"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["CFI_HOME"] = str(work)  # this script's own CFI_HOME, before any setting is read
    os.environ["CFI_AUTOMATION"] = "off"
    from cfi_pipelines.clock import utcnow
    from cfi_pipelines.ops.instance import local_instance
    from cfi_pipelines.sensors.retention import MAX_PARTITIONS, RETENTION
    from cfi_pipelines.settings import child_environment

    n = args.campaigns
    now = utcnow()
    instance = local_instance()
    env = child_environment(PYTHONPATH=str(ROOT))
    proc = None
    try:
        t, _ = _timed(lambda: seed(n, now))
        print(f"MyCfia: {n} campaigns and their exports in {t:.1f} s", flush=True)
        _install_fast_seed()
        FAST_SEED["on"] = True
        t, _ = _timed(lambda: seed_instance(instance, n, args.materialized))
        FAST_SEED["on"] = False
        print(f"instance: {n} partitions and the delivered ones' materializations in {t:.1f} s",
              flush=True)  # fmt: skip
        proc, url = start_webserver(env, work)
        before = measure("before retention", instance, n, now, env, url)
        ticks, plans, deletes = run_retention(instance, now)
        print(
            f"retention: {ticks} ticks removing; plan (sensor evaluation) per tick median {statistics.median(plans):.3f} s "
            f"max {max(plans):.3f} s; deletes per tick (applied as the daemon does) median "
            f"{statistics.median(deletes) if deletes else 0:.2f} s max {max(deletes, default=0):.2f} s",
            flush=True,
        )
        after = measure("after retention", instance, n, now, env, url)
        bounded = after["partitions"] <= MAX_PARTITIONS
        print(
            f"partitions {before['partitions']} -> {after['partitions']} "
            f"(retention {RETENTION.days} days, cap {MAX_PARTITIONS}: "
            f"{'bounded' if bounded else 'NOT bounded'})"
        )
        ok = (
            after["sensor_tick_s"] < 1 and after["status_s"] < 2
            and after["graphql_first_s"] < 3 and bounded
        )  # fmt: skip
        print("targets after retention:", "met" if ok else "MISSED")
        return 0 if ok else 1
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
