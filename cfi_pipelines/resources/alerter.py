"""The alerting resource: hands out an :class:`~cfi_pipelines.alerting.alerter.Alerter`.

Where alerts go is :class:`~cfi_pipelines.settings.AlertSettings`, read from
``CFI_ALERT_*`` by :mod:`cfi_pipelines.settings`. The resource carries only what a
caller may override per deployment or per test; the secrets (Slack token,
webhook URL, SMTP password) go in as ``dagster.EnvVar`` (:func:`alerts_resource`),
so they never show in the UI or the logs.
"""

from dataclasses import replace
from typing import Any

import dagster as dg

from cfi_pipelines.alerting.alerter import Alerter
from cfi_pipelines.settings import AlertSettings, Settings, env_or_default, get_settings


class AlertsResource(dg.ConfigurableResource):
    """Slack, webhook and e-mail alerts; every channel optional (none: log only).

    Empty fields fall back to the environment's :class:`AlertSettings`."""

    slack_token: str = ""
    slack_channel: str = ""
    webhook_url: str = ""
    smtp_host: str = ""
    smtp_password: str = ""
    smtp_to: str = ""  # comma-separated
    state_path: str = ""  # default CFI_HOME/alerts/state.json
    webserver_url: str = ""  # default DAGSTER_WEBSERVER_URL
    use_environment: bool = True  # False: only what is set here (tests, dry runs)

    def settings(self) -> AlertSettings:
        base = get_settings().alerts if self.use_environment else AlertSettings()
        given = {
            k: v
            for k, v in {
                "slack_token": self.slack_token,
                "slack_channel": self.slack_channel,
                "webhook_url": self.webhook_url,
                "smtp_host": self.smtp_host,
                "smtp_password": self.smtp_password,
                "state_path": self.state_path,
                "webserver_url": self.webserver_url,
            }.items()
            if v
        }
        if self.smtp_to:
            given["smtp_to"] = tuple(a.strip() for a in self.smtp_to.split(",") if a.strip())
        return replace(base, **given)

    def alerter(self, logger: Any = None) -> Alerter:
        """An alerter writing its log lines to ``logger`` (e.g. ``context.log``)."""
        return Alerter(self.settings(), logger)


def alerts_resource(settings: Settings) -> AlertsResource:
    """The resource; its secrets as ``EnvVar`` when set (the rest comes from ``settings``)."""
    del settings  # the non-secret channel settings are read by AlertsResource.settings()
    return AlertsResource(
        slack_token=env_or_default("CFI_ALERT_SLACK_TOKEN", ""),
        webhook_url=env_or_default("CFI_ALERT_WEBHOOK_URL", ""),
        smtp_password=env_or_default("CFI_ALERT_SMTP_PASSWORD", ""),
    )
