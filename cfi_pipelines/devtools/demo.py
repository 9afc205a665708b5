"""``cfi-pipelines demo``: the whole product on the embedded defaults, through Dagster.

Seeds the embedded databases if they are missing, starts the embedded SFTP
server and the fake CFI API, refreshes the four views, runs their checks, takes
a fallback snapshot of each view from the CFI API, exports every validated
campaign, and prints a summary. Every step is a Dagster run on the local
instance (``CFI_HOME/dagster``): ``cfi-pipelines dev`` shows them afterwards.

Exit code 0 only if everything that should have worked did:

- the refresh and fallback runs succeeded and every view check passed;
- every validated campaign was delivered (its manifest is on the SFTP drop),
  except the ones :mod:`cfi_pipelines.devtools.seed_mycfia` plants as invalid
  (:data:`~cfi_pipelines.devtools.seed_mycfia.INVALID_KINDS`): each of those
  must be *rejected*, for the defect that was planted in it. A planted campaign
  that is delivered, or any other campaign that is rejected or fails, is an error.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from cfi_pipelines.assets.fallback import fallback_key, fallback_run_config
from cfi_pipelines.db import engine_for
from cfi_pipelines.definitions import build_defs
from cfi_pipelines.devtools.fake_cfi_api import FakeCfiApi
from cfi_pipelines.devtools.seed import seed_all, source_is_seeded
from cfi_pipelines.devtools.seed_mycfia import INVALID_KINDS
from cfi_pipelines.devtools.sftp_server import start_dev_server
from cfi_pipelines.model import mycfia
from cfi_pipelines.ops.instance import local_instance
from cfi_pipelines.ops.runs import QUIET_LOGS, materializations, run_refresh, step_failures
from cfi_pipelines.ops.status import collect_status
from cfi_pipelines.resources.cfi_api import CfiApiResource
from cfi_pipelines.settings import get_settings
from cfi_pipelines.views.freshness import format_age
from cfi_pipelines.views.spec import VIEWS

STEPS = 6

PLANTED_NAME_PREFIX = "Invalide: "
PLANTED_ERROR = {
    # seed_mycfia.INVALID_KINDS -> what the rejection must mention (JSON pointer / field)
    "missing budget": "'budget'",
    "tenant code with a path": "/campaign/tenant_code",
    "formula in a target email": "/email",
    "control character in the name": "/campaign/name",
}


def _say(msg: str) -> None:
    print(msg, flush=True)


def _step(n: int, msg: str) -> None:
    _say(f"[{n}/{STEPS}] {msg}")


class _DropConnectionResets(logging.Filter):
    """paramiko logs a client hanging up on the dev server as an error; it is not one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Connection reset by peer" not in record.getMessage()


def planted_defect(name: str) -> str | None:
    """The defect seed_mycfia planted in a campaign named ``name``, else None.

    seed_mycfia names its invalid campaigns ``"Invalide: <kind>"``, except the
    control-character one, whose name carries the control character itself.
    """

    if name.startswith(PLANTED_NAME_PREFIX) and name[len(PLANTED_NAME_PREFIX) :] in INVALID_KINDS:
        return name[len(PLANTED_NAME_PREFIX) :]
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        return "control character in the name"
    return None


@dataclass
class CampaignOutcome:
    """One validated campaign after its export run."""

    campaign_id: int
    revision: int
    name: str
    status: str  # delivered / rejected / failed / pending / missing
    manifest_path: str | None
    error: str
    expected_defect: str | None
    ok: bool
    verdict: str


def judge(
    campaign_id: int,
    revision: int,
    name: str,
    row: Any | None,
    manifest_on_drop: bool | None,
) -> CampaignOutcome:
    """Apply the exit-code rule to one campaign (``row``: its campaign_exports row)."""
    status = row.status if row is not None else "missing"
    error = (row.error or "").strip() if row is not None else ""
    defect = planted_defect(name)
    if defect is not None:
        fragment = PLANTED_ERROR.get(defect, "")
        ok = status == "rejected" and fragment in error
        verdict = (
            f"rejected as expected ({defect})"
            if ok
            else f"should have been rejected for '{defect}', got {status}"
            + (f" with: {error.splitlines()[0]}" if status == "rejected" and error else "")
        )
    else:
        ok = status == "delivered" and manifest_on_drop is not False
        if ok:
            verdict = "delivered"
        elif status == "delivered":
            verdict = "recorded as delivered but its manifest is not on the SFTP drop"
        else:
            verdict = f"should have been delivered, got {status}"
    return CampaignOutcome(
        campaign_id,
        revision,
        name,
        status,
        row.manifest_path if row is not None else None,
        error,
        defect,
        ok,
        verdict,
    )


