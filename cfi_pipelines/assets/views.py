"""The four views of the common DB as Dagster assets, built by one factory from
:data:`cfi_pipelines.views.spec.VIEWS`, with their checks, jobs and schedules beside them.

Thin: the refresh is :func:`cfi_pipelines.views.refresh.refresh_view`, the
freshness rules are :mod:`cfi_pipelines.views.freshness`."""

from datetime import datetime, timedelta
from typing import Literal

import dagster as dg
import sqlalchemy as sa

from cfi_pipelines.assets.sources import report_schema_drift, source_key
from cfi_pipelines.clock import iso_z, utcnow
from cfi_pipelines.resources.databases import DatabaseResource
from cfi_pipelines.settings import FRESH_WINDOW, INCIDENT_WINDOW, default_schedule_status
from cfi_pipelines.views.diagnosis import DiagnosedFailure, Diagnosis, diagnose
from cfi_pipelines.views.freshness import format_age, freshness_state, view_age
from cfi_pipelines.views.probe import view_source_tables
from cfi_pipelines.views.refresh import (
    DEFAULT_MAX_DROP_SHARE,
    RefreshRefused,
    SwapLockTimeout,
    read_status,
    refresh_view,
)
from cfi_pipelines.views.spec import VIEWS, ViewSpec

GROUP = "cfi_common"


class RefreshConfig(dg.Config):
    """How to refresh a view (Launchpad, schedules, `cfi-pipelines refresh`)."""

    mode: Literal["auto", "full", "incremental"] = "auto"
    force: bool = False
    max_drop_share: float = DEFAULT_MAX_DROP_SHARE
    overlap_seconds: int = 120


def view_key(view: str) -> dg.AssetKey:
    return dg.AssetKey(["cfi_common", view])


def view_pool(view: str) -> str:
    """The concurrency pool shared by everything that swaps this view in."""
    return f"cfi_view_{view}"


def view_op_name(view: str) -> str:
    return f"cfi_common__{view}"


def _column_schema(spec: ViewSpec) -> dg.TableSchema:
    return dg.TableSchema(
        columns=[
            dg.TableColumn(
                c.name, str(c.type), constraints=dg.TableColumnConstraints(nullable=c.nullable)
            )
            for c in spec.table.columns
        ]
    )


def build_view_asset(spec: ViewSpec) -> dg.AssetsDefinition:
    """The asset that refreshes ``spec`` in the common DB."""

    @dg.asset(
        key=view_key(spec.name),
        deps=[source_key(t.name) for t in view_source_tables(spec)],
        group_name=GROUP,
        description=f"{spec.description} Table `{spec.table_name}` in the common DB.",
        kinds={"sql"},
        pool=view_pool(spec.name),
        # No FreshnessPolicy: Dagster's counts materializations only, so a quiet view the
        # change sensor verified current would turn red in the UI while `status` and the
        # freshness check say PASS. The freshness check (from cfi_view_status) is the one
        # freshness mechanism, in the UI as in `status`.
        metadata={
            "dagster/table_name": spec.table_name,
            "dagster/column_schema": _column_schema(spec),
            "natural_key": ", ".join(spec.key),
        },
        tags={"view": spec.name},
    )
    def _refresh(
        context: dg.AssetExecutionContext,
        config: RefreshConfig,
        cfi_source: DatabaseResource,
        cfi_common: DatabaseResource,
    ) -> dg.MaterializeResult:
        try:
            r = refresh_view(
                spec,
                cfi_source.engine(),
                cfi_common.engine(),
                mode=config.mode,
                force=config.force,
                max_drop_share=config.max_drop_share,
                overlap=timedelta(seconds=config.overlap_seconds),
            )
        except RefreshRefused as exc:
            raise dg.Failure(
                description=str(exc),
                metadata={
                    "view": spec.name,
                    "staging_rows": exc.staging_rows,
                    "live_rows": exc.live_rows,
                },
                allow_retries=False,
            ) from exc
        except SwapLockTimeout as exc:  # readers hold the table: retried later, named
            raise dg.Failure(
                description=str(exc), metadata={"view": spec.name, "attempts": exc.attempts}
            ) from exc
        except DiagnosedFailure as exc:  # a database error, its cause named
            _report_drift(context, exc.diagnosis)
            raise diagnosed_failure(spec, exc.diagnosis) from exc
        except sa.exc.DBAPIError as exc:  # before the refresh proper (the common DB's status)
            found = diagnose(spec, cfi_source.engine(), cfi_common.engine(), exc)
            assert found is not None
            _report_drift(context, found)
            raise diagnosed_failure(spec, found) from exc
        context.log.info(
            f"{spec.name}: {r.mode} refresh, {r.rows} rows ({r.inserted} inserted, {r.updated} "
            f"updated, {r.deleted} deleted) in {r.duration_s:.2f}s"
        )
        watermark = r.watermark.isoformat() if r.watermark else None
        # the apply's own figures only where they mean something (an incremental or full
        # refresh reading "changed_keys 0" beside "1 updated, 1 deleted" would not)
        applied = {"changed_keys": r.keys, "row_changes": r.changes} if r.mode == "apply" else {}
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": r.rows,
                "rows": r.rows,
                "loaded": r.loaded,
                "inserted": r.inserted,
                "updated": r.updated,
                "deleted": r.deleted,
                "duration_s": dg.FloatMetadataValue(round(r.duration_s, 3)),
                "lag_s": dg.FloatMetadataValue(
                    round((utcnow() - r.source_snapshot_at).total_seconds(), 3)
                ),
                "watermark": watermark or "",
                "watermark_epoch": dg.FloatMetadataValue(
                    r.watermark.timestamp() if r.watermark else 0.0
                ),
                "mode": r.mode,
                "capture_mode": r.capture_mode,
                **applied,
                **({"capture_position": r.position} if r.position else {}),
                "source_snapshot_at": r.source_snapshot_at.isoformat(),
            }
        )

    return _refresh


