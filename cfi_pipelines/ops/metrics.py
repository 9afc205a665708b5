"""Prometheus metrics for cfi-pipelines, computed at scrape time from the databases.

``cfi-pipelines metrics [--port P] [--host H]`` serves ``/metrics`` (default
``127.0.0.1:9464``). Nothing is kept in memory between scrapes except the probe
histogram: every scrape reads ``cfi_view_status`` / ``cfi_refresh_log`` in the
common DB and ``campaign_exports`` in MyCfia's DB, and times a tenant-scoped read
on the cache. Counters are totals over those tables (like ``pg_stat_*`` in a
database exporter), so they survive restarts of this process.

A scrape never fails because a database is down: the database's sections are
left out and ``cfi_up{db="…"}`` is 0. The series are listed in ``deploy/README.md``.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy.engine import Engine, make_url

from cfi_pipelines.clock import utcnow
from cfi_pipelines.db import engine_for
from cfi_pipelines.model import cfi_common as common
from cfi_pipelines.model import mycfia
from cfi_pipelines.settings import get_settings
from cfi_pipelines.views.spec import VIEWS

log = logging.getLogger(__name__)

DEFAULT_PORT = 9464
DEFAULT_HOST = "127.0.0.1"
CONNECT_TIMEOUT_S = 5
"""PostgreSQL connect timeout of the scrape: a black-holed host must not outlast Prometheus' scrape timeout."""

REFRESH_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
EXPORT_LATENCY_BUCKETS = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
READ_PROBE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
PROBE_LIMIT = 50
"""Rows a probe read fetches: about what an AI-chat tool reads for one answer."""


# --------------------------------------------------------------------------- helpers


def epoch(dt: datetime) -> float:
    """Seconds since the epoch of a naive-UTC datetime (as stored in the databases)."""
    return dt.replace(tzinfo=UTC).timestamp()


def scrape_engine(url: str) -> Engine | None:
    """A pooled engine for ``url`` fit for probing, or ``None`` when it cannot exist.

    A missing SQLite file is reported as down instead of being created empty, and
    PostgreSQL gets a connect timeout.
    """
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            return None
        if not Path(parsed.database).is_file():
            return None
    elif backend == "postgresql" and "connect_timeout" not in parsed.query:
        url = parsed.update_query_dict(
            {"connect_timeout": str(CONNECT_TIMEOUT_S)}
        ).render_as_string(hide_password=False)
    return engine_for(url)


def probe_tenant(conn: sa.Connection) -> int | None:
    """The tenant with the most descendants (the widest cascading read), or None."""
    c = common.cfi_tenant_closure.c
    return conn.scalar(
        sa.select(c.ancestor)
        .group_by(c.ancestor)
        .order_by(sa.func.count().desc(), c.ancestor)
        .limit(1)
    )


def probe_query(view: str, tenant: int) -> sa.Select:
    """The probe: a tenant-scoped read through ``cfi_tenant_closure``, as MyCfia does it."""
    t = common.VIEW_TABLES[view]
    c = common.cfi_tenant_closure.c
    return (
        sa.select(t)
        .where(t.c.tenant_id.in_(sa.select(c.descendant).where(c.ancestor == tenant)))
        .limit(PROBE_LIMIT)
    )


def probe_reads(
    conn: sa.Connection, views: Sequence[str], *, tenant: int | None = None, repeat: int = 1
) -> dict[str, list[float]]:
    """Time ``repeat`` probe reads of each existing view: ``{view: [seconds, …]}``.

    Only the query and the fetch are timed (the connection is already open, as in
    MyCfia's pooled backend). Views whose table does not exist yet are left out.
    """
    tenant = probe_tenant(conn) if tenant is None else tenant
    if tenant is None:
        return {}
    existing = set(sa.inspect(conn).get_table_names())
    out: dict[str, list[float]] = {}
    for view in views:
        if common.VIEW_TABLES[view].name not in existing:
            continue
        q = probe_query(view, tenant)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            conn.execute(q).fetchall()
            times.append(time.perf_counter() - t0)
        out[view] = times
    return out


