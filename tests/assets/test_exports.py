"""Export assets end to end: materialize with an ephemeral instance, real sshd, SQLite MyCfia."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import paramiko
import pytest
import sqlalchemy as sa

from cfi_pipelines.assets.exports import (
    CHECK_NAME,
    DELIVERY_KEY,
    FILES_KEY,
    campaigns_partitions,
    export_assets,
)
from cfi_pipelines.db import create_engine
from cfi_pipelines.devtools.seed_mycfia import add_campaign, default_targets
from cfi_pipelines.exports import campaign as delivery_logic
from cfi_pipelines.model import mycfia
from cfi_pipelines.resources.alerter import AlertsResource
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


def export(
    env, campaign_id: int, sftp: SFTPResource, instance=None, alerts=None
) -> dg.ExecuteInProcessResult:
    instance = instance or dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(campaigns_partitions.name, [str(campaign_id)])
    return dg.materialize(
        export_assets,
        instance=instance,
        partition_key=str(campaign_id),
        resources={
            "mycfia": DatabaseResource(url=env["url"]),
            "sftp": sftp,
            "alerts": alerts or AlertsResource(),  # no channel: alerts are only logged
        },
        raise_on_error=False,
    )


def webhook_alerts(receiver, env) -> AlertsResource:
    """Alerts POSTed to the local ``receiver``; episodes kept under the test's tmp dir."""
    return AlertsResource(
        webhook_url=receiver.url + "/hook",
        state_path=str(env["tmp"] / "alerts" / "state.json"),
        webserver_url="http://dagster.test",
    )


def received(receiver) -> list[dict]:
    return [r.json() for r in receiver.requests if r.path == "/hook"]


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
    assert meta["write_size"].value == 255_000  # negotiated with OpenSSH
    assert meta["remote_manifest"].value == f"{env['drop']}/T011/campaign_11_r2.manifest.json"
    assert meta["seconds_from_validation"].value >= 0
    (check,) = result.get_asset_check_evaluations()
    assert check.passed and check.check_name == CHECK_NAME
    row = export_row(env, 11)
    assert (row.status, row.attempts, row.revision) == ("delivered", 1, 2)
    assert row.csv_sha256 == meta["csv_sha256"].value
    assert row.manifest_path.endswith("campaign_11_r2.manifest.json")


def test_invalid_campaign_rejected_by_its_check_delivery_not_attempted(env, sshd, http_receiver):
    bad = default_targets(2)
    bad[1]["email"] = "=cmd|'/C calc'!A0"
    with env["engine"].begin() as conn:
        add_campaign(conn, 12, targets=bad)
        add_campaign(conn, 13, tenant_code="T013")
    alerts = webhook_alerts(http_receiver, env)
    result = export(env, 12, sftp_for(sshd, env["drop"]), alerts=alerts)
    (check,) = result.get_asset_check_evaluations()
    assert not check.passed
    assert check.metadata["errors"].value[0]["pointer"] == "/targets/1/email"
    assert not [m for m in result.get_asset_materialization_events() if m.asset_key == DELIVERY_KEY]
    assert check.metadata["partition"].value == "12"
    # a rejection is a failed check, never a failed delivery: no step fails, the run succeeds
    assert result.success and not [e for e in result.all_events if e.is_step_failure]
    assert not env["drop"].exists()
    row = export_row(env, 12)
    assert row.status == "rejected" and "/targets/1/email" in row.error
    # the operator hears of it once, with the campaign, the error and what to do
    (alert,) = received(http_receiver)
    assert alert["key"] == "campaign_rejected:12:r1" and alert["event"] == "alert"
    assert "Campaign 12 r1 was rejected" in alert["title"]
    assert (
        "/targets/1/email: " in alert["text"] and "Correct the campaign in MyCfia" in alert["text"]
    )
    assert alert["link"] == f"http://dagster.test/runs/{result.run_id}"
    assert alert["fields"]["tenant"] == "T001"
    export(env, 12, sftp_for(sshd, env["drop"]), alerts=alerts)  # same revision again
    assert len(received(http_receiver)) == 1  # same episode: no second alert
    # the other campaigns go on
    assert export(env, 13, sftp_for(sshd, env["drop"]), alerts=alerts).success
    assert (env["drop"] / "T013" / "campaign_13_r1.manifest.json").exists()


def test_draft_fails_at_once(env, sshd):
    with env["engine"].begin() as conn:
        add_campaign(conn, 14, status="draft")
    result = export(env, 14, sftp_for(sshd, env["drop"]))
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
    assert "campaign 14 r1 is 'draft'" in failure.event_specific_data.error.message
    assert not [m for m in result.get_asset_materialization_events() if m.asset_key == FILES_KEY]


