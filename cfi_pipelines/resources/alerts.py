"""The alerting resource: configuration in, an :class:`~cfi_pipelines.alerts.Alerter` out.

Secrets (Slack token, SMTP password, webhook URL) go in as ``dagster.EnvVar``
(:func:`build_alerts_resource`) so they never show in the UI or the logs.
"""

import os
from typing import Any

import dagster as dg

from cfi_pipelines.alerts import SLACK_API_URL, Alerter, AlertSettings, split_addresses
from cfi_pipelines.settings import env_or_default


class AlertsResource(dg.ConfigurableResource):
    """Slack, webhook and e-mail alerts; every channel optional (none: log only)."""

    slack_token: str = ""
    slack_channel: str = ""
    slack_api_url: str = SLACK_API_URL
    webhook_url: str = ""
    smtp_host: str = ""
    smtp_port: int = 25
    smtp_user: str = ""
    smtp_password: str = ""
    smtp_from: str = "cfi-pipelines@localhost"
    smtp_to: str = ""  # comma-separated
    smtp_starttls: bool = False
    state_path: str = ""  # default CFI_HOME/alerts/state.json
    webserver_url: str = ""  # default DAGSTER_WEBSERVER_URL

    def settings(self) -> AlertSettings:
        return AlertSettings(
            slack_token=self.slack_token,
            slack_channel=self.slack_channel,
            slack_api_url=self.slack_api_url or SLACK_API_URL,
            webhook_url=self.webhook_url,
            smtp_host=self.smtp_host,
            smtp_port=self.smtp_port,
            smtp_user=self.smtp_user,
            smtp_password=self.smtp_password,
            smtp_from=self.smtp_from,
            smtp_to=split_addresses(self.smtp_to),
            smtp_starttls=self.smtp_starttls,
            state_path=self.state_path,
            webserver_url=self.webserver_url,
        )

    def alerter(self, logger: Any = None) -> Alerter:
        """An alerter writing its log lines to ``logger`` (e.g. ``context.log``)."""
        return Alerter(self.settings(), logger)


def build_alerts_resource() -> AlertsResource:
    """The resource from ``CFI_ALERT_*`` (EnvVar for whatever is set)."""
    e = env_or_default
    return AlertsResource(
        slack_token=e("CFI_ALERT_SLACK_TOKEN", ""),
        slack_channel=e("CFI_ALERT_SLACK_CHANNEL", ""),
        slack_api_url=e("CFI_ALERT_SLACK_API_URL", SLACK_API_URL),
        webhook_url=e("CFI_ALERT_WEBHOOK_URL", ""),
        smtp_host=e("CFI_ALERT_SMTP_HOST", ""),
        smtp_port=dg.EnvVar.int("CFI_ALERT_SMTP_PORT") if _set("CFI_ALERT_SMTP_PORT") else 25,
        smtp_user=e("CFI_ALERT_SMTP_USER", ""),
        smtp_password=e("CFI_ALERT_SMTP_PASSWORD", ""),
        smtp_from=e("CFI_ALERT_SMTP_FROM", "cfi-pipelines@localhost"),
        smtp_to=e("CFI_ALERT_SMTP_TO", ""),
        smtp_starttls=_truthy("CFI_ALERT_SMTP_STARTTLS"),
    )


def _set(name: str) -> bool:
    return bool(os.environ.get(name, "").strip())


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "yes", "true", "on"}
