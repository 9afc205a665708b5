"""The production instance config (``deploy/dagster.yaml``) on a real PostgreSQL:
the refresh job runs with the suite's PostgreSQL as Dagster's storage, and its run,
materializations and check results are read back by SQL and by a second instance
(as the webserver, in another process, would)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage
from sqlalchemy.engine import make_url

from cfi_pipelines.assets.views import VIEW_KEYS
from cfi_pipelines.db import create_engine
from cfi_pipelines.definitions import build_defs
from cfi_pipelines.views.spec import VIEWS
from tests.fixtures.common import Databases

pytestmark = pytest.mark.postgres

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
CHECKS = ("freshness", "not_empty")


@pytest.fixture
def pg_dagster_home(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Path, str]]:
    """A DAGSTER_HOME holding the production dagster.yaml, its DAGSTER_PG_* variables
    pointing at a fresh database on the suite's PostgreSQL server."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(DEPLOY / "dagster.yaml", home / "dagster.yaml")
    url = make_url(pg_url)
    for name, value in {
        "DAGSTER_PG_HOST": url.host,
        "DAGSTER_PG_PORT": str(url.port),
        "DAGSTER_PG_USER": url.username,
        "DAGSTER_PG_PASSWORD": url.password,
        "DAGSTER_PG_DB": url.database,
    }.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    yield home, pg_url


def test_the_pipeline_runs_with_postgresql_as_the_instance_storage(
    sqlite_dbs: Databases, pg_dagster_home: tuple[Path, str]
) -> None:
    home, pg_url = pg_dagster_home
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        # the production queue and limits are what the instance loaded
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        queue = instance.get_concurrency_config().run_queue_config
        assert queue is not None and queue.max_concurrent_runs == 10
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1

        result = (
            build_defs()
            .resolve_job_def("refresh_views")
            .execute_in_process(instance=instance, tags={"cfi/trigger": "test"})
        )
        assert result.success
        run_id = result.run_id

    # A second instance from the same file (another process in production) sees it all.
    with dg.DagsterInstance.from_config(str(home)) as instance:
        run = instance.get_run_by_id(run_id)
        assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS
        assert run.tags["cfi/trigger"] == "test"
        for key in VIEW_KEYS:
            event = instance.get_latest_materialization_event(key)
            assert event is not None and event.run_id == run_id
            assert event.asset_materialization is not None
            assert event.asset_materialization.metadata["rows"].value > 0
            for check in CHECKS:
                history = instance.event_log_storage.get_asset_check_execution_history(
                    dg.AssetCheckKey(key, check), limit=1
                )
                assert len(history) == 1, (key, check)
                record = history[0]
                assert record.run_id == run_id
                assert record.status == AssetCheckExecutionRecordStatus.SUCCEEDED
                assert record.event is not None
                assert record.event.asset_check_evaluation is not None
                assert record.event.asset_check_evaluation.passed

    # And it is really in PostgreSQL, in Dagster's tables.
    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            runs = conn.execute(sa.text("SELECT run_id, status FROM runs")).all()
            assert [tuple(r) for r in runs] == [(run_id, "SUCCESS")]
            materialized = conn.scalars(
                sa.text(
                    "SELECT asset_key FROM event_logs "
                    "WHERE dagster_event_type = 'ASSET_MATERIALIZATION' AND run_id = :r"
                ),
                {"r": run_id},
            ).all()
            assert sorted(materialized) == sorted(k.to_string() for k in VIEW_KEYS)
            checks = conn.execute(
                sa.text(
                    "SELECT asset_key, check_name, execution_status FROM asset_check_executions "
                    "WHERE run_id = :r"
                ),
                {"r": run_id},
            ).all()
            assert sorted(tuple(c) for c in checks) == sorted(
                (k.to_string(), c, "SUCCEEDED") for k in VIEW_KEYS for c in CHECKS
            )
            assert len(checks) == 2 * len(VIEWS)
    finally:
        engine.dispose()
    # nothing went to a local SQLite instance instead
    assert not list(home.glob("**/*.db"))