def test_wrong_client_key_is_not_retried(env, sshd, ssh_keys, http_receiver):
    with env["engine"].begin() as conn:
        add_campaign(conn, 15)
    sftp = sftp_for(sshd, env["drop"], key=ssh_keys["stranger"])
    result = export(env, 15, sftp, alerts=webhook_alerts(http_receiver, env))
    assert not result.success
    assert delivery_attempts(result) == 1
    row = export_row(env, 15)
    assert row.status == "failed" and "refused the key" in row.error and row.attempts == 1
    (alert,) = received(http_receiver)  # final at once: alerted at once
    assert alert["key"] == "export_failed:15:r1"
    assert "after 1 attempts" in alert["title"]
    assert "CFI_SFTP_KEY" in alert["text"] and "cfi-pipelines export 15 --force" in alert["text"]


def test_unknown_host_key_is_not_retried(env, sshd, tmp_path):
    (tmp_path / "empty_known_hosts").write_text("")
    with env["engine"].begin() as conn:
        add_campaign(conn, 16)
    result = export(
        env, 16, sftp_for(sshd, env["drop"], known_hosts=tmp_path / "empty_known_hosts")
    )
    assert not result.success and delivery_attempts(result) == 1
    assert "ssh-ed25519 key SHA256:" in export_row(env, 16).error


def test_server_down_retried_then_failed_then_delivered_when_back(env, sshd_factory, http_receiver):
    server = sshd_factory()  # not started yet
    with env["engine"].begin() as conn:
        add_campaign(conn, 17, tenant_code="T017")
    alerts = webhook_alerts(http_receiver, env)
    result = export(env, 17, sftp_for(server, env["drop"]), alerts=alerts)
    assert not result.success
    assert delivery_attempts(result) == 4  # 1 + 3 retries
    row = export_row(env, 17)
    assert row.status == "failed" and row.attempts == 4 and "ConnectionRefusedError" in row.error
    # one alert, after the last retry only, saying what to check and how to re-export
    (alert,) = received(http_receiver)
    assert alert["key"] == "export_failed:17:r1" and alert["event"] == "alert"
    assert "failed after 4 attempts" in alert["title"]
    assert "attempt 4/4: ConnectionRefusedError" in alert["text"]
    assert f"SFTP server 127.0.0.1:{server.port} was unreachable" in alert["text"]
    assert "cfi-pipelines export 17 --force" in alert["text"]
    assert alert["fields"] == {"campaign_id": 17, "revision": 1, "tenant": "T017"}
    server.start()
    result = export(env, 17, sftp_for(server, env["drop"]), alerts=alerts)
    assert result.success
    row = export_row(env, 17)
    assert row.status == "delivered" and row.attempts == 5
    assert (env["drop"] / "T017" / "campaign_17_r1.manifest.json").exists()
    recovered = received(http_receiver)[1:]
    assert [(a["key"], a["event"]) for a in recovered] == [("export_failed:17:r1", "recovered")]
    assert "delivered to CFI" in recovered[0]["text"]


def test_programming_error_in_delivery_fails_at_once(env, sshd, monkeypatch, http_receiver):
    def broken_deliver(*args, **kwargs):
        raise TypeError("deliver() got an unexpected keyword argument 'chunk'")

    monkeypatch.setattr(delivery_logic, "deliver", broken_deliver)
    with env["engine"].begin() as conn:
        add_campaign(conn, 20)
    result = export(env, 20, sftp_for(sshd, env["drop"]), alerts=webhook_alerts(http_receiver, env))
    assert not result.success
    assert delivery_attempts(result) == 1  # no retry burnt on a bug
    failure = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
    message = failure.event_specific_data.error.message
    assert "unexpected error in the export code, not retried: TypeError" in message
    assert "This is a bug, not a network problem" in message
    row = export_row(env, 20)
    assert row.status == "failed" and row.attempts == 1 and "TypeError" in row.error
    (alert,) = received(http_receiver)
    assert alert["key"] == "export_failed:20:r1"


