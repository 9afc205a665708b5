"""Alert channels against real local servers: a webhook receiver, a Slack API stand-in, SMTP."""

import logging

import dagster as dg
import pytest

from cfi_pipelines.alerting.alerter import Alerter
from cfi_pipelines.alerting.channels import Alert, slack_via_http
from cfi_pipelines.alerting.messages import (
    alert_campaign_rejected,
    alert_export_failed,
    resolve_export,
)
from cfi_pipelines.resources.alerter import AlertsResource, alerts_resource
from cfi_pipelines.settings import AlertSettings, get_settings
from tests.fixtures.http import free_port

ALERT = Alert(
    key="view_stale:stocks",
    title="View stocks is stale (20 min old)",
    text="Check the refresh runs.",
    link="http://dagster.example/runs/abc",
)


def slack_settings(receiver, **kw) -> AlertSettings:
    return AlertSettings(
        slack_token="xoxb-test-secret",
        slack_channel="#cfi-alerts",
        slack_api_url=receiver.url + "/api/",
        **kw,
    )


def test_webhook_gets_the_alert_as_json(http_receiver):
    alerter = Alerter(AlertSettings(webhook_url=http_receiver.url + "/hook"))
    assert alerter.send(ALERT) == ["webhook"]
    (req,) = http_receiver.requests
    body = req.json()
    assert req.path == "/hook" and req.headers["Content-Type"] == "application/json"
    assert body["key"] == "view_stale:stocks" and body["event"] == "alert"
    assert body["link"] == "http://dagster.example/runs/abc" and body["at"].endswith("Z")


@pytest.mark.parametrize("via", ["slack_sdk", "httpx"])
def test_slack_chat_post_message(http_receiver, via):
    settings = slack_settings(http_receiver)
    if via == "slack_sdk":
        assert Alerter(settings).send(ALERT) == ["slack"]
    else:
        slack_via_http(settings, ALERT)
    (req,) = http_receiver.requests
    assert req.path == "/api/chat.postMessage"
    assert req.headers["Authorization"] == "Bearer xoxb-test-secret"
    sent = req.body.decode()
    assert "#cfi-alerts" in sent and "View stocks is stale" in sent
    assert "dagster.example/runs/abc" in sent


def test_slack_refusal_is_reported_not_raised(http_receiver, caplog):
    http_receiver.reply = {"ok": False, "error": "channel_not_found"}
    with caplog.at_level(logging.ERROR):
        assert Alerter(slack_settings(http_receiver)).send(ALERT) == []
    assert "slack delivery failed" in caplog.text and "channel_not_found" in caplog.text
    assert "xoxb-test-secret" not in caplog.text


def test_email_over_smtp(smtp_server):
    settings = AlertSettings(
        smtp_host=smtp_server.host,
        smtp_port=smtp_server.port,
        smtp_from="cfi@example.org",
        smtp_to=("ops@example.org", "oncall@example.org"),
    )
    assert Alerter(settings).send(ALERT) == ["email"]
    (msg,) = smtp_server.mailbox.messages
    assert msg["Subject"] == "[cfi-pipelines] View stocks is stale (20 min old)"
    assert smtp_server.mailbox.envelopes == [
        ("cfi@example.org", ["ops@example.org", "oncall@example.org"])
    ]
    assert "http://dagster.example/runs/abc" in msg.get_payload()


def test_nothing_configured_logs_only(caplog):
    alerter = Alerter(AlertSettings())
    with caplog.at_level(logging.WARNING):
        assert alerter.send(ALERT) == []
        assert alerter.open(ALERT) is True
    assert "ALERT [view_stale:stocks]" in caplog.text


def test_one_broken_channel_does_not_stop_the_others(http_receiver):
    settings = AlertSettings(
        webhook_url=http_receiver.url + "/hook",
        smtp_host="127.0.0.1",
        smtp_port=free_port(),  # nobody listens
        smtp_to=("ops@example.org",),
        timeout_s=2,
    )
    assert Alerter(settings).send(ALERT) == ["webhook"]


