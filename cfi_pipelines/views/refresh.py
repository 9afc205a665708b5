"""Refreshing a view of the common DB: plain functions, no Dagster.

Full refresh: load a staging table (through the fastest path the two databases
offer), build its indexes and statistics, check the row-count guard, then swap it
in with one short transaction that also records the status. Readers see the old
complete view or the new complete view, never a partial or empty one; a refresh
that fails at any point leaves the live view untouched and records the error.

Incremental refresh: the rows changed since the last watermark (minus an overlap
window, so late-committing rows are not missed) are loaded into a delta table and
upserted in one transaction (ON CONFLICT on SQLite/PostgreSQL, MERGE on SQL
Server). Parents whose aggregates a change left (a child moved to another parent
or deleted) are found by comparing the cached aggregates with the source's
(:func:`stale_keys`) and reloaded in the same delta. View rows whose own source
row was deleted are found by :func:`cfi_pipelines.views.reconcile.deleted_keys`
(skipped at the cost of one count per side when the cache has no more rows than
the source) and deleted in the refresh's last transaction.

The steps live in their own modules: :mod:`~cfi_pipelines.views.load` (work tables,
load paths, indexes, counts), :mod:`~cfi_pipelines.views.swap` (guard, renames,
lock waits), :mod:`~cfi_pipelines.views.incremental` (delta, upsert, stale parents),
:mod:`~cfi_pipelines.views.status` (status, history, tenant closure) and
:mod:`~cfi_pipelines.views.result` (what a refresh returns and raises). This module
owns the entry point, :func:`refresh_view`, and re-exports the names the rest of the
package imports from here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from datetime import timedelta
from typing import Literal

from sqlalchemy.engine import Engine

from cfi_pipelines.clock import utcnow
from cfi_pipelines.tenancy.roles import sync_after_refresh
from cfi_pipelines.views.apply import NeedsFullRefresh, apply_view
from cfi_pipelines.views.capture import Capture, CaptureLost, CaptureUnavailable, capture_for
from cfi_pipelines.views.diagnosis import DiagnosedFailure, diagnose
from cfi_pipelines.views.incremental import (
    _high_watermark,
    _incremental,
    stale_keys,
    upsert_statement,
)
from cfi_pipelines.views.load import Loader, _table_exists, source_loader
from cfi_pipelines.views.positions import forget_positions, read_positions, store_position
from cfi_pipelines.views.result import (
    DEFAULT_MAX_DROP_SHARE,
    RefreshError,
    RefreshRefused,
    RefreshResult,
)
from cfi_pipelines.views.spec import ViewSpec
from cfi_pipelines.views.status import (
    _read_closure,
    init_common,
    read_status,
    record_failure,
    tenant_closure,
)
from cfi_pipelines.views.swap import (
    SwapLockTimeout,
    copy_grants_sql,
    swap_in,
    swap_statements,
)

__all__ = [
    "DEFAULT_MAX_DROP_SHARE",
    "DEFAULT_OVERLAP",
    "DiagnosedFailure",
    "Loader",
    "Mode",
    "exact_capture",
    "RefreshError",
    "RefreshRefused",
    "RefreshResult",
    "SwapLockTimeout",
    "copy_grants_sql",
    "init_common",
    "read_status",
    "record_failure",
    "refresh_view",
    "source_loader",
    "stale_keys",
    "swap_in",
    "swap_statements",
    "tenant_closure",
    "upsert_statement",
    "utcnow",
]

Mode = Literal["auto", "full", "incremental"]
DEFAULT_OVERLAP = timedelta(minutes=2)
log = logging.getLogger(__name__)


def exact_capture(source: Engine) -> Capture | None:
    """The source's capture when it is exact (row changes to apply by key), else None."""
    capture = capture_for(source)
    return capture if capture.exact else None


def _take_position(spec: ViewSpec, capture: Capture, target: Engine) -> str | None:
    """Before a full refresh reads the source: make sure the change log exists (a new one
    voids every stored position) and take the position the view will be at."""
    try:
        for line in capture.ensure():
            log.info("view %s: capture %s: %s", spec.name, capture.mode, line)
        if capture.restarted:
            n = forget_positions(target, capture.mode)
            log.warning(
                "capture %s: a new change log was started; %d view position(s) forgotten, "
                "each view gets a full refresh",
                capture.mode,
                n,
            )
        return capture.position()
    except (CaptureUnavailable, CaptureLost) as exc:
        log.warning("view %s: no capture position (%s); full refresh only", spec.name, exc)
        return None


