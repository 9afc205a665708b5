"""The view assets, their checks and schedules, through Dagster (materialize with
an ephemeral instance; real SQLite databases)."""

from __future__ import annotations

from datetime import timedelta

import dagster as dg
import pytest
import sqlalchemy as sa

from cfi_pipelines.assets.views import (
    VIEW_KEYS,
    build_view_schedules,
    check_views_job,
    freshness_severity,
    refresh_views_job,
    view_assets,
    view_checks,
    view_key,
    view_op_name,
)
from cfi_pipelines.model import cfi_common as common
from cfi_pipelines.model import cfi_source as src
from cfi_pipelines.resources.databases import DatabaseResource
from tests.fixtures.common import Databases


def _defs(dbs: Databases) -> dg.Definitions:
    return dg.Definitions(
        assets=view_assets,
        asset_checks=view_checks,
        jobs=[refresh_views_job, check_views_job],
        resources={
            "cfi_source": DatabaseResource(url=dbs.source_url),
            "cfi_common": DatabaseResource(url=dbs.common_url),
        },
    )


def _checks(result) -> dict[tuple[str, str], dg.AssetCheckEvaluation]:
    return {
        (e.asset_key.path[-1], e.check_name): e
        for e in (
            ev.event_specific_data
            for ev in result.all_events
            if ev.event_type_value == "ASSET_CHECK_EVALUATION"
        )
    }


def _age(dbs: Databases, view: str, minutes: float) -> None:
    t = common.cfi_view_status
    with dbs.common.begin() as conn:
        snap = conn.scalar(sa.select(t.c.source_snapshot_at).where(t.c.view == view))
        conn.execute(
            t.update()
            .where(t.c.view == view)
            .values(source_snapshot_at=snap - timedelta(minutes=minutes))
        )


def test_the_refresh_job_materializes_four_views_with_numeric_metadata_and_passing_checks(
    sqlite_dbs,
):
    defs = _defs(sqlite_dbs)
    result = defs.resolve_job_def("refresh_views").execute_in_process(
        instance=dg.DagsterInstance.ephemeral()
    )
    assert result.success
    mats = {
        e.asset_key: e.metadata
        for e in (m.materialization for m in result.get_asset_materialization_events())
    }
    assert set(mats) == set(VIEW_KEYS)
    stocks = mats[view_key("stocks")]
    assert stocks["rows"].value == 9984 and stocks["inserted"].value == 9984
    assert stocks["mode"].value == "full"
    for name in (
        "rows",
        "inserted",
        "updated",
        "deleted",
        "duration_s",
        "lag_s",
        "watermark_epoch",
    ):
        assert isinstance(stocks[name].value, int | float), name
    checks = _checks(result)
    assert len(checks) == 8 and all(c.passed for c in checks.values())


def test_second_run_is_incremental_and_config_can_force_full(sqlite_dbs):
    defs = _defs(sqlite_dbs)
    job = defs.resolve_job_def("refresh_views")
    instance = dg.DagsterInstance.ephemeral()
    job.execute_in_process(instance=instance)
    again = job.execute_in_process(instance=instance)
    modes = {
        m.materialization.asset_key.path[-1]: m.materialization.metadata["mode"].value
        for m in again.get_asset_materialization_events()
    }
    assert set(modes.values()) == {"incremental"}
    for m in again.get_asset_materialization_events():
        meta = m.materialization.metadata
        assert meta["capture_mode"].value == "sqlite_data_version"
        # the apply's figures are not shown as zeros on another path
        assert not {"changed_keys", "row_changes", "capture_position"} & set(meta)
    full = job.execute_in_process(
        instance=instance,
        run_config={"ops": {view_op_name("stocks"): {"config": {"mode": "full"}}}},
        asset_selection=[view_key("stocks")],
    )
    [mat] = full.get_asset_materialization_events()
    assert mat.materialization.metadata["mode"].value == "full"


