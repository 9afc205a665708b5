"""What we alert on: the messages for stale views, fallbacks, failed runs and exports.

Each says what is wrong and what to do; the episode keys make them once-only.
"""

from __future__ import annotations

from datetime import datetime

from cfi_pipelines.alerting.alerter import Alerter
from cfi_pipelines.alerting.channels import Alert


def view_stale_alert(view: str, age_s: float | None, source: str | None, link: str | None) -> Alert:
    age = "never refreshed" if age_s is None else f"{age_s / 60:.0f} min old"
    return Alert(
        key=f"view_stale:{view}",
        title=f"View {view} is stale ({age})",
        text=(
            f"The freshness check of cfi_common/{view} is at ERROR (> 15 min; last source: "
            f"{source or 'none'}). The lag sensor requests a refresh, or a fallback snapshot "
            f"from the CFI API if CFI's DB is unreachable. Check the runs of cfi_common/{view} "
            f"and `cfi-pipelines status`; refresh by hand with `cfi-pipelines refresh {view}`."
        ),
        link=link,
        fields={"view": view, "age_s": age_s, "source": source},
    )


def view_on_api_alert(view: str, snapshot_at: datetime | None, link: str | None) -> Alert:
    return Alert(
        key=f"view_fallback:{view}",
        title=f"View {view} is served from CFI API data",
        text=(
            f"cfi_common/{view} was filled from a fallback snapshot of CFI's HTTP API (as of "
            f"{snapshot_at.isoformat() + 'Z' if snapshot_at else 'unknown'}) because CFI's source DB "
            "could not be read. Check CFI_SOURCE_URL and the source DB; the next successful "
            "refresh from the DB ends this episode."
        ),
        severity="warning",
        link=link,
        fields={"view": view},
    )


def common_db_down_alert(error: str, link: str | None = None) -> Alert:
    return Alert(
        key="common_db_down",
        title="The common DB (MyCfia's read cache) is unreachable",
        text=(
            f"{error}. MyCfia falls back to CFI's HTTP API; fallback snapshots are written to "
            "CFI_HOME/snapshots (Parquet only). Check CFI_COMMON_URL and the database server."
        ),
        link=link,
    )


def run_failed_alert(job: str, run_id: str, error: str, link: str, scope: str = "") -> Alert:
    return Alert(
        key=f"run_failed:{job}" + (f":{scope}" if scope else ""),
        title=f"Run of {job}{f' ({scope})' if scope else ''} failed",
        text=f"{error[:1500]}\nOpen the run, fix the cause, then re-execute it from the UI.",
        link=link,
        fields={"job": job, "run_id": run_id},
    )


def schema_changed_key(table: str) -> str:
    return f"schema_changed:{table}"


def schema_changed_alert(
    table: str, missing: list[str], views: list[str], link: str | None = None
) -> Alert:
    """CFI renamed or dropped what the views read from ``table``: not an outage."""
    return Alert(
        key=schema_changed_key(table),
        title=f"CFI's schema changed: {', '.join(missing)} missing",
        text=(
            f"CFI's DB no longer has {', '.join(missing)}, read by the view(s) "
            f"{', '.join(views)}: their refreshes fail (not an outage: the DB answers). The "
            "views keep their last data; once one is > 15 min old and 2 refreshes failed, the "
            "lag sensor serves it from the CFI API (same view contract). Restore the column in "
            "CFI's DB, or adapt the views' queries (cfi_pipelines/views/spec.py) and deploy. "
            "`cfi-pipelines doctor` names every difference; the schema check of "
            f"cfi_source/{table} shows it in the UI."
        ),
        link=link,
        fields={"table": table, "missing": missing, "views": views},
    )


# --------------------------------------------------------------------------- for the exports


def export_failed_key(campaign_id: int, revision: int) -> str:
    return f"export_failed:{campaign_id}:r{revision}"


def campaign_rejected_key(campaign_id: int, revision: int) -> str:
    return f"campaign_rejected:{campaign_id}:r{revision}"


def alert_export_failed(
    campaign_id: int,
    revision: int,
    error: str,
    *,
    tenant: str | None = None,
    attempts: int | None = None,
    run_id: str | None = None,
    alerter: Alerter | None = None,
) -> bool:
    """Alert (once) that a campaign export failed after its retries. True when sent now."""
    alerter = alerter or Alerter()
    tries = f" after {attempts} attempts" if attempts else ""
    return alerter.open(
        Alert(
            key=export_failed_key(campaign_id, revision),
            title=f"Export of campaign {campaign_id} r{revision} failed{tries}",
            text=(
                f"{error}\nThe files did not reach CFI's SFTP drop"
                f"{f' (tenant {tenant})' if tenant else ''}. Fix the cause (SFTP host, key, "
                f"disk), then re-export: `cfi-pipelines export {campaign_id} --force` or "
                f"re-materialize partition {campaign_id} of the export asset in the UI."
            ),
            link=alerter.run_link(run_id) if run_id else None,
            fields={"campaign_id": campaign_id, "revision": revision, "tenant": tenant},
        )
    )


def alert_campaign_rejected(
    campaign_id: int,
    revision: int,
    reasons: str | list[str],
    *,
    tenant: str | None = None,
    run_id: str | None = None,
    alerter: Alerter | None = None,
) -> bool:
    """Alert (once) that a validated campaign was rejected (e.g. fails the JSON Schema)."""
    alerter = alerter or Alerter()
    if isinstance(reasons, list):
        reasons = "\n".join(f"- {r}" for r in reasons)
    return alerter.open(
        Alert(
            key=campaign_rejected_key(campaign_id, revision),
            title=f"Campaign {campaign_id} r{revision} was rejected",
            text=(
                f"{reasons}\nNothing was sent to CFI. Correct the campaign in MyCfia (a new "
                "revision is exported automatically) or fix the export and re-export by hand."
            ),
            severity="warning",
            link=alerter.run_link(run_id) if run_id else None,
            fields={"campaign_id": campaign_id, "revision": revision, "tenant": tenant},
        )
    )


def resolve_export(campaign_id: int, revision: int, *, alerter: Alerter | None = None) -> bool:
    """Send "recovered" for a campaign whose export/rejection episode was open (after delivery)."""
    alerter = alerter or Alerter()
    text = f"Campaign {campaign_id} r{revision} was delivered to CFI."
    a = alerter.resolve(export_failed_key(campaign_id, revision), text)
    b = alerter.resolve(campaign_rejected_key(campaign_id, revision), text)
    return a or b