def test_an_episode_alerts_once_then_recovers(http_receiver, cfi_home):
    settings = AlertSettings(webhook_url=http_receiver.url + "/hook")
    assert Alerter(settings).open(ALERT) is True
    assert Alerter(settings).open(ALERT) is False  # another process, same state file
    assert (cfi_home / "alerts" / "state.json").exists()
    assert Alerter(settings).resolve(ALERT.key, "Fresh again.") is True
    assert Alerter(settings).resolve(ALERT.key) is False  # nothing open any more
    events = [(r.json()["event"], r.json()["title"]) for r in http_receiver.requests]
    assert events == [
        ("alert", "View stocks is stale (20 min old)"),
        ("recovered", "Recovered: View stocks is stale (20 min old)"),
    ]
    assert http_receiver.requests[1].json()["text"] == "Fresh again. (episode lasted 0 min)"


def test_an_undelivered_alert_is_tried_again(http_receiver):
    settings = AlertSettings(webhook_url=http_receiver.url + "/hook")
    http_receiver.status = 503
    assert Alerter(settings).open(ALERT) is False  # not recorded: the next tick retries
    http_receiver.status = 200
    assert Alerter(settings).open(ALERT) is True
    assert len(http_receiver.requests) == 2


def test_a_corrupt_state_file_does_not_silence_alerts(cfi_home, http_receiver):
    state = cfi_home / "alerts" / "state.json"
    state.parent.mkdir(parents=True)
    state.write_text("{oops")
    assert Alerter(AlertSettings(webhook_url=http_receiver.url)).open(ALERT) is True


def test_export_helpers(http_receiver, monkeypatch):
    monkeypatch.setenv("CFI_ALERT_WEBHOOK_URL", http_receiver.url + "/hook")
    monkeypatch.setenv("DAGSTER_WEBSERVER_URL", "http://ui.example:3000/")
    assert alert_export_failed(
        42, 3, "SFTP: connection refused", tenant="ACME", attempts=3, run_id="r1"
    )
    assert not alert_export_failed(42, 3, "SFTP: connection refused")  # same episode
    assert alert_campaign_rejected(43, 1, ["budget: must be >= 0", "name: required"])
    assert resolve_export(42, 3)
    bodies = [r.json() for r in http_receiver.requests]
    assert [(b["key"], b["event"]) for b in bodies] == [
        ("export_failed:42:r3", "alert"),
        ("campaign_rejected:43:r1", "alert"),
        ("export_failed:42:r3", "recovered"),
    ]
    assert bodies[0]["title"] == "Export of campaign 42 r3 failed after 3 attempts"
    assert "cfi-pipelines export 42 --force" in bodies[0]["text"]
    assert bodies[0]["link"] == "http://ui.example:3000/runs/r1"
    assert "- budget: must be >= 0" in bodies[1]["text"]


def test_resource_takes_secrets_from_env_vars(http_receiver, smtp_server, monkeypatch):
    monkeypatch.setenv("CFI_ALERT_SLACK_TOKEN", "xoxb-env-secret")
    monkeypatch.setenv("CFI_ALERT_SLACK_CHANNEL", "#ops")
    monkeypatch.setenv("CFI_ALERT_SLACK_API_URL", http_receiver.url + "/slack/")
    monkeypatch.setenv("CFI_ALERT_WEBHOOK_URL", http_receiver.url + "/hook")
    monkeypatch.setenv("CFI_ALERT_SMTP_HOST", smtp_server.host)
    monkeypatch.setenv("CFI_ALERT_SMTP_PORT", str(smtp_server.port))
    monkeypatch.setenv("CFI_ALERT_SMTP_TO", "ops@example.org")
    res = alerts_resource(get_settings())

    @dg.asset
    def noisy(alerts: AlertsResource) -> None:
        assert alerts.alerter().send(ALERT) == ["slack", "webhook", "email"]

    result = dg.materialize([noisy], resources={"alerts": res})
    assert result.success
    assert {r.path for r in http_receiver.requests} == {"/slack/chat.postMessage", "/hook"}
    assert len(smtp_server.mailbox.messages) == 1
    assert "xoxb-env-secret" not in str(result.dagster_run.run_config)
