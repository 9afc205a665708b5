"""Campaign export assets, one dynamic partition per campaign id.

``cfi_export/campaign_files`` builds the JSON + CSV + manifest in the outbox and
carries the check ``valid_against_schema`` (per partition); ``cfi_export/campaign_delivery``
uploads them over SFTP, under a retry policy, only when the check passed. Both
write the outcome to MyCfia's ``campaign_exports`` table, and alert (resource
"alerts"): a rejected campaign, a delivery that failed for good (last retry, or an
error no retry can fix), then "recovered" once the campaign is delivered.

Each state of a partition reads as what it is, in the UI:

- delivered: both assets materialized (green);
- rejected by validation: neither materialized (grey), the check failed *for that
  partition*, and an observation on each asset gives the reason;
- delivery failed: campaign_delivery red (a failed step, or in a batch run a planned
  materialization the failed run did not make);
- a failed re-send of a delivered revision: stays green (its files are on the drop),
  an observation says the re-send failed; no alert episode (nothing was lost).
"""

import random
import time
import warnings
from collections.abc import Iterator

import dagster as dg
import sqlalchemy as sa

from cfi_pipelines.assets.export_events import (
    DELIVERY_KEY,
    FILES_KEY,
    check_description,
    check_metadata,
    delivery_metadata,
    files_metadata,
    rejected_observations,
    report_delivered,
    report_final_failure,
    report_rejected,
    resend_failed_observation,
)
from cfi_pipelines.exports.campaign import (
    DeliveryOutcome,
    NotDeliverable,
    SFTPTarget,
    SharedSession,
    build_campaign,
    deliver_campaign,
)
from cfi_pipelines.exports.errors import CampaignNotExportable
from cfi_pipelines.exports.records import latest_export
from cfi_pipelines.resources.alerter import AlertsResource
from cfi_pipelines.resources.databases import DatabaseResource
from cfi_pipelines.resources.sftp import SFTPResource
from cfi_pipelines.settings import get_settings

campaigns_partitions = dg.DynamicPartitionsDefinition(name="campaigns")
"""Partition key = MyCfia campaign id."""

CHECK_NAME = "valid_against_schema"
GROUP = "cfi_export"
"""One name: the asset group is the key prefix."""
MAX_RETRIES = 3


with warnings.catch_warnings():
    # Partitioned checks are "preview" in Dagster 1.13; they are what makes a rejected
    # campaign's check read "Failed, Partition 1007" instead of the last campaign's result.
    warnings.filterwarnings("ignore", r".*partitions_def on an AssetCheckSpec", dg.PreviewWarning)
    VALIDATION_CHECK = dg.AssetCheckSpec(
        CHECK_NAME,
        asset=FILES_KEY,
        description="Every field of the campaign and of each target matches the JSON Schema; "
        "a failure marks the export 'rejected' (errors in the metadata) and the delivery is "
        "not attempted: a rejection is a failed check, never a failed delivery.",
        partitions_def=campaigns_partitions,  # evaluated per campaign: "Partition 1007"
    )


def _campaign_id(context: dg.AssetExecutionContext) -> int:
    key = context.partition_key
    if not key.isdigit():
        raise dg.Failure(
            f"partition {key!r} is not a campaign id (digits only)",
            metadata={"partition": key},
            allow_retries=False,
        )
    return int(key)