def _report_drift(context: dg.AssetExecutionContext, diagnosis: Diagnosis) -> None:
    """The drifted tables' schema checks fail now, in the UI (never changes the outcome)."""
    if not diagnosis.differences:
        return
    try:
        report_schema_drift(context.instance, diagnosis.differences)
    except Exception as exc:
        context.log.error(f"could not report the schema checks: {type(exc).__name__}: {exc}")


def diagnosed_failure(spec: ViewSpec, diagnosis: Diagnosis) -> dg.Failure:
    """The refresh's Failure for a database error: one line naming the cause and what to
    do. A schema change is not retried (the same query fails again) and carries the
    drifted tables (``schema_drift``: the alert sensor opens one episode per table)."""
    untouched = "The live view is untouched"
    if diagnosis.kind == "schema":
        after = (
            f"{untouched}; once it is > 15 min old and 2 refreshes failed, the lag sensor "
            "serves it from the CFI API (same view contract). Restore the column in CFI's DB, "
            "or adapt the view's query (cfi_pipelines/views/spec.py)."
        )
    else:
        after = f"{untouched}; the lag sensor falls back to the CFI API if this lasts."
    drift = [
        {"table": d.table, "column": d.column, "views": list(d.views)}
        for d in diagnosis.differences
    ]
    return dg.Failure(
        description=f"view {spec.name}: {diagnosis.message}. {after}",
        metadata={
            "view": spec.name,
            "cause": diagnosis.kind,
            **({"schema_drift": dg.MetadataValue.json(drift)} if drift else {}),
        },
        allow_retries=diagnosis.kind != "schema",
    )


def freshness_severity(age: timedelta | None) -> tuple[bool, dg.AssetCheckSeverity]:
    """(passed, severity) of the freshness check for ``age`` (see :func:`freshness_state`)."""
    state = freshness_state(age)
    severity = dg.AssetCheckSeverity.ERROR if state == "ERROR" else dg.AssetCheckSeverity.WARN
    return state == "PASS", severity


def freshness_check_result(row: dict | None, now: datetime | None = None) -> dg.AssetCheckResult:
    """The freshness check's result for a ``cfi_view_status`` row: the check run and the
    change sensor (which reports it without a run) say the same thing."""
    age = view_age(row, now)
    passed, severity = freshness_severity(age)
    return dg.AssetCheckResult(
        passed=passed,
        severity=severity,
        description=format_age(age),
        metadata={
            "age_s": dg.FloatMetadataValue(age.total_seconds() if age is not None else None),
            "warn_after_s": FRESH_WINDOW.total_seconds(),
            "error_after_s": INCIDENT_WINDOW.total_seconds(),
            "source": (row or {}).get("source") or "",
            "source_snapshot_at": iso_z((row or {}).get("source_snapshot_at")) or "",
        },
    )


