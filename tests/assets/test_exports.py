"""Export assets end to end: materialize with an ephemeral instance, real sshd, SQLite MyCfia."""

from __future__ import annotations

import dagster as dg
import pytest
import sqlalchemy as sa

from cfi_pipelines.assets.exports import (
    CHECK_NAME,
    DELIVERY_KEY,
    FILES_KEY,
    build_export_assets,
    campaigns_partitions,
)
from cfi_pipelines.db import create_engine
from cfi_pipelines.devtools.seed_mycfia import add_campaign, default_targets
from cfi_pipelines.model import mycfia
from cfi_pipelines.resources.databases import DatabaseResource
from cfi_pipelines.resources.sftp import SFTPResource

pytestmark = pytest.mark.sshd


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("CFI_HOME", str(tmp_path / "home"))
    url = f"sqlite:///{tmp_path / 'mycfia.db'}"
    engine = create_engine(url)
    mycfia.metadata.create_all(engine)
    yield {"url": url, "engine": engine, "drop": tmp_path / "drop", "tmp": tmp_path}
    engine.dispose()


def sftp_for(server, drop, port=None, known_hosts=None, key=None) -> SFTPResource:
    return SFTPResource(
        host="127.0.0.1",
        port=port or server.port,
        username=server.user,
        private_key=str(key or server.client_key),
        known_hosts=str(known_hosts or server.known_hosts),
        remote_dir=str(drop),
        connect_timeout=5.0,
        io_timeout=10.0,
    )


def export(env, campaign_id: int, sftp: SFTPResource, instance=None) -> dg.ExecuteInProcessResult:
    instance = instance or dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(campaigns_partitions.name, [str(campaign_id)])
    return dg.materialize(
        build_export_assets(delay=0),
        instance=instance,
        partition_key=str(campaign_id),
        resources={"mycfia": DatabaseResource(url=env["url"]), "sftp": sftp},
        raise_on_error=False,
    )


def export_row(env, campaign_id: int):
    with env["engine"].connect() as conn:
        t = mycfia.campaign_exports
        return conn.execute(sa.select(t).where(t.c.campaign_id == campaign_id)).one()


def delivery_attempts(result: dg.ExecuteInProcessResult) -> int:
    """Executions of the delivery step: the first one plus one per retry."""
    events = [e for e in result.all_events if "campaign_delivery" in (e.step_key or "")]
    started = any(e.event_type == dg.DagsterEventType.STEP_START for e in events)
    retries = sum(e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY for e in events)
    return int(started) + retries


def test_validated_campaign_is_delivered_with_metadata(env, sshd):
    with env["engine"].begin() as conn:
        add_campaign(conn, 11, tenant_code="T011", revision=2, targets=default_targets(50))
    result = export(env, 11, sftp_for(sshd, env["drop"]))
    assert result.success
    folder = env["drop"] / "T011"
    assert sorted(p.name for p in folder.iterdir()) == [
        "campaign_11_r2.csv",
        "campaign_11_r2.json",
        "campaign_11_r2.manifest.json",
    ]
    (mat,) = result.asset_materializations_for_node("cfi_export__campaign_delivery")
    meta = mat.metadata
    assert meta["attempts"].value == 1
    assert meta["remote_manifest"].value == f"{env['drop']}/T011/campaign_11_r2.manifest.json"
    assert meta["seconds_from_validation"].value >= 0
    (check,) = result.get_asset_check_evaluations()
    assert check.passed and check.check_name == CHECK_NAME
    row = export_row(env, 11)
    assert (row.status, row.attempts, row.revision) == ("delivered", 1, 2)
    assert row.csv_sha256 == meta["csv_sha256"].value
    assert row.manifest_path.endswith("campaign_11_r2.manifest.json")


def test_invalid_campaign_rejected_by_blocking_check_nothing_uploaded(env, sshd):
    bad = default_targets(2)
    bad[1]["email"] = "=cmd|'/C calc'!A0"
    with env["engine"].begin() as conn:
        add_campaign(conn, 12, targets=bad)
        add_campaign(conn, 13, tenant_code="T013")
    result = export(env, 12, sftp_for(sshd, env["drop"]))
    (check,) = result.get_asset_check_evaluations()
    assert not check.passed
    assert check.metadata["errors"].value[0]["pointer"] == "/targets/1/email"
    assert not [m for m in result.get_asset_materialization_events() if m.asset_key == DELIVERY_KEY]
    assert not env["drop"].exists()
    row = export_row(env, 12)
    assert row.status == "rejected" and "/targets/1/email" in row.error
    # the other campaigns go on
    assert export(env, 13, sftp_for(sshd, env["drop"])).success
    assert (env["drop"] / "T013" / "campaign_13_r1.manifest.json").exists()