def test_transient_ssh_error_is_retried(env, sshd, monkeypatch):
    calls = []
    real = delivery_logic.deliver

    def flaky_deliver(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise paramiko.SSHException("Server connection dropped: ")
        return real(*args, **kwargs)

    monkeypatch.setattr(delivery_logic, "deliver", flaky_deliver)
    with env["engine"].begin() as conn:
        add_campaign(conn, 21, tenant_code="T021")
    result = export(env, 21, sftp_for(sshd, env["drop"]))
    assert result.success and delivery_attempts(result) == 2
    assert (env["drop"] / "T021" / "campaign_21_r1.manifest.json").exists()


def test_built_files_gone_fails_at_once_with_what_to_do(env, sshd, tmp_path):
    with env["engine"].begin() as conn:
        add_campaign(conn, 22)
    instance = dg.DagsterInstance.ephemeral()
    assert export(env, 22, sftp_for(sshd, env["drop"]), instance).success
    Path(export_row(env, 22).local_manifest).unlink()  # the outbox was cleaned meanwhile
    result = dg.materialize(
        [a for a in export_assets if DELIVERY_KEY in a.keys],
        instance=instance,
        partition_key="22",
        resources={
            "mycfia": DatabaseResource(url=env["url"]),
            "sftp": sftp_for(sshd, env["drop"]),
            "alerts": AlertsResource(),
        },
        raise_on_error=False,
    )
    assert delivery_attempts(result) == 1  # no retry can rebuild them
    # a failed *re*-send is said (observation, log), not a red partition: still delivered
    assert result.success and partition_status(instance, DELIVERY_KEY, "22") == "MATERIALIZED"
    (obs,) = observations(instance, DELIVERY_KEY, "22")
    assert obs["status"] == "resend_failed" and "the built files are gone" in obs["reason"]
    # a failed *re*-send never downgrades a delivered revision: its files are on the drop
    row = export_row(env, 22)
    assert (row.status, row.error, row.attempts) == ("delivered", None, 2)


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


# ------------------------------------------------- issue 16 item 7: each state reads as what it is


def partition_status(instance, key: dg.AssetKey, partition: str) -> str | None:
    """What the UI colours the partition: MATERIALIZED (green), FAILED (red), None (grey)."""
    status = instance.get_status_by_partition(key, [partition], campaigns_partitions)
    value = (status or {}).get(partition)
    return value.value if value is not None else None


def observations(instance, key: dg.AssetKey, partition: str) -> list[dict]:
    records = instance.fetch_observations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=10
    ).records
    return [
        {k: v.value for k, v in r.asset_observation.metadata.items()}
        for r in records
        if r.asset_observation is not None
    ]


def test_a_rejected_partition_is_grey_with_its_reason_and_a_failed_check_of_that_partition(
    env, sshd
):
    bad = default_targets(2)
    bad[1]["email"] = "not-an-email"
    with env["engine"].begin() as conn:
        add_campaign(conn, 21, targets=bad)
    instance = dg.DagsterInstance.ephemeral()
    result = export(env, 21, sftp_for(sshd, env["drop"]), instance=instance)
    assert result.success
    # not green: nothing valid was built, nothing delivered; not red: no step failed
    assert partition_status(instance, FILES_KEY, "21") is None
    assert partition_status(instance, DELIVERY_KEY, "21") is None
    (check,) = result.get_asset_check_evaluations()
    assert not check.passed and check.partition == "21"  # "Failed, Partition 21"
    for key in (FILES_KEY, DELIVERY_KEY):  # the grey partition carries its reason
        (obs,) = observations(instance, key, "21")
        assert obs["status"] == "rejected" and "/targets/1/email" in obs["reason"], obs


def test_a_failed_resend_of_a_delivered_revision_stays_green_and_alerts_nobody(
    env, sshd, http_receiver
):
    from tests.fixtures.http import free_port

    with env["engine"].begin() as conn:
        add_campaign(conn, 22, tenant_code="T022", revision=2)
    instance = dg.DagsterInstance.ephemeral()
    alerts = webhook_alerts(http_receiver, env)
    assert export(env, 22, sftp_for(sshd, env["drop"]), instance=instance, alerts=alerts).success
    assert partition_status(instance, DELIVERY_KEY, "22") == "MATERIALIZED"
    # a forced re-send while the server is unreachable
    result = export(
        env, 22, sftp_for(sshd, env["drop"], port=free_port()), instance=instance, alerts=alerts
    )
    assert export_row(env, 22).status == "delivered"  # the files are still on the drop
    assert partition_status(instance, DELIVERY_KEY, "22") == "MATERIALIZED"  # not red
    assert partition_status(instance, FILES_KEY, "22") == "MATERIALIZED"
    (obs,) = observations(instance, DELIVERY_KEY, "22")
    assert obs["status"] == "resend_failed" and "ConnectionRefusedError" in obs["reason"]
    assert not [e for e in result.get_asset_materialization_events() if e.asset_key == DELIVERY_KEY]
    # nothing was lost: no "export failed" episode, hence no wrong "recovered" later
    assert received(http_receiver) == []
