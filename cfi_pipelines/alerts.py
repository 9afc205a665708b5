"""Alerts: Slack, a generic webhook and e-mail, one episode at a time. Plain code, no Dagster.

An alert belongs to an *episode* named by a key (``view_stale:stocks``,
``export_failed:42:r3``…). :meth:`Alerter.open` sends it once per episode;
:meth:`Alerter.resolve` sends "recovered" and closes it. Open episodes are kept
in a small JSON file under ``CFI_HOME/alerts/`` (not in the common DB: it may be
the very thing that is down), guarded by a file lock so sensors and runs in
other processes agree. Nothing configured → the alert is logged, never raised.

Channels (all optional, environment variables in brackets):

- Slack ``chat.postMessage`` through ``slack_sdk`` (what ``dagster-slack`` hands
  out), ``CFI_ALERT_SLACK_TOKEN`` + ``CFI_ALERT_SLACK_CHANNEL``; the API base URL
  ``CFI_ALERT_SLACK_API_URL`` can point at a proxy or a test receiver.
- A webhook: JSON POST to ``CFI_ALERT_WEBHOOK_URL``.
- E-mail over SMTP: ``CFI_ALERT_SMTP_HOST`` / ``_PORT`` / ``_USER`` / ``_PASSWORD``
  / ``_FROM`` / ``_TO`` (comma-separated) / ``_STARTTLS``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import smtplib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx

from cfi_pipelines.refresh import utcnow
from cfi_pipelines.settings import get_settings

log = logging.getLogger(__name__)

SLACK_API_URL = "https://slack.com/api/"
SEVERITY_ICON = {"error": ":rotating_light:", "warning": ":warning:", "info": ":white_check_mark:"}


@dataclass(frozen=True)
class AlertSettings:
    """Where alerts go. Every channel is optional."""

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

    @classmethod
    def from_env(cls) -> AlertSettings:
        """The settings from ``CFI_ALERT_*`` (for code outside Dagster resources)."""

        def env(name: str, default: str = "") -> str:
            return os.environ.get(f"CFI_ALERT_{name}", "").strip() or default

        return cls(
            slack_token=env("SLACK_TOKEN"),
            slack_channel=env("SLACK_CHANNEL"),
            slack_api_url=env("SLACK_API_URL", SLACK_API_URL),
            webhook_url=env("WEBHOOK_URL"),
            smtp_host=env("SMTP_HOST"),
            smtp_port=int(env("SMTP_PORT", "25")),
            smtp_user=env("SMTP_USER"),
            smtp_password=env("SMTP_PASSWORD"),
            smtp_from=env("SMTP_FROM", "cfi-pipelines@localhost"),
            smtp_to=split_addresses(env("SMTP_TO")),
            smtp_starttls=env("SMTP_STARTTLS", "no").lower() in {"1", "yes", "true", "on"},
        )

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


def split_addresses(text: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in text.split(",") if a.strip())


@dataclass(frozen=True)
class Alert:
    """One message: what is wrong (title), the error and what to do (text)."""

    key: str  # the episode
    title: str
    text: str
    severity: str = "error"  # error / warning / info
    link: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    event: str = "alert"  # alert / recovered


# --------------------------------------------------------------------------- state


class AlertState:
    """Open episodes ``{key: {"title", "opened_at"}}`` in a JSON file, under a file lock."""

    def __init__(self, path: Path):
        self.path = path

    @contextlib.contextmanager
    def locked(self) -> Iterator[dict[str, dict]]:
        """The state, locked for read-modify-write; written back atomically on exit."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                try:
                    state = json.loads(self.path.read_text() or "{}")
                except FileNotFoundError:
                    state = {}
                except ValueError:  # a corrupt file must not silence alerting
                    log.warning("alert state %s is corrupt; starting afresh", self.path)
                    state = {}
                before = json.dumps(state, sort_keys=True)
                yield state
                if json.dumps(state, sort_keys=True) != before:
                    tmp = self.path.with_suffix(".tmp")
                    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
                    os.replace(tmp, self.path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def open_keys(self, prefix: str = "") -> list[str]:
        with self.locked() as state:
            return sorted(k for k in state if k.startswith(prefix))


# --------------------------------------------------------------------------- channels


def slack_text(alert: Alert) -> str:
    text = f"{SEVERITY_ICON.get(alert.severity, '')} *{alert.title}*\n{alert.text}"
    if alert.link:
        text += f"\n<{alert.link}|Open in Dagster>"
    return text


def _slack_base(s: AlertSettings) -> str:
    return s.slack_api_url if s.slack_api_url.endswith("/") else s.slack_api_url + "/"


def slack_via_http(s: AlertSettings, alert: Alert) -> None:
    """``chat.postMessage`` over plain httpx (when slack_sdk is not installed)."""
    resp = httpx.post(
        _slack_base(s) + "chat.postMessage",
        headers={"Authorization": f"Bearer {s.slack_token}"},
        json={"channel": s.slack_channel, "text": slack_text(alert)},
        timeout=s.timeout_s,
    )
    resp.raise_for_status()
    if not resp.json().get("ok"):
        raise RuntimeError(f"Slack refused the message: {resp.json().get('error')}")


def _slack(s: AlertSettings, alert: Alert) -> None:
    try:
        from slack_sdk import WebClient  # the client dagster-slack's SlackResource hands out
    except ImportError:
        WebClient = None  # noqa: N806
    if WebClient is None:
        slack_via_http(s, alert)
        return
    client = WebClient(token=s.slack_token, base_url=_slack_base(s), timeout=int(s.timeout_s))
    client.chat_postMessage(channel=s.slack_channel, text=slack_text(alert))


def _webhook(s: AlertSettings, alert: Alert) -> None:
    payload = {**asdict(alert), "source": "cfi-pipelines", "at": utcnow().isoformat() + "Z"}
    httpx.post(s.webhook_url, json=payload, timeout=s.timeout_s).raise_for_status()


def _email(s: AlertSettings, alert: Alert) -> None:
    msg = EmailMessage()
    msg["Subject"] = f"[cfi-pipelines] {alert.title}"
    msg["From"] = s.smtp_from
    msg["To"] = ", ".join(s.smtp_to)
    body = alert.text
    if alert.link:
        body += f"\n\nOpen in Dagster: {alert.link}"
    if alert.fields:
        body += "\n\n" + "\n".join(f"{k}: {v}" for k, v in alert.fields.items())
    msg.set_content(body)
    with smtplib.SMTP(s.smtp_host, s.smtp_port, timeout=s.timeout_s) as smtp:
        if s.smtp_starttls:
            smtp.starttls()
        if s.smtp_user:
            smtp.login(s.smtp_user, s.smtp_password)
        smtp.send_message(msg)


_CHANNELS = {"slack": _slack, "webhook": _webhook, "email": _email}


# --------------------------------------------------------------------------- alerter


class Alerter:
    """Sends alerts to the configured channels, once per episode."""

    def __init__(self, settings: AlertSettings | None = None, logger: Any = None):
        self.settings = settings or AlertSettings.from_env()
        self.log = logger or log
        path = self.settings.state_path or str(get_settings().home / "alerts" / "state.json")
        self.state = AlertState(Path(path))

    @property
    def webserver_url(self) -> str:
        return (self.settings.webserver_url or get_settings().webserver_url).rstrip("/")

    def run_link(self, run_id: str) -> str:
        """The run's page in the Dagster UI."""
        return f"{self.webserver_url}/runs/{run_id}"

    def send(self, alert: Alert) -> list[str]:
        """Deliver now (no de-duplication); returns the channels that took it. Never raises."""
        level = logging.INFO if alert.event == "recovered" else logging.WARNING
        self.log.log(level, f"ALERT [{alert.key}] {alert.title}: {alert.text}")
        delivered = []
        for name in self.settings.channels:
            try:
                _CHANNELS[name](self.settings, alert)
                delivered.append(name)
            except Exception as exc:  # one broken channel must not stop the others
                self.log.error(
                    f"alert {alert.key}: {name} delivery failed: {type(exc).__name__}: {exc}"
                )
        return delivered

    def _delivered(self, alert: Alert) -> bool:
        channels = self.settings.channels
        return not channels or bool(self.send(alert))

    def open(self, alert: Alert) -> bool:
        """Alert once for ``alert.key``'s episode; True when sent now (False: already open).

        When every configured channel fails the episode stays closed, so the next
        call tries again.
        """
        with self.state.locked() as state:
            if alert.key in state:
                return False
            if not self.settings.channels:
                self.send(alert)  # log only
            elif not self.send(alert):
                return False
            state[alert.key] = {"title": alert.title, "opened_at": utcnow().isoformat()}
            return True

    def resolve(self, key: str, text: str = "", *, link: str | None = None) -> bool:
        """Close ``key``'s episode with a "recovered" message; False when none was open."""
        with self.state.locked() as state:
            episode = state.get(key)
            if episode is None:
                return False
            opened = datetime.fromisoformat(episode["opened_at"])
            minutes = (utcnow() - opened).total_seconds() / 60
            self.send(
                Alert(
                    key=key,
                    title=f"Recovered: {episode['title']}",
                    text=(text + " " if text else "") + f"(episode lasted {minutes:.0f} min)",
                    severity="info",
                    link=link,
                    event="recovered",
                )
            )
            del state[key]
            return True

    def is_open(self, key: str) -> bool:
        with self.state.locked() as state:
            return key in state


# --------------------------------------------------------------------------- what we alert on


def view_stale_alert(view: str, age_s: float | None, source: str | None, link: str | None) -> Alert:
    age = "never refreshed" if age_s is None else f"{age_s / 60:.0f} min old"
    return Alert(
        key=f"view_stale:{view}",
        title=f"View {view} is stale ({age})",
        text=(
            f"The freshness check of cfi_common/{view} is at ERROR (> 15 min; last source: "
            f"{source or 'none'}). The lag sensor requests a refresh, or a fallback snapshot "
            f"from the CFI API if CFI's DB is unreachable. Check the runs of cfi_common/{view} "
            f"and `cfi-pipelines status`; refresh by hand with `cfi-pipelines refresh {view}`."
        ),
        link=link,
        fields={"view": view, "age_s": age_s, "source": source},
    )


def view_on_api_alert(view: str, snapshot_at: datetime | None, link: str | None) -> Alert:
    return Alert(
        key=f"view_fallback:{view}",
        title=f"View {view} is served from CFI API data",
        text=(
            f"cfi_common/{view} was filled from a fallback snapshot of CFI's HTTP API (as of "
            f"{snapshot_at.isoformat() + 'Z' if snapshot_at else 'unknown'}) because CFI's source DB "
            "could not be read. Check CFI_SOURCE_URL and the source DB; the next successful "
            "refresh from the DB ends this episode."
        ),
        severity="warning",
        link=link,
        fields={"view": view},
    )


def common_db_down_alert(error: str, link: str | None = None) -> Alert:
    return Alert(
        key="common_db_down",
        title="The common DB (MyCfia's read cache) is unreachable",
        text=(
            f"{error}. MyCfia falls back to CFI's HTTP API; fallback snapshots are written to "
            "CFI_HOME/snapshots (Parquet only). Check CFI_COMMON_URL and the database server."
        ),
        link=link,
    )


def run_failed_alert(job: str, run_id: str, error: str, link: str, scope: str = "") -> Alert:
    return Alert(
        key=f"run_failed:{job}" + (f":{scope}" if scope else ""),
        title=f"Run of {job}{f' ({scope})' if scope else ''} failed",
        text=f"{error[:1500]}\nOpen the run, fix the cause, then re-execute it from the UI.",
        link=link,
        fields={"job": job, "run_id": run_id},
    )


# --------------------------------------------------------------------------- for the exports


def export_failed_key(campaign_id: int, revision: int) -> str:
    return f"export_failed:{campaign_id}:r{revision}"


def campaign_rejected_key(campaign_id: int, revision: int) -> str:
    return f"campaign_rejected:{campaign_id}:r{revision}"


def alert_export_failed(
    campaign_id: int,
    revision: int,
    error: str,
    *,
    tenant: str | None = None,
    attempts: int | None = None,
    run_id: str | None = None,
    alerter: Alerter | None = None,
) -> bool:
    """Alert (once) that a campaign export failed after its retries. True when sent now."""
    alerter = alerter or Alerter()
    tries = f" after {attempts} attempts" if attempts else ""
    return alerter.open(
        Alert(
            key=export_failed_key(campaign_id, revision),
            title=f"Export of campaign {campaign_id} r{revision} failed{tries}",
            text=(
                f"{error}\nThe files did not reach CFI's SFTP drop"
                f"{f' (tenant {tenant})' if tenant else ''}. Fix the cause (SFTP host, key, "
                f"disk), then re-export: `cfi-pipelines export {campaign_id} --force` or "
                f"re-materialize partition {campaign_id} of the export asset in the UI."
            ),
            link=alerter.run_link(run_id) if run_id else None,
            fields={"campaign_id": campaign_id, "revision": revision, "tenant": tenant},
        )
    )


def alert_campaign_rejected(
    campaign_id: int,
    revision: int,
    reasons: str | list[str],
    *,
    tenant: str | None = None,
    run_id: str | None = None,
    alerter: Alerter | None = None,
) -> bool:
    """Alert (once) that a validated campaign was rejected (e.g. fails the JSON Schema)."""
    alerter = alerter or Alerter()
    if isinstance(reasons, list):
        reasons = "\n".join(f"- {r}" for r in reasons)
    return alerter.open(
        Alert(
            key=campaign_rejected_key(campaign_id, revision),
            title=f"Campaign {campaign_id} r{revision} was rejected",
            text=(
                f"{reasons}\nNothing was sent to CFI. Correct the campaign in MyCfia (a new "
                "revision is exported automatically) or fix the export and re-export by hand."
            ),
            severity="warning",
            link=alerter.run_link(run_id) if run_id else None,
            fields={"campaign_id": campaign_id, "revision": revision, "tenant": tenant},
        )
    )


def resolve_export(campaign_id: int, revision: int, *, alerter: Alerter | None = None) -> bool:
    """Send "recovered" for a campaign whose export/rejection episode was open (after delivery)."""
    alerter = alerter or Alerter()
    text = f"Campaign {campaign_id} r{revision} was delivered to CFI."
    a = alerter.resolve(export_failed_key(campaign_id, revision), text)
    b = alerter.resolve(campaign_rejected_key(campaign_id, revision), text)
    return a or b