def test_draft_fails_at_once(env, sshd):
    with env["engine"].begin() as conn:
        add_campaign(conn, 14, status="draft")
    result = export(env, 14, sftp_for(sshd, env["drop"]))
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
    assert "campaign 14 r1 is 'draft'" in failure.event_specific_data.error.message
    assert not [m for m in result.get_asset_materialization_events() if m.asset_key == FILES_KEY]


def test_wrong_client_key_is_not_retried(env, sshd, ssh_keys):
    with env["engine"].begin() as conn:
        add_campaign(conn, 15)
    sftp = sftp_for(sshd, env["drop"], key=ssh_keys["stranger"])
    result = export(env, 15, sftp)
    assert not result.success
    assert delivery_attempts(result) == 1
    row = export_row(env, 15)
    assert row.status == "failed" and "refused the key" in row.error and row.attempts == 1


def test_unknown_host_key_is_not_retried(env, sshd, tmp_path):
    (tmp_path / "empty_known_hosts").write_text("")
    with env["engine"].begin() as conn:
        add_campaign(conn, 16)
    result = export(
        env, 16, sftp_for(sshd, env["drop"], known_hosts=tmp_path / "empty_known_hosts")
    )
    assert not result.success and delivery_attempts(result) == 1
    assert "ssh-ed25519 key SHA256:" in export_row(env, 16).error


def test_server_down_retried_then_failed_then_delivered_when_back(env, sshd_factory):
    server = sshd_factory()  # not started yet
    with env["engine"].begin() as conn:
        add_campaign(conn, 17, tenant_code="T017")
    result = export(env, 17, sftp_for(server, env["drop"]))
    assert not result.success
    assert delivery_attempts(result) == 4  # 1 + 3 retries
    row = export_row(env, 17)
    assert row.status == "failed" and row.attempts == 4 and "ConnectionRefusedError" in row.error
    server.start()
    result = export(env, 17, sftp_for(server, env["drop"]))
    assert result.success
    row = export_row(env, 17)
    assert row.status == "delivered" and row.attempts == 5
    assert (env["drop"] / "T017" / "campaign_17_r1.manifest.json").exists()


def test_connection_cut_mid_upload_then_success_on_retry(env, sshd, cut_proxy):
    with env["engine"].begin() as conn:
        add_campaign(conn, 18, tenant_code="T018", targets=default_targets(3000))
    proxy = cut_proxy(sshd.port, cut_after=80_000)
    real = (sshd.host_key.parent / (sshd.host_key.name + ".pub")).read_text().split()
    kh = env["tmp"] / "kh"
    kh.write_text(f"[127.0.0.1]:{proxy.port} {real[0]} {real[1]}\n")
    result = export(env, 18, sftp_for(sshd, env["drop"], port=proxy.port, known_hosts=kh))
    assert result.success
    assert proxy.cut_count == 1 and delivery_attempts(result) == 2
    names = sorted(p.name for p in (env["drop"] / "T018").iterdir())
    assert names == ["campaign_18_r1.csv", "campaign_18_r1.json", "campaign_18_r1.manifest.json"]
    (mat,) = result.asset_materializations_for_node("cfi_export__campaign_delivery")
    assert mat.metadata["attempts"].value == 2


def test_reexport_same_revision_is_idempotent(env, sshd):
    with env["engine"].begin() as conn:
        add_campaign(conn, 19, tenant_code="T019")
    instance = dg.DagsterInstance.ephemeral()
    assert export(env, 19, sftp_for(sshd, env["drop"]), instance).success
    before = {p.name: p.read_bytes() for p in (env["drop"] / "T019").iterdir()}
    assert export(env, 19, sftp_for(sshd, env["drop"]), instance).success
    after = {p.name: p.read_bytes() for p in (env["drop"] / "T019").iterdir()}
    assert after == before
    with env["engine"].connect() as conn:
        assert (
            conn.execute(sa.select(sa.func.count()).select_from(mycfia.campaign_exports)).scalar()
            == 1
        )
