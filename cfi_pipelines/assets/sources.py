"""CFI's source tables as external assets (``cfi_source/<table>``), upstream of the views.

This project never writes them: they are declared so that the lineage reads
source tables → views, and observed by ``view_change_sensor`` (each change the source's
change capture reports for a table is an ``AssetObservation``, with the capture mode and
the latest change: the UI shows when the source last changed and how that is known). Each carries a ``schema`` check: which columns the views read are gone.
"""

from collections.abc import Sequence

import dagster as dg

from cfi_pipelines.resources.databases import DatabaseResource
from cfi_pipelines.views.probe import source_tables
from cfi_pipelines.views.schema import Difference, compare, describe, tables_read

GROUP = "cfi_source"


def source_key(table: str) -> dg.AssetKey:
    return dg.AssetKey([GROUP, table])


source_assets = [
    dg.AssetSpec(
        key=source_key(t.name),
        group_name=GROUP,
        kinds={"sql"},
        description=f"CFI's production table `{t.name}` (read only; observed, never materialized "
        "here). Its changes are found by the source's change capture (logical decoding, Change "
        "Tracking, counters or data_version; see `cfi-pipelines status`).",
        metadata={"dagster/table_name": t.name},
    )
    for t in source_tables()
]


# ------------------------------------------------------------------ schema checks
# When CFI renames or drops a column a view reads, the views that read it stop
# refreshing. The check `schema` of each cfi_source/<table> says which table drifted
# and which columns are gone (cfi_pipelines.views.schema: catalog reads only). It is
# evaluated when it costs nothing in steady state: by a refresh that failed on a
# database error (the refresh diagnoses the failure, and reports the drifted tables'
# check at once, see report_schema_drift), when a refresh succeeds again (the alert
# sensor reports it passed), and on demand from the UI or `doctor`. Not on a timer:
# a drift that no refresh trips over breaks nothing yet, and every view is refreshed
# at least nightly.

SCHEMA_CHECK = "schema"


def schema_check_evaluation(
    table: str, differences: Sequence[Difference]
) -> dg.AssetCheckEvaluation:
    """The ``schema`` check's result for ``table`` given its differences (none: passed)."""
    return dg.AssetCheckEvaluation(
        asset_key=source_key(table),
        check_name=SCHEMA_CHECK,
        passed=not differences,
        severity=dg.AssetCheckSeverity.ERROR,
        description=describe(differences) if differences else "every column the views read is here",
        metadata={
            "missing": dg.MetadataValue.json([d.what for d in differences]),
            "views": ", ".join(sorted({v for d in differences for v in d.views})),
        },
    )


def report_schema_drift(instance: dg.DagsterInstance, differences: Sequence[Difference]) -> None:
    """Report the failed ``schema`` check of each drifted table (without a run)."""
    by_table: dict[str, list[Difference]] = {}
    for d in differences:
        by_table.setdefault(d.table, []).append(d)
    known = {a.key for a in source_assets}
    for table, found in by_table.items():
        if source_key(table) in known:
            instance.report_runless_asset_event(schema_check_evaluation(table, found))


def _build_schema_check(table: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=source_key(table),
        name=SCHEMA_CHECK,
        description=f"Every column of `{table}` the views read is in CFI's DB (a renamed or "
        "dropped column stops their refresh). Catalog reads only.",
    )
    def _check(cfi_source: DatabaseResource) -> dg.AssetCheckResult:
        with cfi_source.engine().connect() as conn:
            found = compare(conn, tables=[table])
        e = schema_check_evaluation(table, found)
        return dg.AssetCheckResult(
            passed=e.passed, severity=e.severity, description=e.description, metadata=e.metadata
        )

    return _check


schema_checks = [
    _build_schema_check(t) for t in tables_read() if source_key(t) in {a.key for a in source_assets}
]
