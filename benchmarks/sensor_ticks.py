"""Seconds per sensor tick, against the issues' targets (run on demand).

    python benchmarks/sensor_ticks.py [--campaigns 10000] [--ticks 20]

- validated_campaigns_sensor with N campaigns in MyCfia's table: the ticks that
  drain the backlog, then a tick with one new campaign (target < 2 s per tick);
- view_lag_sensor with both databases healthy, with CFI's source on a dead port,
  and with the common DB on a dead port (target < 1 s per tick).

Timing lives here, not in the tests: a loaded CI machine must not fail a build.
Prints median and max per case and the ratio of the max to the target.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dagster as dg  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from cfi_pipelines.db import create_engine  # noqa: E402
from cfi_pipelines.devtools.seed import seed_source  # noqa: E402
from cfi_pipelines.devtools.seed_mycfia import add_campaign, valid_content  # noqa: E402
from cfi_pipelines.model import mycfia  # noqa: E402
from cfi_pipelines.resources.alerter import AlertsResource  # noqa: E402
from cfi_pipelines.resources.cfi_api import CfiApiResource  # noqa: E402
from cfi_pipelines.resources.databases import DatabaseResource  # noqa: E402
from cfi_pipelines.sensors.campaigns import build_campaigns_sensor  # noqa: E402
from cfi_pipelines.sensors.lag import build_view_lag_sensor  # noqa: E402
from cfi_pipelines.views.refresh import init_common, refresh_view  # noqa: E402
from cfi_pipelines.views.spec import VIEWS  # noqa: E402

T0 = datetime(2026, 1, 1)


def _timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def _dead_pg() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"postgresql+psycopg://x:y@127.0.0.1:{port}/none?connect_timeout=1"


def campaigns_case(work: Path, n: int) -> dict[str, list[float]]:
    url = f"sqlite:///{work}/mycfia.db"
    engine = create_engine(url)
    mycfia.metadata.create_all(engine)
    content = json.dumps(valid_content())
    rows = [
        dict(id=i, tenant_id=1, tenant_code="T001", name=f"C{i}", channel="email", status="validated",
             revision=1, validated_at=T0, content=content, created_at=T0,
             updated_at=T0 + timedelta(milliseconds=i))
        for i in range(1, n + 1)
    ]  # fmt: skip
    with engine.begin() as conn:
        conn.execute(sa.insert(mycfia.campaigns), rows)

    sensor = build_campaigns_sensor()
    instance = dg.DagsterInstance.ephemeral()

    def tick(cursor):
        ctx = dg.build_sensor_context(
            instance=instance, cursor=cursor, resources={"mycfia": DatabaseResource(url=url)}
        )
        return sensor(ctx)

    drain, cursor = [], None
    while True:
        took, result = _timed(lambda c=cursor: tick(c))
        drain.append(took)
        cursor = result.cursor
        if not result.run_requests:
            break
    with engine.begin() as conn:
        add_campaign(conn, n + 1, updated_at=T0 + timedelta(days=1))
    took, _ = _timed(lambda: tick(cursor))
    return {f"campaigns: drain {n}": drain, "campaigns: one new": [took]}


def lag_case(work: Path, ticks: int) -> dict[str, list[float]]:
    src_url, common_url = f"sqlite:///{work}/src.db", f"sqlite:///{work}/common.db"
    source, common = create_engine(src_url), create_engine(common_url)
    seed_source(source, scale=1)
    init_common(common)
    for spec in VIEWS:
        refresh_view(spec, source, common)
    sensor = build_view_lag_sensor()
    out = {}
    for name, s_url, c_url in (
        ("lag: healthy", src_url, common_url),
        ("lag: source down", _dead_pg(), common_url),
        ("lag: common down", src_url, _dead_pg()),
    ):
        resources = {
            "cfi_source": DatabaseResource(url=s_url),
            "cfi_common": DatabaseResource(url=c_url),
            "cfi_api": CfiApiResource(base_url="http://127.0.0.1:9", token="t"),
            "alerts": AlertsResource(state_path=str(work / "alerts.json")),
        }
        instance = dg.DagsterInstance.ephemeral()
        times, cursor = [], None
        for _ in range(ticks):
            ctx = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
            took, result = _timed(lambda ctx=ctx: sensor(ctx))
            cursor = result.cursor
            times.append(took)
        out[name] = times
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--campaigns", type=int, default=10_000)
    ap.add_argument("--ticks", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = {**campaigns_case(work, args.campaigns), **lag_case(work, args.ticks)}
    print(
        f"{'case':<26} {'ticks':>5} {'median s':>9} {'max s':>8} {'target':>7} {'max/target':>10}"
    )
    for name, times in results.items():
        target = 2.0 if name.startswith("campaigns") else 1.0
        worst = max(times)
        verdict = "ok" if worst < target else "MISS"
        print(
            f"{name:<26} {len(times):>5} {statistics.median(times):>9.3f} {worst:>8.3f} "
            f"{target:>7.1f} {worst / target:>9.2f}x {verdict}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
