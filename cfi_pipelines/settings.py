"""Configuration from the environment, read in one place, with embedded defaults.

Every other module asks :func:`get_settings` instead of reading ``os.environ``.
Secrets (URLs with passwords, keys, tokens) are *not* copied into Dagster config:
:func:`env_or_default` hands resources a ``dagster.EnvVar`` when the variable is
set, so the value never shows in the UI or in logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import dagster as dg

FRESH_WINDOW = timedelta(minutes=5)
"""A view younger than this is healthy."""
INCIDENT_WINDOW = timedelta(minutes=15)
"""A view older than this is an incident: the lag sensor acts, the check is ERROR."""


@dataclass(frozen=True)
class Settings:
    home: Path
    source_url: str
    common_url: str
    mycfia_url: str
    sftp_host: str | None
    sftp_port: int
    sftp_user: str | None
    sftp_key: str | None
    sftp_known_hosts: str | None
    sftp_dir: str
    api_url: str | None
    api_token: str | None
    automation: bool
    webserver_url: str

    @property
    def snapshots_dir(self) -> Path:
        return self.home / "snapshots"

    @property
    def outbox_dir(self) -> Path:
        return self.home / "outbox"

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"

    @property
    def dev_sftp_dir(self) -> Path:
        """State of the embedded development SFTP server (keys, known_hosts, root)."""
        return self.home / "sftp"


def _sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def _env(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def get_settings() -> Settings:
    """Read the environment now (cheap; call it where the value is needed)."""
    home = Path(_env("CFI_HOME") or "./.cfi").expanduser().resolve()
    return Settings(
        home=home,
        source_url=_env("CFI_SOURCE_URL") or _sqlite_url(home / "cfi_source.db"),
        common_url=_env("CFI_COMMON_URL") or _sqlite_url(home / "cfi_common.db"),
        mycfia_url=_env("MYCFIA_URL") or _sqlite_url(home / "mycfia.db"),
        sftp_host=_env("CFI_SFTP_HOST"),
        sftp_port=int(_env("CFI_SFTP_PORT") or 22),
        sftp_user=_env("CFI_SFTP_USER"),
        sftp_key=_env("CFI_SFTP_KEY"),
        sftp_known_hosts=_env("CFI_SFTP_KNOWN_HOSTS"),
        sftp_dir=_env("CFI_SFTP_DIR") or "/",
        api_url=_env("CFI_API_URL"),
        api_token=_env("CFI_API_TOKEN"),
        automation=(_env("CFI_AUTOMATION") or "on").lower() not in {"off", "0", "false", "no"},
        webserver_url=(_env("DAGSTER_WEBSERVER_URL") or "http://127.0.0.1:3000").rstrip("/"),
    )


def env_or_default(name: str, default: str) -> str | dg.EnvVar:
    """``EnvVar(name)`` when the variable is set (kept out of the UI), else ``default``."""
    return dg.EnvVar(name) if _env(name) else default


def default_schedule_status() -> dg.DefaultScheduleStatus:
    """RUNNING unless ``CFI_AUTOMATION=off``."""
    return (
        dg.DefaultScheduleStatus.RUNNING
        if get_settings().automation
        else dg.DefaultScheduleStatus.STOPPED
    )


def default_sensor_status() -> dg.DefaultSensorStatus:
    """RUNNING unless ``CFI_AUTOMATION=off``."""
    return (
        dg.DefaultSensorStatus.RUNNING
        if get_settings().automation
        else dg.DefaultSensorStatus.STOPPED
    )
