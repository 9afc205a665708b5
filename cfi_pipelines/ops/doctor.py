"""``cfi-pipelines doctor``: is this deployment configured and reachable?

One line per component (the three databases, the SFTP drop, CFI's API, each alert
channel): OK, or what is wrong and which variable to fix. A configuration error
of one component (e.g. an unparsable ``CFI_SOURCE_URL``) is that component's line:
the others are still checked. Nothing is sent to an alert channel unless asked
(``--send-test-alert``); the SFTP probe file is written the way deliveries write
(``.part`` then posix-rename) and removed. ``--selftest`` runs every statement
kind of the refresh on scratch tables of the common DB
(:mod:`cfi_pipelines.views.selftest`).
"""

from __future__ import annotations

import json
import secrets
import smtplib
import socket
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

import click
import httpx
import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.sql import visitors

from cfi_pipelines import settings as cfg
from cfi_pipelines.db import create_engine, redact
from cfi_pipelines.model import cfi_common as common
from cfi_pipelines.model import cfi_source as src
from cfi_pipelines.model import mycfia
from cfi_pipelines.settings import Settings

OK, WARN, FAIL = "OK", "WARN", "FAIL"
TIMEOUT_S = 5
"""Connect timeout of every probe (databases, SFTP, HTTP, SMTP)."""
READONLY_ROLE = "mycfia_readonly"
READONLY_TABLES = (
    "cfi_stocks", "cfi_operations", "cfi_invoices", "cfi_campaigns",
    "cfi_tenant_closure", "cfi_view_status", "cfi_refresh_log",
)  # fmt: skip
"""The tables deploy/sql/postgresql_readonly.sql grants SELECT on."""

DATABASES = (  # component, variable, Settings attribute, default file, what it must hold
    ("cfi_source", "CFI_SOURCE_URL", "source_url", "cfi_source.db"),
    ("common", "CFI_COMMON_URL", "common_url", "cfi_common.db"),
    ("mycfia", "MYCFIA_URL", "mycfia_url", "mycfia.db"),
)
_VAR_COMPONENT = {
    "CFI_SOURCE_URL": "cfi_source",
    "CFI_COMMON_URL": "common",
    "MYCFIA_URL": "mycfia",
    "CFI_SFTP_PORT": "sftp",
    "CFI_SFTP_WRITE_SIZE": "sftp",
    "CFI_ENV": "sftp",
    "CFI_ALERT_SMTP_PORT": "alert:email",
}


@dataclass(frozen=True)
class Check:
    component: str
    status: str  # OK / WARN / FAIL
    detail: str
    variable: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- settings


def load_settings() -> tuple[Settings, dict[str, str]]:
    """The settings, and the configuration errors by variable.

    :func:`~cfi_pipelines.settings.get_settings` stops at the first unusable
    variable; :func:`~cfi_pipelines.settings.read_settings` reads each one on its
    own, so that one bad value fails its component only.
    """
    return cfg.read_settings()


# --------------------------------------------------------------------------- databases


def source_tables() -> list[str]:
    """The CFI source tables the views read (their queries' FROMs, and the tenants)."""
    from cfi_pipelines.views.spec import VIEWS

    names = {src.tenants.name}  # the tenant closure
    for spec in VIEWS:
        for incremental in (False, True):
            for el in visitors.iterate(spec.query(incremental=incremental)):
                if isinstance(el, sa.Table) and el.metadata is src.metadata:
                    names.add(el.name)
    return sorted(names)


REQUIRED_TABLES: dict[str, Callable[[], list[str]]] = {
    "cfi_source": source_tables,
    "common": lambda: sorted(common.metadata.tables),
    "mycfia": lambda: sorted(t for t in mycfia.metadata.tables if t != "campaign_exports"),
}
_MISSING_HINT = {
    "cfi_source": "is this CFI's production DB? (locally: `cfi-pipelines seed`)",
    "common": "the first refresh creates them (`cfi-pipelines refresh`; locally `cfi-pipelines seed`)",
    "mycfia": "is this MyCfia's DB? (locally: `cfi-pipelines seed`)",
}