def _buckets(
    values: Iterable[float], bounds: Sequence[float]
) -> tuple[list[tuple[str, float]], float]:
    """Cumulative Prometheus buckets (with +Inf) and the sum of ``values``."""
    counts = [0] * len(bounds)
    total, n = 0.0, 0
    for v in values:
        n += 1
        total += v
        for i, b in enumerate(bounds):
            if v <= b:
                counts[i] += 1
    return [(_le(b), float(c)) for b, c in zip(bounds, counts, strict=True)] + [
        ("+Inf", float(n))
    ], total


def _le(bound: float) -> str:
    return repr(float(bound))


# --------------------------------------------------------------------------- collector


@dataclass(frozen=True)
class MetricsConfig:
    """What the collector reads; :meth:`from_settings` takes it from the environment."""

    common_url: str
    mycfia_url: str
    source_url: str | None = None
    sftp_host: str | None = None
    sftp_port: int = 22
    probe_tenant: int | None = None
    capture_slot: str = "cfi_pipelines"

    @classmethod
    def from_settings(cls, probe_tenant: int | None = None) -> MetricsConfig:
        s = get_settings()
        return cls(
            common_url=s.common_url,
            mycfia_url=s.mycfia_url,
            source_url=s.source_url,
            # locally the embedded development server: cfi_sftp_up is always served
            sftp_host="127.0.0.1" if s.local else s.sftp_host,
            sftp_port=s.dev_sftp_port if s.local else s.sftp_port,
            probe_tenant=probe_tenant,
            capture_slot=s.capture_slot,
        )


@dataclass
class _ProbeHistogram:
    """Cumulative histogram of the probe reads made by this process (one per view)."""

    counts: dict[str, list[int]] = field(default_factory=dict)
    sums: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def observe(self, view: str, seconds: float) -> None:
        with self.lock:
            counts = self.counts.setdefault(view, [0] * (len(READ_PROBE_BUCKETS) + 1))
            for i, b in enumerate(READ_PROBE_BUCKETS):
                if seconds <= b:
                    counts[i] += 1
            counts[-1] += 1
            self.sums[view] = self.sums.get(view, 0.0) + seconds

    def family(self) -> HistogramMetricFamily:
        h = HistogramMetricFamily(
            "cfi_cache_read_probe_seconds",
            "Probe reads made by this exporter (one per view and scrape); "
            "rate(_sum)/rate(_count) is the average read latency.",
            labels=["view"],
        )
        with self.lock:
            for view, counts in sorted(self.counts.items()):
                buckets = [
                    (_le(b), float(c)) for b, c in zip(READ_PROBE_BUCKETS, counts, strict=False)
                ]
                h.add_metric([view], buckets + [("+Inf", float(counts[-1]))], self.sums[view])
        return h


