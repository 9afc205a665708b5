"""The local Dagster instance used by the CLI (demo, refresh, export, dev)."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from cfi_pipelines.settings import get_settings

LOCAL_DAGSTER_YAML = """\
# Written by cfi-pipelines for the local instance (DAGSTER_HOME = CFI_HOME/dagster).
telemetry:
  enabled: false
nux:
  enabled: false
concurrency:
  pools:
    # one refresh of a given view at a time (pool "cfi_view_<view>")
    default_limit: 1
"""


def ensure_dagster_home() -> Path:
    """``DAGSTER_HOME`` if set; else ``CFI_HOME/dagster``, created with a local dagster.yaml."""
    if home := os.environ.get("DAGSTER_HOME"):
        return Path(home)
    home = get_settings().dagster_home
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text(LOCAL_DAGSTER_YAML)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def local_instance() -> dg.DagsterInstance:
    """The persistent instance the UI reads (runs launched from the CLI show there)."""
    ensure_dagster_home()
    return dg.DagsterInstance.get()
