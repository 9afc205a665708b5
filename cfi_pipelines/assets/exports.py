"""Campaign export assets, one dynamic partition per campaign id.

``cfi_export/campaign_files`` builds the JSON + CSV + manifest in the outbox and
carries the blocking check ``valid_against_schema``; ``cfi_export/campaign_delivery``
uploads them over SFTP, under a retry policy, only when the check passed. Both
write the outcome to MyCfia's ``campaign_exports`` table, and alert (resource
"alerts"): a rejected campaign, a delivery that failed for good (last retry, or an
error no retry can fix), then "recovered" once the campaign is delivered.
"""

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import sqlalchemy as sa
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from cfi_pipelines import alerts as alerting
from cfi_pipelines.db import write_transaction
from cfi_pipelines.exports import CampaignNotExportable, ExportBundle, build_export, deliver
from cfi_pipelines.exports.delivery import BUG, PERMANENT, classify_error
from cfi_pipelines.exports.document import load_bundle
from cfi_pipelines.model import mycfia as model
from cfi_pipelines.resources.alerts import AlertsResource
from cfi_pipelines.resources.databases import DatabaseResource
from cfi_pipelines.resources.sftp import HostKeyError, SFTPResource
from cfi_pipelines.settings import get_settings

campaigns_partitions = dg.DynamicPartitionsDefinition(name="campaigns")
"""Partition key = MyCfia campaign id."""

FILES_KEY = dg.AssetKey(["cfi_export", "campaign_files"])
DELIVERY_KEY = dg.AssetKey(["cfi_export", "campaign_delivery"])
CHECK_NAME = "valid_against_schema"
MAX_RETRIES = 3


def retry_delay() -> float:
    """Base delay of the delivery retries: ``CFI_EXPORT_RETRY_DELAY`` seconds (5)."""
    return float(os.environ.get("CFI_EXPORT_RETRY_DELAY", "5") or 5)


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _campaign_id(context: dg.AssetExecutionContext) -> int:
    key = context.partition_key
    if not key.isdigit():
        raise dg.Failure(
            f"partition {key!r} is not a campaign id (digits only)",
            metadata={"partition": key},
            allow_retries=False,
        )
    return int(key)


def record_export(conn: sa.Connection, campaign_id: int, revision: int, **values: Any) -> None:
    """Insert or update the ``campaign_exports`` row of (campaign, revision)."""
    t = model.campaign_exports
    values["updated_at"] = _now()
    where = (t.c.campaign_id == campaign_id) & (t.c.revision == revision)
    if conn.execute(sa.update(t).where(where).values(**values)).rowcount == 0:
        values.setdefault("requested_at", values["updated_at"])
        values.setdefault("attempts", 0)
        conn.execute(sa.insert(t).values(campaign_id=campaign_id, revision=revision, **values))


def _alert(context: dg.AssetExecutionContext, what: str, send: Any, *args: Any, **kw: Any) -> None:
    # Alerting must never change the outcome of the export it reports on.
    try:
        send(*args, **kw)
    except Exception as exc:
        context.log.error(f"could not alert ({what}): {type(exc).__name__}: {exc}")


def _files_metadata(bundle: ExportBundle) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "campaign_id": bundle.campaign_id,
        "revision": bundle.revision,
        "tenant_code": bundle.tenant_code,
        "rows": dg.MetadataValue.int(bundle.row_count),
    }
    for kind, info in bundle.files.items():
        meta[f"{kind}_bytes"] = dg.MetadataValue.int(info["bytes"])
        meta[f"{kind}_sha256"] = info["sha256"]
    if bundle.directory is not None:
        meta["outbox"] = dg.MetadataValue.path(str(bundle.directory))
    return meta