@contextlib.contextmanager
def embedded_sftp() -> Iterator[object | None]:
    """The dev SFTP server in the local environment (else CFI's real server is used)."""
    s = get_settings()
    if not s.local:
        yield None
        return
    server = start_dev_server(s.dev_sftp_port)  # a taken port: one line naming CFI_SFTP_PORT
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def embedded_api() -> Iterator[FakeCfiApi | None]:
    """The fake CFI API when CFI_API_URL is unset (the demo's cfi_api resource points at it)."""
    s = get_settings()
    if s.api_url:
        yield None
        return
    with FakeCfiApi(s.source_url, token=s.api_token or "dev-token") as api:
        yield api


def run_demo(scale: int = 1) -> int:
    """Run the demo; the exit code (0: everything that should have worked did)."""
    logging.getLogger("paramiko.transport").addFilter(_DropConnectionResets())
    started = time.perf_counter()
    s = get_settings()
    instance = local_instance()
    problems: list[str] = []
    views = [v.name for v in VIEWS]
    tags = {"cfi/trigger": "demo"}

    if not source_is_seeded(s):
        _step(1, f"seeding the embedded databases under {s.home} (scale {scale}) …")
        for line in seed_all(s, scale=scale):
            _say(f"      {line}")
    else:
        _step(1, f"databases already seeded ({s.home})")

    with embedded_sftp() as server, embedded_api() as api:
        overrides = {}
        if api is not None:
            overrides["cfi_api"] = CfiApiResource(base_url=api.url, token=api.token)
        defs = build_defs(**overrides)
        if server is not None:
            _step(2, f"embedded SFTP server on 127.0.0.1:{server.port} (root {server.paths.root})")
        else:
            _step(2, f"using CFI's SFTP server {s.sftp_host}")
        _say(
            f"      fake CFI API on {api.url}"
            if api is not None
            else f"      using CFI's API {s.api_url}"
        )

        _step(3, "refreshing the four views (Dagster job refresh_views) …")
        t0 = time.perf_counter()
        refresh = run_refresh(views, tags=tags, defs=defs)
        rows = {k: md.get("rows") for k, md in materializations(refresh).items()}
        _say(
            f"      {'ok' if refresh.success else 'FAILED'} in {time.perf_counter() - t0:.1f}s: "
            + ", ".join(f"{v} {rows.get(v, '-')} rows" for v in views)
        )
        problems += [f"refresh {f}" for f in step_failures(refresh)]
        if not refresh.success and not step_failures(refresh):
            problems.append(f"refresh run {refresh.run_id} failed")

        _step(4, "running the view checks (Dagster job check_views) …")
        checks = defs.resolve_job_def("check_views").execute_in_process(
            instance=instance, run_config=QUIET_LOGS, raise_on_error=False, tags=tags
        )
        check_state: dict[str, list[str]] = {}
        for ev in checks.all_events:
            if ev.event_type_value == "ASSET_CHECK_EVALUATION":
                data = ev.event_specific_data
                state = "PASS" if data.passed else data.severity.value
                view = data.asset_key.path[-1]
                check_state.setdefault(view, []).append(f"{data.check_name}={state}")
                if not data.passed:
                    problems.append(f"check {view}/{data.check_name}: {state}")
        problems += [f"checks {f}" for f in step_failures(checks)]
        states = [st.split("=")[1] for v in check_state.values() for st in v]
        _say(f"      {len(states)} checks evaluated, {states.count('PASS')} passed")

        _step(5, "fallback snapshots from the CFI API (Dagster job fallback_snapshots, no swap) …")
        t0 = time.perf_counter()
        fallback_config: dict[str, Any] = {"ops": {}}
        for v in views:
            fallback_config["ops"].update(fallback_run_config(v, swap=False)["ops"])
        fallback = defs.resolve_job_def("fallback_snapshots").execute_in_process(
            instance=instance,
            run_config={**QUIET_LOGS, **fallback_config},
            asset_selection=[fallback_key(v) for v in views],
            raise_on_error=False,
            tags=tags,
        )
        snaps = {k: md.get("rows") for k, md in materializations(fallback).items()}
        _say(
            f"      {'ok' if fallback.success else 'FAILED'} in {time.perf_counter() - t0:.1f}s: "
            + ", ".join(f"{v} {snaps.get(v, '-')} rows" for v in views)
            + f" -> {s.snapshots_dir}"
        )
        problems += [f"fallback {f}" for f in step_failures(fallback)]

        engine = engine_for(s.mycfia_url)
        c, e = mycfia.campaigns.c, mycfia.campaign_exports.c
        with engine.connect() as conn:
            validated = conn.execute(
                sa.select(c.id, c.revision, c.name).where(c.status == "validated").order_by(c.id)
            ).all()
            settled = {
                (cid, rev): status
                for cid, rev, status in conn.execute(
                    sa.select(e.campaign_id, e.revision, e.status).where(
                        e.status.in_(("delivered", "rejected"))
                    )
                )
            }
        planted = sum(planted_defect(name) is not None for _, _, name in validated)
        _step(
            6,
            f"exporting the {len(validated)} campaigns MyCfia validated, {planted} of them "
            "planted invalid (they must be rejected) (Dagster job campaign_export) …",
        )
        job = defs.resolve_job_def("campaign_export")
        instance.add_dynamic_partitions("campaigns", [str(cid) for cid, _, _ in validated])
        drop_root = s.dev_sftp_dir / "root" if server is not None else None
        outcomes: list[CampaignOutcome] = []
        for i, (cid, rev, name) in enumerate(validated, 1):
            t0 = time.perf_counter()
            if (cid, rev) in settled:  # a re-run of the demo does not send the same revision again
                _say(
                    f"      {i}/{len(validated)} campaign {cid} r{rev}: already {settled[cid, rev]} "
                    "(not sent again; `cfi-pipelines export ID --force` re-sends)"
                )
            else:
                job.execute_in_process(
                    instance=instance,
                    partition_key=str(cid),
                    run_config=QUIET_LOGS,
                    raise_on_error=False,
                    tags={**tags, "cfi/campaign_id": str(cid), "cfi/revision": str(rev)},
                )
            with engine.connect() as conn:
                row = conn.execute(
                    sa.select(mycfia.campaign_exports).where(
                        e.campaign_id == cid, e.revision == rev
                    )
                ).first()
            on_drop = None
            if drop_root is not None and row is not None and row.manifest_path:
                on_drop = (drop_root / row.manifest_path.lstrip("/")).is_file()
            out = judge(cid, rev, name, row, on_drop)
            outcomes.append(out)
            if not out.ok:
                problems.append(f"campaign {cid} r{rev}: {out.verdict}")
            if (cid, rev) not in settled:
                _say(
                    f"      {i}/{len(validated)} campaign {cid} r{rev} ({name!r}): "
                    f"{out.verdict}  ({time.perf_counter() - t0:.1f}s)"
                )

    st = collect_status()
    _say("\nViews:")
    for v in st["views"]:
        _say(
            f"  {v['view']:<11} {v['rows'] if v['rows'] is not None else '-':>8} rows  "
            f"{format_age(v['age_s']):<22} checks: {' '.join(check_state.get(v['view'], ['-']))}"
        )
    _say("Campaigns:")
    for o in outcomes:
        if o.status == "delivered":
            _say(f"  campaign {o.campaign_id} r{o.revision}: delivered -> {o.manifest_path}")
        else:
            errors = [ln.strip() for ln in o.error.splitlines() if ln.strip()][:3]
            _say(
                f"  campaign {o.campaign_id} r{o.revision}: {o.status.upper()}"
                + (f"  {' | '.join(errors)}" if errors else "")
            )
    delivered = sum(o.status == "delivered" for o in outcomes)
    rejected = sum(o.status == "rejected" for o in outcomes)
    _say(
        f"  {delivered} delivered, {rejected} rejected "
        f"({sum(o.expected_defect is not None for o in outcomes)} planted invalid on purpose)"
    )
    _say("Files:")
    _say(f"  databases, snapshots, outbox: {s.home}")
    if drop_root is not None:
        _say(f"  SFTP drop (embedded server root): {drop_root}")
    _say(f"  Dagster instance: {instance.root_directory}  (see the runs: cfi-pipelines dev)")
    for p in problems:
        _say(f"PROBLEM: {p}")
    elapsed = time.perf_counter() - started
    if problems:
        _say(f"demo: {len(problems)} thing(s) that should have worked did not ({elapsed:.0f}s)")
        return 1
    _say(f"demo: OK ({elapsed:.0f}s)")
    return 0