def probe_engine(url: str) -> Engine:
    """An engine for a one-off probe: short connect timeouts, no file created."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite" and parsed.database and parsed.database != ":memory:":
        path = parsed.database.removeprefix("file:").split("?")[0]
        if not Path(path).is_file():
            raise FileNotFoundError(f"the SQLite file {path} does not exist")
    if backend == "postgresql" and "connect_timeout" not in parsed.query:
        url = parsed.update_query_dict({"connect_timeout": str(TIMEOUT_S)}).render_as_string(
            hide_password=False
        )
    if backend == "mssql":
        return sa.create_engine(parsed, connect_args={"timeout": TIMEOUT_S})  # login timeout
    return create_engine(url)


def _readonly_problems(conn: sa.Connection) -> list[str]:
    if not conn.scalar(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": READONLY_ROLE}):
        return [f"the read-only role {READONLY_ROLE} does not exist"]
    problems = []
    for table in READONLY_TABLES:
        priv = sa.text("SELECT has_table_privilege(:r, :t, :p)")
        if not conn.scalar(priv, {"r": READONLY_ROLE, "t": table, "p": "SELECT"}):
            problems.append(f"{READONLY_ROLE} lacks SELECT on {table}")
        if conn.scalar(priv, {"r": READONLY_ROLE, "t": table, "p": "INSERT"}):
            problems.append(f"{READONLY_ROLE} can INSERT into {table}")
    return problems


def _schema_drift(conn: sa.Connection) -> str:
    """Every column the views read that CFI's DB lacks, named (catalog reads only); ""."""
    from cfi_pipelines.views.schema import compare, describe

    differences = compare(conn)
    if not differences:
        return ""
    return (
        f"{describe(differences)}: those views cannot be refreshed (the lag sensor serves "
        "them from the CFI API); restore the columns in CFI's DB, or adapt the views' queries "
        "(cfi_pipelines/views/spec.py)"
    )


def _in_place(component: str, have: set[str]) -> str:
    """What the OK line counts. CFI's source: its tables present, how many the views read,
    how many they follow for changes (the ``cfi_source/*`` assets): 15, 14 and 12 today."""
    if component != "cfi_source":
        return f"{len(REQUIRED_TABLES[component]())} tables in place"
    from cfi_pipelines.views.probe import source_tables as followed_tables

    present = sum(name in have for name in src.metadata.tables)
    return (
        f"{present} of CFI's tables in place; the views read {len(source_tables())} of them "
        f"and follow {len(followed_tables())} for changes (the cfi_source assets)"
    )


def check_database(component: str, variable: str, url: str) -> list[Check]:
    where = redact(url)
    try:
        engine = probe_engine(url)
    except FileNotFoundError as exc:
        return [
            Check(
                component,
                FAIL,
                f"{exc}: set {variable}, or run `cfi-pipelines seed` for the embedded defaults",
                variable,
            )
        ]
    except Exception as exc:  # a missing driver, a bad option
        return [Check(component, FAIL, f"{where}: {_short(exc)}", variable)]
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
            have = set(sa.inspect(conn).get_table_names())
            missing = [t for t in REQUIRED_TABLES[component]() if t not in have]
            if missing:
                return [
                    Check(
                        component,
                        FAIL,
                        f"{where} is reachable but lacks the tables "
                        f"{', '.join(missing)}: {_MISSING_HINT[component]}, or point {variable} "
                        "at the right database",
                        variable,
                    )
                ]
            if component == "cfi_source" and (drift := _schema_drift(conn)):
                return [
                    Check(
                        component,
                        FAIL,
                        f"{where} is reachable but {drift}; or point {variable} at the right DB",
                        variable,
                    )
                ]
            out = [Check(component, OK, f"{where}: reachable, {_in_place(component, have)}")]
            if component == "common" and conn.dialect.name == "postgresql":
                problems = _readonly_problems(conn)
                out.append(
                    Check(
                        "common:readonly",
                        FAIL,
                        "; ".join(problems) + ": run `psql 'postgresql://SUPERUSER@HOST/DB' "
                        "-v ON_ERROR_STOP=1 -f deploy/sql/postgresql_readonly.sql` as a superuser "
                        f"on the common DB ({where})",
                        "CFI_COMMON_URL",
                    )
                    if problems
                    else Check(
                        "common:readonly",
                        OK,
                        f"{READONLY_ROLE} has SELECT and no INSERT on the read model",
                    )
                )
            if component == "cfi_source" and conn.dialect.name == "mssql":
                out.append(check_change_tracking(conn, where))
            if component == "cfi_source":
                out.append(check_capture(engine))
            if component == "common":
                out.extend(check_tenancy(conn))
            conn.rollback()
            return out
    except Exception as exc:
        return [
            Check(
                component,
                FAIL,
                f"{where} is unreachable: {_short(exc)}: check {variable} "
                "(host, port, database, credentials)",
                variable,
            )
        ]
    finally:
        engine.dispose()


