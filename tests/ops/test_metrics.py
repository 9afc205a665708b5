"""The Prometheus endpoint: a real HTTP server on a free port, scraped and parsed
with prometheus_client's own parser, over seeded SQLite databases (and the common
and MyCfia DBs on the suite's PostgreSQL, for the SQL's portability)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from cfi_pipelines.clock import utcnow
from cfi_pipelines.db import create_engine
from cfi_pipelines.devtools.postgres import free_port
from cfi_pipelines.model import cfi_common as common
from cfi_pipelines.model import mycfia
from cfi_pipelines.ops.metrics import MetricsConfig, start_metrics_server
from cfi_pipelines.views.refresh import init_common, read_status, refresh_view
from cfi_pipelines.views.spec import VIEWS
from tests.fixtures.common import Databases
from tests.fixtures.processes import stop_process

Samples = dict[tuple[str, frozenset], float]

T0 = datetime(2031, 3, 2, 10, 0, 0)


def scrape(url: str) -> tuple[str, Samples]:
    """GET /metrics, parse it, return (content type, {(sample name, labels): value})."""
    r = httpx.get(url, timeout=10)
    assert r.status_code == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return r.headers["content-type"], samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def add_exports(engine: sa.Engine, now: datetime) -> None:
    """Exports whose metrics are known: latest revisions delivered 3, failed 1, rejected 1, pending 1."""
    mycfia.metadata.create_all(engine)

    def row(cid: int, rev: int, status: str, attempts: int, **kw) -> dict:
        base = {
            "campaign_id": cid,
            "revision": rev,
            "status": status,
            "attempts": attempts,
            "json_bytes": None,
            "csv_bytes": None,
            "validated_at": T0,
            "delivered_at": None,
            "requested_at": T0,
            "updated_at": T0,
        }
        return {**base, **kw}

    rows = [
        row(
            1,
            1,
            "delivered",
            1,
            json_bytes=1000,
            csv_bytes=500,
            delivered_at=T0 + timedelta(seconds=40),
        ),
        row(
            2,
            1,
            "delivered",
            3,
            json_bytes=200,
            csv_bytes=100,
            delivered_at=T0 + timedelta(seconds=400),
        ),
        row(3, 1, "failed", 4),
        # campaign 4: revision 1 failed, then revision 2 delivered: only r2 counts in cfi_exports
        row(4, 1, "failed", 4),
        row(
            4,
            2,
            "delivered",
            1,
            json_bytes=10,
            csv_bytes=5,
            delivered_at=T0 + timedelta(seconds=10),
        ),
        row(5, 1, "rejected", 0),
        row(6, 1, "pending", 1, requested_at=now - timedelta(seconds=120)),
    ]
    with engine.begin() as conn:
        conn.execute(sa.insert(mycfia.campaign_exports), rows)


def log_extra_attempts(engine: sa.Engine, now: datetime) -> None:
    """One failed DB refresh and two fallback snapshots (one failed) in the refresh log."""
    rows = [
        ("stocks", "db", "incremental", "failed", 2.0),
        ("stocks", "cfi_api", "full", "success", 7.0),
        ("invoices", "cfi_api", "full", "failed", 1.0),
    ]
    with engine.begin() as conn:
        conn.execute(
            sa.insert(common.cfi_refresh_log),
            [
                {
                    "view": v,
                    "source": src,
                    "mode": mode,
                    "outcome": outcome,
                    "duration_s": d,
                    "started_at": now - timedelta(minutes=30),
                    "finished_at": now - timedelta(minutes=30) + timedelta(seconds=d),
                }
                for v, src, mode, outcome, d in rows
            ],
        )


@pytest.fixture
def refreshed(sqlite_dbs: Databases, cfi_home: Path) -> Iterator[tuple[Databases, str]]:
    """Seeded SQLite DBs with the four views refreshed, plus a MyCfia DB with exports."""
    for spec in VIEWS:
        refresh_view(spec, sqlite_dbs.source, sqlite_dbs.common)
    log_extra_attempts(sqlite_dbs.common, utcnow())
    mycfia_url = f"sqlite:///{cfi_home}/mycfia.db"
    engine = create_engine(mycfia_url)
    add_exports(engine, utcnow())
    engine.dispose()
    yield sqlite_dbs, mycfia_url


def test_a_scrape_reports_views_refreshes_exports_and_read_latency(refreshed) -> None:
    dbs, mycfia_url = refreshed
    now = utcnow() + timedelta(seconds=100)  # a fixed clock: lags are exact
    config = MetricsConfig(
        common_url=dbs.common_url, mycfia_url=mycfia_url, source_url=dbs.source_url
    )
    with start_metrics_server(port=0, config=config, now=lambda: now) as server:
        content_type, m = scrape(server.url)
        _, again = scrape(server.url)

    assert content_type.startswith("text/plain")
    for db in ("common", "mycfia", "source"):
        assert value(m, "cfi_up", db=db) == 1.0

    status = read_status(dbs.common)
    for spec in VIEWS:
        st = status[spec.name]
        expected_lag = (now - st["source_snapshot_at"]).total_seconds()
        assert value(m, "cfi_view_lag_seconds", view=spec.name) == pytest.approx(expected_lag)
        assert 100 <= expected_lag < 160
        assert value(m, "cfi_view_rows", view=spec.name) == st["rows"] > 0
        assert value(m, "cfi_view_fallback_active", view=spec.name) == 0.0
        assert value(m, "cfi_refresh_last_duration_seconds", view=spec.name) == pytest.approx(
            st["duration_s"]
        )
        assert (
            value(
                m,
                "cfi_refreshes_total",
                view=spec.name,
                source="db",
                mode="full",
                outcome="success",
            )
            == 1
        )
        # one successful DB refresh per view in the duration histogram
        assert value(m, "cfi_refresh_duration_seconds_count", view=spec.name, source="db") == 1
        assert (
            value(m, "cfi_refresh_duration_seconds_bucket", view=spec.name, source="db", le="+Inf")
            == 1
        )
        latency = value(m, "cfi_cache_read_latency_seconds", view=spec.name)
        assert 0 < latency < 0.5
        # the probe histogram accumulates across scrapes (one probe per view and scrape)
        assert value(again, "cfi_cache_read_probe_seconds_count", view=spec.name) == 2

    # failures and fallbacks, by outcome and source
    assert (
        value(
            m,
            "cfi_refreshes_total",
            view="stocks",
            source="db",
            mode="incremental",
            outcome="failed",
        )
        == 1
    )
    assert (
        value(
            m,
            "cfi_refreshes_total",
            view="stocks",
            source="cfi_api",
            mode="full",
            outcome="success",
        )
        == 1
    )
    assert (
        value(
            m,
            "cfi_refreshes_total",
            view="invoices",
            source="cfi_api",
            mode="full",
            outcome="failed",
        )
        == 1
    )
    # a failed attempt is not in the duration histogram; a successful fallback is, with its source
    assert value(m, "cfi_refresh_duration_seconds_sum", view="stocks", source="cfi_api") == 7.0
    assert (
        value(m, "cfi_refresh_duration_seconds_bucket", view="stocks", source="cfi_api", le="5.0")
        == 0
    )
    assert (
        value(m, "cfi_refresh_duration_seconds_bucket", view="stocks", source="cfi_api", le="10.0")
        == 1
    )
    assert (
        "cfi_refresh_duration_seconds_count",
        frozenset({("view", "invoices"), ("source", "cfi_api")}),
    ) not in m

    # exports: latest revision of each campaign
    assert value(m, "cfi_exports", status="delivered") == 3
    assert value(m, "cfi_exports", status="failed") == 1
    assert value(m, "cfi_exports", status="rejected") == 1
    assert value(m, "cfi_exports", status="pending") == 1
    assert value(m, "cfi_export_attempts_total") == 1 + 3 + 4 + 4 + 1 + 0 + 1
    assert value(m, "cfi_sftp_delivered_bytes_total") == 1500 + 300 + 15
    assert value(m, "cfi_export_latency_seconds_count") == 3
    assert value(m, "cfi_export_latency_seconds_sum") == 40 + 400 + 10
    assert value(m, "cfi_export_latency_seconds_bucket", le="30.0") == 1
    assert value(m, "cfi_export_latency_seconds_bucket", le="300.0") == 2
    assert value(m, "cfi_export_latency_seconds_bucket", le="600.0") == 3
    assert value(m, "cfi_export_oldest_pending_age_seconds") == pytest.approx(220, abs=2)


def test_a_view_never_refreshed_lags_infinitely(sqlite_dbs: Databases) -> None:
    config = MetricsConfig(common_url=sqlite_dbs.common_url, mycfia_url=sqlite_dbs.common_url)
    with start_metrics_server(port=0, config=config) as server:
        _, m = scrape(server.url)
    assert value(m, "cfi_up", db="common") == 1
    assert value(m, "cfi_view_lag_seconds", view="stocks") == float("inf")
    assert value(m, "cfi_view_rows", view="stocks") == 0
    # no view table yet: nothing to probe
    assert ("cfi_cache_read_latency_seconds", frozenset({("view", "stocks")})) not in m
    # the common DB has no campaign_exports: that "MyCfia DB" is reported down, not a crash
    assert value(m, "cfi_up", db="mycfia") == 0


def test_an_unreachable_common_db_is_reported_down_not_a_failed_scrape(
    refreshed, tmp_path: Path
) -> None:
    _, mycfia_url = refreshed
    missing = tmp_path / "nowhere" / "cfi_common.db"
    for common_url in (
        f"postgresql+psycopg://cfi:secret@127.0.0.1:{free_port()}/common",  # nothing listens
        f"sqlite:///{missing}",
    ):
        config = MetricsConfig(common_url=common_url, mycfia_url=mycfia_url)
        with start_metrics_server(port=0, config=config) as server:
            _, m = scrape(server.url)
        assert value(m, "cfi_up", db="common") == 0
        assert value(m, "cfi_up", db="mycfia") == 1
        assert not any(name == "cfi_view_lag_seconds" for name, _ in m)
        assert value(m, "cfi_exports", status="delivered") == 3
    assert not missing.parent.exists(), "a scrape must not create an empty SQLite DB"


@pytest.mark.postgres
def test_the_queries_run_on_postgresql(postgres, pg_url: str) -> None:
    """Common and MyCfia DBs on PostgreSQL (status and log rows written directly)."""
    mycfia_url = postgres.create_database(pg_url.rsplit("/", 1)[1] + "_mycfia")
    engine, m_engine = create_engine(pg_url), create_engine(mycfia_url)
    now = utcnow()
    init_common(engine)
    with engine.begin() as conn:
        conn.execute(
            common.cfi_view_status.update()
            .where(common.cfi_view_status.c.view == "operations")
            .values(source_snapshot_at=now - timedelta(minutes=20), rows=12, source="cfi_api")
        )
    log_extra_attempts(engine, now)
    add_exports(m_engine, now)
    engine.dispose()
    m_engine.dispose()

    config = MetricsConfig(common_url=pg_url, mycfia_url=mycfia_url)
    with start_metrics_server(port=0, config=config, now=lambda: now) as server:
        _, m = scrape(server.url)
    assert value(m, "cfi_up", db="common") == 1
    assert value(m, "cfi_up", db="mycfia") == 1
    assert value(m, "cfi_view_lag_seconds", view="operations") == pytest.approx(1200)
    assert value(m, "cfi_view_fallback_active", view="operations") == 1
    assert (
        value(m, "cfi_refresh_duration_seconds_bucket", view="stocks", source="cfi_api", le="10.0")
        == 1
    )
    assert value(m, "cfi_exports", status="delivered") == 3
    assert value(m, "cfi_sftp_delivered_bytes_total") == 1815
    assert value(m, "cfi_export_latency_seconds_bucket", le="300.0") == 2


def test_the_command_serves_metrics_until_stopped(refreshed) -> None:
    """The command in a subprocess (``--port 0``): it prints its URL, then serves."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cfi_pipelines.cli", "metrics", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the server is listening
        assert line.startswith("serving Prometheus metrics on http://127.0.0.1:"), (
            line + proc.stderr.read()
        )
        url = line.split()[4]
        _, m = scrape(url)
        assert value(m, "cfi_up", db="common") == 1
        assert value(m, "cfi_exports", status="delivered") == 3
    finally:
        stop_process(proc)


