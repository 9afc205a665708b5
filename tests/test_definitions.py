"""The one code location: it loads as Dagster loads it, has no side effect, and
builds its resources once from the environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import sqlalchemy as sa

from cfi_pipelines.db import create_engine
from cfi_pipelines.definitions import build_defs
from cfi_pipelines.devtools.seed_mycfia import add_campaign
from cfi_pipelines.devtools.sftp_server import DevSFTPServer
from cfi_pipelines.model import mycfia
from cfi_pipelines.ops.runs import run_export

ROOT = Path(__file__).resolve().parents[1]
VIEWS = ("stocks", "operations", "invoices", "campaigns")


def test_loads_the_way_dagster_loads_it(tmp_path):
    """``dagster definitions validate -m cfi_pipelines.definitions`` from an empty directory
    with an empty CFI_HOME: it loads, and creates no file and no directory."""
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CFI_", "MYCFIA_", "DAGSTER_"))}
    env.update(CFI_HOME=str(home), PYTHONPATH=str(ROOT))
    dagster = Path(sys.executable).with_name("dagster")
    proc = subprocess.run(
        [str(dagster), "definitions", "validate", "-m", "cfi_pipelines.definitions"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not home.exists() and list(cwd.iterdir()) == []


def test_lists_everything_with_one_set_of_resources(tmp_path, monkeypatch):
    monkeypatch.setenv("CFI_HOME", str(tmp_path))
    monkeypatch.delenv("CFI_SFTP_HOST", raising=False)
    defs = build_defs()
    dg.Definitions.validate_loadable(defs)
    keys = {k.to_user_string() for k in defs.resolve_all_asset_keys()}
    assert {f"cfi_common/{v}" for v in VIEWS} | {f"cfi_fallback/{v}" for v in VIEWS} <= keys
    assert {"cfi_export/campaign_files", "cfi_export/campaign_delivery"} <= keys
    assert {"cfi_source/stock_levels", "cfi_source/payments"} <= keys  # observed, upstream
    stocks = defs.resolve_assets_def(dg.AssetKey(["cfi_common", "stocks"]))
    assert {
        k.to_user_string() for k in stocks.asset_deps[dg.AssetKey(["cfi_common", "stocks"])]
    } == {
        "cfi_source/stock_levels",
        "cfi_source/products",
        "cfi_source/warehouses",
    }
    assert [s.name for s in defs.schedules] == ["refresh_views_full_nightly"]
    assert {s.name for s in defs.sensors} == {
        "view_change_sensor",
        "view_lag_sensor",
        "validated_campaigns_sensor",
        "campaign_partitions_retention",
        "view_health_alerts",
        "alert_on_run_failure",
        "recover_run_failure_alerts",
    }
    for job in ("refresh_views", "fallback_snapshots", "campaign_export", "campaign_export_batch"):
        assert defs.resolve_job_def(job)
    assert set(defs.resources) == {
        "cfi_source",
        "cfi_common",
        "mycfia",
        "sftp",
        "cfi_api",
        "alerts",
    }
    sftp = defs.resources["sftp"]
    assert (sftp.host, sftp.embedded, sftp.write_size) == ("127.0.0.1", True, 0)
    assert not (tmp_path / "sftp").exists()  # the dev server's keys: made by who starts it


def test_schedules_and_sensors_follow_cfi_automation(monkeypatch):
    monkeypatch.setenv("CFI_AUTOMATION", "off")
    defs = build_defs()
    assert {s.default_status for s in defs.sensors} == {dg.DefaultSensorStatus.STOPPED}
    assert {s.default_status for s in defs.schedules} == {dg.DefaultScheduleStatus.STOPPED}
    monkeypatch.setenv("CFI_AUTOMATION", "on")
    defs = build_defs()
    assert {s.default_status for s in defs.sensors} == {dg.DefaultSensorStatus.RUNNING}


def test_secrets_are_env_vars(monkeypatch):
    monkeypatch.setenv("CFI_SFTP_HOST", "sftp.cfi.example")
    monkeypatch.setenv("CFI_SFTP_KEY", "/keys/id_ed25519")
    monkeypatch.setenv("CFI_API_URL", "https://api.cfi.example")
    monkeypatch.setenv("CFI_API_TOKEN", "s3cret")
    monkeypatch.setenv("CFI_ALERT_SMTP_PASSWORD", "pw")
    monkeypatch.setenv("CFI_COMMON_URL", "postgresql+psycopg://u:pw@db/common")
    res = build_defs().resources
    assert res["cfi_api"].token.env_var_name == "CFI_API_TOKEN"
    assert res["alerts"].smtp_password.env_var_name == "CFI_ALERT_SMTP_PASSWORD"
    assert res["sftp"].private_key.env_var_name == "CFI_SFTP_KEY"
    assert res["cfi_common"].url.env_var_name == "CFI_COMMON_URL"
    assert res["sftp"].host == "sftp.cfi.example" and not res["sftp"].embedded


def test_export_command_delivers_then_skips_then_forces(tmp_path, monkeypatch):
    monkeypatch.setenv("CFI_HOME", str(tmp_path))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    (tmp_path / "dagster").mkdir()
    server = DevSFTPServer(port=0)
    monkeypatch.setenv("CFI_SFTP_PORT", str(server.port))
    try:
        engine = create_engine(f"sqlite:///{tmp_path / 'mycfia.db'}")
        mycfia.metadata.create_all(engine)
        with engine.begin() as conn:
            add_campaign(conn, 42, tenant_code="T042")
        defs = build_defs()
        first = run_export(42, defs=defs)
        assert first.code == 0, first.message
        assert (server.paths.root / "T042" / "campaign_42_r1.manifest.json").exists()
        again = run_export(42, defs=defs)
        assert again.code == 0 and "already delivered" in again.message
        assert run_export(42, force=True, defs=defs).code == 0
        with engine.connect() as conn:
            assert conn.execute(sa.select(mycfia.campaign_exports.c.attempts)).scalar() == 2
        # the named job, so the UI can re-execute it
        run = dg.DagsterInstance.get().get_run_by_id(first.run_id)
        assert run.job_name == "campaign_export"
        # a draft exported by hand: the reason is in the command's answer, not "see the UI"
        with engine.begin() as conn:
            add_campaign(conn, 43, tenant_code="T043", status="draft")
        draft = run_export(43, defs=defs)
        assert draft.code == 1 and "is 'draft', not 'validated'" in draft.message
    finally:
        server.stop()


def test_dg_checks_and_lists_the_definitions():
    """``dg check defs`` / ``dg list defs`` read ``[tool.dg]`` in pyproject.toml."""
    dg_cli = Path(sys.executable).with_name("dg")
    check = subprocess.run(
        [str(dg_cli), "check", "defs"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]
    listed = subprocess.run(
        [str(dg_cli), "list", "defs", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert "cfi_export/campaign_delivery" in listed.stdout
    assert "validated_campaigns_sensor" in listed.stdout


def test_the_local_instance_config_is_the_repositorys_dagster_yaml():
    """One local dagster.yaml: what `cfi-pipelines` writes into CFI_HOME/dagster is the
    repository's own file, word for word (they used to disagree on run_retries)."""
    from cfi_pipelines.ops.instance import LOCAL_DAGSTER_YAML

    assert (ROOT / "dagster.yaml").read_text() == LOCAL_DAGSTER_YAML


def test_descriptions_render_their_placeholders(tmp_path, monkeypatch):
    """The UI renders descriptions as Markdown: a bare <tenant> would be eaten as HTML."""
    monkeypatch.setenv("CFI_HOME", str(tmp_path))
    for a in build_defs().assets:
        for spec in getattr(a, "specs", []):
            text = spec.description or ""
            outside_code = "".join(text.split("`")[::2])
            assert "<" not in outside_code, (spec.key, text)
