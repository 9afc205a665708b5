"""Alerting: channels (Slack, webhook, e-mail), the once-per-episode alerter, the messages."""