def check_capture(engine: Engine) -> Check:
    """``source:capture``: how the change sensor finds CFI's changes here, and why (the
    mode :func:`cfi_pipelines.views.capture.choose_capture` picks; catalog queries only).
    WARN when it is not exact: what the DBA would enable is in the line."""
    from cfi_pipelines.views.capture import choose_capture

    try:
        capture = choose_capture(engine)
    except Exception as exc:  # the line must come out whatever the engine says
        return Check("source:capture", WARN, f"could not choose a capture mode: {_short(exc)}")
    try:
        detail = f"{capture.mode}: {capture.why}; guarantees {capture.guarantee}"
        if capture.exact:
            return Check("source:capture", OK, detail)
        if engine.dialect.name == "sqlite":  # the embedded default: nothing to enable
            return Check("source:capture", OK, detail)
        return Check("source:capture", WARN, detail, "CFI_SOURCE_URL")
    finally:
        capture.close()


def check_change_tracking(conn: sa.Connection, where: str) -> Check:
    """SQL Server source: Change Tracking on the database and on each followed table,
    snapshot isolation allowed, VIEW CHANGE TRACKING granted (catalog functions, O(1)).
    WARN, not FAIL: without it the capture falls back to ``updated_at``."""
    from cfi_pipelines.views.capture.mssql import DBA_SCRIPT, change_tracking_problems
    from cfi_pipelines.views.probe import source_tables as followed

    tables = followed()
    problems = change_tracking_problems(conn, tables)
    if problems:
        return Check(
            "cfi_source:change_tracking",
            WARN,
            "; ".join(problems) + f" on {where}: changes are found by updated_at only (deletes "
            f"and silent updates wait for the nightly full refresh); have CFI's DBA run "
            f"{DBA_SCRIPT} (sqlcmd -v READER=<the account of CFI_SOURCE_URL>)",
            "CFI_SOURCE_URL",
        )
    return Check(
        "cfi_source:change_tracking",
        OK,
        f"Change Tracking on, {len(tables)} followed tables tracked, VIEW CHANGE TRACKING "
        "granted, snapshot isolation allowed",
    )


def check_tenancy(conn: sa.Connection) -> list[Check]:
    """Tenant isolation on the common DB: policies in place and forced, no reading
    account that bypasses them, which binding is in use (cfi_pipelines.tenancy)."""
    from cfi_pipelines.tenancy.policies import inspect

    return [
        Check("common:tenancy", status, detail, None if status == OK else "CFI_COMMON_URL")
        for status, detail in inspect(conn)
    ]


def _short(exc: BaseException) -> str:
    from cfi_pipelines.views.selftest import describe_error

    return describe_error(exc)


# --------------------------------------------------------------------------- SFTP


