"""End to end through the real command lines: `cfi-pipelines seed`, Dagster's own
`dagster asset materialize` on a temporary DAGSTER_HOME, then `cfi-pipelines
refresh` and `cfi-pipelines status` as an operator would use them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from cfi_pipelines.db import create_engine
from cfi_pipelines.model import cfi_common as common
from tests.fixtures.processes import stop_process

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent


def _run(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=240)


def test_seed_materialize_refresh_status(tmp_path, cfi_home):
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {
        **os.environ,
        "CFI_HOME": str(cfi_home),
        "DAGSTER_HOME": str(dagster_home),
        "CFI_AUTOMATION": "off",
    }

    seed = _run([str(BIN / "cfi-pipelines"), "seed", "--scale", "1"], env, tmp_path)
    assert seed.returncode == 0, seed.stderr
    assert "stock_levels 9984" in seed.stdout

    views = ",".join(f"cfi_common/{v}" for v in ("stocks", "operations", "invoices", "campaigns"))
    mat = _run(
        [
            str(BIN / "dagster"),
            "asset",
            "materialize",
            "-m",
            "cfi_pipelines.definitions",
            "--select",
            views,
        ],
        env,
        tmp_path,
    )
    assert mat.returncode == 0, mat.stderr[-3000:]

    # what the CLI run recorded in the instance: 4 materializations, 8 passing checks
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        [run] = instance.get_runs()
        assert run.status == dg.DagsterRunStatus.SUCCESS
        records = instance.get_records_for_run(run.run_id).records
        mats = [
            r.event_log_entry.dagster_event
            for r in records
            if r.event_log_entry.dagster_event
            and r.event_log_entry.dagster_event.event_type_value == "ASSET_MATERIALIZATION"
        ]
        checks = [
            r.event_log_entry.dagster_event.event_specific_data
            for r in records
            if r.event_log_entry.dagster_event
            and r.event_log_entry.dagster_event.event_type_value == "ASSET_CHECK_EVALUATION"
        ]
        assert len(mats) == 4
        assert len(checks) == 8 and all(c.passed for c in checks)

    status = _run([str(BIN / "cfi-pipelines"), "status", "--json"], env, tmp_path)
    assert status.returncode == 0, status.stdout
    st = json.loads(status.stdout)
    assert {v["view"]: v["rows"] for v in st["views"]} == {
        "stocks": 9984,
        "operations": 20,
        "invoices": 1000,
        "campaigns": 10,
    }

    # a view older than 15 min: status says so and exits 2 (health checks rely on it)
    engine = create_engine(f"sqlite:///{cfi_home}/cfi_common.db")
    t = common.cfi_view_status
    with engine.begin() as conn:
        snap = conn.scalar(sa.select(t.c.source_snapshot_at).where(t.c.view == "invoices"))
        conn.execute(
            t.update()
            .where(t.c.view == "invoices")
            .values(source_snapshot_at=snap - timedelta(minutes=20))
        )
    stale = _run([str(BIN / "cfi-pipelines"), "status"], env, tmp_path)
    assert stale.returncode == 2
    assert re.search(r"PROBLEM: view invoices: 2\d min old", stale.stdout), stale.stdout

    # the admin "force refresh" goes through Dagster and clears the incident
    refresh = _run([str(BIN / "cfi-pipelines"), "refresh", "invoices", "--full"], env, tmp_path)
    assert refresh.returncode == 0, refresh.stderr[-3000:]
    assert "invoices" in refresh.stdout and "full" in refresh.stdout
    assert _run([str(BIN / "cfi-pipelines"), "status"], env, tmp_path).returncode == 0
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        assert len(instance.get_runs()) == 2  # the CLI refresh is recorded, visible in the UI

    bad = _run([str(BIN / "cfi-pipelines"), "refresh", "factures"], env, tmp_path)
    assert bad.returncode == 1 and "unknown view 'factures'" in bad.stderr


def test_the_readmes_dagster_commands_land_in_the_projects_instance(tmp_path, cfi_home):
    """README: after `cfi-pipelines demo`, `export DAGSTER_HOME=$PWD/.cfi/dagster`, then
    Dagster's own CLI materializes a campaign's partition into the same instance."""
    from cfi_pipelines.devtools.postgres import free_port
    from cfi_pipelines.model import mycfia

    port = free_port()
    env = {**os.environ, "CFI_HOME": str(cfi_home), "CFI_SFTP_PORT": str(port)}
    env.pop("DAGSTER_HOME", None)
    demo = _run([str(BIN / "cfi-pipelines"), "demo"], env, tmp_path)
    assert demo.returncode == 0, demo.stdout[-3000:]
    env["DAGSTER_HOME"] = str(cfi_home / "dagster")  # the README's export
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        before = len(instance.get_runs())
    server = subprocess.Popen(
        [str(BIN / "cfi-pipelines"), "sftp-server", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert "dev SFTP server on 127.0.0.1" in server.stdout.readline()  # listening
        mat = _run(
            [
                str(BIN / "dagster"),
                "asset",
                "materialize",
                "-m",
                "cfi_pipelines.definitions",
                "--select",
                "cfi_export/campaign_files,cfi_export/campaign_delivery",
                "--partition",
                "1001",
            ],
            env,
            tmp_path,
        )
        assert mat.returncode == 0, mat.stderr[-3000:]
    finally:
        stop_process(server)
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        runs = instance.get_runs()
        assert len(runs) == before + 1
        assert runs[0].tags.get("dagster/partition") == "1001"
        assert runs[0].status == dg.DagsterRunStatus.SUCCESS
    with create_engine(f"sqlite:///{cfi_home}/mycfia.db").connect() as conn:
        e = mycfia.campaign_exports.c
        assert conn.execute(sa.select(e.attempts).where(e.campaign_id == 1001)).scalar() == 2


def _documented_env(monkeypatch, cwd: Path) -> dict[str, str]:
    """The README's set-up: no CFI_HOME (the default ./.cfi), run from ``cwd``."""
    monkeypatch.delenv("CFI_HOME", raising=False)
    monkeypatch.chdir(cwd)
    return {k: v for k, v in os.environ.items() if not k.startswith(("CFI_HOME", "DAGSTER_HOME"))}


