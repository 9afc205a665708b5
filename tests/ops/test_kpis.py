"""``cfi-pipelines kpis``: the freshness arithmetic, then the whole report over real
SQLite databases holding a known history (refresh log and campaign exports)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from cfi_pipelines.cli import main as cli_main
from cfi_pipelines.clock import utcnow
from cfi_pipelines.db import create_engine
from cfi_pipelines.devtools.postgres import free_port
from cfi_pipelines.model import cfi_common as common
from cfi_pipelines.model import mycfia
from cfi_pipelines.ops.kpis import collect_kpis, freshness_over, percentile
from cfi_pipelines.views.refresh import refresh_view
from cfi_pipelines.views.spec import VIEWS
from tests.fixtures.common import Databases

T = datetime(2031, 5, 1, 12, 0, 0)
MIN = timedelta(minutes=1)


def at(minutes: float) -> datetime:
    return T + minutes * MIN


# --------------------------------------------------------------------------- arithmetic


def test_refreshes_every_5_minutes_average_2_5_minutes_of_age_and_no_incident() -> None:
    successes = [(at(m), at(m)) for m in range(-60, 61, 5)]
    f = freshness_over(successes, at(0), at(60))
    assert f.covered_s == 3600
    assert f.average_age_s == pytest.approx(150)
    assert f.max_age_s == pytest.approx(300)
    assert (f.incidents, f.incident_s) == (0, 0)


def test_a_gap_is_one_incident_lasting_from_15_minutes_of_age_to_the_next_refresh() -> None:
    successes = [(at(0), at(0)), (at(5), at(5)), (at(30), at(30)), (at(35), at(35))]
    f = freshness_over(successes, at(0), at(40))
    assert f.max_age_s == pytest.approx(25 * 60)
    assert f.incidents == 1
    assert f.incident_s == pytest.approx(10 * 60)  # age > 15 min from t=20 to t=30


def test_a_fallback_with_an_old_snapshot_continues_the_incident() -> None:
    # at t=20 the API snapshot is as of t=2 (still > 15 min old); the DB is back at t=25
    successes = [(at(0), at(0)), (at(20), at(2)), (at(25), at(25))]
    f = freshness_over(successes, at(0), at(30))
    assert f.incidents == 1
    assert f.incident_s == pytest.approx(10 * 60)  # t=15 → 25


def test_time_before_the_first_known_refresh_is_not_counted() -> None:
    f = freshness_over([(at(30), at(29))], at(0), at(60))
    assert f.covered_s == 30 * 60
    assert f.average_age_s == pytest.approx(60 + 15 * 60)
    assert f.incidents == 1  # the view reached 15 min of age at t=44
    assert freshness_over([], at(0), at(60)).average_age_s is None


def test_percentile_is_nearest_rank() -> None:
    assert percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 95) == 10
    assert percentile([5.0], 95) == 5.0
    assert percentile(list(range(1, 101)), 95) == 95


# --------------------------------------------------------------------------- report


def _history(dbs: Databases, home: Path, now: datetime, *, bad: bool) -> None:
    """3 h of refreshes every 5 min, fallback snapshots and campaign exports.

    ``bad``: stocks misses its refreshes for 40 min, 1 fallback in 10 fails, one
    export in 50 fails after its retries and one is stuck pending for 2 h.
    """
    log = []
    for spec in VIEWS:
        for k in range(36):
            finished = now - timedelta(minutes=5 * k)
            if bad and spec.name == "stocks" and 50 <= 5 * k <= 90:
                continue
            log.append(
                {
                    "view": spec.name,
                    "started_at": finished - timedelta(seconds=3),
                    "finished_at": finished,
                    "source_snapshot_at": finished - timedelta(seconds=3),
                    "mode": "incremental",
                    "source": "db",
                    "outcome": "success",
                    "duration_s": 3.0,
                }
            )
    for k in range(10):
        failed = bad and k == 0
        log.append(
            {
                "view": "invoices",
                "started_at": now - timedelta(minutes=90 + k),
                "finished_at": now - timedelta(minutes=90 + k) + timedelta(seconds=20),
                "source_snapshot_at": None if failed else now - timedelta(hours=4),
                "mode": "full",
                "source": "cfi_api",
                "outcome": "failed" if failed else "success",
                "duration_s": 20.0,
            }
        )
    with dbs.common.begin() as conn:
        conn.execute(sa.insert(common.cfi_refresh_log), log)

    exports = []
    for cid in range(1, 51):
        validated = now - timedelta(hours=1, minutes=cid)
        failed = bad and cid == 1
        exports.append(
            {
                "campaign_id": cid,
                "revision": 1,
                "status": "failed" if failed else "delivered",
                "attempts": 4 if failed else 1,
                "validated_at": validated,
                "requested_at": validated + timedelta(seconds=5),
                "delivered_at": None if failed else validated + timedelta(seconds=60 + cid),
                "updated_at": validated + timedelta(seconds=60),
            }
        )
    if bad:
        exports.append(
            {
                "campaign_id": 99,
                "revision": 1,
                "status": "pending",
                "attempts": 1,
                "validated_at": now - timedelta(hours=2),
                "requested_at": now - timedelta(hours=2),
                "delivered_at": None,
                "updated_at": now - timedelta(hours=2),
            }
        )
    engine = create_engine(f"sqlite:///{home}/mycfia.db")
    mycfia.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(mycfia.campaign_exports), exports)
    engine.dispose()


def _by_name(report: dict) -> dict[str, dict]:
    return {k["name"]: k for k in report["kpis"]}


@pytest.fixture
def views_refreshed(sqlite_dbs: Databases) -> Databases:
    """The four views really refreshed (the read-latency probe needs their tables)."""
    for spec in VIEWS:
        refresh_view(spec, sqlite_dbs.source, sqlite_dbs.common)
    return sqlite_dbs


def test_a_healthy_history_meets_every_target(
    views_refreshed: Databases, cfi_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    now = utcnow()
    _history(views_refreshed, cfi_home, now, bad=False)
    report = collect_kpis(timedelta(hours=2), now=now)
    k = _by_name(report)
    assert {n: v["status"] for n, v in k.items()} == {
        "freshness": "OK",
        "lag incidents": "OK",
        "fallback success": "OK",
        "SFTP export latency": "OK",
        "SFTP export success": "OK",
        "campaign export success": "OK",
        "read latency": "OK",
    }
    assert k["freshness"]["value"] == pytest.approx(150 + 3, abs=5)  # the sawtooth's mean
    assert k["SFTP export latency"]["value"] == pytest.approx(60 + 48)  # p95 of 61..110 s
    assert k["SFTP export success"]["value"] == 1.0
    assert k["fallback success"]["value"] == 1.0
    assert 0 < k["read latency"]["value"] < 0.05
    assert report["exit_code"] == 0

    assert cli_main(["kpis", "--window-hours", "2"]) == 0
    out = capsys.readouterr().out
    assert "freshness" in out and "read latency" in out and "MISS" not in out


def test_a_bad_history_misses_targets_and_exits_1(
    views_refreshed: Databases, cfi_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    now = utcnow()
    _history(views_refreshed, cfi_home, now, bad=True)
    k = _by_name(collect_kpis(timedelta(hours=3), now=now))
    assert k["lag incidents"]["status"] == "MISS"
    assert k["lag incidents"]["value"] == 1
    # stocks: last refresh before the gap at -95 min, next at -45 min → > 15 min from -80 to -45
    assert k["lag incidents"]["details"]["stocks"]["incident_s"] == pytest.approx(35 * 60, abs=5)
    assert k["fallback success"]["status"] == "MISS"  # 9/10 < 95 %
    assert k["fallback success"]["value"] == pytest.approx(0.9)
    assert k["SFTP export success"]["status"] == "MISS"  # 49/50 = 98 %
    assert k["SFTP export success"]["value"] == pytest.approx(0.98)
    assert k["campaign export success"]["status"] == "MISS"  # 49/51: one failed, one stuck
    assert k["campaign export success"]["details"]["stuck_pending"] == 1
    assert k["SFTP export latency"]["status"] == "OK"

    assert cli_main(["kpis", "--json", "--window-hours", "3"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["exit_code"] == 1
    assert _by_name(report)["lag incidents"]["status"] == "MISS"


def test_no_data_is_not_a_miss(sqlite_dbs: Databases, cfi_home: Path) -> None:
    engine = create_engine(f"sqlite:///{cfi_home}/mycfia.db")
    mycfia.metadata.create_all(engine)
    engine.dispose()
    report = collect_kpis()
    assert {k["status"] for k in report["kpis"]} == {"NO DATA"}
    assert report["exit_code"] == 0


def test_an_unreachable_database_is_an_error_not_a_crash(
    sqlite_dbs: Databases, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CFI_COMMON_URL", f"postgresql+psycopg://cfi:x@127.0.0.1:{free_port()}/c")
    report = collect_kpis()
    k = _by_name(report)
    for name in ("freshness", "lag incidents", "fallback success", "read latency"):
        assert k[name]["status"] == "ERROR"
        assert "common DB unreadable" in k[name]["measured"]
    # MyCfia's DB does not exist either (never seeded): an error too, named
    assert k["SFTP export success"]["status"] == "ERROR"
    assert report["exit_code"] == 1