@pytest.mark.parametrize(
    ("minutes", "passed", "severity"),
    [
        (1, True, None),
        (7, False, dg.AssetCheckSeverity.WARN),
        (20, False, dg.AssetCheckSeverity.ERROR),
    ],
)
def test_freshness_check_reads_the_status_table(sqlite_dbs, minutes, passed, severity):
    defs = _defs(sqlite_dbs)
    instance = dg.DagsterInstance.ephemeral()
    defs.resolve_job_def("refresh_views").execute_in_process(instance=instance)
    _age(sqlite_dbs, "invoices", minutes)  # refreshed outside this run: the DB is the truth
    result = defs.resolve_job_def("check_views").execute_in_process(
        instance=instance, raise_on_error=False
    )
    check = _checks(result)[("invoices", "freshness")]
    assert check.passed is passed
    if severity:
        assert check.severity == severity
    assert check.metadata["age_s"].value == pytest.approx(minutes * 60, abs=30)
    assert check.metadata["error_after_s"].value == 900
    assert _checks(result)[("stocks", "freshness")].passed


def test_not_empty_fails_when_the_view_is_empty_but_the_source_is_not(sqlite_dbs):
    defs = _defs(sqlite_dbs)
    instance = dg.DagsterInstance.ephemeral()
    defs.resolve_job_def("refresh_views").execute_in_process(instance=instance)
    with sqlite_dbs.common.begin() as conn:
        conn.execute(common.cfi_campaigns.delete())
    result = defs.resolve_job_def("check_views").execute_in_process(
        instance=instance, raise_on_error=False
    )
    check = _checks(result)[("campaigns", "not_empty")]
    assert not check.passed and check.metadata["source_rows"].value == 10
    assert _checks(result)[("stocks", "not_empty")].passed


def test_guard_failure_is_not_retried_and_says_what_to_do(sqlite_dbs):
    defs = _defs(sqlite_dbs)
    instance = dg.DagsterInstance.ephemeral()
    job = defs.resolve_job_def("refresh_views")
    job.execute_in_process(instance=instance)
    with sqlite_dbs.source.begin() as conn:
        conn.execute(src.stock_movements.delete())
        conn.execute(src.stock_levels.delete())
    result = job.execute_in_process(
        instance=instance,
        run_config={"ops": {view_op_name("stocks"): {"config": {"mode": "full"}}}},
        asset_selection=[view_key("stocks")],
        raise_on_error=False,
    )
    assert not result.success
    [failure] = [e for e in result.all_events if e.is_step_failure]
    assert "--force" in failure.step_failure_data.user_failure_data.description
    with sqlite_dbs.common.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(common.cfi_stocks)) == 9984


def test_freshness_thresholds():
    assert freshness_severity(timedelta(minutes=5)) == (True, dg.AssetCheckSeverity.WARN)
    assert freshness_severity(timedelta(minutes=5, seconds=1)) == (
        False,
        dg.AssetCheckSeverity.WARN,
    )
    assert freshness_severity(timedelta(minutes=15, seconds=1)) == (
        False,
        dg.AssetCheckSeverity.ERROR,
    )
    assert freshness_severity(None) == (False, dg.AssetCheckSeverity.ERROR)


def test_assets_carry_pools_and_one_freshness_mechanism_the_check(sqlite_dbs):
    defs = _defs(sqlite_dbs)
    for key in VIEW_KEYS:
        asset = defs.resolve_assets_def(key)
        # a FreshnessPolicy would count materializations only (see the GraphQL test below)
        assert asset.specs_by_key[key].freshness_policy is None
        specs = [spec for check in view_checks for spec in check.check_specs]
        assert any(s.asset_key == key and s.name == "freshness" for s in specs)
        assert list(asset.op.pools) == [f"cfi_view_{key.path[-1]}"]


def test_automation_is_on_by_default_and_off_with_cfi_automation(monkeypatch):
    assert {s.default_status for s in build_view_schedules()} == {dg.DefaultScheduleStatus.RUNNING}
    monkeypatch.setenv("CFI_AUTOMATION", "off")
    assert {s.default_status for s in build_view_schedules()} == {dg.DefaultScheduleStatus.STOPPED}