def test_dev_children_open_the_databases_seed_filled(tmp_path, monkeypatch):
    """Issue 16 item 1: with CFI_HOME at its default, the Dagster processes `dev` starts (in
    the instance's directory, with `child_environment()`) read the databases `seed` wrote under
    ./.cfi, not empty phantom ones under .cfi/dagster/.cfi."""
    from cfi_pipelines.ops.instance import ensure_dagster_home
    from cfi_pipelines.settings import child_environment

    env = _documented_env(monkeypatch, tmp_path)
    seed = _run([str(BIN / "cfi-pipelines"), "seed"], env, tmp_path)
    assert seed.returncode == 0, seed.stderr
    # what run_dev does before it starts Dagster: the instance, the child's env, its cwd
    dagster_home = ensure_dagster_home()
    child_env = child_environment(DAGSTER_HOME=str(dagster_home), CFI_AUTOMATION="off")
    mat = _run(
        [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "cfi_pipelines.definitions"]
        + ["--select", "cfi_common/stocks"],
        child_env,
        Path(child_env["DAGSTER_HOME"]),
    )
    assert mat.returncode == 0, mat.stderr[-3000:]
    with create_engine(f"sqlite:///{tmp_path}/.cfi/cfi_common.db").connect() as conn:
        t = common.cfi_view_status
        assert conn.scalar(sa.select(t.c.rows).where(t.c.view == "stocks")) == 9984
    assert not (tmp_path / ".cfi" / "dagster" / ".cfi").exists()


def test_dagster_backed_commands_carry_no_beta_or_supersession_warning(tmp_path, cfi_home):
    """Issue 16 item 11: every Dagster-backed command printed "BetaWarning: Parameter `owners`
    of SensorDefinition" (Dagster's own copy of a sensor, owners=[]); the README's `dg`
    commands (Dagster's recommended ones) load the code location without either warning."""
    env = {**os.environ, "CFI_HOME": str(cfi_home), "CFI_AUTOMATION": "off"}
    assert _run([str(BIN / "cfi-pipelines"), "seed"], env, tmp_path).returncode == 0
    refresh = _run([str(BIN / "cfi-pipelines"), "refresh", "stocks"], env, tmp_path)
    assert refresh.returncode == 0, refresh.stderr[-3000:]
    check = _run([str(BIN / "dg"), "check", "defs"], env, Path(__file__).parents[2])
    assert check.returncode == 0, check.stderr[-3000:]
    for proc in (refresh, check):
        assert "BetaWarning" not in proc.stderr, proc.stderr[-3000:]
        assert "SupersessionWarning" not in proc.stderr, proc.stderr[-3000:]


def test_every_option_of_demo_and_kpis_says_what_it_does(tmp_path):
    """Issue 16 item 15: `demo --scale` and `kpis --window-hours` had no help text."""
    for command, option, says in (
        ("demo", "--scale", "1 ≈ 10k stock rows"),
        ("kpis", "--window-hours", "how far back"),
    ):
        proc = _run([str(BIN / "cfi-pipelines"), command, "--help"], dict(os.environ), tmp_path)
        assert proc.returncode == 0
        lines = proc.stdout.split(option, 1)[1].split("\n  -", 1)[0]
        assert says in " ".join(lines.split()), proc.stdout


def test_a_dagster_home_that_is_no_directory_is_one_line_naming_it(tmp_path):
    missing = tmp_path / "no_such_instance"
    env = {**os.environ, "CFI_HOME": str(tmp_path / "cfi"), "DAGSTER_HOME": str(missing)}
    proc = _run([str(BIN / "cfi-pipelines"), "refresh", "stocks"], env, tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: DAGSTER_HOME={missing} is not a directory"), line
    assert "mkdir -p" in line and "unset DAGSTER_HOME" in line
    assert not missing.exists()  # nothing created behind the user's back
