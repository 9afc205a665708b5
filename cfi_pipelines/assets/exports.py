"""Campaign export assets, one dynamic partition per campaign id.

``cfi_export/campaign_files`` builds the JSON + CSV + manifest in the outbox and
carries the blocking check ``valid_against_schema``; ``cfi_export/campaign_delivery``
uploads them over SFTP, under a retry policy, only when the check passed. Both
write the outcome to MyCfia's ``campaign_exports`` table, and alert (resource
"alerts"): a rejected campaign, a delivery that failed for good (last retry, or an
error no retry can fix), then "recovered" once the campaign is delivered.
"""

from collections.abc import Iterator
from typing import Any

import dagster as dg
import sqlalchemy as sa

from cfi_pipelines.alerting import messages as alerting
from cfi_pipelines.clock import utcnow
from cfi_pipelines.db import write_transaction
from cfi_pipelines.exports.campaign import NotDeliverable, SFTPTarget, deliver_campaign
from cfi_pipelines.exports.document import ExportBundle, build_export
from cfi_pipelines.exports.errors import CampaignNotExportable
from cfi_pipelines.exports.records import latest_export, record_export
from cfi_pipelines.model import mycfia as model
from cfi_pipelines.resources.alerter import AlertsResource
from cfi_pipelines.resources.databases import DatabaseResource
from cfi_pipelines.resources.sftp import SFTPResource
from cfi_pipelines.settings import get_settings

campaigns_partitions = dg.DynamicPartitionsDefinition(name="campaigns")
"""Partition key = MyCfia campaign id."""

FILES_KEY = dg.AssetKey(["cfi_export", "campaign_files"])
DELIVERY_KEY = dg.AssetKey(["cfi_export", "campaign_delivery"])
CHECK_NAME = "valid_against_schema"
GROUP = "cfi_export"
"""One name: the asset group is the key prefix."""
MAX_RETRIES = 3


def _campaign_id(context: dg.AssetExecutionContext) -> int:
    key = context.partition_key
    if not key.isdigit():
        raise dg.Failure(
            f"partition {key!r} is not a campaign id (digits only)",
            metadata={"partition": key},
            allow_retries=False,
        )
    return int(key)


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
    group_name=GROUP,
    kinds={"json", "csv"},
    description="A validated campaign's export (JSON + CSV + manifest) in the outbox, "
    "checked against schemas/campaign_export.v1.json.",
    check_specs=[
        dg.AssetCheckSpec(
            CHECK_NAME,
            asset=FILES_KEY,
            description="Every field of the campaign and of each target matches the JSON Schema; "
            "a failure marks the export 'rejected' (errors in the metadata) and the delivery is "
            "not attempted: a rejection is a failed check, never a failed delivery.",
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
            "requested_at": utcnow(),
            "validated_at": bundle.validated_at,
            "row_count": bundle.row_count,
        }
        if bundle.valid:
            # a re-send of a delivered revision stays delivered (its files are on the drop)
            # and keeps its first delivery time (the export latency is measured to it)
            e = model.campaign_exports.c
            was_delivered = conn.execute(
                sa.select(e.status).where(
                    e.campaign_id == campaign_id, e.revision == bundle.revision
                )
            ).scalar() == "delivered"
            record_export(
                conn,
                campaign_id,
                bundle.revision,
                status="delivered" if was_delivered else "pending",
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
                delivered_at=None,
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
            "campaign_id": campaign_id,
            "partition": context.partition_key,
            "revision": bundle.revision,
            "error_count": dg.MetadataValue.int(bundle.error_count),
            "errors": dg.MetadataValue.json(
                [{"pointer": e.pointer, "message": e.message} for e in bundle.errors]
            ),
        },
    )
    meta = _files_metadata(bundle)
    meta["status"] = "pending" if bundle.valid else "rejected"
    return dg.MaterializeResult(metadata=meta, check_results=[check])


DELIVERY_RETRY_POLICY = dg.RetryPolicy(
    max_retries=MAX_RETRIES,
    delay=get_settings().export_retry_delay,  # CFI_EXPORT_RETRY_DELAY, read at load
    backoff=dg.Backoff.EXPONENTIAL,
    jitter=dg.Jitter.PLUS_MINUS,
)


