"""The code location: the one place where Definitions are assembled.

Every asset, check, job, schedule and sensor is listed here, with the resources
built once by :func:`cfi_pipelines.resources.build_resources`. Load it with
``dagster dev`` / ``dg`` (``pyproject.toml``), ``workspace.yaml``, or
``dagster … -m cfi_pipelines.definitions``. Importing it has no side effect: no
file, no key, no connection.
"""

from __future__ import annotations

import warnings

import dagster as dg

from cfi_pipelines.assets.exports import (
    campaign_export_batch_job,
    campaign_export_job,
    export_assets,
)
from cfi_pipelines.assets.fallback import fallback_assets, fallback_snapshots_job
from cfi_pipelines.assets.sources import schema_checks, source_assets
from cfi_pipelines.assets.views import (
    build_view_schedules,
    check_views_job,
    refresh_views_job,
    view_assets,
    view_checks,
)
from cfi_pipelines.resources import build_resources
from cfi_pipelines.sensors.campaigns import build_campaigns_sensor
from cfi_pipelines.sensors.changes import build_view_change_sensor
from cfi_pipelines.sensors.health import build_alert_sensors
from cfi_pipelines.sensors.lag import build_view_lag_sensor
from cfi_pipelines.sensors.retention import build_retention_sensor

_OWNERS_WARNING = r"Parameter `owners` of initializer `SensorDefinition.__init__`"


def build_defs(**resource_overrides: object) -> dg.Definitions:
    """The code location's definitions; schedules and sensors read ``CFI_AUTOMATION`` now.

    ``resource_overrides`` replace resources by key (the demo points ``cfi_api`` at its
    embedded fake API)."""
    defs = dg.Definitions(
        assets=[*source_assets, *view_assets, *fallback_assets, *export_assets],
        asset_checks=[*view_checks, *schema_checks],
        jobs=[
            refresh_views_job,
            check_views_job,
            fallback_snapshots_job,
            campaign_export_job,
            campaign_export_batch_job,
        ],
        schedules=build_view_schedules(),
        sensors=[
            build_view_change_sensor(),
            build_view_lag_sensor(),
            build_campaigns_sensor(),
            build_retention_sensor(),
            *build_alert_sensors(),
        ],
        resources={**build_resources(), **resource_overrides},
    )
    # No sensor has owners, but binding the resources to a sensor's op job
    # (campaign_export_batch) makes Dagster copy the sensor with owners=[], which it then
    # reports as "Parameter `owners` … is currently in beta" on every command. Resolve the
    # repository here, once (cached on ``defs``; ~15 ms, no I/O), with that one warning off.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", _OWNERS_WARNING, dg.BetaWarning)
        defs.get_repository_def()
    return defs


defs = build_defs()
