"""Configuration from the environment, read in one place, with embedded defaults.

This is the only module that reads ``os.environ``: every other one asks
:func:`get_settings`. Secrets (URLs with passwords, keys, tokens) are *not*
copied into Dagster config: :func:`env_or_default` hands resources a
``dagster.EnvVar`` when the variable is set, so the value never shows in the UI
or in logs.

**Local or production** is one explicit switch, :attr:`Settings.environment`:
``CFI_ENV=local|production``, by default ``production`` as soon as
``CFI_SFTP_HOST`` names CFI's server and ``local`` otherwise. Locally the
exports go to the embedded development SFTP server (``cfi-pipelines dev``,
``demo`` or ``sftp-server`` start it); in production every ``CFI_SFTP_*``
setting it needs must be given.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Literal

import dagster as dg
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

FRESH_WINDOW = timedelta(minutes=5)
"""A view younger than this is healthy."""
INCIDENT_WINDOW = timedelta(minutes=15)
"""A view older than this is an incident: the lag sensor acts, the check is ERROR."""

DEV_SFTP_PORT = 2222
"""Port of the embedded development SFTP server on 127.0.0.1."""
DEV_SFTP_USER = "cfi"
SLACK_API_URL = "https://slack.com/api/"

Environment = Literal["local", "production"]


class ConfigError(ValueError):
    """A configuration variable is missing or wrong; the message names it and says what to do."""


@dataclass(frozen=True)
class AlertSettings:
    """Where alerts go (``CFI_ALERT_*``). Every channel is optional."""

    slack_token: str = ""
    slack_channel: str = ""
    slack_api_url: str = SLACK_API_URL
    webhook_url: str = ""
    smtp_host: str = ""
    smtp_port: int = 25
    smtp_user: str = ""
    smtp_password: str = ""
    smtp_from: str = "cfi-pipelines@localhost"
    smtp_to: tuple[str, ...] = ()
    smtp_starttls: bool = False
    state_path: str = ""  # default CFI_HOME/alerts/state.json
    webserver_url: str = ""  # default DAGSTER_WEBSERVER_URL
    timeout_s: float = 10.0

    @property
    def channels(self) -> list[str]:
        out = []
        if self.slack_token and self.slack_channel:
            out.append("slack")
        if self.webhook_url:
            out.append("webhook")
        if self.smtp_host and self.smtp_to:
            out.append("email")
        return out


@dataclass(frozen=True)
class Settings:
    home: Path
    environment: Environment
    source_url: str
    common_url: str
    mycfia_url: str
    sftp_host: str | None
    sftp_port: int
    sftp_user: str | None
    sftp_key: str | None
    sftp_known_hosts: str | None
    sftp_dir: str
    sftp_write_size: int
    export_retry_delay: float
    api_url: str | None
    api_token: str | None
    automation: bool
    webserver_url: str
    dagster_home_env: str | None
    alerts: AlertSettings = field(default_factory=AlertSettings)
    partition_retention_days: int = 30
    partition_max: int = 20_000
    capture_slot: str = "cfi_pipelines"
    """PostgreSQL logical decoding: the slot and publication names (``CFI_CAPTURE_SLOT``)."""

    @property
    def local(self) -> bool:
        """True on the embedded defaults (dev SFTP server), False in production."""
        return self.environment == "local"

    @property
    def snapshots_dir(self) -> Path:
        return self.home / "snapshots"

    @property
    def outbox_dir(self) -> Path:
        return self.home / "outbox"

    @property
    def dagster_home(self) -> Path:
        """``DAGSTER_HOME`` when set, else ``CFI_HOME/dagster`` (the project's instance)."""
        return Path(self.dagster_home_env) if self.dagster_home_env else self.home / "dagster"

    @property
    def dev_sftp_dir(self) -> Path:
        """State of the embedded development SFTP server (keys, known_hosts, root)."""
        return self.home / "sftp"

    @property
    def dev_sftp_port(self) -> int:
        """``CFI_SFTP_PORT`` when set to something else than 22, else 2222."""
        return DEV_SFTP_PORT if self.sftp_port == 22 else self.sftp_port


def _sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def _env(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def is_set(name: str) -> bool:
    """Whether the environment variable ``name`` has a non-blank value."""
    return _env(name) is not None


def _db_url(name: str, default: str) -> str:
    """The SQLAlchemy URL in ``name`` (checked to parse: no connection is made), else ``default``."""
    raw = _env(name)
    if raw is None:
        return default
    try:
        make_url(raw)
    except ArgumentError:
        raise ConfigError(
            f"{name} is not a SQLAlchemy URL (it does not parse as dialect+driver://…): set it "
            "to e.g. postgresql+psycopg://user:password@host:5432/db, "
            "mssql+pyodbc://user:password@host/db?driver=ODBC+Driver+18+for+SQL+Server or "
            "sqlite:////path/file.db, or unset it for the embedded SQLite default"
        ) from None
    return raw


def _number(name: str, default: float, kind: type = int) -> float:
    raw = _env(name)
    if raw is None:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(
            f"{name}={raw!r} is not {'a whole number' if kind is int else 'a number'}: "
            f"set it to e.g. {default!r}, or unset it for the default"
        ) from None
    if value < 0:
        raise ConfigError(f"{name}={raw!r} is negative: set it to 0 or more")
    return value


def _truthy(name: str, default: bool = False) -> bool:
    raw = (_env(name) or "").lower()
    return default if not raw else raw in {"1", "yes", "true", "on"}


def split_addresses(text: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in text.split(",") if a.strip())


def _alert_settings() -> AlertSettings:
    def env(name: str, default: str = "") -> str:
        return _env(f"CFI_ALERT_{name}") or default

    return AlertSettings(
        slack_token=env("SLACK_TOKEN"),
        slack_channel=env("SLACK_CHANNEL"),
        slack_api_url=env("SLACK_API_URL", SLACK_API_URL),
        webhook_url=env("WEBHOOK_URL"),
        smtp_host=env("SMTP_HOST"),
        smtp_port=int(_number("CFI_ALERT_SMTP_PORT", 25)),
        smtp_user=env("SMTP_USER"),
        smtp_password=env("SMTP_PASSWORD"),
        smtp_from=env("SMTP_FROM", "cfi-pipelines@localhost"),
        smtp_to=split_addresses(env("SMTP_TO")),
        smtp_starttls=_truthy("CFI_ALERT_SMTP_STARTTLS"),
    )


def _environment() -> Environment:
    raw = (_env("CFI_ENV") or "").lower()
    if raw in ("local", "production"):
        return raw  # type: ignore[return-value]
    if raw:
        raise ConfigError(f"CFI_ENV={raw!r}: use 'local' or 'production' (or unset it)")
    return "production" if _env("CFI_SFTP_HOST") else "local"


def _capture_slot() -> str:
    name = _env("CFI_CAPTURE_SLOT") or "cfi_pipelines"
    if not re.fullmatch(r"[a-z0-9_]{1,63}", name):
        raise ConfigError(
            f"CFI_CAPTURE_SLOT={name!r}: a replication slot name is 1-63 lower-case letters, "
            "digits or underscores"
        )
    return name


def read_settings() -> tuple[Settings, dict[str, str]]:
    """Every setting that can be read, and the unusable ones by variable.

    An unusable value is replaced by its default and reported (``{variable: message}``),
    so that ``cfi-pipelines doctor`` can check every other component; everything
    else calls :func:`get_settings`, which refuses to go on.
    """
    errors: dict[str, str] = {}

    def read(name: str, fn, fallback):
        try:
            return fn()
        except ConfigError as exc:
            errors.setdefault(name, str(exc))
            return fallback

    home = Path(_env("CFI_HOME") or "./.cfi").expanduser().resolve()

    def url(name: str, file: str) -> str:
        default = _sqlite_url(home / file)
        return absolute_sqlite_url(read(name, lambda: _db_url(name, default), default))

    settings = Settings(
        home=home,
        environment=read("CFI_ENV", _environment, "local"),
        source_url=url("CFI_SOURCE_URL", "cfi_source.db"),
        common_url=url("CFI_COMMON_URL", "cfi_common.db"),
        mycfia_url=url("MYCFIA_URL", "mycfia.db"),
        sftp_host=_env("CFI_SFTP_HOST"),
        sftp_port=int(read("CFI_SFTP_PORT", lambda: _number("CFI_SFTP_PORT", 22), 22)),
        sftp_user=_env("CFI_SFTP_USER"),
        sftp_key=_key_setting(_env("CFI_SFTP_KEY")),
        sftp_known_hosts=_path_setting(_env("CFI_SFTP_KNOWN_HOSTS")),
        sftp_dir=_env("CFI_SFTP_DIR") or "/",
        sftp_write_size=int(
            read("CFI_SFTP_WRITE_SIZE", lambda: _number("CFI_SFTP_WRITE_SIZE", 0), 0)
        ),
        export_retry_delay=float(
            read(
                "CFI_EXPORT_RETRY_DELAY",
                lambda: _number("CFI_EXPORT_RETRY_DELAY", 5.0, float),
                5.0,
            )
        ),
        api_url=_env("CFI_API_URL"),
        api_token=_env("CFI_API_TOKEN"),
        automation=(_env("CFI_AUTOMATION") or "on").lower() not in {"off", "0", "false", "no"},
        webserver_url=(_env("DAGSTER_WEBSERVER_URL") or "http://127.0.0.1:3000").rstrip("/"),
        dagster_home_env=_path_setting(_env("DAGSTER_HOME")),
        alerts=read("CFI_ALERT_SMTP_PORT", _alert_settings, AlertSettings()),
        partition_retention_days=int(
            read(
                "CFI_PARTITION_RETENTION_DAYS",
                lambda: _number("CFI_PARTITION_RETENTION_DAYS", 30),
                30,
            )
        ),
        partition_max=int(
            read("CFI_PARTITION_MAX", lambda: _number("CFI_PARTITION_MAX", 20_000), 20_000)
        ),
        capture_slot=read("CFI_CAPTURE_SLOT", _capture_slot, "cfi_pipelines"),
    )
    return settings, errors


def get_settings() -> Settings:
    """Read the environment now (cheap; call it where the value is needed).

    Raises :class:`ConfigError` naming the variable when a value is unusable.
    """
    settings, errors = read_settings()
    if errors:
        raise ConfigError(next(iter(errors.values())))
    return settings


def env_or_default(name: str, default: str) -> str | dg.EnvVar:
    """``EnvVar(name)`` when the variable is set (kept out of the UI), else ``default``."""
    return dg.EnvVar(name) if _env(name) else default


def absolute_sqlite_url(url: str) -> str:
    """``url`` with a relative SQLite file made absolute (against this process's directory).

    Other URLs, in-memory SQLite and URLs that do not parse are returned as they are.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        return url
    db = parsed.database
    if parsed.get_backend_name() != "sqlite" or db in (None, "", ":memory:"):
        return url
    if db.startswith("file:"):  # a SQLite URI: passed on as written
        return url
    path = Path(db).expanduser()
    if path.is_absolute() and path == Path(db):
        return url
    return parsed.set(database=str(path.resolve())).render_as_string(hide_password=False)


def _absolute_path(value: str) -> str:
    return str(Path(value).expanduser().resolve())


def _path_setting(value: str | None) -> str | None:
    return _absolute_path(value) if value is not None else None


def _key_setting(value: str | None) -> str | None:
    """``CFI_SFTP_KEY``: the key text as it is, a file name made absolute."""
    return value if value is None or value.startswith("-----BEGIN") else _absolute_path(value)


def absolute_environment() -> dict[str, str]:
    """Every path and URL of the configuration, absolute, as environment variables.

    ``CFI_HOME`` (default ``./.cfi``), relative SQLite URLs, ``CFI_SFTP_KEY`` when it is a
    file name (not the key text), ``CFI_SFTP_KNOWN_HOSTS`` and ``DAGSTER_HOME`` are resolved
    against *this* process's directory: a child started elsewhere (``dagster dev`` runs in
    the instance's directory) then opens the same files, not empty ones of its own.
    """
    env = {"CFI_HOME": str(read_settings()[0].home)}
    for name in ("CFI_SOURCE_URL", "CFI_COMMON_URL", "MYCFIA_URL"):
        if (raw := _env(name)) is not None:
            env[name] = absolute_sqlite_url(raw)
    key = _env("CFI_SFTP_KEY")
    if key is not None and not key.startswith("-----BEGIN"):
        env["CFI_SFTP_KEY"] = _absolute_path(key)
    for name in ("CFI_SFTP_KNOWN_HOSTS", "DAGSTER_HOME"):
        if (raw := _env(name)) is not None:
            env[name] = _absolute_path(raw)
    return env


def child_environment(**overrides: str) -> dict[str, str]:
    """The environment for a child process (``dagster dev``, ``initdb``…), with ``overrides``.

    The one place children get their environment: paths and URLs are made absolute
    (:func:`absolute_environment`) so that the child's own working directory does not matter.
    """
    return {**os.environ, **absolute_environment(), **overrides}


def set_dagster_home(path: Path) -> None:
    """Point this process's Dagster at ``path`` (``DagsterInstance.get()`` reads it)."""
    os.environ["DAGSTER_HOME"] = str(path)


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


def tenant_secret() -> str | None:
    """``CFI_TENANT_SECRET``: the secret the tenant roles' passwords derive from
    (``cfi_pipelines.tenancy.binding.derive_password``); MyCfia holds the same value.
    Unset: the refresh creates the roles without a password (certificate or peer
    authentication only) and ``cfi-pipelines query`` cannot log in on PostgreSQL."""
    return _env("CFI_TENANT_SECRET")