def refresh_view(
    spec: ViewSpec,
    source: Engine,
    target: Engine,
    *,
    mode: Mode = "auto",
    force: bool = False,
    max_drop_share: float = DEFAULT_MAX_DROP_SHARE,
    overlap: timedelta = DEFAULT_OVERLAP,
) -> RefreshResult:
    """Refresh one view of the common DB from CFI's source DB.

    ``auto``: with an exact capture (:func:`exact_capture`) and a stored position, the
    changes since it are applied by key (:mod:`cfi_pipelines.views.apply`); a lost change
    log or a view without position gets a full refresh that records its position. Without
    an exact capture, incremental when the view has a watermark from a previous refresh
    from the DB, full otherwise. Every outcome is recorded in ``cfi_view_status``
    and ``cfi_refresh_log``; failures are re-raised.
    """
    started = time.perf_counter()
    started_at = utcnow()
    init_common(target)
    status = read_status(target).get(spec.name) or {}
    with target.connect() as conn:
        live_exists = _table_exists(conn, spec.table_name)
    can_increment = (
        live_exists and status.get("watermark") is not None and status.get("source") == "db"
    )
    effective = (
        "full" if mode == "full" or (mode == "auto" and not can_increment) else "incremental"
    )
    if effective == "incremental" and not can_increment:
        effective = "full"  # nothing to increment from yet: a first refresh is always full
    try:  # from the first read of the source on, every failure is recorded and diagnosed
        found = capture_for(source)  # named in the result whatever path runs
        capture = found if found.exact and mode != "incremental" else None
        position = read_positions(target, capture.mode).get(spec.name) if capture else None
        if mode == "auto" and capture is not None:
            applies = position is not None and live_exists and status.get("source") == "db"
            effective = "apply" if applies else "full"
        closure = _read_closure(source)
        sync_after_refresh(source, target)  # tenants' map and login roles (tenancy.roles)
        if effective == "apply":
            assert capture is not None and position is not None
            try:
                return apply_view(
                    spec,
                    capture,
                    source,
                    target,
                    since=position,
                    started=started,
                    closure=closure,
                    watermark=status.get("watermark"),
                    last_rows=status.get("rows"),
                    force=force,
                    max_drop_share=max_drop_share,
                )
            except (CaptureLost, NeedsFullRefresh) as exc:
                log.warning("view %s: %s; full refresh instead", spec.name, exc)
                if isinstance(exc, CaptureLost):
                    forget_positions(target, capture.mode)
                effective = "full"
        if effective == "incremental":
            incremental = _incremental(
                spec,
                source,
                target,
                last_watermark=status["watermark"],
                overlap=overlap,
                started=started,
                closure=closure,
                force=force,
                max_drop_share=max_drop_share,
                last_rows=status.get("rows"),
            )
            return replace(incremental, capture_mode=found.mode)
        taken = _take_position(spec, capture, target) if capture is not None else None
        snapshot_at = utcnow()  # taken before reading: the data is at least this fresh
        watermark = _high_watermark(spec, source)
        loader = source_loader(
            spec, source, target, incremental=False, params=spec.params(), freeze=True
        )
        result = swap_in(
            spec,
            target,
            loader,
            source="db",
            snapshot_at=snapshot_at,
            force=force,
            max_drop_share=max_drop_share,
            watermark=watermark,
            closure=closure,
            started=started,
        )
        if capture is not None and taken is not None:
            # after the swap: a crash in between leaves an older position (replayed)
            store_position(target, spec.name, capture.mode, taken)
            result = replace(result, capture_mode=capture.mode, position=taken)
        return replace(result, capture_mode=found.mode) if not result.capture_mode else result
    except BaseException as exc:
        outcome = "refused" if isinstance(exc, RefreshRefused) else "failed"
        # a database error: which one, or CFI's schema changed (one line, the variable)
        diagnosed = diagnose(spec, source, target, exc)
        failure = DiagnosedFailure(spec.name, diagnosed) if diagnosed is not None else None
        record_failure(
            target,
            spec.name,
            mode=effective,
            source="db",
            started_at=started_at,
            error=failure or (exc if str(exc) else repr(exc)),
            outcome=outcome,
        )
        if failure is not None:
            raise failure from exc
        raise