def check_sftp(s: Settings) -> Check:
    from cfi_pipelines.exports.delivery import makedirs, upload_atomic
    from cfi_pipelines.exports.sftp_client import (
        AuthError,
        EmbeddedServerDown,
        HostKeyError,
        KeyLoadError,
        SFTPPermanentError,
    )
    from cfi_pipelines.resources.sftp import sftp_resource

    if not s.local and not s.sftp_host:
        return Check(
            "sftp",
            FAIL,
            "CFI_ENV=production but CFI_SFTP_HOST is not set: set it "
            "(with CFI_SFTP_USER, CFI_SFTP_KEY, CFI_SFTP_KNOWN_HOSTS)",
            "CFI_SFTP_HOST",
        )
    res = sftp_resource(s).process_config_and_initialize()  # EnvVars resolved
    res = res.model_copy(update={"connect_timeout": TIMEOUT_S, "io_timeout": 2 * TIMEOUT_S})
    try:
        conn = res.open()
    except EmbeddedServerDown as exc:
        return Check("sftp", FAIL, str(exc), "CFI_SFTP_HOST")
    except HostKeyError as exc:
        return Check("sftp", FAIL, f"{exc} (fix CFI_SFTP_KNOWN_HOSTS)", "CFI_SFTP_KNOWN_HOSTS")
    except KeyLoadError as exc:  # says which file, why and what to set
        return Check("sftp", FAIL, str(exc), "CFI_SFTP_KEY")
    except AuthError as exc:  # the server refused the key for that user
        return Check("sftp", FAIL, f"{exc} (fix CFI_SFTP_KEY or CFI_SFTP_USER)", "CFI_SFTP_KEY")
    except SFTPPermanentError as exc:
        return Check("sftp", FAIL, str(exc), "CFI_SFTP_KEY")
    except Exception as exc:  # refused, timed out, not SSH
        return Check(
            "sftp",
            FAIL,
            f"cannot connect to {res.target}: {_short(exc)}: check CFI_SFTP_HOST and CFI_SFTP_PORT",
            "CFI_SFTP_HOST",
        )
    remote_dir = res.remote_dir or "/"
    probe = f"{remote_dir.rstrip('/')}/.cfi-doctor-{secrets.token_hex(4)}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "probe"
            local.write_bytes(b"cfi-pipelines doctor probe\n")
            try:
                makedirs(conn.sftp, remote_dir)
                upload_atomic(conn.sftp, local, probe, local.stat().st_size, conn.write_size)
                conn.sftp.remove(probe)
            except Exception as exc:
                for leftover in (probe + ".part", probe):
                    try:
                        conn.sftp.remove(leftover)
                    except Exception:  # noqa: S112 - best effort, the first error is reported
                        continue
                return Check(
                    "sftp",
                    FAIL,
                    f"{res.target}: host key and key accepted, but the "
                    f"remote dir {remote_dir} is not writable ({_short(exc)}): fix "
                    "CFI_SFTP_DIR or the account's rights there",
                    "CFI_SFTP_DIR",
                )
    finally:
        conn.close()
    return Check(
        "sftp",
        OK,
        f"{res.target}: host key verified, key accepted, {remote_dir} "
        "writable (.part + posix-rename probe written and removed)",
    )


# --------------------------------------------------------------------------- CFI API


def check_api(s: Settings) -> Check:
    from cfi_pipelines.fallback.api_client import CfiApiAuthError, CfiApiError
    from cfi_pipelines.resources.cfi_api import cfi_api_resource

    res = cfi_api_resource(s).process_config_and_initialize()
    if not res.configured:
        return Check(
            "cfi_api",
            WARN,
            "CFI_API_URL is not set: the fallback to CFI's HTTP API "
            "is unavailable (set CFI_API_URL and CFI_API_TOKEN)",
            "CFI_API_URL",
        )
    res = res.model_copy(update={
        "page_size": 1, "max_retries": 0, "connect_timeout_s": TIMEOUT_S,
        "read_timeout_s": 2 * TIMEOUT_S, "response_deadline_s": 3 * TIMEOUT_S,
    })  # fmt: skip
    try:
        with res.client() as client:
            client.get_page("stocks")
    except CfiApiAuthError as exc:
        return Check("cfi_api", FAIL, f"{res.base_url}: {exc}", "CFI_API_TOKEN")
    except CfiApiError as exc:
        return Check("cfi_api", FAIL, f"{res.base_url}: {exc} (check CFI_API_URL)", "CFI_API_URL")
    except Exception as exc:
        return Check(
            "cfi_api", FAIL, f"{res.base_url}: {_short(exc)} (check CFI_API_URL)", "CFI_API_URL"
        )
    return Check("cfi_api", OK, f"{res.base_url}: token accepted (GET /api/v1/views/stocks)")


# --------------------------------------------------------------------------- alerts