@dg.asset(
    key=FILES_KEY,
    partitions_def=campaigns_partitions,
    group_name="exports",
    kinds={"json", "csv"},
    description="A validated campaign's export (JSON + CSV + manifest) in the outbox, "
    "checked against schemas/campaign_export.v1.json.",
    check_specs=[
        dg.AssetCheckSpec(
            CHECK_NAME,
            asset=FILES_KEY,
            blocking=True,
            description="Every field of the campaign and of each target matches the JSON Schema; "
            "a failure blocks the upload and marks the export 'rejected'.",
        )
    ],
)
def campaign_files(
    context: dg.AssetExecutionContext, mycfia: DatabaseResource, alerts: AlertsResource
) -> dg.MaterializeResult:
    """Build and validate one campaign's export; record pending or rejected."""
    campaign_id = _campaign_id(context)
    engine = mycfia.engine()
    with write_transaction(engine) as conn:  # one transaction: campaign and targets agree
        try:
            bundle = build_export(conn, campaign_id, get_settings().outbox_dir)
        except CampaignNotExportable as exc:
            raise dg.Failure(
                str(exc), metadata={"campaign_id": campaign_id}, allow_retries=False
            ) from None
        common = {
            "run_id": context.run.run_id,
            "requested_at": _now(),
            "validated_at": bundle.validated_at,
            "row_count": bundle.row_count,
            "delivered_at": None,
        }
        if bundle.valid:
            record_export(
                conn,
                campaign_id,
                bundle.revision,
                status="pending",
                error=None,
                local_manifest=str(bundle.local_path("manifest")),
                json_sha256=bundle.files["json"]["sha256"],
                json_bytes=bundle.files["json"]["bytes"],
                csv_sha256=bundle.files["csv"]["sha256"],
                csv_bytes=bundle.files["csv"]["bytes"],
                **common,
            )
        else:
            record_export(
                conn,
                campaign_id,
                bundle.revision,
                status="rejected",
                error=bundle.error_text(),
                **common,
            )
    if not bundle.valid:
        context.log.error(
            f"campaign {campaign_id} r{bundle.revision} rejected:\n{bundle.error_text()}"
        )
        reasons = [str(e) for e in bundle.errors[:20]]
        if bundle.error_count > len(reasons):
            reasons.append(f"... and {bundle.error_count - len(reasons)} more (see the run)")
        _alert(  # once per (campaign, revision): the alerter keeps the episode open
            context,
            "campaign rejected",
            alerting.alert_campaign_rejected,
            campaign_id,
            bundle.revision,
            reasons,
            tenant=bundle.tenant_code or None,
            run_id=context.run.run_id,
            alerter=alerts.alerter(context.log),
        )
    check = dg.AssetCheckResult(
        check_name=CHECK_NAME,
        passed=bundle.valid,
        severity=dg.AssetCheckSeverity.ERROR,
        description=None if bundle.valid else bundle.error_text(limit=10),
        metadata={
            "error_count": dg.MetadataValue.int(bundle.error_count),
            "errors": dg.MetadataValue.json(
                [{"pointer": e.pointer, "message": e.message} for e in bundle.errors]
            ),
        },
    )
    meta = _files_metadata(bundle)
    meta["status"] = "pending" if bundle.valid else "rejected"
    return dg.MaterializeResult(metadata=meta, check_results=[check])


def _latest_export(conn: sa.Connection, campaign_id: int) -> Any:
    t = model.campaign_exports.c
    return conn.execute(
        sa.select(model.campaign_exports)
        .where(t.campaign_id == campaign_id)
        .order_by(t.revision.desc())
        .limit(1)
    ).first()


