"""``cfi-pipelines dev [--port P]``: the embedded servers, then ``dg dev`` with automation on.

Seeds the embedded databases if they are missing, starts the embedded SFTP
server (when ``CFI_SFTP_HOST`` is unset) and the fake CFI API (when
``CFI_API_URL`` is unset, so the fallback path works), then runs ``dg dev -w
CFI_HOME/dagster/workspace.yaml -h 127.0.0.1 -p P`` (Dagster's recommended
command; ``dagster dev`` when dagster-dg-cli is not installed) with
``DAGSTER_HOME`` = ``CFI_HOME/dagster``: the UI, and the daemon running the
schedules and sensors (on by default unless ``CFI_AUTOMATION=off``). The
workspace names the code location ``cfi_pipelines``, as ``workspace.yaml`` and
``pyproject.toml`` do. Every path and URL the children get is absolute
(``settings.child_environment``): they run in the instance's directory.

Dagster runs in its own session (process group): started from a script
it would otherwise ignore SIGINT/SIGTERM. Ctrl-C (or SIGTERM/SIGHUP) is
forwarded to the whole group as the SIGINT a terminal's Ctrl-C sends (the
shutdown Dagster's processes are written for), and the group is killed if it
has not stopped after ``STOP_TIMEOUT_S``; then the embedded servers stop.
Nothing started here outlives the command.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

from cfi_pipelines.devtools.fake_cfi_api import DEFAULT_PORT as DEFAULT_API_PORT
from cfi_pipelines.devtools.fake_cfi_api import FakeCfiApi
from cfi_pipelines.devtools.seed import seed_all, source_is_seeded
from cfi_pipelines.devtools.sftp_server import start_dev_server
from cfi_pipelines.ops.instance import ensure_dagster_home
from cfi_pipelines.settings import ConfigError, child_environment, get_settings

DEFAULT_UI_PORT = 3000
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 20.0


class _Stop(Exception):
    """Raised by the signal handlers: leave the main loop and clean up."""


def _say(msg: str) -> None:
    print(f"cfi-pipelines dev: {msg}", flush=True)


LOCATION_NAME = "cfi_pipelines"
"""The code location's name, as in workspace.yaml and pyproject.toml ([tool.dg])."""
WORKSPACE_YAML = f"""\
# Written by `cfi-pipelines dev`: the project's code location, under its one name.
load_from:
  - python_module:
      module_name: cfi_pipelines.definitions
      location_name: {LOCATION_NAME}
"""


def write_workspace(dagster_home: Path) -> Path:
    """``<dagster_home>/workspace.yaml`` for ``dg dev -w`` (rewritten each time: cheap)."""
    path = dagster_home / "workspace.yaml"
    path.write_text(WORKSPACE_YAML)
    return path


def dagster_dev_command(port: int, workspace: Path, host: str = "127.0.0.1") -> list[str]:
    """``dg dev`` on ``workspace``, run with this interpreter (same virtualenv); ``dagster
    dev`` (which Dagster reports as superseded) when dagster-dg-cli is not installed."""
    if importlib.util.find_spec("dagster_dg_cli") is not None:
        head = [sys.executable, "-m", "dagster_dg_cli.cli", "dev"]
    else:
        head = [sys.executable, "-m", "dagster", "dev"]
    return [*head, "-w", str(workspace), "-h", host, "-p", str(port)]


