"""Bursts of validated campaigns: the sensor chooses one run per campaign or batch runs,
and ``campaign_export_batch`` builds, validates and delivers many campaigns over one
SFTP connection (real sshd), reporting per campaign what ``campaign_export`` reports."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from cfi_pipelines.assets.exports import (
    BATCH_JOB_NAME,
    CHECK_NAME,
    DELIVERY_KEY,
    FILES_KEY,
    campaign_export_batch_job,
    campaigns_partitions,
    export_assets,
)
from cfi_pipelines.clock import utcnow
from cfi_pipelines.db import create_engine
from cfi_pipelines.devtools.seed_mycfia import add_campaign, default_targets
from cfi_pipelines.exports.records import TRANSIENT
from cfi_pipelines.model import mycfia
from cfi_pipelines.resources.alerter import AlertsResource
from cfi_pipelines.resources.databases import DatabaseResource
from cfi_pipelines.resources.sftp import SFTPResource
from cfi_pipelines.sensors.campaigns import (
    BATCH_SIZE,
    SINGLE_RUNS_MAX,
    Due,
    build_campaigns_sensor,
    split_batches,
)

T0 = datetime(2030, 1, 1, 12, 0)


@pytest.fixture
def env(tmp_path):
    url = f"sqlite:///{tmp_path / 'mycfia.db'}"
    engine = create_engine(url)
    mycfia.metadata.create_all(engine)
    yield {"url": url, "engine": engine, "drop": tmp_path / "drop", "tmp": tmp_path}
    engine.dispose()


def tick(url, cursor=None, now=None):
    sensor = build_campaigns_sensor(clock=lambda: now or utcnow())
    context = dg.build_sensor_context(
        cursor=cursor,
        instance=dg.DagsterInstance.ephemeral(),
        resources={"mycfia": DatabaseResource(url=url)},
    )
    return sensor(context)


def batch_ids(request) -> list[int]:
    return request.run_config["ops"]["export_campaign_batch"]["config"]["campaigns"]


def add_many(engine, ids, **kw) -> None:
    with engine.begin() as conn:
        for cid in ids:
            add_campaign(conn, cid, updated_at=T0 + timedelta(milliseconds=cid), **kw)


def sftp_for(server, drop, port=None, known_hosts=None) -> SFTPResource:
    return SFTPResource(
        host="127.0.0.1",
        port=port or server.port,
        username=server.user,
        private_key=str(server.client_key),
        known_hosts=str(known_hosts or server.known_hosts),
        remote_dir=str(drop),
        connect_timeout=5.0,
        io_timeout=10.0,
    )


def run_batch(env, ids, sftp, instance=None, max_attempts=None) -> dg.ExecuteInProcessResult:
    instance = instance or dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(campaigns_partitions.name, [str(i) for i in ids])
    config: dict = {"campaigns": list(ids)}
    if max_attempts is not None:
        config["max_attempts"] = max_attempts
    return campaign_export_batch_job.execute_in_process(
        run_config={"ops": {"export_campaign_batch": {"config": config}}},
        instance=instance,
        resources={
            "mycfia": DatabaseResource(url=env["url"]),
            "sftp": sftp,
            "alerts": AlertsResource(),
        },
        raise_on_error=False,
    )


def rows(env) -> dict[int, object]:
    with env["engine"].connect() as conn:
        return {r.campaign_id: r for r in conn.execute(sa.select(mycfia.campaign_exports))}


def accepted(server) -> int:
    """SSH logins the server accepted so far."""
    return sum("Accepted publickey" in line for line in server.log)


def materialized(result, key) -> dict[str, dg.AssetMaterialization]:
    return {
        m.partition: m
        for m in result.asset_materializations_for_node("export_campaign_batch")
        if m.asset_key == key
    }


def assert_no_partial_file_under_a_final_name(drop: Path) -> None:
    """Every file under a final name is complete: a manifest's files match its sizes and
    hashes; a json/csv without its manifest yet matches the outbox's built file."""
    for path in drop.rglob("*"):
        if path.is_dir() or path.name.endswith(".part"):
            continue
        if path.name.endswith(".manifest.json"):
            manifest = json.loads(path.read_text())
            for info in manifest["files"].values():
                data = (path.parent / info["name"]).read_bytes()
                assert len(data) == info["bytes"], path
                assert hashlib.sha256(data).hexdigest() == info["sha256"], path


# --- the sensor: single runs or batches ------------------------------------------------


