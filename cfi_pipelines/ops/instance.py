"""The project's Dagster instance, used by the CLI (demo, refresh, export, dev).

``DAGSTER_HOME`` when set; else ``CFI_HOME/dagster``, created with the local
``dagster.yaml`` (the same text as the repository's ``dagster.yaml``; a test keeps
them equal). Dagster's own CLI lands there with ``export DAGSTER_HOME=$PWD/.cfi/dagster``.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from cfi_pipelines.settings import ConfigError, get_settings, set_dagster_home

LOCAL_DAGSTER_YAML = """\
# Local instance (dagster dev / the demo). Production: deploy/dagster.yaml.
telemetry:
  enabled: false
nux:
  enabled: false
concurrency:
  pools:
    # one refresh of a given view at a time: every view asset (and its fallback
    # snapshot) runs in the pool "cfi_view_<view>".
    default_limit: 1
run_retries:
  enabled: true
  max_retries: 0
"""
"""The local instance's dagster.yaml: the repository's ``dagster.yaml``, word for word (tested)."""


def ensure_dagster_home() -> Path:
    """The instance directory, created (with its dagster.yaml) when it is the default one,
    and exported as ``DAGSTER_HOME`` for this process and its children. A ``DAGSTER_HOME``
    that is not a directory is a :class:`ConfigError` (one line naming it), not Dagster's
    traceback."""
    s = get_settings()
    home = s.dagster_home
    if s.dagster_home_env is not None and not home.is_dir():
        raise ConfigError(
            f"DAGSTER_HOME={s.dagster_home_env} is not a directory (Dagster needs an existing "
            f"one): create it (mkdir -p {home}), or unset DAGSTER_HOME to use the project's "
            f"instance in CFI_HOME ({s.home / 'dagster'})"
        )
    if s.dagster_home_env is None:
        home.mkdir(parents=True, exist_ok=True)
        config = home / "dagster.yaml"
        if not config.exists():
            config.write_text(LOCAL_DAGSTER_YAML)
        set_dagster_home(home)
    return home


def local_instance() -> dg.DagsterInstance:
    """The persistent instance the UI reads (runs launched from the CLI show there)."""
    ensure_dagster_home()
    return dg.DagsterInstance.get()