def webserver_ready(url: str, timeout: float = 2.0) -> bool:
    """True when the Dagster webserver at ``url`` answers a GraphQL query."""
    req = urllib.request.Request(
        f"{url}/graphql",
        data=b'{"query": "{ version }"}',
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status == 200 and b'"version"' in resp.read()
    except (urllib.error.URLError, OSError):
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_process_group(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> int | None:
    """Interrupt the process group led by ``proc`` as Ctrl-C in a terminal does (SIGINT to
    every process of the group: the shutdown Dagster's dev processes are written for);
    SIGKILL what is left of it after ``timeout``.

    Waits for the leader *and* the rest of the group (run workers still shutting
    down), so nothing it started outlives the call. Returns the leader's exit code.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    deadline = time.monotonic() + timeout
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)  # polling the group's exit, bounded by the deadline
    if _group_alive(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5.0)
    return proc.poll()


@contextlib.contextmanager
def embedded_servers(env: dict[str, str], api_port: int) -> Iterator[list[str]]:
    """Start the dev SFTP server and the fake CFI API as needed; set ``env`` for the child.

    Yields one line per server started (for the banner); stops them on exit.
    """
    s = get_settings()
    lines: list[str] = []
    with contextlib.ExitStack() as stack:
        if s.local:
            port = s.dev_sftp_port
            sftp = start_dev_server(port)  # a taken port: one line naming CFI_SFTP_PORT
            stack.callback(sftp.stop)
            env["CFI_SFTP_PORT"] = str(sftp.port)
            lines.append(f"embedded SFTP server  127.0.0.1:{sftp.port}  (root {sftp.paths.root})")
        else:
            lines.append(f"SFTP                  {s.sftp_host}:{s.sftp_port} (CFI_SFTP_HOST)")

        if not s.api_url:
            token = s.api_token or "dev-token"
            try:
                api = FakeCfiApi(s.source_url, token=token, port=api_port)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                if api_port != DEFAULT_API_PORT:
                    raise ConfigError(
                        f"port {api_port} on 127.0.0.1 is taken: the fake CFI API cannot start; "
                        "pass another --api-port (0: any free port)"
                    ) from None
                api = FakeCfiApi(s.source_url, token=token, port=0)  # the default is taken
            stack.enter_context(api)
            env["CFI_API_URL"], env["CFI_API_TOKEN"] = api.url, token
            lines.append(f"fake CFI API          {api.url}  (CFI_API_URL for the fallback)")
        else:
            lines.append(f"CFI API               {s.api_url} (CFI_API_URL)")
        yield lines


def run_dagster_dev(cmd: Sequence[str], env: dict[str, str], url: str) -> int:
    """Run ``cmd`` in its own process group until it exits or a signal arrives; stop the group."""

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        raise _Stop(signal.Signals(signum).name)

    previous = {
        sig: signal.signal(sig, _on_signal)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    # cwd: the instance's own directory, so a dagster.yaml in the caller's directory is
    # neither read nor warned about (the instance's is the one in DAGSTER_HOME)
    proc = subprocess.Popen(list(cmd), env=env, cwd=env.get("DAGSTER_HOME"), start_new_session=True)
    code: int | None = None
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        announced = False
        while (code := proc.poll()) is None:
            if not announced and webserver_ready(url):
                _say(f"Dagster UI ready at {url}  (Ctrl-C stops everything)")
                announced = True
            elif not announced and time.monotonic() > deadline:
                _say(f"the UI is not answering at {url} yet; still waiting for dagster dev …")
                announced = True
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.5 if not announced else 5.0)
        _say(f"dagster dev exited with code {code}")
        return code
    except _Stop as stop:
        _say(f"{stop}: stopping dagster dev …")
        return 0
    finally:
        for sig in previous:  # a second Ctrl-C must not interrupt the clean-up
            signal.signal(sig, signal.SIG_IGN)
        stop_process_group(proc)  # also when the leader is gone: whatever it left in its group
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_dev(port: int = DEFAULT_UI_PORT, api_port: int = DEFAULT_API_PORT) -> int:
    """``cfi-pipelines dev [--port P] [--api-port P]``: embedded servers + ``dagster dev``."""
    s = get_settings()
    s.home.mkdir(parents=True, exist_ok=True)
    if not source_is_seeded(s):
        _say(f"seeding the embedded databases under {s.home} …")
        for line in seed_all(s):
            _say(line)
    dagster_home = ensure_dagster_home()
    env = child_environment(DAGSTER_HOME=str(dagster_home))
    url = f"http://127.0.0.1:{port}"
    try:
        with embedded_servers(env, api_port) as lines:
            for line in lines:
                _say(line)
            _say(f"DAGSTER_HOME          {dagster_home}")
            automation = "on" if s.automation else "off (CFI_AUTOMATION)"
            _say(f"starting dg dev on {url} (schedules and sensors {automation}) …")
            workspace = write_workspace(dagster_home)
            code = run_dagster_dev(dagster_dev_command(port, workspace), env, url)
    except (_Stop, KeyboardInterrupt):  # a signal before dagster dev started
        code = 0
    _say("stopped (dagster dev and the embedded servers)")
    return code