def test_a_few_campaigns_keep_one_campaign_export_run_each(env):
    add_many(env["engine"], range(1, SINGLE_RUNS_MAX + 1))
    result = tick(env["url"])
    assert [r.job_name for r in result.run_requests] == ["campaign_export"] * SINGLE_RUNS_MAX
    assert [r.run_key for r in result.run_requests] == [
        f"{i}:r1" for i in range(1, SINGLE_RUNS_MAX + 1)
    ]
    assert [r.partition_key for r in result.run_requests] == [
        str(i) for i in range(1, SINGLE_RUNS_MAX + 1)
    ]


def test_a_burst_is_requested_as_batch_runs_each_campaign_once(env):
    n = 3 * BATCH_SIZE + 7
    add_many(env["engine"], range(1, n + 1))
    first = tick(env["url"])
    requests = first.run_requests
    assert {r.job_name for r in requests} == {BATCH_JOB_NAME}
    assert len(requests) == 4 and all(len(batch_ids(r)) <= BATCH_SIZE for r in requests)
    assert sorted(c for r in requests for c in batch_ids(r)) == list(range(1, n + 1))
    for r in requests:
        assert r.partition_key is None and r.run_key.startswith("batch:")
        assert r.tags["cfi/campaign_id"] == "batch-" + r.run_key.removeprefix("batch:")
        assert r.tags["cfi/batch_size"] == str(len(batch_ids(r)))
    assert len({r.run_key for r in requests}) == len(requests)
    (add,) = first.dynamic_partitions_requests
    assert sorted(map(int, add.partition_keys)) == list(range(1, n + 1))
    # nothing twice: the next tick has nothing, a new campaign alone is a single run
    assert not tick(env["url"], first.cursor).run_requests
    add_many(env["engine"], [n + 1])
    (single,) = tick(env["url"], first.cursor).run_requests
    assert (single.job_name, single.run_key) == ("campaign_export", f"{n + 1}:r1")


def test_batches_are_even_and_parallel():
    def sizes(n):
        return [len(b) for b in split_batches([Due(i, 1) for i in range(n)])]

    assert sizes(5) == [5]
    assert sizes(40) == [10, 10, 10, 10]  # four SFTP sessions at once
    assert sizes(100) == [25, 25, 25, 25]
    assert sizes(500) == [50] * 10
    assert sizes(101) == [26, 25, 25, 25]


def test_retries_due_in_a_burst_are_batched_once_then_again_after_an_hour(env):
    ids = range(1, 11)
    add_many(env["engine"], ids)
    cursor = tick(env["url"]).cursor  # their first export was requested
    now = utcnow()
    with env["engine"].begin() as conn:
        conn.execute(
            sa.insert(mycfia.campaign_exports),
            [
                {
                    "campaign_id": cid,
                    "revision": 1,
                    "status": "failed",
                    "attempts": 4,
                    "failure_kind": TRANSIENT,
                    "transient_failures": 1,
                    "next_attempt_at": now - timedelta(seconds=1),
                    "requested_at": T0,
                    "updated_at": T0,
                }
                for cid in ids
            ],
        )
    result = tick(env["url"], cursor, now)
    assert sorted(c for r in result.run_requests for c in batch_ids(r)) == list(ids)
    assert all(r.tags["cfi/retry"] == "batch" for r in result.run_requests)
    # still due (the batch has not run yet), plus one new campaign: not re-requested
    add_many(env["engine"], [11])
    second = tick(env["url"], result.cursor, now + timedelta(seconds=20))
    assert [r.run_key for r in second.run_requests] == ["11:r1"]
    # a batch that never ran does not block them for good
    later = tick(env["url"], second.cursor, now + timedelta(hours=1, seconds=1))
    assert sorted(c for r in later.run_requests for c in batch_ids(r)) == list(ids)


# --- the batch run, against a real sshd -------------------------------------------------