def test_sftp_up_is_always_served_even_with_no_host(sqlite_dbs: Databases, monkeypatch) -> None:
    """The Grafana "SFTP server" panel and CfiSftpDown need the series in every environment:
    locally it probes the embedded server (0 when it is not running, 1 when it is)."""
    from cfi_pipelines.devtools.sftp_server import DevSFTPServer

    monkeypatch.delenv("CFI_SFTP_HOST", raising=False)
    monkeypatch.setenv("CFI_SFTP_PORT", str(free_port()))
    config = MetricsConfig.from_settings()
    with start_metrics_server(port=0, config=config) as server:
        _, m = scrape(server.url)
    assert value(m, "cfi_sftp_up") == 0
    dev = DevSFTPServer(port=0)
    try:
        monkeypatch.setenv("CFI_SFTP_PORT", str(dev.port))
        with start_metrics_server(port=0, config=MetricsConfig.from_settings()) as server:
            _, m = scrape(server.url)
        assert value(m, "cfi_sftp_up") == 1
    finally:
        dev.stop()
    # production with the host missing from the config: still served, as down
    bare = MetricsConfig(common_url=sqlite_dbs.common_url, mycfia_url=sqlite_dbs.common_url)
    with start_metrics_server(port=0, config=bare) as s:
        _, m = scrape(s.url)
    assert value(m, "cfi_sftp_up") == 0
