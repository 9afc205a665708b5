"""The change sensor on PostgreSQL with logical decoding: the gate names the changed tables,
one run applies them by key, and the next tick verifies the view current from the change log."""

from __future__ import annotations

import dagster as dg
import pytest
import sqlalchemy as sa

from cfi_pipelines.assets.sources import source_assets
from cfi_pipelines.assets.views import refresh_views_job, view_assets, view_checks
from cfi_pipelines.model import cfi_common as common
from cfi_pipelines.model import cfi_source as src
from cfi_pipelines.sensors.changes import EXACT_FROM
from cfi_pipelines.views.capture import capture_for
from cfi_pipelines.views.positions import read_positions
from cfi_pipelines.views.refresh import read_status, refresh_view
from cfi_pipelines.views.spec import VIEWS
from tests.sensors.test_changes import res, tick

pytestmark = pytest.mark.postgres


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def test_a_silent_update_is_applied_by_key_and_then_verified(pg_logical_dbs, instance):
    dbs = pg_logical_dbs
    for spec in VIEWS:
        assert refresh_view(spec, dbs.source, dbs.common).capture_mode == "pg_logical"
    first = tick(instance, res(dbs))
    assert not first.run_requests
    assert "pg_logical: no change in the change log" in first.skip_reason.skip_message
    sl = src.stock_levels
    with dbs.source.begin() as conn:  # updated_at untouched: no signature would see it
        conn.execute(sl.update().where(sl.c.id == 1).values(quantity=31337))
    result = tick(instance, res(dbs), first.cursor)
    (req,) = result.run_requests
    assert [k.path[-1] for k in req.asset_selection] == ["stocks"]
    (obs,) = [e for e in result.asset_events if isinstance(e, dg.AssetObservation)]
    assert obs.asset_key.path[-1] == "stock_levels"
    assert obs.metadata["capture_mode"].value == "pg_logical"
    assert obs.metadata["latest_change"].value.startswith("commit at LSN ")
    defs = dg.Definitions(
        assets=[*source_assets, *view_assets],
        asset_checks=view_checks,
        jobs=[refresh_views_job],
        resources=res(dbs),
    )
    run = defs.resolve_job_def(req.job_name).execute_in_process(
        instance=instance, run_config=req.run_config, asset_selection=list(req.asset_selection)
    )
    assert run.success
    (mat,) = [
        e.event_specific_data.materialization
        for e in run.all_events
        if e.event_type_value == "ASSET_MATERIALIZATION"
    ]
    assert mat.metadata["mode"].value == "apply"
    assert mat.metadata["capture_mode"].value == "pg_logical"
    assert mat.metadata["changed_keys"].value == 1 and mat.metadata["row_changes"].value == 1
    with dbs.common.connect() as conn:
        assert 31337 in set(conn.scalars(sa.select(common.cfi_stocks.c.quantity)))
    before = read_status(dbs.common)["stocks"]["source_snapshot_at"]
    after = tick(instance, res(dbs), result.cursor)
    assert not after.run_requests
    assert read_status(dbs.common)["stocks"]["source_snapshot_at"] > before
    # the views that do not read stock_levels never ran, yet their positions followed the
    # verified gate: the slot was advanced past the change, nothing is left pending
    capture = capture_for(dbs.source)
    assert not capture.gate(EXACT_FROM).changed
    positions = read_positions(dbs.common, "pg_logical")
    assert len(set(positions.values())) <= 2 and set(positions) == {v.name for v in VIEWS}
