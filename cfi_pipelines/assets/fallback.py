"""Fallback snapshots: one asset per view (``cfi_fallback/<view>``), built by one factory.

Each pulls the whole view from CFI's HTTP API into a Parquet snapshot under
``CFI_HOME/snapshots/<view>/`` and, when the common DB is reachable (and the run
asks for it), swaps it into the view with the refresh's atomic swap, recorded as
``source = cfi_api`` with the API's ``as_of`` as the snapshot time. The asset
shares the view's concurrency pool, so it never overlaps a refresh of that view.

A snapshot gets its final name (becomes "the latest") only once it is accepted:
swapped in, or not to be swapped (``swap=False``, common DB unreachable). Until the
swap is accepted it sits under a hidden pending name; one that the swap refuses
(``RefreshRefused``) or fails on is moved to ``snapshots/<view>/refused/``, so the
latest snapshot stays the last good one (see :mod:`cfi_pipelines.fallback.snapshots`).
"""

from pathlib import Path

import dagster as dg
import sqlalchemy as sa
from pydantic import Field

from cfi_pipelines.assets.views import view_key, view_pool
from cfi_pipelines.clock import utcnow
from cfi_pipelines.fallback.api_client import (
    CfiApiAuthError,
    CfiApiContractError,
    CfiApiError,
    CfiApiNotConfigured,
)
from cfi_pipelines.fallback.snapshots import (
    Snapshot,
    log_snapshot_attempt,
    parquet_loader,
    publish_snapshot,
    refuse_snapshot,
    write_snapshot,
)
from cfi_pipelines.resources.cfi_api import CfiApiResource
from cfi_pipelines.resources.databases import DatabaseResource
from cfi_pipelines.settings import get_settings
from cfi_pipelines.views.refresh import (
    DEFAULT_MAX_DROP_SHARE,
    RefreshRefused,
    SwapLockTimeout,
    init_common,
    record_failure,
    swap_in,
)
from cfi_pipelines.views.spec import VIEWS, ViewSpec

GROUP = "cfi_fallback"


class FallbackConfig(dg.Config):
    """How to take a fallback snapshot (Launchpad, the lag sensor)."""

    swap: bool = Field(
        default=True,
        description="Swap the snapshot into the common DB's view (False: write the Parquet file only).",
    )
    keep: int = Field(default=5, ge=1, description="Snapshots kept per view.")
    force: bool = Field(default=False, description="Swap in even if the row count dropped a lot.")
    max_drop_share: float = DEFAULT_MAX_DROP_SHARE
    snapshots_dir: str = Field(default="", description="Default: CFI_HOME/snapshots.")


def fallback_key(view: str) -> dg.AssetKey:
    return dg.AssetKey([GROUP, view])


def fallback_op_name(view: str) -> str:
    return f"{GROUP}__{view}"


def _api_failure(spec: ViewSpec, exc: Exception) -> dg.Failure:
    if isinstance(exc, CfiApiNotConfigured):
        return dg.Failure(description=str(exc), metadata={"view": spec.name}, allow_retries=False)
    assert isinstance(exc, CfiApiError)
    # a contract or auth error will not fix itself; an unavailable API may
    permanent = isinstance(exc, CfiApiContractError | CfiApiAuthError)
    return dg.Failure(
        description=f"{exc}. No snapshot was written and the view is untouched.",
        metadata=exc.metadata(),
        allow_retries=not permanent,
    )


def _common_reachable(engine: sa.Engine, log) -> bool:
    try:
        init_common(engine)
        return True
    except sa.exc.DBAPIError as exc:
        log.warning(f"common DB unreachable ({type(exc.orig).__name__}: {exc.orig}); Parquet only")
        return False