@dg.asset(
    key=DELIVERY_KEY,
    deps=[FILES_KEY],
    partitions_def=campaigns_partitions,
    group_name=GROUP,
    kinds={"sftp"},
    retry_policy=DELIVERY_RETRY_POLICY,
    # a rejected campaign is not delivered: no materialization, and the run succeeds
    # (the failed check on campaign_files says why); an SFTP failure fails the run
    output_required=False,
    description="The campaign's files on CFI's SFTP drop: "
    "`<CFI_SFTP_DIR>/<tenant>/campaign_<id>_r<rev>.json`, `.csv` and `.manifest.json`, "
    "the manifest last. Atomic and idempotent; retried 3 times with exponential backoff.",
)
def campaign_delivery(
    context: dg.AssetExecutionContext,
    mycfia: DatabaseResource,
    sftp: SFTPResource,
    alerts: AlertsResource,
) -> Iterator[dg.MaterializeResult]:
    """Upload the built files of the partition's campaign over one SFTP connection."""
    campaign_id = _campaign_id(context)
    attempt = context.retry_number + 1
    with mycfia.engine().connect() as conn:
        row = latest_export(conn, campaign_id)
    if row is not None and row.status == "rejected":
        context.log.warning(
            f"campaign {campaign_id} r{row.revision} was rejected by validation: delivery not "
            "attempted (see the failed valid_against_schema check of cfi_export/campaign_files)"
        )
        return
    target = SFTPTarget(sftp.host, sftp.port, sftp.target, sftp.remote_dir, sftp.session)
    try:
        outcome = deliver_campaign(
            mycfia.engine(), target, campaign_id, attempt=attempt, max_attempts=MAX_RETRIES + 1
        )
    except NotDeliverable as exc:
        raise dg.Failure(
            str(exc), metadata={"campaign_id": campaign_id}, allow_retries=False
        ) from None
    alerter = alerts.alerter(context.log)
    if not outcome.delivered:
        if outcome.final_failure:
            _alert(
                context,
                "export failed",
                alerting.alert_export_failed,
                campaign_id,
                outcome.revision,
                outcome.message,
                tenant=outcome.bundle.tenant_code if outcome.bundle else None,
                attempts=attempt,
                run_id=context.run.run_id,
                alerter=alerter,
            )
        raise dg.Failure(
            outcome.message + (" (will retry)" if outcome.retry else ""),
            metadata={
                "campaign_id": campaign_id,
                "host": sftp.host,
                "port": sftp.port,
                "attempt": attempt,
                "error_type": outcome.error_type or "",
            },
            allow_retries=outcome.retry,
        )
    bundle, delivery = outcome.bundle, outcome.delivery
    assert bundle is not None and delivery is not None
    meta: dict[str, Any] = {
        "campaign_id": campaign_id,
        "revision": outcome.revision,
        "tenant_code": bundle.tenant_code,
        "attempts": dg.MetadataValue.int(attempt),
        "bytes": dg.MetadataValue.int(delivery.bytes),
        "upload_seconds": dg.MetadataValue.float(delivery.seconds),
        "json_sha256": bundle.files["json"]["sha256"],
        "csv_sha256": bundle.files["csv"]["sha256"],
        "rows": dg.MetadataValue.int(bundle.row_count),
        "write_size": dg.MetadataValue.int(outcome.write_size or 0),
    }
    meta.update({f"remote_{k}": v for k, v in delivery.remote_paths.items()})
    if outcome.seconds_from_validation is not None:
        meta["seconds_from_validation"] = dg.MetadataValue.float(outcome.seconds_from_validation)
    context.log.info(outcome.message)
    _alert(
        context,
        "recovered",
        alerting.resolve_export,
        campaign_id,
        outcome.revision,
        alerter=alerter,
    )
    yield dg.MaterializeResult(metadata=meta)


export_assets = [campaign_files, campaign_delivery]

campaign_export_job = dg.define_asset_job(
    "campaign_export",
    executor_def=dg.in_process_executor,  # a few steps: one process, not one per step
    selection=dg.AssetSelection.assets(FILES_KEY, DELIVERY_KEY),
    partitions_def=campaigns_partitions,
    description="Export one campaign (partition = campaign id): build, validate, upload over SFTP.",
)
"""The job the sensor and ``cfi-pipelines export`` run: build, check, deliver."""