@pytest.mark.sshd
def test_batch_delivers_valid_rejects_invalid_and_fails_on_draft_over_one_connection(env, sshd):
    bad = default_targets(2)
    bad[1]["email"] = "=cmd|'/C calc'!A0"
    with env["engine"].begin() as conn:
        add_campaign(conn, 31, tenant_code="T031", revision=2)
        add_campaign(conn, 32, tenant_code="T032", targets=bad)
        add_campaign(conn, 33, tenant_code="T033", status="draft")
        add_campaign(conn, 34, tenant_code="T031")
    logins = accepted(sshd)
    result = run_batch(env, [31, 32, 33, 34], sftp_for(sshd, env["drop"]))

    # per campaign, what the UI shows for campaign_export, partition = campaign id
    files = materialized(result, FILES_KEY)
    assert sorted(files) == ["31", "34"]  # a rejected campaign is no export: grey, its reason
    rejected = [o for o in result.asset_observations_for_node("export_campaign_batch")]
    assert {(o.asset_key, o.partition) for o in rejected} == {
        (FILES_KEY, "32"),
        (DELIVERY_KEY, "32"),
    }
    assert all("/targets/1/email" in o.metadata["reason"].value for o in rejected)
    delivered = materialized(result, DELIVERY_KEY)
    assert sorted(delivered) == ["31", "34"]  # a rejection is never a delivery (failed or not)
    assert delivered["31"].metadata["remote_manifest"].value == (
        f"{env['drop']}/T031/campaign_31_r2.manifest.json"
    )
    assert delivered["31"].metadata["seconds_from_validation"].value >= 0
    checks = {c.partition: c for c in result.get_asset_check_evaluations()}
    assert sorted(checks) == ["31", "32", "34"]
    assert all(c.check_name == CHECK_NAME and c.asset_key == FILES_KEY for c in checks.values())
    assert checks["31"].passed and checks["34"].passed and not checks["32"].passed
    assert checks["32"].metadata["errors"].value[0]["pointer"] == "/targets/1/email"

    # the draft fails the run, at the end, naming it; the others went through
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    message = failure.event_specific_data.error.message
    assert "campaign 33" in message and "'draft'" in message and "campaign 32" not in message
    assert accepted(sshd) - logins == 1  # one SFTP connection for the whole batch

    state = rows(env)
    assert (state[31].status, state[31].revision) == ("delivered", 2)
    assert state[34].status == "delivered"
    assert state[32].status == "rejected" and "/targets/1/email" in state[32].error
    assert 33 not in state
    assert sorted(p.name for p in (env["drop"] / "T031").iterdir()) == [
        "campaign_31_r2.csv",
        "campaign_31_r2.json",
        "campaign_31_r2.manifest.json",
        "campaign_34_r1.csv",
        "campaign_34_r1.json",
        "campaign_34_r1.manifest.json",
    ]
    assert not (env["drop"] / "T032").exists()


def _proxied(env, sshd, proxy) -> SFTPResource:
    real = (sshd.host_key.parent / (sshd.host_key.name + ".pub")).read_text().split()
    kh = env["tmp"] / f"kh{proxy.port}"
    kh.write_text(f"[127.0.0.1]:{proxy.port} {real[0]} {real[1]}\n")
    return sftp_for(sshd, env["drop"], port=proxy.port, known_hosts=kh)


@pytest.mark.sshd
def test_connection_cut_mid_batch_leaves_no_partial_file_and_the_failed_one_is_retried(
    env, sshd, cut_proxy
):
    ids = list(range(41, 49))
    with env["engine"].begin() as conn:
        for cid in ids:
            add_campaign(conn, cid, tenant_code="T040", targets=default_targets(1500))
    proxy = cut_proxy(sshd.port, cut_after=400_000)  # cut once, a few campaigns in
    # one attempt per campaign: the cut one fails (transient), the next reconnects
    result = run_batch(env, ids, _proxied(env, sshd, proxy), max_attempts=1)
    assert proxy.cut_count == 1 and not result.success
    state = rows(env)
    failed = sorted(cid for cid, r in state.items() if r.status != "delivered")
    assert len(failed) == 1 and 41 < failed[0] < 48
    (cut,) = failed
    assert state[cut].status == "failed" and state[cut].failure_kind == TRANSIENT
    assert state[cut].next_attempt_at is not None
    assert sorted(materialized(result, DELIVERY_KEY)) == sorted(str(c) for c in ids if c != cut)
    drop = env["drop"] / "T040"
    assert not (drop / f"campaign_{cut}_r1.manifest.json").exists()
    assert_no_partial_file_under_a_final_name(env["drop"])

    # the automation re-tries it once due: a single campaign_export run, which delivers
    cursor = tick(env["url"]).cursor
    assert not tick(
        env["url"], cursor, state[cut].next_attempt_at - timedelta(seconds=1)
    ).run_requests
    (retry,) = tick(env["url"], cursor, state[cut].next_attempt_at).run_requests
    assert (retry.job_name, retry.run_key) == ("campaign_export", f"{cut}:r1:retry1")
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(campaigns_partitions.name, [str(cut)])
    again = dg.materialize(
        export_assets,
        instance=instance,
        partition_key=str(cut),
        resources={
            "mycfia": DatabaseResource(url=env["url"]),
            "sftp": sftp_for(sshd, env["drop"]),
            "alerts": AlertsResource(),
        },
        tags=retry.tags,
    )
    assert again.success and rows(env)[cut].status == "delivered"
    assert_no_partial_file_under_a_final_name(env["drop"])
    assert sorted(p.name for p in drop.iterdir() if p.name.endswith(".manifest.json")) == sorted(
        f"campaign_{c}_r1.manifest.json" for c in ids
    )


