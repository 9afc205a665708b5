"""``cfi-pipelines demo``: the whole product on the embedded defaults, through Dagster.

Seeds the embedded databases if they are missing, starts the embedded SFTP
server, refreshes the four views, runs their checks, exports every validated
campaign, and prints a summary. Exit code 0 only if everything that should have
worked did (a campaign that is invalid on purpose is *expected* to be rejected).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import sqlalchemy as sa


def _say(msg: str) -> None:
    print(msg, flush=True)


@contextlib.contextmanager
def embedded_sftp() -> Iterator[object | None]:
    """The dev SFTP server when CFI_SFTP_HOST is unset (else CFI's real server is used)."""
    from cfi_pipelines.settings import get_settings

    if get_settings().sftp_host:
        yield None
        return
    from cfi_pipelines.devtools.sftp_server import DevSFTPServer, dev_port

    server = DevSFTPServer(port=dev_port())
    try:
        yield server
    finally:
        server.stop()


def run_demo(scale: int = 1) -> int:
    from cfi_pipelines import cli
    from cfi_pipelines.db import engine_for
    from cfi_pipelines.definitions import build_defs
    from cfi_pipelines.instance import local_instance
    from cfi_pipelines.model import mycfia
    from cfi_pipelines.settings import get_settings
    from cfi_pipelines.views import VIEWS

    s = get_settings()
    instance = local_instance()
    defs = build_defs()
    ok = True
    if not cli.source_is_seeded():
        _say(f"[1/5] seeding the embedded databases under {s.home} (scale {scale}) …")
        cli.cmd_seed(type("A", (), {"scale": scale, "seed": 0})())
    else:
        _say("[1/5] databases already seeded")

    with embedded_sftp() as server:
        if server is not None:
            _say(
                f"[2/5] embedded SFTP server on 127.0.0.1:{server.port} (root {server.paths.root})"
            )
        else:
            _say(f"[2/5] using CFI's SFTP server {s.sftp_host}")

        _say("[3/5] refreshing the four views (Dagster job refresh_views) …")
        result = cli.run_refresh([v.name for v in VIEWS], tags={"cfi/trigger": "demo"})
        ok &= result.success
        for failure in cli._failures(result):
            _say(f"      FAILED {failure}")

        _say("[4/5] running the view checks (Dagster job check_views) …")
        checks = defs.resolve_job_def("check_views").execute_in_process(
            instance=instance, raise_on_error=False, tags={"cfi/trigger": "demo"}
        )
        check_state: dict[str, list[str]] = {}
        for ev in checks.all_events:
            if ev.event_type_value == "ASSET_CHECK_EVALUATION":
                data = ev.event_specific_data
                state = "PASS" if data.passed else data.severity.value
                check_state.setdefault(data.asset_key.path[-1], []).append(
                    f"{data.check_name}={state}"
                )
                ok &= data.passed

        engine = engine_for(s.mycfia_url)
        c = mycfia.campaigns.c
        with engine.connect() as conn:
            validated = conn.execute(
                sa.select(c.id, c.name).where(c.status == "validated").order_by(c.id)
            ).all()
        _say(
            f"[5/5] exporting {len(validated)} validated campaigns (Dagster job campaign_export) …"
        )
        job = defs.resolve_job_def("campaign_export")
        instance.add_dynamic_partitions("campaigns", [str(cid) for cid, _ in validated])
        for i, (cid, name) in enumerate(validated, 1):
            job.execute_in_process(
                instance=instance,
                partition_key=str(cid),
                raise_on_error=False,
                tags={"cfi/trigger": "demo"},
            )
            _say(f"      {i}/{len(validated)} campaign {cid} ({name[:40]})")

    st = cli.collect_status()
    _say("\nViews:")
    for v in st["views"]:
        _say(
            f"  {v['view']:<11} {v['rows'] if v['rows'] is not None else '-':>8} rows  "
            f"{cli._fmt_age(v['age_s']):<22} checks: {' '.join(check_state.get(v['view'], ['-']))}"
        )
    _say("Campaigns:")
    e = mycfia.campaign_exports.c
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(e.campaign_id, e.revision, e.status, e.manifest_path, e.error).order_by(
                e.campaign_id, e.revision
            )
        ).all()
    expected_invalid = {cid for cid, name in validated if "invalid" in name.lower()}
    for r in rows:
        if r.status == "delivered":
            _say(f"  campaign {r.campaign_id} r{r.revision}: delivered -> {r.manifest_path}")
        else:
            first = (r.error or "").strip().splitlines()[:3]
            _say(
                f"  campaign {r.campaign_id} r{r.revision}: {r.status.upper()}  "
                + " | ".join(first)
            )
            if r.status != "rejected" or r.campaign_id not in expected_invalid:
                ok &= r.status == "rejected"  # a rejection is the expected outcome for bad input
    _say("Files:")
    _say(f"  databases, snapshots, outbox: {s.home}")
    if not s.sftp_host:
        _say(f"  SFTP drop (embedded server root): {s.dev_sftp_dir / 'root'}")
    _say(f"  Dagster instance: {instance.root_directory}  (see the runs: cfi-pipelines dev)")
    _say("demo: OK" if ok else "demo: something that should have worked did not (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run_demo())
