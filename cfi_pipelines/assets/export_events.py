"""What the campaign export assets and the batch op report, per campaign: the metadata
of the files and of the delivery, the validation check's metadata, the observations that
say why a partition is grey (rejected) or stays green (a failed re-send), and the alerts
(rejected, failed for good, recovered). Shared by :mod:`cfi_pipelines.assets.exports`'s
assets and its batch op, so both read the same in the UI. No I/O besides the alerts.
"""

from typing import Any

import dagster as dg

from cfi_pipelines.alerting import messages as alerting
from cfi_pipelines.exports.campaign import DeliveryOutcome
from cfi_pipelines.exports.document import ExportBundle
from cfi_pipelines.resources.alerter import AlertsResource

FILES_KEY = dg.AssetKey(["cfi_export", "campaign_files"])
DELIVERY_KEY = dg.AssetKey(["cfi_export", "campaign_delivery"])


def alert(context: dg.AssetExecutionContext, what: str, send: Any, *args: Any, **kw: Any) -> None:
    # Alerting must never change the outcome of the export it reports on.
    try:
        send(*args, **kw)
    except Exception as exc:
        context.log.error(f"could not alert ({what}): {type(exc).__name__}: {exc}")


def files_metadata(bundle: ExportBundle) -> dict[str, Any]:
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


def check_description(bundle: ExportBundle) -> str | None:
    return None if bundle.valid else bundle.error_text(limit=10)


def check_metadata(bundle: ExportBundle, partition: str) -> dict[str, Any]:
    return {
        "campaign_id": bundle.campaign_id,
        "partition": partition,
        "revision": bundle.revision,
        "error_count": dg.MetadataValue.int(bundle.error_count),
        "errors": dg.MetadataValue.json(
            [{"pointer": e.pointer, "message": e.message} for e in bundle.errors]
        ),
    }


def rejected_observations(bundle: ExportBundle, partition: str) -> list[dg.AssetObservation]:
    """The reason a rejected partition is grey, on both assets (the UI's partition view)."""
    reason = bundle.error_text(limit=10)
    return [
        dg.AssetObservation(
            key,
            partition=partition,
            description=f"rejected by validation: {what}",
            metadata={
                "status": "rejected",
                "revision": bundle.revision,
                "error_count": dg.MetadataValue.int(bundle.error_count),
                "reason": reason,
            },
        )
        for key, what in (
            (FILES_KEY, "the export does not match the JSON Schema"),
            (DELIVERY_KEY, "not delivered (nothing is sent for an invalid campaign)"),
        )
    ]


def resend_failed_observation(outcome: DeliveryOutcome, partition: str) -> dg.AssetObservation:
    return dg.AssetObservation(
        DELIVERY_KEY,
        partition=partition,
        description="re-send failed; the revision stays delivered (its files are on the drop)",
        metadata={
            "status": "resend_failed",
            "revision": outcome.revision,
            "reason": outcome.message,
        },
    )


def report_rejected(
    context: dg.OpExecutionContext, alerts: AlertsResource, bundle: ExportBundle
) -> None:
    """Log and alert a rejected campaign (once per revision: the alerter keeps the episode)."""
    context.log.error(
        f"campaign {bundle.campaign_id} r{bundle.revision} rejected:\n{bundle.error_text()}"
    )
    reasons = [str(e) for e in bundle.errors[:20]]
    if bundle.error_count > len(reasons):
        reasons.append(f"... and {bundle.error_count - len(reasons)} more (see the run)")
    alert(
        context,
        "campaign rejected",
        alerting.alert_campaign_rejected,
        bundle.campaign_id,
        bundle.revision,
        reasons,
        tenant=bundle.tenant_code or None,
        run_id=context.run.run_id,
        alerter=alerts.alerter(context.log),
    )


def report_delivered(
    context: dg.OpExecutionContext, alerter: Any, outcome: DeliveryOutcome
) -> None:
    """Log the delivery and close the campaign's alert episode, if one was open."""
    context.log.info(outcome.message)
    alert(
        context,
        "recovered",
        alerting.resolve_export,
        outcome.campaign_id,
        outcome.revision,
        alerter=alerter,
    )


def report_final_failure(
    context: dg.OpExecutionContext, alerter: Any, outcome: DeliveryOutcome, attempt: int
) -> None:
    alert(
        context,
        "export failed",
        alerting.alert_export_failed,
        outcome.campaign_id,
        outcome.revision,
        outcome.message,
        tenant=outcome.bundle.tenant_code if outcome.bundle else None,
        attempts=attempt,
        run_id=context.run.run_id,
        alerter=alerter,
    )


def delivery_metadata(outcome: DeliveryOutcome, attempt: int) -> dict[str, Any]:
    bundle, delivery = outcome.bundle, outcome.delivery
    assert bundle is not None and delivery is not None
    meta: dict[str, Any] = {
        "campaign_id": outcome.campaign_id,
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
    return meta