def build_fallback_asset(spec: ViewSpec) -> dg.AssetsDefinition:
    """The asset that takes a fallback snapshot of ``spec`` from the CFI API."""

    @dg.asset(
        key=fallback_key(spec.name),
        group_name=GROUP,
        description=(
            f"Fallback snapshot of `{spec.table_name}` from CFI's HTTP API (Parquet under "
            f"CFI_HOME/snapshots/{spec.name}/), swapped into the view when the common DB is up. "
            "Requested by the lag sensor when CFI's source DB is unreachable."
        ),
        kinds={"parquet"},
        pool=view_pool(spec.name),
        tags={"view": spec.name},
        metadata={"view": spec.name, "view_asset": view_key(spec.name).to_user_string()},
    )
    def _fallback(
        context: dg.AssetExecutionContext,
        config: FallbackConfig,
        cfi_api: CfiApiResource,
        cfi_common: DatabaseResource,
    ) -> dg.MaterializeResult:
        root = Path(config.snapshots_dir) if config.snapshots_dir else get_settings().snapshots_dir
        started_at = utcnow()
        try:
            with cfi_api.client() as client:
                # not published yet: it becomes the latest only once accepted
                snap: Snapshot = write_snapshot(
                    client, spec.name, root, keep=config.keep, publish=False
                )
        except (CfiApiError, CfiApiNotConfigured) as exc:
            if not isinstance(
                exc, CfiApiNotConfigured
            ):  # an attempt that failed: the KPI counts it
                log_snapshot_attempt(
                    cfi_common.engine(),
                    spec.name,
                    started_at=started_at,
                    outcome="failed",
                    error=f"{type(exc).__name__}: {exc}",
                )
            raise _api_failure(spec, exc) from exc
        context.log.info(
            f"{spec.name}: {snap.rows} rows in {snap.pages} pages from the CFI API "
            f"(as of {snap.as_of.isoformat()}Z)"
        )
        swapped = False
        if config.swap and _common_reachable(cfi_common.engine(), context.log):
            engine = cfi_common.engine()
            try:
                swap_in(
                    spec,
                    engine,
                    parquet_loader(snap.path, spec.name, engine),
                    source="cfi_api",
                    snapshot_at=snap.as_of,
                    force=config.force,
                    max_drop_share=config.max_drop_share,
                )
            except BaseException as exc:
                if isinstance(exc, SwapLockTimeout):  # a good snapshot; readers held the table
                    snap = publish_snapshot(snap, root, keep=config.keep)
                    raise dg.Failure(
                        description=f"{exc} The snapshot is kept as the latest: {snap.path}",
                        metadata={"view": spec.name, "snapshot": str(snap.path)},
                    ) from exc
                snap = refuse_snapshot(snap, root, keep=config.keep)  # never the latest
                context.log.warning(f"{spec.name}: snapshot not swapped in, kept at {snap.path}")
                record_failure(
                    engine,
                    spec.name,
                    mode="full",
                    source="cfi_api",
                    started_at=started_at,
                    error=exc if str(exc) else repr(exc),
                    outcome="refused" if isinstance(exc, RefreshRefused) else "failed",
                )
                if isinstance(exc, RefreshRefused):
                    raise dg.Failure(
                        description=(
                            f"{exc} The refused snapshot is kept apart at {snap.path}; "
                            "the latest snapshot is still the last good one."
                        ),
                        metadata={"view": spec.name, "snapshot": str(snap.path)},
                        allow_retries=False,
                    ) from exc
                raise
            swapped = True
            context.log.info(f"{spec.name}: swapped into {spec.table_name} (source cfi_api)")
        snap = publish_snapshot(snap, root, keep=config.keep)
        if not swapped:  # swapped ones are in the refresh log already (swap_in writes it)
            log_snapshot_attempt(
                cfi_common.engine(),
                spec.name,
                started_at=started_at,
                outcome="success",
                rows=snap.rows,
            )
        context.log.info(f"{spec.name}: snapshot -> {snap.path}")
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": snap.rows,
                "rows": snap.rows,
                "pages": snap.pages,
                "bytes": snap.bytes,
                "api_bytes": snap.api_bytes,
                "retries": snap.retries,
                "duration_s": dg.FloatMetadataValue(round(snap.duration_s, 3)),
                "as_of": snap.as_of.isoformat() + "Z",
                "as_of_lag_s": dg.FloatMetadataValue(
                    round((utcnow() - snap.as_of).total_seconds(), 3)
                ),
                "swapped": swapped,
                "path": dg.MetadataValue.path(str(snap.path)),
            }
        )

    return _fallback


FALLBACK_KEYS = [fallback_key(v.name) for v in VIEWS]


fallback_snapshots_job = dg.define_asset_job(
    "fallback_snapshots",
    executor_def=dg.in_process_executor,  # a few steps: one process, not one per step
    selection=dg.AssetSelection.assets(*FALLBACK_KEYS),
    description="Fallback snapshots from the CFI API (the lag sensor selects one view per run).",
)


def fallback_run_config(view: str, *, swap: bool) -> dict:
    """Run config of ``fallback_snapshots`` for one view."""
    return {"ops": {fallback_op_name(view): {"config": {"swap": swap}}}}


fallback_assets = [build_fallback_asset(v) for v in VIEWS]
