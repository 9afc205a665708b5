"""The fallback half loads with the views, and honours CFI_AUTOMATION."""

import dagster as dg

from cfi_pipelines.assets.views import build_view_defs
from cfi_pipelines.definitions import build_resources
from cfi_pipelines.fallback_defs import build_fallback_defs


def merged() -> dg.Definitions:
    return dg.Definitions.merge(
        build_view_defs(), build_fallback_defs(), dg.Definitions(resources=build_resources())
    )


def test_loads_with_the_views_and_core_resources():
    defs = merged()
    dg.Definitions.validate_loadable(defs)
    assert defs.resolve_job_def("fallback_snapshots")
    assert {s.name for s in defs.sensors} == {
        "view_lag_sensor",
        "view_health_alerts",
        "alert_on_run_failure",
        "recover_run_failure_alerts",
    }
    assert {"cfi_api", "alerts", "cfi_source", "cfi_common"} <= set(defs.resources)
    keys = {k.to_user_string() for k in defs.resolve_all_asset_keys()}
    assert {f"cfi_fallback/{v}" for v in ("stocks", "operations", "invoices", "campaigns")} <= keys


def test_sensors_follow_cfi_automation(monkeypatch):
    monkeypatch.setenv("CFI_AUTOMATION", "off")
    assert {s.default_status for s in build_fallback_defs().sensors} == {
        dg.DefaultSensorStatus.STOPPED
    }
    monkeypatch.setenv("CFI_AUTOMATION", "on")
    assert {s.default_status for s in build_fallback_defs().sensors} == {
        dg.DefaultSensorStatus.RUNNING
    }


def test_secrets_are_env_vars(monkeypatch):
    monkeypatch.setenv("CFI_API_URL", "https://api.cfi.example")
    monkeypatch.setenv("CFI_API_TOKEN", "s3cret")
    monkeypatch.setenv("CFI_ALERT_SMTP_PASSWORD", "pw")
    res = build_fallback_defs().resources
    assert (
        isinstance(res["cfi_api"].token, dg.EnvVar)
        and res["cfi_api"].token.env_var_name == "CFI_API_TOKEN"
    )
    assert isinstance(res["alerts"].smtp_password, dg.EnvVar)
