"""Runs through Dagster for the CLI and the demo: refresh views, export a campaign.

Each is a run of a named job (``refresh_views``, ``campaign_export``) on the
project's instance, so it shows in the UI and can be re-executed from there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dagster as dg
import sqlalchemy as sa

from cfi_pipelines.assets.exports import DELIVERY_KEY, campaigns_partitions
from cfi_pipelines.assets.views import RefreshConfig, view_key, view_op_name
from cfi_pipelines.db import engine_for
from cfi_pipelines.definitions import defs as location_defs
from cfi_pipelines.exports.document import not_exportable_reason
from cfi_pipelines.model import mycfia
from cfi_pipelines.ops.instance import local_instance
from cfi_pipelines.settings import get_settings

QUIET_LOGS: dict[str, Any] = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
"""Run config that keeps Dagster's console quiet: the commands print their own answer
and every failure; the full event logs are in the instance (the UI shows them)."""


def run_refresh(
    views: Sequence[str],
    *,
    mode: str = "auto",
    force: bool = False,
    tags: dict | None = None,
    run_config: dict | None = None,
    defs: dg.Definitions | None = None,
) -> dg.ExecuteInProcessResult:
    """Refresh ``views`` through the ``refresh_views`` job on the project's instance
    (``run_config``: extra run config, e.g. loggers)."""
    job = (defs or location_defs).resolve_job_def("refresh_views")
    ops = {
        view_op_name(v): {"config": RefreshConfig(mode=mode, force=force).model_dump()}
        for v in views
    }
    return job.execute_in_process(
        instance=local_instance(),
        run_config={**QUIET_LOGS, **(run_config or {}), "ops": ops},
        asset_selection=[view_key(v) for v in views],
        raise_on_error=False,
        tags={"cfi/trigger": "cli", **(tags or {})},
    )


def materializations(result: dg.ExecuteInProcessResult) -> dict[str, dict[str, Any]]:
    """``{view or asset name: metadata values}`` of a result's materializations."""
    out = {}
    for event in result.get_asset_materialization_events():
        mat = event.materialization
        out[mat.asset_key.path[-1]] = {k: v.value for k, v in mat.metadata.items()}
    return out


def step_failures(result: dg.ExecuteInProcessResult) -> list[str]:
    """Per failed step of an in-process result: step key and what failed, whole. A
    ``dagster.Failure``'s description is the message (never cut, no exception class);
    any other error, its first line (the traceback is in the run's logs)."""
    out = []
    for ev in result.all_events:
        if ev.is_step_failure:
            data = ev.step_failure_data
            if data.user_failure_data is not None and data.user_failure_data.description:
                text = data.user_failure_data.description.strip()
            else:
                err = data.error
                text = (err.message.strip().splitlines() or [""])[0] if err else ""
            out.append(f"{ev.step_key}: {text}")
    return out


def failure_descriptions(result: dg.ExecuteInProcessResult) -> list[str]:
    """The whole message of each failed step (a ``dagster.Failure``'s description)."""
    out = []
    for ev in result.all_events:
        if ev.is_step_failure and ev.step_failure_data.error:
            err = ev.step_failure_data.error
            if ev.step_failure_data.user_failure_data is not None:
                out.append(ev.step_failure_data.user_failure_data.description or err.message)
            else:
                out.append(err.message.strip())
    return out


@dataclass(frozen=True)
class ExportRun:
    """What ``cfi-pipelines export`` did: exit code and the line(s) to print."""

    code: int
    message: str
    run_id: str | None = None


def run_export(
    campaign_id: int,
    *,
    force: bool = False,
    defs: dg.Definitions | None = None,
    tags: dict | None = None,
) -> ExportRun:
    """Export one campaign now through the ``campaign_export`` job (partition = id).

    Without ``force`` a revision already delivered is not sent again. A campaign that is
    not validated (a draft) is refused before any run is launched: a run bound to fail
    would only turn its partition red. Code 0: delivered (or already delivered), 1
    otherwise, with the reason.
    """
    engine = engine_for(get_settings().mycfia_url)
    c, e = mycfia.campaigns.c, mycfia.campaign_exports.c
    with engine.connect() as conn:
        campaign = conn.execute(sa.select(c.revision, c.status).where(c.id == campaign_id)).first()
        if campaign is None:
            return ExportRun(1, f"campaign {campaign_id} does not exist in MyCfia's DB")
        refused = not_exportable_reason(campaign_id, campaign.revision, campaign.status)
        if refused is not None:
            return ExportRun(1, f"{refused}; nothing was launched")
        done = conn.execute(
            sa.select(e.manifest_path).where(
                e.campaign_id == campaign_id,
                e.revision == campaign.revision,
                e.status == "delivered",
            )
        ).scalar()
    revision = campaign.revision
    if done and not force:
        return ExportRun(
            0,
            f"campaign {campaign_id} r{revision} already delivered ({done}); "
            "use --force to send it again",
        )
    instance = local_instance()
    instance.add_dynamic_partitions(campaigns_partitions.name, [str(campaign_id)])
    result = (
        (defs or location_defs)
        .resolve_job_def("campaign_export")
        .execute_in_process(
            instance=instance,
            partition_key=str(campaign_id),
            run_config=QUIET_LOGS,
            raise_on_error=False,
            tags={"cfi/trigger": "cli", "cfi/campaign_id": str(campaign_id), **(tags or {})},
        )
    )
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(e.status, e.manifest_path, e.error).where(
                e.campaign_id == campaign_id, e.revision == revision
            )
        ).first()
    run = f"run {result.run_id}"
    reasons = list(dict.fromkeys(failure_descriptions(result)))
    sent = any(ev.asset_key == DELIVERY_KEY for ev in result.get_asset_materialization_events())
    if not sent:  # a failed re-send is an observation, not a failed step: the partition stays green
        reasons += [
            str(obs.metadata["reason"].value)
            for obs in (
                ev.asset_observation_data.asset_observation
                for ev in result.all_events
                if ev.event_type == dg.DagsterEventType.ASSET_OBSERVATION
            )
            if obs.asset_key == DELIVERY_KEY and "reason" in obs.metadata
        ]
    if sent and result.success and row is not None and row.status == "delivered":
        return ExportRun(
            0,
            f"campaign {campaign_id} r{revision} delivered: {row.manifest_path} ({run})",
            result.run_id,
        )
    if row is not None and row.status == "delivered":  # a failed re-send: nothing lost
        detail = "\n".join(reasons) or "see the run in the Dagster UI"
        return ExportRun(
            1,
            f"campaign {campaign_id} r{revision}: the re-send failed ({run}); the revision stays "
            f"delivered, its files from the earlier delivery are on the drop "
            f"({row.manifest_path}):\n{detail}",
            result.run_id,
        )
    detail = (row.error if row is not None and row.error else None) or (
        "\n".join(reasons) if reasons else "see the run in the Dagster UI"
    )
    status = row.status if row is not None else "not exported"
    return ExportRun(
        1, f"campaign {campaign_id} r{revision} {status} ({run}):\n{detail}", result.run_id
    )
