"""The files under ``deploy/``: they parse, the production ``dagster.yaml`` passes
Dagster's own instance-config validation, and names agree across files and code
(ports, module, tags, env vars, and every series the alerts and the dashboard use
is one the exporter really serves)."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster._config import process_config
from dagster._core.errors import DagsterInvalidConfigError
from dagster._core.instance.config import dagster_instance_config
from dagster._core.run_coordinator.queued_run_coordinator import QueuedRunCoordinator

from cfi_pipelines.assets.views import view_pool
from cfi_pipelines.clock import utcnow
from cfi_pipelines.db import create_engine
from cfi_pipelines.devtools.postgres import free_port
from cfi_pipelines.ops.metrics import DEFAULT_PORT, MetricsConfig, start_metrics_server
from cfi_pipelines.sensors.lag import TAG_VIEW
from cfi_pipelines.views.refresh import refresh_view
from cfi_pipelines.views.spec import VIEWS
from tests.fixtures.common import Databases
from tests.ops.test_metrics import add_exports, log_extra_attempts, scrape

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CONTRACT_ENV = [
    "CFI_HOME",
    "CFI_SOURCE_URL",
    "CFI_COMMON_URL",
    "MYCFIA_URL",
    "CFI_SFTP_HOST",
    "CFI_SFTP_PORT",
    "CFI_SFTP_USER",
    "CFI_SFTP_KEY",
    "CFI_SFTP_KNOWN_HOSTS",
    "CFI_SFTP_DIR",
    "CFI_API_URL",
    "CFI_API_TOKEN",
    "CFI_AUTOMATION",
    "DAGSTER_WEBSERVER_URL",
]
PG_ENV = [
    "DAGSTER_PG_HOST",
    "DAGSTER_PG_PORT",
    "DAGSTER_PG_USER",
    "DAGSTER_PG_PASSWORD",
    "DAGSTER_PG_DB",
]


def load(rel: str) -> Any:
    return yaml.safe_load((DEPLOY / rel).read_text())


def test_every_yaml_and_json_file_parses() -> None:
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))
    assert len(files) >= 9
    for path in files:
        text = path.read_text()
        docs = (
            [json.loads(text)]
            if path.suffix == ".json"
            else [d for d in yaml.safe_load_all(text) if d is not None]
        )
        assert docs and all(isinstance(d, dict) for d in docs), path


# --------------------------------------------------------------------------- dagster.yaml


def _validate(tmp_path: Path, config: dict) -> dict:
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(config))
    value, _ = dagster_instance_config(str(tmp_path))
    return dict(value)


def test_the_production_dagster_yaml_passes_dagsters_validation(tmp_path: Path) -> None:
    config = load("dagster.yaml")
    value = _validate(tmp_path, config)
    pg = value["storage"]["postgres"]["postgres_db"]
    assert {pg[k]["env"] for k in ("hostname", "port", "username", "password", "db_name")} == set(
        PG_ENV
    )
    assert pg["scheme"] == "postgresql+psycopg2"
    assert value["telemetry"] == {"enabled": False}
    assert value["run_monitoring"]["enabled"] is True
    assert value["retention"]["schedule"]["purge_after_days"] == 90
    # the run coordinator's own config is checked by its class
    rc = value["run_coordinator"]
    assert rc["class"] == "QueuedRunCoordinator"
    assert process_config(QueuedRunCoordinator.config_type(), rc["config"]).success


def test_the_validation_would_catch_a_broken_file(tmp_path: Path) -> None:
    config = load("dagster.yaml")
    # run limits in two places: Dagster refuses it, so must our test
    config["run_coordinator"]["config"]["max_concurrent_runs"] = 5
    with pytest.raises(DagsterInvalidConfigError, match="incompatible"):
        _validate(tmp_path, config)
    config = load("dagster.yaml")
    config["storage"]["postgres"]["postgres_db"]["hostnme"] = "typo"
    with pytest.raises(DagsterInvalidConfigError):
        _validate(tmp_path, config)


def test_limits_name_the_pools_and_tags_the_code_uses() -> None:
    config = load("dagster.yaml")
    assert config["concurrency"]["pools"]["default_limit"] == 1
    assert all(view_pool(v.name) == f"cfi_view_{v.name}" for v in VIEWS)
    tag_keys = {t["key"] for t in config["concurrency"]["runs"]["tag_concurrency_limits"]}
    assert tag_keys == {TAG_VIEW, "cfi/campaign_id"}
    source = "".join(p.read_text() for p in (ROOT / "cfi_pipelines").rglob("*.py"))
    assert source.count('"cfi/campaign_id"') >= 2  # the sensor's runs and the CLI's
    helm = load("helm/values.yaml")
    assert helm["concurrency"]["runs"]["tagConcurrencyLimits"] == [
        {"key": t["key"], **({"value": t["value"]} if "value" in t else {}), "limit": t["limit"]}
        for t in config["concurrency"]["runs"]["tag_concurrency_limits"]
    ]
    assert helm["concurrency"]["pools"]["defaultLimit"] == 1


# --------------------------------------------------------------------------- images and services


def test_image_compose_workspace_and_helm_agree() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    module = pyproject["tool"]["dagster"]["module_name"]
    location = pyproject["tool"]["dagster"]["code_location_name"]
    dagster_minor = re.search(r"dagster==1\.(\d+)", " ".join(pyproject["project"]["dependencies"]))
    assert dagster_minor

    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"'dagster-postgres==0.{int(dagster_minor.group(1)) + 16}.*'" in dockerfile
    assert f'"-m", "{module}"' in dockerfile and '"-p", "4000"' in dockerfile
    assert "COPY deploy/dagster.yaml" in dockerfile

    workspace = load("workspace.yaml")["load_from"][0]["grpc_server"]
    assert workspace == {"host": "code", "port": 4000, "location_name": location}

    compose = load("compose.yaml")
    services = compose["services"]
    assert {"postgres", "code", "webserver", "daemon", "metrics"} <= set(services)
    for name in ("code", "webserver", "daemon", "metrics"):
        assert set(PG_ENV) <= set(services[name]["environment"]), name
    for name in ("code", "metrics"):
        assert set(CONTRACT_ENV) <= set(services[name]["environment"]), name
    assert services["code"]["build"]["dockerfile"] == "deploy/Dockerfile"
    assert str(DEFAULT_PORT) in " ".join(services["metrics"]["command"])

    helm = load("helm/values.yaml")
    deployment = helm["dagster-user-deployments"]["deployments"][0]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", module]
    assert helm["runLauncher"]["type"] == "K8sRunLauncher"
    assert helm["postgresql"]["postgresqlScheme"] == "postgresql+psycopg2"
    assert helm["telemetry"]["enabled"] is False

    prometheus = load("prometheus/prometheus.yml")
    assert prometheus["rule_files"] == ["alerts.yml"]
    assert prometheus["scrape_configs"][0]["static_configs"][0]["targets"] == [
        f"metrics:{DEFAULT_PORT}"
    ]


# --------------------------------------------------------------------------- alerts and dashboard


SLOT_SERIES = {"cfi_capture_slot_retained_wal_bytes", "cfi_capture_slot_lost"}


def _alert_rules() -> dict[str, dict]:
    return {r["alert"]: r for g in load("prometheus/alerts.yml")["groups"] for r in g["rules"]}


def _dashboard_exprs() -> list[str]:
    dash = json.loads((DEPLOY / "grafana" / "cfi-pipelines.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_the_missions_alerts_are_there() -> None:
    rules = _alert_rules()
    assert rules["CfiCacheDown"]["expr"] == 'cfi_up{db="common"} == 0'
    assert rules["CfiSftpExportFailed"]["expr"] == 'cfi_exports{status="failed"} > 0'
    assert rules["CfiCacheReadLatencyHigh"]["expr"].endswith("> 0.5")
    assert rules["CfiViewLagging"]["expr"] == "cfi_view_lag_seconds > 900"
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"page", "warning"}, name
        assert rule["annotations"]["summary"], name


def test_alerts_and_dashboard_use_only_series_the_exporter_serves(
    sqlite_dbs: Databases, cfi_home: Path
) -> None:
    for spec in VIEWS:
        refresh_view(spec, sqlite_dbs.source, sqlite_dbs.common)
    log_extra_attempts(sqlite_dbs.common, utcnow())
    mycfia_url = f"sqlite:///{cfi_home}/mycfia.db"
    engine = create_engine(mycfia_url)
    add_exports(engine, utcnow())
    engine.dispose()
    config = MetricsConfig(
        common_url=sqlite_dbs.common_url,
        mycfia_url=mycfia_url,
        source_url=sqlite_dbs.source_url,
        sftp_host="127.0.0.1",
        sftp_port=free_port(),  # nothing listens: cfi_sftp_up is 0, but served
    )
    with start_metrics_server(port=0, config=config) as server:
        _, samples = scrape(server.url)
    served = {name for name, _ in samples}
    exprs = [r["expr"] for r in _alert_rules().values()] + _dashboard_exprs()
    unquoted = [re.sub(r'"[^"]*"', '""', e) for e in exprs]  # label values are not series
    used = {m for e in unquoted for m in re.findall(r"\bcfi_[a-z_]+\b", e)}
    assert used, exprs
    # served only by a PostgreSQL source with a logical replication slot (tests/ops/test_metrics_capture.py)
    assert used - served <= SLOT_SERIES, sorted(used - served - SLOT_SERIES)
    assert samples[("cfi_sftp_up", frozenset())] == 0


def test_the_deploy_readme_lists_every_served_series() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for metric in (
        "cfi_up",
        "cfi_view_lag_seconds",
        "cfi_view_rows",
        "cfi_refreshes_total",
        "cfi_refresh_duration_seconds",
        "cfi_exports",
        "cfi_export_latency_seconds",
        "cfi_sftp_delivered_bytes_total",
        "cfi_cache_read_latency_seconds",
        "cfi_cache_read_probe_seconds",
    ):
        assert f"`{metric}" in readme, metric
    for alert in _alert_rules():
        assert alert in readme, alert