def build_view_checks(spec: ViewSpec) -> list[dg.AssetChecksDefinition]:
    """Freshness (from ``cfi_view_status``: the DB is the truth) and not-empty."""

    @dg.asset_check(
        asset=view_key(spec.name),
        name="freshness",
        description="Age of the data (now − source_snapshot_at): pass ≤ 5 min, WARN > 5 min, ERROR > 15 min.",
    )
    def freshness(cfi_common: DatabaseResource) -> dg.AssetCheckResult:
        return freshness_check_result(read_status(cfi_common.engine()).get(spec.name))

    @dg.asset_check(
        asset=view_key(spec.name),
        name="not_empty",
        description=f"`{spec.table_name}` has rows whenever `{spec.driving_table.name}` in the source has.",
    )
    def not_empty(
        cfi_source: DatabaseResource, cfi_common: DatabaseResource
    ) -> dg.AssetCheckResult:
        """O(1) while the view has rows (it runs after every refresh, applies included): one
        row of the view probed, its row count from ``cfi_view_status``. CFI's source is
        read (a count of the driving table, O(table)) only when the view is empty."""
        engine = cfi_common.engine()
        with engine.connect() as conn:
            has_table = sa.inspect(conn).has_table(spec.table_name)
            probe = sa.select(sa.literal(1)).select_from(spec.table).limit(1)
            has_rows = has_table and conn.execute(probe).first() is not None
        if has_rows:
            rows = (read_status(engine).get(spec.name) or {}).get("rows")
            return dg.AssetCheckResult(
                passed=True,
                severity=dg.AssetCheckSeverity.ERROR,
                metadata={"view_rows": int(rows or 0)},
            )
        try:
            with cfi_source.engine().connect() as conn:
                source_rows = conn.scalar(
                    sa.select(sa.func.count()).select_from(spec.driving_table)
                )
        except sa.exc.OperationalError:
            source_rows = None  # unreachable: judge the view alone
        passed = source_rows == 0
        return dg.AssetCheckResult(
            passed=passed,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={
                "view_rows": 0,
                "source_rows": source_rows if source_rows is not None else -1,
            },
            description=None
            if passed
            else f"{spec.table_name} is empty but the source has {source_rows} rows",
        )

    return [freshness, not_empty]


VIEW_KEYS = [view_key(v.name) for v in VIEWS]

refresh_views_job = dg.define_asset_job(
    "refresh_views",
    executor_def=dg.in_process_executor,  # a few steps: one process, not one per step
    selection=dg.AssetSelection.assets(*VIEW_KEYS),
    description="Refresh the four views of the common DB (then run their checks).",
)
check_views_job = dg.define_asset_job(
    "check_views",
    executor_def=dg.in_process_executor,
    selection=dg.AssetSelection.checks_for_assets(*VIEW_KEYS),
    description="Run the freshness and not-empty checks of the four views.",
)


def _run_config(mode: str) -> dg.RunConfig:
    return dg.RunConfig(ops={view_op_name(v.name): RefreshConfig(mode=mode) for v in VIEWS})


view_assets = [build_view_asset(v) for v in VIEWS]
view_checks = [c for v in VIEWS for c in build_view_checks(v)]


def build_view_schedules() -> list[dg.ScheduleDefinition]:
    """The nightly full refresh (built with the definitions: ``CFI_AUTOMATION`` is read then).

    Incremental refreshes are change-driven (``view_change_sensor``), and the freshness
    checks are reported by that sensor and by every refresh run: no clock-driven refresh
    or check job runs during the day."""
    return [
        dg.ScheduleDefinition(
            name="refresh_views_full_nightly",
            cron_schedule="0 2 * * *",
            job=refresh_views_job,
            run_config=_run_config("full"),
            default_status=default_schedule_status(),
            description="Full refresh of the four views: rebuilds each from scratch (indexes, "
            "statistics) and repairs anything an incremental could not see.",
        ),
    ]
