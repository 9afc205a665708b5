"""Alert channels: Slack, a generic webhook and e-mail. Plain code, no Dagster.

Each channel takes the :class:`~cfi_pipelines.settings.AlertSettings` and one
:class:`Alert`, and raises when the message did not get through. Channels (all
optional, environment variables in brackets):

- Slack ``chat.postMessage`` through ``slack_sdk`` (what ``dagster-slack`` hands
  out), ``CFI_ALERT_SLACK_TOKEN`` + ``CFI_ALERT_SLACK_CHANNEL``; the API base URL
  ``CFI_ALERT_SLACK_API_URL`` can point at a proxy or a test receiver.
- A webhook: JSON POST to ``CFI_ALERT_WEBHOOK_URL``.
- E-mail over SMTP: ``CFI_ALERT_SMTP_HOST`` / ``_PORT`` / ``_USER`` / ``_PASSWORD``
  / ``_FROM`` / ``_TO`` (comma-separated) / ``_STARTTLS``.
"""

from __future__ import annotations

import smtplib
from dataclasses import asdict, dataclass, field
from email.message import EmailMessage
from typing import Any

import httpx

from cfi_pipelines.clock import utcnow
from cfi_pipelines.settings import AlertSettings

SEVERITY_ICON = {"error": ":rotating_light:", "warning": ":warning:", "info": ":white_check_mark:"}


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


CHANNELS = {"slack": _slack, "webhook": _webhook, "email": _email}