@pytest.mark.sshd
def test_connection_cut_mid_batch_is_retried_in_the_run(env, sshd, cut_proxy):
    ids = list(range(51, 57))
    with env["engine"].begin() as conn:
        for cid in ids:
            add_campaign(conn, cid, tenant_code="T050", targets=default_targets(1500))
    proxy = cut_proxy(sshd.port, cut_after=300_000)
    result = run_batch(env, ids, _proxied(env, sshd, proxy))
    assert result.success and proxy.cut_count == 1
    delivered = materialized(result, DELIVERY_KEY)
    assert sorted(delivered) == [str(c) for c in ids]
    assert sorted(m.metadata["attempts"].value for m in delivered.values()) == [1] * 5 + [2]
    assert {r.status for r in rows(env).values()} == {"delivered"}
    assert_no_partial_file_under_a_final_name(env["drop"])


@pytest.mark.sshd
def test_server_down_fails_the_batch_fast_then_the_sensor_retries_it_as_a_batch(env, sshd_factory):
    server = sshd_factory()  # not started yet
    ids = list(range(61, 61 + SINGLE_RUNS_MAX + 3))
    add_many(env["engine"], ids, tenant_code="T060")
    cursor = tick(env["url"]).cursor
    result = run_batch(env, ids, sftp_for(server, env["drop"]), max_attempts=2)
    assert not result.success
    state = rows(env)
    assert {(r.status, r.failure_kind) for r in state.values()} == {("failed", TRANSIENT)}
    # the first used its attempts; the others were not made to wait for nothing
    assert state[ids[0]].attempts == 2
    assert {state[c].attempts for c in ids[1:]} == {1}  # one attempt each, recorded at once
    assert "not attempted: the SFTP server could not be reached" in state[ids[1]].error
    due = max(r.next_attempt_at for r in state.values())

    server.start()
    requests = tick(env["url"], cursor, due).run_requests
    assert {r.job_name for r in requests} == {BATCH_JOB_NAME}
    assert sorted(c for r in requests for c in batch_ids(r)) == ids
    for r in requests:
        assert run_batch(env, batch_ids(r), sftp_for(server, env["drop"])).success
    assert {r.status for r in rows(env).values()} == {"delivered"}


def test_a_campaign_whose_delivery_fails_in_a_batch_is_red_the_rejected_one_grey(env, sshd_factory):
    """Issue 16 item 7: as a failed campaign_export run would show it, per partition."""
    server = sshd_factory()  # not started: every delivery fails
    bad = default_targets(2)
    bad[1]["email"] = "not-an-email"
    with env["engine"].begin() as conn:
        add_campaign(conn, 71, tenant_code="T071")
        add_campaign(conn, 72, tenant_code="T072", targets=bad)
    instance = dg.DagsterInstance.ephemeral()
    result = run_batch(env, [71, 72], sftp_for(server, env["drop"]), instance, max_attempts=1)
    assert not result.success

    def status(key, partition):
        found = instance.get_status_by_partition(key, [partition], campaigns_partitions) or {}
        value = found.get(partition)
        return value.value if value is not None else None

    assert status(DELIVERY_KEY, "71") == "FAILED"  # red: its delivery failed
    assert status(FILES_KEY, "71") == "MATERIALIZED"
    assert status(DELIVERY_KEY, "72") is None and status(FILES_KEY, "72") is None  # grey
    (check,) = [c for c in result.get_asset_check_evaluations() if c.partition == "72"]
    assert not check.passed
    # delivered later (the sensor's re-try): green again
    server.start()
    assert run_batch(env, [71], sftp_for(server, env["drop"]), instance).success
    assert status(DELIVERY_KEY, "71") == "MATERIALIZED"