def build_delivery_asset(delay: float | None = None) -> dg.AssetsDefinition:
    """The delivery asset, with its retry policy (``delay`` defaults to :func:`retry_delay`)."""
    policy = dg.RetryPolicy(
        max_retries=MAX_RETRIES,
        delay=retry_delay() if delay is None else delay,
        backoff=dg.Backoff.EXPONENTIAL,
        jitter=dg.Jitter.PLUS_MINUS,
    )

    @dg.asset(
        key=DELIVERY_KEY,
        deps=[FILES_KEY],
        partitions_def=campaigns_partitions,
        group_name="exports",
        kinds={"sftp"},
        retry_policy=policy,
        description="The campaign's files on CFI's SFTP drop: <dir>/<tenant>/campaign_<id>_r<rev>"
        ".json/.csv/.manifest.json, the manifest last. Atomic and idempotent; retried 3 times.",
    )
    def campaign_delivery(
        context: dg.AssetExecutionContext,
        mycfia: DatabaseResource,
        sftp: SFTPResource,
        alerts: AlertsResource,
    ) -> dg.MaterializeResult:
        """Upload the built files of the partition's campaign over one SFTP connection."""
        campaign_id = _campaign_id(context)
        attempt = context.retry_number + 1
        engine = mycfia.engine()
        with write_transaction(engine) as conn:
            row = _latest_export(conn, campaign_id)
        if row is None or row.status == "rejected" or not row.local_manifest:
            why = "was rejected:\n" + (row.error or "") if row is not None else "has not been built"
            raise dg.Failure(
                f"campaign {campaign_id} {why}",
                metadata={"campaign_id": campaign_id},
                allow_retries=False,
            )
        revision = row.revision
        where = f"campaign {campaign_id} r{revision} to {sftp.target}"
        alerter = alerts.alerter(context.log)

        def fail(message: str, retry: bool, exc: BaseException) -> dg.Failure:
            """Record the attempt; alert when it is the last one; the Failure to raise."""
            _failed(engine, campaign_id, revision, attempt, message, final=not retry)
            if not retry:
                _alert(
                    context,
                    "export failed",
                    alerting.alert_export_failed,
                    campaign_id,
                    revision,
                    message,
                    tenant=bundle.tenant_code if bundle else None,
                    attempts=attempt,
                    run_id=context.run.run_id,
                    alerter=alerter,
                )
            return dg.Failure(
                message + (" (will retry)" if retry else ""),
                metadata={
                    "campaign_id": campaign_id,
                    "host": sftp.host,
                    "port": sftp.port,
                    "attempt": attempt,
                    "error_type": type(exc).__name__,
                },
                allow_retries=retry,
            )

        bundle: ExportBundle | None = None
        try:
            bundle = load_bundle(Path(row.local_manifest), row.validated_at)
        except (OSError, ValueError, KeyError) as exc:
            raise fail(
                f"campaign {campaign_id} r{revision}: the built files are gone or damaged "
                f"({type(exc).__name__}: {exc}). Rebuild them: re-materialize partition "
                f"{campaign_id} of both export assets (`cfi-pipelines export {campaign_id} "
                "--force`).",
                retry=False,
                exc=exc,
            ) from exc
        try:
            with sftp.session() as session:  # one connection for all the files
                delivery = deliver(session.sftp, bundle, sftp.remote_dir, session.write_size)
        except Exception as exc:
            kind = classify_error(exc)
            detail = f"{type(exc).__name__}: {exc}"
            if kind == BUG:
                # A defect of the export code: the same code on the same data fails again.
                raise fail(
                    f"{where}: unexpected error in the export code, not retried: {detail}. "
                    "This is a bug, not a network problem: report it with this run's logs; "
                    f"once fixed, re-export with `cfi-pipelines export {campaign_id} --force`.",
                    retry=False,
                    exc=exc,
                ) from exc
            if kind == PERMANENT:
                hint = (
                    ""
                    if isinstance(exc, HostKeyError)  # its message says what to check
                    else " Check CFI_SFTP_USER, CFI_SFTP_KEY and the server's authorized_keys "
                    "and permissions on CFI_SFTP_DIR; retrying cannot help."
                )
                raise fail(f"{where}: {detail}.{hint}", retry=False, exc=exc) from None
            final = attempt > MAX_RETRIES
            message = f"{where}, attempt {attempt}/{MAX_RETRIES + 1}: {detail}"
            if final:
                message += (
                    f". The SFTP server {sftp.host}:{sftp.port} was unreachable or dropped the "
                    "connection on every attempt: check that it is up and reachable from Dagster "
                    f"(host, port, firewall), then `cfi-pipelines export {campaign_id} --force`."
                )
            raise fail(message, retry=not final, exc=exc) from exc

        delivered_at = _now()
        latency = (
            (delivered_at - bundle.validated_at).total_seconds() if bundle.validated_at else None
        )
        with write_transaction(engine) as conn:
            record_export(
                conn,
                campaign_id,
                revision,
                status="delivered",
                attempts=model.campaign_exports.c.attempts + 1,
                delivered_at=delivered_at,
                json_path=delivery.remote_paths["json"],
                csv_path=delivery.remote_paths["csv"],
                manifest_path=delivery.remote_paths["manifest"],
                error=None,
            )
        meta: dict[str, Any] = {
            "campaign_id": campaign_id,
            "revision": revision,
            "tenant_code": bundle.tenant_code,
            "attempts": dg.MetadataValue.int(attempt),
            "bytes": dg.MetadataValue.int(delivery.bytes),
            "upload_seconds": dg.MetadataValue.float(delivery.seconds),
            "json_sha256": bundle.files["json"]["sha256"],
            "csv_sha256": bundle.files["csv"]["sha256"],
            "rows": dg.MetadataValue.int(bundle.row_count),
        }
        meta.update({f"remote_{k}": v for k, v in delivery.remote_paths.items()})
        if latency is not None:
            meta["seconds_from_validation"] = dg.MetadataValue.float(latency)
        meta["write_size"] = dg.MetadataValue.int(session.write_size)
        context.log.info(f"delivered {where} in {delivery.seconds:.2f}s (attempt {attempt})")
        _alert(
            context, "recovered", alerting.resolve_export, campaign_id, revision, alerter=alerter
        )
        return dg.MaterializeResult(metadata=meta)

    return campaign_delivery


def _failed(
    engine: sa.Engine, campaign_id: int, revision: int, attempt: int, error: str, final: bool = True
) -> None:
    with write_transaction(engine) as conn:
        record_export(
            conn,
            campaign_id,
            revision,
            status="failed" if final else "pending",
            attempts=model.campaign_exports.c.attempts + 1,
            error=error,
        )


def build_export_assets(delay: float | None = None) -> list[dg.AssetsDefinition]:
    """The export assets (files with its blocking check, delivery)."""
    return [campaign_files, build_delivery_asset(delay)]


def export_job(assets: list[dg.AssetsDefinition]) -> "UnresolvedAssetJobDefinition":
    """The job the sensor and ``cfi-pipelines export`` run: build, check, deliver."""
    return dg.define_asset_job(
        "campaign_export",
        selection=dg.AssetSelection.assets(*assets),
        partitions_def=campaigns_partitions,
        description="Export one campaign (partition = campaign id): build, validate, upload over SFTP.",
    )
