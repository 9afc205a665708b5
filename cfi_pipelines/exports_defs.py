"""The campaign-export half of the code location, merged by ``definitions.py``."""

from __future__ import annotations

import os

import dagster as dg

from cfi_pipelines.assets.exports import build_export_assets, export_job
from cfi_pipelines.resources.sftp import SFTPResource
from cfi_pipelines.sensors.campaigns import build_campaigns_sensor
from cfi_pipelines.settings import get_settings


def sftp_resource() -> SFTPResource:
    """CFI's SFTP from ``CFI_SFTP_*`` (secrets as ``EnvVar``), else the embedded dev server's."""
    settings = get_settings()
    if not settings.sftp_host:
        from cfi_pipelines.devtools.sftp_server import dev_sftp_resource

        return dev_sftp_resource()
    return SFTPResource(
        host=settings.sftp_host,
        port=settings.sftp_port,
        username=settings.sftp_user or "cfi",
        private_key=dg.EnvVar("CFI_SFTP_KEY"),
        known_hosts=settings.sftp_known_hosts or "~/.ssh/known_hosts",
        remote_dir=settings.sftp_dir,
        # 0: negotiated with the server (large writes on OpenSSH), see resources/sftp.py
        write_size=int(os.environ.get("CFI_SFTP_WRITE_SIZE") or 0),
    )


def build_export_defs(retry_delay: float | None = None) -> dg.Definitions:
    """Assets, check, job, sensor and the "sftp" resource of campaign exports
    ("mycfia" comes from :func:`cfi_pipelines.definitions.build_resources`)."""
    assets = build_export_assets(retry_delay)
    job = export_job(assets)
    return dg.Definitions(
        assets=assets,
        jobs=[job],
        sensors=[build_campaigns_sensor(job)],
        resources={
            "sftp": sftp_resource(),
        },
    )


def export_command(campaign_id: int, force: bool = False) -> int:
    """``cfi-pipelines export CAMPAIGN_ID [--force]``: export one campaign now, through Dagster.

    Runs the export assets for partition ``campaign_id`` on the instance of
    ``DAGSTER_HOME`` (default ``CFI_HOME/dagster``), so the run shows in the UI.
    Without ``--force`` a revision already delivered is not sent again.
    Returns the exit code: 0 delivered (or already delivered), 1 otherwise.
    """
    import sqlalchemy as sa

    from cfi_pipelines.assets.exports import campaigns_partitions
    from cfi_pipelines.db import engine_for
    from cfi_pipelines.instance import ensure_dagster_home
    from cfi_pipelines.model import mycfia

    settings = get_settings()
    ensure_dagster_home()
    engine = engine_for(settings.mycfia_url)
    c, e = mycfia.campaigns.c, mycfia.campaign_exports.c
    with engine.connect() as conn:
        revision = conn.execute(sa.select(c.revision).where(c.id == campaign_id)).scalar()
        done = conn.execute(
            sa.select(e.manifest_path).where(
                e.campaign_id == campaign_id, e.revision == revision, e.status == "delivered"
            )
        ).scalar()
    if revision is None:
        print(f"campaign {campaign_id} does not exist in MyCfia's DB")
        return 1
    if done and not force:
        print(
            f"campaign {campaign_id} r{revision} already delivered ({done}); use --force to send it again"
        )
        return 0
    from cfi_pipelines.definitions import build_defs

    defs = build_defs()
    instance = dg.DagsterInstance.get()
    instance.add_dynamic_partitions(campaigns_partitions.name, [str(campaign_id)])
    result = dg.materialize(
        [
            a
            for a in defs.assets or []
            if isinstance(a, dg.AssetsDefinition) and a.partitions_def is not None
        ],
        instance=instance,
        partition_key=str(campaign_id),
        resources=defs.resources,
        raise_on_error=False,
        tags={"cfi/trigger": "cli", "cfi/campaign_id": str(campaign_id)},
    )
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(e.status, e.manifest_path, e.error, e.attempts)
            .where(e.campaign_id == campaign_id)
            .order_by(e.revision.desc())
            .limit(1)
        ).first()
    if result.success and row is not None and row.status == "delivered":
        print(
            f"campaign {campaign_id} r{revision} delivered: {row.manifest_path} (run {result.run_id})"
        )
        return 0
    detail = (row.error if row is not None else None) or "see the run in the Dagster UI"
    status = row.status if row is not None else "failed"
    print(f"campaign {campaign_id} r{revision} {status} (run {result.run_id}):\n{detail}")
    return 1
