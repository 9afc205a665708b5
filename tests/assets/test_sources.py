"""The cfi_source/<table> assets' schema check: which table drifted, in the UI
(issue 16 item 4), run as a check and reported by a refresh that failed on it."""

from __future__ import annotations

import dagster as dg

from cfi_pipelines.assets.sources import (
    SCHEMA_CHECK,
    schema_checks,
    source_assets,
    source_key,
)
from cfi_pipelines.assets.views import view_assets, view_checks, view_key
from cfi_pipelines.resources.databases import DatabaseResource
from tests.fixtures.common import Databases


def _defs(dbs: Databases) -> dg.Definitions:
    return dg.Definitions(
        assets=[*source_assets, *view_assets],
        asset_checks=[*view_checks, *schema_checks],
        jobs=[
            dg.define_asset_job(
                "schema_checks",
                selection=dg.AssetSelection.checks(
                    *(c for s in schema_checks for c in s.check_keys)
                ),
            )
        ],
        resources={
            "cfi_source": DatabaseResource(url=dbs.source_url),
            "cfi_common": DatabaseResource(url=dbs.common_url),
        },
    )


def _latest(instance: dg.DagsterInstance, table: str):
    key = dg.AssetCheckKey(source_key(table), SCHEMA_CHECK)
    (record,) = instance.event_log_storage.get_asset_check_execution_history(key, limit=1)
    return record.event.dagster_event.event_specific_data


def test_every_table_a_view_reads_has_a_schema_check_that_passes(sqlite_dbs: Databases):
    keys = {c.asset_key for s in schema_checks for c in s.check_keys}
    assert source_key("products") in keys
    assert keys <= {a.key for a in source_assets}
    result = _defs(sqlite_dbs).resolve_job_def("schema_checks").execute_in_process()
    evaluations = result.get_asset_check_evaluations()
    assert evaluations and all(e.passed for e in evaluations)


def test_the_check_names_the_drifted_table_and_column(sqlite_dbs: Databases):
    with sqlite_dbs.source.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE products RENAME COLUMN name TO label")
    result = (
        _defs(sqlite_dbs).resolve_job_def("schema_checks").execute_in_process(raise_on_error=False)
    )
    failed = {e.asset_key: e for e in result.get_asset_check_evaluations() if not e.passed}
    assert list(failed) == [source_key("products")]
    assert failed[source_key("products")].description == (
        "CFI's schema changed: products.name is missing (read by stocks)"
    )


def test_a_refresh_that_fails_on_a_schema_change_reports_the_tables_check(sqlite_dbs: Databases):
    with sqlite_dbs.source.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE products RENAME COLUMN name TO label")
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        [*source_assets, *view_assets],
        selection=[view_key("stocks")],
        instance=instance,
        resources=_defs(sqlite_dbs).resources,
        raise_on_error=False,
    )
    assert not result.success
    evaluation = _latest(instance, "products")
    assert not evaluation.passed
    assert "products.name is missing (read by stocks)" in evaluation.description
