"""CFI's source tables as external assets (``cfi_source/<table>``), upstream of the views.

This project never writes them: they are declared so that the lineage reads
source tables → views, and observed by ``view_change_sensor`` (each change of a
table's signature is an ``AssetObservation``: the UI shows when the source last
changed).
"""

import dagster as dg

from cfi_pipelines.views.probe import source_tables

GROUP = "cfi_source"


def source_key(table: str) -> dg.AssetKey:
    return dg.AssetKey([GROUP, table])


source_assets = [
    dg.AssetSpec(
        key=source_key(t.name),
        group_name=GROUP,
        kinds={"sql"},
        description=f"CFI's production table `{t.name}` (read only; observed, never materialized "
        "here). Its change watermark is max(updated_at); deletions show in its row count.",
        metadata={"dagster/table_name": t.name},
    )
    for t in source_tables()
]
