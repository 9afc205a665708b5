"""Campaign export assets, one dynamic partition per campaign id.

``cfi_export/campaign_files`` builds the JSON + CSV + manifest in the outbox and
carries the blocking check ``valid_against_schema``; ``cfi_export/campaign_delivery``
uploads them over SFTP, under a retry policy, only when the check passed. Both
write the outcome to MyCfia's ``campaign_exports`` table.
"""

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import paramiko
import sqlalchemy as sa
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from cfi_pipelines.exports import CampaignNotExportable, ExportBundle, build_export, deliver
from cfi_pipelines.exports.document import load_bundle
from cfi_pipelines.model import mycfia as model
from cfi_pipelines.resources.databases import DatabaseResource
from cfi_pipelines.resources.sftp import SFTPPermanentError, SFTPResource
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
    context: dg.AssetExecutionContext, mycfia: DatabaseResource
) -> dg.MaterializeResult:
    """Build and validate one campaign's export; record pending or rejected."""
    campaign_id = _campaign_id(context)
    engine = mycfia.engine()
    with engine.begin() as conn:  # one transaction: campaign and targets agree
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
        context: dg.AssetExecutionContext, mycfia: DatabaseResource, sftp: SFTPResource
    ) -> dg.MaterializeResult:
        """Upload the built files of the partition's campaign over one SFTP connection."""
        campaign_id = _campaign_id(context)
        attempt = context.retry_number + 1
        engine = mycfia.engine()
        with engine.begin() as conn:
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
        try:
            bundle = load_bundle(Path(row.local_manifest), row.validated_at)
            with sftp.connect() as client:  # one connection for all the files
                delivery = deliver(client, bundle, sftp.remote_dir, sftp.write_size)
        except SFTPPermanentError as exc:
            _failed(engine, campaign_id, revision, attempt, str(exc))
            raise dg.Failure(
                f"{where}: {exc}",
                metadata={"campaign_id": campaign_id, "host": sftp.host, "port": sftp.port},
                allow_retries=False,
            ) from None
        except (OSError, EOFError, paramiko.SSHException) as exc:
            final = attempt > MAX_RETRIES
            message = f"{where}, attempt {attempt}/{MAX_RETRIES + 1}: {type(exc).__name__}: {exc}"
            _failed(engine, campaign_id, revision, attempt, message, final=final)
            raise dg.Failure(
                message + ("" if final else " (will retry)"),
                metadata={"campaign_id": campaign_id, "host": sftp.host, "attempt": attempt},
            ) from exc

        delivered_at = _now()
        latency = (
            (delivered_at - bundle.validated_at).total_seconds() if bundle.validated_at else None
        )
        with engine.begin() as conn:
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
        context.log.info(f"delivered {where} in {delivery.seconds:.2f}s (attempt {attempt})")
        return dg.MaterializeResult(metadata=meta)

    return campaign_delivery


def _failed(
    engine: sa.Engine, campaign_id: int, revision: int, attempt: int, error: str, final: bool = True
) -> None:
    with engine.begin() as conn:
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