class CfiCollector(Collector):
    """Reads the databases at every scrape and yields the ``cfi_*`` series."""

    def __init__(self, config: MetricsConfig, now: Callable[[], datetime] = utcnow) -> None:
        self.config = config
        self.now = now
        self._probes = _ProbeHistogram()

    def describe(self) -> list[Metric]:
        # Registering must not touch the databases (the default describe calls collect).
        return []

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        up = GaugeMetricFamily(
            "cfi_up", "1 when the database answered this scrape's reads, else 0.", labels=["db"]
        )
        families: list[Metric] = []
        sections: list[tuple[str, str | None, Callable[[Engine], list[Metric]]]] = [
            ("common", self.config.common_url, self._common),
            ("mycfia", self.config.mycfia_url, self._mycfia),
            ("source", self.config.source_url, self._source),
        ]
        for db, url, read in sections:
            if url is None:
                continue
            ok = False
            try:
                engine = scrape_engine(url)
                if engine is not None:
                    families.extend(read(engine))
                    ok = True
            except Exception as exc:  # a scrape must never fail: report the DB down instead
                log.warning("metrics: %s DB unreadable: %s: %s", db, type(exc).__name__, exc)
            up.add_metric([db], 1.0 if ok else 0.0)
        yield up
        yield self._sftp_up()  # always: an unset host is "down", never an empty panel
        yield from families
        yield self._probes.family()
        yield GaugeMetricFamily(
            "cfi_metrics_scrape_duration_seconds",
            "Time this exporter took to read the databases for this scrape.",
            value=time.perf_counter() - started,
        )

    # ----------------------------------------------------------------- sections

    def _ping(self, engine: Engine) -> list[Metric]:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return []

    def _source(self, engine: Engine) -> list[Metric]:
        """CFI's source answers; on PostgreSQL, the WAL its logical replication slot keeps
        (``CFI_CAPTURE_SLOT``; nothing when there is no slot): one catalog view read."""
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
            if conn.dialect.name != "postgresql":
                return []
            row = conn.execute(
                sa.text(
                    "SELECT (pg_current_wal_lsn() - restart_lsn)::bigint AS retained, wal_status "
                    "FROM pg_replication_slots WHERE slot_name = :s"
                ),
                {"s": self.config.capture_slot},
            ).first()
        if row is None:
            return []
        retained = GaugeMetricFamily(
            "cfi_capture_slot_retained_wal_bytes",
            "WAL CFI's source server keeps for the change capture's logical replication slot "
            "(pg_current_wal_lsn() - restart_lsn).",
            labels=["slot"],
        )
        retained.add_metric([self.config.capture_slot], float(row.retained or 0))
        lost = GaugeMetricFamily(
            "cfi_capture_slot_lost",
            "1 when the change capture's slot was invalidated (wal_status lost): the views get "
            "a full refresh and a new slot.",
            labels=["slot"],
        )
        lost.add_metric([self.config.capture_slot], 1.0 if row.wal_status == "lost" else 0.0)
        return [retained, lost]

    def _common(self, engine: Engine) -> list[Metric]:
        now = self.now()
        views = [v.name for v in VIEWS]
        lg = common.cfi_refresh_log.c
        with engine.connect() as conn:
            status = {r.view: r for r in conn.execute(sa.select(common.cfi_view_status))}
            counts = conn.execute(
                sa.select(lg.view, lg.source, lg.mode, lg.outcome, sa.func.count())
                .group_by(lg.view, lg.source, lg.mode, lg.outcome)
                .order_by(lg.view, lg.source, lg.mode, lg.outcome)
            ).all()
            ok = lg.outcome == "success"
            bucket_cols = [
                sa.func.sum(sa.case((lg.duration_s <= b, 1), else_=0)) for b in REFRESH_BUCKETS
            ]
            durations = conn.execute(
                sa.select(
                    lg.view,
                    lg.source,
                    sa.func.count(),
                    sa.func.coalesce(sa.func.sum(lg.duration_s), 0.0),
                    *bucket_cols,
                )
                .where(ok, lg.duration_s.is_not(None))
                .group_by(lg.view, lg.source)
                .order_by(lg.view, lg.source)
            ).all()
            probes = probe_reads(conn, views, tenant=self.config.probe_tenant)

        lag = GaugeMetricFamily(
            "cfi_view_lag_seconds",
            "now - source_snapshot_at (the time the view's data is as of); +Inf if never refreshed.",
            labels=["view"],
        )
        rows = GaugeMetricFamily("cfi_view_rows", "Rows in the view.", labels=["view"])
        fallback = GaugeMetricFamily(
            "cfi_view_fallback_active",
            "1 when the view currently holds a snapshot from the CFI API (source=cfi_api).",
            labels=["view"],
        )
        failures = GaugeMetricFamily(
            "cfi_view_consecutive_failures",
            "Failed refresh attempts since the last success.",
            labels=["view"],
        )
        last_success = GaugeMetricFamily(
            "cfi_view_last_success_timestamp_seconds",
            "When the view was last swapped in successfully (Unix time).",
            labels=["view"],
        )
        last_duration = GaugeMetricFamily(
            "cfi_refresh_last_duration_seconds",
            "Duration of the view's last successful refresh.",
            labels=["view"],
        )
        for view in views:
            st = status.get(view)
            snap = st.source_snapshot_at if st is not None else None
            lag.add_metric([view], (now - snap).total_seconds() if snap else float("inf"))
            rows.add_metric([view], float((st.rows if st is not None else 0) or 0))
            fallback.add_metric([view], 1.0 if st is not None and st.source == "cfi_api" else 0.0)
            failures.add_metric([view], float((st.consecutive_failures if st else 0) or 0))
            if st is not None and st.last_success_at is not None:
                last_success.add_metric([view], epoch(st.last_success_at))
            if st is not None and st.duration_s is not None:
                last_duration.add_metric([view], float(st.duration_s))

        refreshes = CounterMetricFamily(
            "cfi_refreshes",
            "Refresh attempts in cfi_refresh_log by outcome (success/failed/refused); "
            "source=cfi_api are the fallback snapshots.",
            labels=["view", "source", "mode", "outcome"],
        )
        for view, source, mode, outcome, n in counts:
            refreshes.add_metric([view, source, mode, outcome], float(n))

        hist = HistogramMetricFamily(
            "cfi_refresh_duration_seconds",
            "Durations of the successful refreshes in cfi_refresh_log.",
            labels=["view", "source"],
        )
        for view, source, n, total, *cum in durations:
            buckets = [(_le(b), float(c or 0)) for b, c in zip(REFRESH_BUCKETS, cum, strict=True)]
            hist.add_metric([view, source], buckets + [("+Inf", float(n))], float(total))

        latency = GaugeMetricFamily(
            "cfi_cache_read_latency_seconds",
            f"Time of one tenant-scoped read ({PROBE_LIMIT} rows through cfi_tenant_closure) "
            "on the cache, measured by this scrape.",
            labels=["view"],
        )
        for view, times in probes.items():
            latency.add_metric([view], times[0])
            self._probes.observe(view, times[0])

        return [
            lag,
            rows,
            fallback,
            failures,
            last_success,
            last_duration,
            refreshes,
            hist,
            latency,
        ]

    def _mycfia(self, engine: Engine) -> list[Metric]:
        now = self.now()
        t = mycfia.campaign_exports
        e = t.c
        with engine.connect() as conn:
            latest = (
                sa.select(e.campaign_id, sa.func.max(e.revision).label("revision"))
                .group_by(e.campaign_id)
                .subquery()
            )
            by_status = dict(
                conn.execute(
                    sa.select(e.status, sa.func.count())
                    .select_from(
                        t.join(
                            latest,
                            (latest.c.campaign_id == e.campaign_id)
                            & (latest.c.revision == e.revision),
                        )
                    )
                    .group_by(e.status)
                ).all()
            )
            attempts, delivered_bytes = conn.execute(
                sa.select(
                    sa.func.coalesce(sa.func.sum(e.attempts), 0),
                    sa.func.coalesce(
                        sa.func.sum(
                            sa.case(
                                (
                                    e.status == "delivered",
                                    sa.func.coalesce(e.json_bytes, 0)
                                    + sa.func.coalesce(e.csv_bytes, 0),
                                ),
                                else_=0,
                            )
                        ),
                        0,
                    ),
                )
            ).one()
            delivered = conn.execute(
                sa.select(e.validated_at, e.delivered_at).where(
                    e.status == "delivered",
                    e.validated_at.is_not(None),
                    e.delivered_at.is_not(None),
                )
            ).all()
            oldest_pending = conn.scalar(
                sa.select(sa.func.min(e.requested_at)).where(e.status == "pending")
            )

        exports = GaugeMetricFamily(
            "cfi_exports",
            "Campaign exports by status (latest revision of each campaign): pending, delivered, "
            "failed (after its retries), rejected (invalid against the JSON Schema).",
            labels=["status"],
        )
        for status in mycfia.EXPORT_STATUSES:
            exports.add_metric([status], float(by_status.get(status, 0)))
        attempts_total = CounterMetricFamily(
            "cfi_export_attempts",
            "SFTP delivery attempts (retries included).",
            value=float(attempts),
        )
        bytes_total = CounterMetricFamily(
            "cfi_sftp_delivered_bytes",
            "Bytes (JSON + CSV) of the delivered exports, each (campaign, revision) once.",
            value=float(delivered_bytes),
        )
        buckets, total = _buckets(
            (max(0.0, (d - v).total_seconds()) for v, d in delivered), EXPORT_LATENCY_BUCKETS
        )
        latency = HistogramMetricFamily(
            "cfi_export_latency_seconds",
            "Validation of a campaign -> its files delivered on CFI's SFTP server.",
            buckets=buckets,
            sum_value=total,
        )
        pending_age = GaugeMetricFamily(
            "cfi_export_oldest_pending_age_seconds",
            "Age of the oldest pending export (0 when none).",
            value=max(0.0, (now - oldest_pending).total_seconds()) if oldest_pending else 0.0,
        )
        return [exports, attempts_total, bytes_total, latency, pending_age]

    def _sftp_up(self) -> GaugeMetricFamily:
        """TCP connect and SSH banner of CFI's SFTP server (no login)."""
        host, port = self.config.sftp_host or "", self.config.sftp_port
        ok = 0.0
        if not host:
            log.warning("metrics: no SFTP host configured (CFI_SFTP_HOST): cfi_sftp_up 0")
            return GaugeMetricFamily(
                "cfi_sftp_up",
                "1 when CFI's SFTP server accepted a TCP connection and sent an SSH banner.",
                value=0.0,
            )
        try:
            with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S) as sock:
                sock.settimeout(CONNECT_TIMEOUT_S)
                ok = 1.0 if sock.recv(64).startswith(b"SSH-") else 0.0
        except OSError as exc:
            log.warning("metrics: SFTP %s:%s unreachable: %s", host, port, exc)
        return GaugeMetricFamily(
            "cfi_sftp_up",
            "1 when CFI's SFTP server accepted a TCP connection and sent an SSH banner.",
            value=ok,
        )