@dg.asset(
    key=FILES_KEY,
    partitions_def=campaigns_partitions,
    group_name=GROUP,
    kinds={"json", "csv"},
    description="A validated campaign's export (JSON + CSV + manifest) in the outbox, "
    "checked against schemas/campaign_export.v1.json.",
    check_specs=[VALIDATION_CHECK],
    # a rejected campaign is not materialized (grey, with its reason): only what is valid
    # is an export; the delivery, downstream, is then skipped
    output_required=False,
)
def campaign_files(
    context: dg.AssetExecutionContext, mycfia: DatabaseResource, alerts: AlertsResource
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult | dg.AssetObservation]:
    """Build and validate one campaign's export; record pending or rejected."""
    campaign_id = _campaign_id(context)
    try:
        bundle = build_campaign(
            mycfia.engine(), campaign_id, get_settings().outbox_dir, context.run.run_id
        )
    except CampaignNotExportable as exc:
        raise dg.Failure(
            str(exc), metadata={"campaign_id": campaign_id}, allow_retries=False
        ) from None
    check = dg.AssetCheckResult(
        check_name=CHECK_NAME,
        passed=bundle.valid,
        severity=dg.AssetCheckSeverity.ERROR,
        description=check_description(bundle),
        metadata=check_metadata(bundle, context.partition_key),
    )
    if not bundle.valid:
        report_rejected(context, alerts, bundle)
        yield check
        yield from rejected_observations(bundle, context.partition_key)
        return
    meta = files_metadata(bundle)
    meta["status"] = "pending"
    yield dg.MaterializeResult(metadata=meta, check_results=[check])


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
) -> Iterator[dg.MaterializeResult | dg.AssetObservation]:
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
        yield dg.AssetObservation(
            DELIVERY_KEY,
            partition=context.partition_key,
            description="rejected by validation: not delivered",
            metadata={"status": "rejected", "revision": row.revision, "reason": row.error or ""},
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
    if outcome.resend_failed:
        # not a failed step: the partition stays green (delivered), the observation and
        # the log say the re-send failed; `cfi-pipelines export --force` exits 1
        context.log.error(
            f"{outcome.message} The re-send failed; campaign {campaign_id} r{outcome.revision} "
            "stays delivered: the files of its earlier delivery are on the drop."
        )
        yield resend_failed_observation(outcome, context.partition_key)
        return
    if not outcome.delivered:
        if outcome.final_failure:
            report_final_failure(context, alerter, outcome, attempt)
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
    report_delivered(context, alerter, outcome)
    yield dg.MaterializeResult(metadata=delivery_metadata(outcome, attempt))


export_assets = [campaign_files, campaign_delivery]

campaign_export_job = dg.define_asset_job(
    "campaign_export",
    executor_def=dg.in_process_executor,  # a few steps: one process, not one per step
    selection=dg.AssetSelection.assets(FILES_KEY, DELIVERY_KEY),
    partitions_def=campaigns_partitions,
    description="Export one campaign (partition = campaign id): build, validate, upload over SFTP.",
)
"""The job the sensor and ``cfi-pipelines export`` run: build, check, deliver."""


# ------------------------------------------------------------------ many campaigns, one run
# A burst of validated campaigns (a seasonal push: hundreds at once) is exported by runs
# of ``campaign_export_batch``: one process start and ONE SFTP connection for up to
# BATCH_SIZE campaigns, instead of one run (a process start, a connection) each. The op
# reports, per campaign, what the two assets of ``campaign_export`` would: the
# materialization of cfi_export/campaign_files and its check valid_against_schema, then
# the materialization of cfi_export/campaign_delivery, all with partition=<campaign id>.

BATCH_JOB_NAME = "campaign_export_batch"


class CampaignBatchConfig(dg.Config):
    """The campaigns of one batch run (their current revision is exported)."""

    campaigns: list[int]
    max_attempts: int = MAX_RETRIES + 1
    """Delivery attempts per campaign in the run (the first + in-run retries)."""


def _retry_pause(attempt: int) -> float:
    """Seconds before attempt ``attempt + 1``: the delivery asset's backoff, jittered."""
    base = (DELIVERY_RETRY_POLICY.delay or 0) * 2 ** (attempt - 1)  # read at load, as above
    return base * random.uniform(0.5, 1.5)  # noqa: S311 - jitter, not security


def _mark_delivery_failed(context: dg.OpExecutionContext, partition: str) -> None:
    """Make a campaign whose delivery failed in this batch run red in the UI, as a failed
    ``campaign_export`` run would: Dagster colours a partition failed when a run that
    *planned* its materialization fails without making it. A batch is an op, not the
    asset, so nothing is planned for it: the plan is reported here, and the batch run
    fails at its end (its Failure lists the campaigns). Dagster has no public API for
    this event; it is the one the asset job itself logs at run start."""
    from dagster._core.events import AssetMaterializationPlannedData, DagsterEvent

    event = DagsterEvent.build_asset_materialization_planned_event(
        context.job_name,
        context.get_step_execution_context().step.key,
        AssetMaterializationPlannedData(DELIVERY_KEY, partition=partition),
    )
    context.instance.report_dagster_event(event, context.run_id)


def deliver_with_retries(
    context: dg.OpExecutionContext,
    engine: sa.Engine,
    target: SFTPTarget,
    campaign_id: int,
    max_attempts: int,
    *,
    first_attempt: int = 1,
) -> tuple[DeliveryOutcome, int]:
    """Deliver one campaign over the batch's connection, re-trying transient failures
    in the run like the delivery asset's RetryPolicy does. (outcome, attempt number)"""
    attempt = first_attempt
    while True:
        outcome = deliver_campaign(
            engine, target, campaign_id, attempt=attempt, max_attempts=max_attempts
        )
        if not outcome.retry:
            return outcome, attempt
        pause = _retry_pause(attempt)
        context.log.warning(f"{outcome.message} (will retry in {pause:.1f}s)")
        time.sleep(pause)
        attempt += 1


@dg.op(
    name="export_campaign_batch",
    description="Build, validate and deliver a batch of campaigns over one SFTP connection; "
    "per campaign: materializations of cfi_export/campaign_files and "
    "cfi_export/campaign_delivery and the check valid_against_schema (partition = id).",
    tags={"kind": "sftp"},
    out={},  # events only: the per-campaign materializations, observations, check evaluations
)
def export_campaign_batch(
    context: dg.OpExecutionContext,
    config: CampaignBatchConfig,
    mycfia: DatabaseResource,
    sftp: SFTPResource,
    alerts: AlertsResource,
) -> Iterator[dg.AssetMaterialization | dg.AssetCheckEvaluation | dg.AssetObservation]:
    """One run, many campaigns. A rejected campaign is a failed check (never a failed
    delivery), grey with its reason; a delivery that failed is recorded (transient ones
    are re-tried later by the sensor), red, and fails the run at the end, once every
    other campaign went through."""
    engine = mycfia.engine()
    outbox = get_settings().outbox_dir
    alerter = alerts.alerter(context.log)
    shared = SharedSession(sftp.open)
    target = SFTPTarget(sftp.host, sftp.port, sftp.target, sftp.remote_dir, shared.session)
    problems: dict[int, str] = {}
    counts = {"delivered": 0, "rejected": 0, "failed": 0}
    try:
        for campaign_id in config.campaigns:
            partition = str(campaign_id)
            try:
                bundle = build_campaign(engine, campaign_id, outbox, context.run.run_id)
            except CampaignNotExportable as exc:
                context.log.error(str(exc))
                problems[campaign_id] = str(exc)
                counts["failed"] += 1
                continue
            if bundle.valid:
                files_meta = files_metadata(bundle)
                files_meta["status"] = "pending"
                yield dg.AssetMaterialization(FILES_KEY, partition=partition, metadata=files_meta)
            yield dg.AssetCheckEvaluation(
                asset_key=FILES_KEY,
                check_name=CHECK_NAME,
                passed=bundle.valid,
                severity=dg.AssetCheckSeverity.ERROR,
                description=check_description(bundle),
                metadata=check_metadata(bundle, partition),
                partition=partition,
            )
            if not bundle.valid:
                report_rejected(context, alerts, bundle)
                yield from rejected_observations(bundle, partition)
                counts["rejected"] += 1
                continue
            try:
                outcome, attempts = deliver_with_retries(
                    context,
                    engine,
                    target,
                    campaign_id,
                    config.max_attempts,
                    # server unreachable for the batch: one (final) attempt, failing at once
                    first_attempt=config.max_attempts if shared.gave_up else 1,
                )
            except NotDeliverable as exc:
                problems[campaign_id] = str(exc)
                counts["failed"] += 1
                continue
            if outcome.resend_failed:  # stays delivered (green): said, not red
                context.log.error(f"{outcome.message} (re-send; the revision stays delivered)")
                yield resend_failed_observation(outcome, partition)
                problems[campaign_id] = outcome.message
                counts["failed"] += 1
                continue
            if not outcome.delivered:
                context.log.error(outcome.message)
                problems[campaign_id] = outcome.message
                counts["failed"] += 1
                _mark_delivery_failed(context, partition)
                if outcome.final_failure:
                    report_final_failure(context, alerter, outcome, attempts)
                if shared.open_error is not None and not shared.gave_up:
                    # the server could not be reached on any attempt: the others would
                    # wait as long for nothing; they are recorded failed now, re-tried later
                    shared.give_up(
                        "not attempted: the SFTP server could not be reached for the "
                        f"previous campaign of this batch ({campaign_id}, {attempts} attempts: "
                        f"{type(shared.open_error).__name__}: {shared.open_error})"
                    )
                continue
            counts["delivered"] += 1
            report_delivered(context, alerter, outcome)
            yield dg.AssetMaterialization(
                DELIVERY_KEY, partition=partition, metadata=delivery_metadata(outcome, attempts)
            )
    finally:
        shared.close()
    summary = (
        f"{len(config.campaigns)} campaigns: {counts['delivered']} delivered, "
        f"{counts['rejected']} rejected, {counts['failed']} failed; "
        f"{shared.opened} SFTP connection(s)"
    )
    context.log.info(summary)
    if problems:
        raise dg.Failure(
            f"{summary}. Failed:\n"
            + "\n".join(f"campaign {cid}: {why}" for cid, why in problems.items()),
            metadata={
                "failed_campaigns": dg.MetadataValue.json(sorted(problems)),
                **{k: dg.MetadataValue.int(v) for k, v in counts.items()},
            },
            allow_retries=False,
        )


@dg.job(
    name=BATCH_JOB_NAME,
    executor_def=dg.in_process_executor,
    description="Export a batch of campaigns (config: their ids) in one run over one SFTP "
    "connection; requested by validated_campaigns_sensor when many are due at once. Per "
    "campaign it reports what campaign_export does, with partition = campaign id.",
    tags={"cfi/trigger": "batch"},
)
def campaign_export_batch_job() -> None:
    export_campaign_batch()
