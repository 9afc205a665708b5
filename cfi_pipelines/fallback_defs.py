"""Definitions of the resilience half: fallback snapshots, the lag sensor, alerts.

Merged into the code location by :mod:`cfi_pipelines.definitions`. Needs the
``cfi_source`` and ``cfi_common`` resources from there; brings ``cfi_api`` and
``alerts``.
"""

import dagster as dg

from cfi_pipelines.assets.fallback import build_fallback_assets, fallback_snapshots_job
from cfi_pipelines.resources.alerts import build_alerts_resource
from cfi_pipelines.resources.cfi_api import build_cfi_api_resource
from cfi_pipelines.sensors.alerts import build_alert_sensors
from cfi_pipelines.sensors.lag import build_view_lag_sensor


def build_fallback_defs() -> dg.Definitions:
    """Fallback assets and job, the lag and alert sensors, resources "cfi_api" and "alerts"."""
    return dg.Definitions(
        assets=build_fallback_assets(),
        jobs=[fallback_snapshots_job],
        sensors=[build_view_lag_sensor(), *build_alert_sensors()],
        resources={"cfi_api": build_cfi_api_resource(), "alerts": build_alerts_resource()},
    )