UI_FRESHNESS = """
query ($key: AssetKeyInput!) {
  assetOrError(assetKey: $key) {
    ... on Asset {
      assetHealth { freshnessStatus assetChecksStatus }
      definition { freshnessStatusInfo { freshnessStatus } }
    }
  }
}
"""


def test_a_quiet_view_verified_current_reads_fresh_in_the_ui_as_in_status(tmp_path):
    """Issue 16 item 5: 16 min after its last materialization, a view the change sensor
    verified current is PASS in `status` and in its freshness check; the UI (GraphQL,
    after the freshness daemon's evaluation) must not call it failed."""
    import asyncio
    import os

    from dagster._core.remote_origin import InProcessCodeLocationOrigin
    from dagster._core.test_utils import (
        create_test_daemon_workspace_context,
        freeze_time,
        instance_for_test,
    )
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
    from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
    from dagster._daemon.freshness import FreshnessDaemon
    from dagster._time import get_current_datetime
    from dagster_graphql.test.utils import execute_dagster_graphql

    from cfi_pipelines.assets.views import freshness_check_result

    key = view_key("operations")
    origin = InProcessCodeLocationOrigin(
        LoadableTargetOrigin(
            module_name="cfi_pipelines.definitions", working_directory=os.getcwd()
        ),
        location_name="cfi_pipelines",
    )
    with (
        instance_for_test() as instance,
        create_test_daemon_workspace_context(
            InProcessWorkspaceLoadTarget(origin), instance
        ) as workspace,
    ):
        instance.report_runless_asset_event(dg.AssetMaterialization(key))
        later = get_current_datetime() + timedelta(minutes=16)
        with freeze_time(later):
            # what the change sensor reports when nothing changed: verified current now
            now = later.replace(tzinfo=None)
            check = freshness_check_result({"source_snapshot_at": now, "source": "db"}, now)
            assert check.passed
            instance.report_runless_asset_event(
                dg.AssetCheckEvaluation(
                    asset_key=key,
                    check_name="freshness",
                    passed=check.passed,
                    severity=check.severity,
                    description=check.description,
                )
            )
            asyncio.run(FreshnessDaemon()._evaluate_assets(workspace))  # noqa: SLF001
            result = execute_dagster_graphql(
                workspace.create_request_context(), UI_FRESHNESS, {"key": {"path": key.path}}
            )
    assert not result.errors, result.errors
    node = result.data["assetOrError"]
    ui = (node["definition"]["freshnessStatusInfo"] or {}).get("freshnessStatus")
    assert ui not in ("DEGRADED", "WARNING"), node  # the UI agrees with the check: not red
    health = node["assetHealth"] or {}  # None unless the instance computes asset health
    assert health.get("freshnessStatus") not in ("DEGRADED", "WARNING"), node


def test_not_empty_reads_no_source_table_while_the_view_has_rows(sqlite_dbs):
    """It runs after every applied change: a count of CFI's table there would be O(table)."""
    defs = _defs(sqlite_dbs)
    instance = dg.DagsterInstance.ephemeral()
    defs.resolve_job_def("refresh_views").execute_in_process(instance=instance)
    seen: list[str] = []

    def record(conn, cursor, statement, *args) -> None:
        seen.append(statement)

    source = DatabaseResource(url=sqlite_dbs.source_url).engine()
    sa.event.listen(source, "before_cursor_execute", record)
    try:
        result = defs.resolve_job_def("check_views").execute_in_process(instance=instance)
    finally:
        sa.event.remove(source, "before_cursor_execute", record)
    checks = _checks(result)
    with sqlite_dbs.common.connect() as conn:
        stocks = conn.scalar(sa.select(sa.func.count()).select_from(common.cfi_stocks))
    assert checks[("stocks", "not_empty")].passed
    assert checks[("stocks", "not_empty")].metadata["view_rows"].value == stocks > 0
    assert "source_rows" not in checks[("stocks", "not_empty")].metadata
    assert not [s for s in seen if "stock_levels" in s or "campaigns" in s], seen