def _check_slack(a: cfg.AlertSettings) -> Check:
    base = a.slack_api_url if a.slack_api_url.endswith("/") else a.slack_api_url + "/"
    try:
        resp = httpx.post(
            base + "auth.test",
            headers={"Authorization": f"Bearer {a.slack_token}"},
            timeout=TIMEOUT_S,
        )
        body = (
            resp.json()
            if resp.headers.get("content-type", "").startswith("application/json")
            else {}
        )
    except Exception as exc:
        return Check(
            "alert:slack", FAIL, f"{base} unreachable: {_short(exc)}", "CFI_ALERT_SLACK_API_URL"
        )
    if resp.status_code >= 400 or not body.get("ok"):
        why = body.get("error") or f"HTTP {resp.status_code}"
        return Check(
            "alert:slack", FAIL, f"Slack refused the token ({why})", "CFI_ALERT_SLACK_TOKEN"
        )
    return Check(
        "alert:slack", OK, f"{base}: token accepted (auth.test), channel {a.slack_channel}"
    )


def _check_webhook(a: cfg.AlertSettings) -> Check:
    parts = urlsplit(a.webhook_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return Check(
            "alert:webhook",
            FAIL,
            f"{a.webhook_url!r} is not an http(s) URL",
            "CFI_ALERT_WEBHOOK_URL",
        )
    port = parts.port or (443 if parts.scheme == "https" else 80)
    where = f"{parts.scheme}://{parts.hostname}:{port}"
    try:
        with socket.create_connection((parts.hostname, port), timeout=TIMEOUT_S):
            pass
    except OSError as exc:
        return Check(
            "alert:webhook",
            FAIL,
            f"{where} does not accept connections ({exc}): check CFI_ALERT_WEBHOOK_URL",
            "CFI_ALERT_WEBHOOK_URL",
        )
    return Check("alert:webhook", OK, f"{where} accepts connections (nothing sent)")


def _check_email(a: cfg.AlertSettings) -> Check:
    where = f"{a.smtp_host}:{a.smtp_port}"
    try:
        with smtplib.SMTP(a.smtp_host, a.smtp_port, timeout=TIMEOUT_S) as smtp:
            smtp.ehlo()
            if a.smtp_starttls:
                smtp.starttls()
                smtp.ehlo()
            if a.smtp_user:
                try:
                    smtp.login(a.smtp_user, a.smtp_password)
                except smtplib.SMTPException as exc:
                    return Check(
                        "alert:email",
                        FAIL,
                        f"{where} refused the login of {a.smtp_user!r}: {exc}",
                        "CFI_ALERT_SMTP_PASSWORD",
                    )
    except (OSError, smtplib.SMTPException) as exc:
        return Check(
            "alert:email",
            FAIL,
            f"{where}: {_short(exc)}: check CFI_ALERT_SMTP_HOST, _PORT and _STARTTLS",
            "CFI_ALERT_SMTP_HOST",
        )
    login = f", logged in as {a.smtp_user}" if a.smtp_user else ""
    return Check("alert:email", OK, f"{where}: EHLO accepted{login}, to {', '.join(a.smtp_to)}")


_ALERT_CHECKS = {"slack": _check_slack, "webhook": _check_webhook, "email": _check_email}


def check_alerts(a: cfg.AlertSettings, *, send_test: bool = False) -> list[Check]:
    out: list[Check] = []
    if a.slack_token and not a.slack_channel:
        out.append(
            Check(
                "alert:slack",
                WARN,
                "CFI_ALERT_SLACK_TOKEN is set but not "
                "CFI_ALERT_SLACK_CHANNEL: Slack alerts are off",
                "CFI_ALERT_SLACK_CHANNEL",
            )
        )
    if a.smtp_host and not a.smtp_to:
        out.append(
            Check(
                "alert:email",
                WARN,
                "CFI_ALERT_SMTP_HOST is set but not CFI_ALERT_SMTP_TO: e-mail alerts are off",
                "CFI_ALERT_SMTP_TO",
            )
        )
    if not a.channels:
        out.append(
            Check(
                "alerts",
                WARN,
                "no alert channel configured: alerts are only logged "
                "(set CFI_ALERT_WEBHOOK_URL, CFI_ALERT_SLACK_TOKEN + _CHANNEL or "
                "CFI_ALERT_SMTP_HOST + _TO)",
                "CFI_ALERT_WEBHOOK_URL",
            )
        )
        return out
    for name in a.channels:
        out.append(_ALERT_CHECKS[name](a))
    if send_test:
        from cfi_pipelines.alerting.alerter import Alerter
        from cfi_pipelines.alerting.channels import Alert

        alert = Alert(
            key="doctor_test_alert",
            title="cfi-pipelines doctor: test alert",
            text="A test alert sent by `cfi-pipelines doctor --send-test-alert`: "
            "this channel works. Nothing to do.",
            severity="info",
        )
        delivered = Alerter(a).send(alert)
        for name in a.channels:
            var = {"slack": "CFI_ALERT_SLACK_TOKEN", "webhook": "CFI_ALERT_WEBHOOK_URL",
                   "email": "CFI_ALERT_SMTP_HOST"}[name]  # fmt: skip
            out.append(
                Check(f"alert:{name}", OK, "test alert sent")
                if name in delivered
                else Check(
                    f"alert:{name}",
                    FAIL,
                    "the test alert was not delivered (the error is in the log above)",
                    var,
                )
            )
    return out


# --------------------------------------------------------------------------- all


def check_selftest(common_url: str) -> list[Check]:
    from cfi_pipelines.views.selftest import run_selftest

    try:
        engine = probe_engine(common_url)
    except Exception as exc:
        return [Check("selftest", FAIL, f"not run: {_short(exc)}", "CFI_COMMON_URL")]
    try:
        return [
            Check(
                f"selftest:{r.step}",
                OK if r.ok else FAIL,
                r.detail,
                None if r.ok else "CFI_COMMON_URL",
            )
            for r in run_selftest(engine)
        ]
    finally:
        engine.dispose()


def run_checks(*, selftest: bool = False, send_test_alert: bool = False) -> list[Check]:
    """Every check, in a fixed order; never raises."""
    s, errors = load_settings()
    checks: list[Check] = []
    failed_components = {_VAR_COMPONENT.get(v, "settings"): v for v in errors}
    for component, var, attr, _ in DATABASES:
        if var in errors:
            checks.append(Check(component, FAIL, errors[var], var))
        else:
            checks.extend(check_database(component, var, getattr(s, attr)))
    guarded: list[tuple[str, Callable[[], list[Check]]]] = [
        ("sftp", lambda: [check_sftp(s)]),
        ("cfi_api", lambda: [check_api(s)]),
        ("alert:email", lambda: check_alerts(s.alerts, send_test=send_test_alert)),
    ]
    for component, run in guarded:
        if component in failed_components:
            var = failed_components[component]
            checks.append(Check(component, FAIL, errors[var], var))
            continue
        try:
            checks.extend(run())
        except Exception as exc:  # a check's own bug must not hide the others
            checks.append(Check(component, FAIL, f"the check itself failed: {_short(exc)}"))
    if "settings" in failed_components:
        var = failed_components["settings"]
        checks.append(Check("settings", FAIL, errors[var], var))
    if selftest:
        if "CFI_COMMON_URL" in errors:
            checks.append(
                Check("selftest", FAIL, "not run: CFI_COMMON_URL is unusable", "CFI_COMMON_URL")
            )
        else:
            checks.extend(check_selftest(s.common_url))
    return checks


def format_check(c: Check) -> str:
    fix = f"  [fix: {c.variable}]" if c.variable and c.status != OK else ""
    return f"{c.status:<4} {c.component:<22} {c.detail}{fix}"


def report(*, as_json: bool, selftest: bool, send_test_alert: bool) -> int:
    """Print the checks; 0 when none failed (WARN is not a failure), else 1."""
    checks = run_checks(selftest=selftest, send_test_alert=send_test_alert)
    if as_json:
        click.echo(json.dumps([c.as_dict() for c in checks], indent=2))
    else:
        for c in checks:
            click.echo(format_check(c))
    return 1 if any(c.status == FAIL for c in checks) else 0
