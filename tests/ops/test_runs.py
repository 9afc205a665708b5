"""`cfi-pipelines export` (ops/runs.py) on the project's instance, with the embedded SFTP
server: what it refuses before launching a run, and what a failed re-send says."""

from __future__ import annotations

import dagster as dg
import pytest
import sqlalchemy as sa

from cfi_pipelines.assets.exports import DELIVERY_KEY, campaigns_partitions
from cfi_pipelines.db import create_engine
from cfi_pipelines.definitions import build_defs
from cfi_pipelines.devtools.seed_mycfia import add_campaign
from cfi_pipelines.devtools.sftp_server import DevSFTPServer
from cfi_pipelines.model import mycfia
from cfi_pipelines.ops.runs import run_export


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CFI_HOME", str(tmp_path))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    (tmp_path / "dagster").mkdir()
    engine = create_engine(f"sqlite:///{tmp_path / 'mycfia.db'}")
    mycfia.metadata.create_all(engine)
    yield engine
    engine.dispose()


def test_a_draft_is_refused_before_any_run_so_no_partition_turns_red(home):
    with home.begin() as conn:
        add_campaign(conn, 1007, tenant_code="T007", status="draft")
    out = run_export(1007, defs=build_defs())
    assert out.code == 1 and out.run_id is None
    assert "campaign 1007 r1 is 'draft', not 'validated'" in out.message
    instance = dg.DagsterInstance.get()
    assert instance.get_runs() == []
    assert "1007" not in instance.get_dynamic_partitions(campaigns_partitions.name)


def test_a_failed_forced_resend_exits_1_and_the_revision_stays_delivered(home, monkeypatch):
    server = DevSFTPServer(port=0)
    monkeypatch.setenv("CFI_SFTP_PORT", str(server.port))
    defs = build_defs()
    try:
        with home.begin() as conn:
            add_campaign(conn, 1001, tenant_code="T001", revision=2)
        assert run_export(1001, defs=defs).code == 0
    finally:
        server.stop()
    out = run_export(1001, force=True, defs=defs)  # the SFTP server is gone
    assert out.code == 1, out.message
    assert "the re-send failed" in out.message and "stays delivered" in out.message
    assert "campaign 1001 r2" in out.message
    with home.connect() as conn:
        e = mycfia.campaign_exports.c
        assert conn.execute(sa.select(e.status).where(e.campaign_id == 1001)).scalar() == (
            "delivered"
        )
    status = dg.DagsterInstance.get().get_status_by_partition(
        DELIVERY_KEY, ["1001"], campaigns_partitions
    )
    assert status["1001"].value == "MATERIALIZED"  # green, not red
