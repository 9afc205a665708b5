"""The alerter: one alert per episode, then "recovered". Plain code, no Dagster.

An alert belongs to an *episode* named by a key (``view_stale:stocks``,
``export_failed:42:r3``…). :meth:`Alerter.open` sends it once per episode;
:meth:`Alerter.resolve` sends "recovered" and closes it. Open episodes are kept
in a small JSON file under ``CFI_HOME/alerts/`` (not in the common DB: it may be
the very thing that is down), guarded by a file lock so sensors and runs in
other processes agree. Nothing configured → the alert is logged, never raised.
Where alerts go: :mod:`cfi_pipelines.alerting.channels`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from cfi_pipelines.alerting.channels import CHANNELS, Alert
from cfi_pipelines.clock import utcnow
from cfi_pipelines.settings import AlertSettings, get_settings

log = logging.getLogger(__name__)


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


# --------------------------------------------------------------------------- alerter


class Alerter:
    """Sends alerts to the configured channels, once per episode."""

    def __init__(self, settings: AlertSettings | None = None, logger: Any = None):
        self.settings = settings or get_settings().alerts
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
                CHANNELS[name](self.settings, alert)
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