# --------------------------------------------------------------------------- server


@dataclass
class MetricsServer:
    """A running ``/metrics`` endpoint (its own registry); :meth:`close` stops it."""

    host: str
    port: int
    registry: CollectorRegistry
    _httpd: object
    _thread: threading.Thread

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()  # type: ignore[attr-defined]
        self._httpd.server_close()  # type: ignore[attr-defined]
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_metrics_server(
    port: int = DEFAULT_PORT,
    host: str = DEFAULT_HOST,
    config: MetricsConfig | None = None,
    now: Callable[[], datetime] = utcnow,
) -> MetricsServer:
    """Serve the ``cfi_*`` metrics in a background thread (``port=0``: a free port)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CfiCollector(config or MetricsConfig.from_settings(), now=now))
    httpd, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(host, httpd.server_port, registry, httpd, thread)


def serve_metrics(
    *, port: int = DEFAULT_PORT, host: str = DEFAULT_HOST, probe_tenant: int | None = None
) -> int:
    """``cfi-pipelines metrics``: serve until Ctrl-C; 1 when the port cannot be bound."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        server = start_metrics_server(
            port, host, MetricsConfig.from_settings(probe_tenant=probe_tenant)
        )
    except OSError as exc:
        print(f"error: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 1
    try:  # entered before the banner: a stop signal right after it is a clean stop too
        print(f"serving Prometheus metrics on {server.url} (Ctrl-C to stop)", flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (`cfi-pipelines metrics` maps it)
        pass
    finally:
        server.close()
    return 0
