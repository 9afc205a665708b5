"""The ``cfi-pipelines`` command: set-up, demo, admin and on-call commands.

A click group; each command is a few lines over :mod:`cfi_pipelines.ops` (or
:mod:`cfi_pipelines.devtools` for the development servers). Everything that
changes data goes through Dagster (runs recorded in the project's instance,
visible in the UI); read-only commands (``status``, ``kpis``) read the databases.
The heavy modules are imported inside the commands, so ``--help`` and ``status``
start fast. A configuration error prints one line naming the variable (exit 1),
never a traceback.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable, Sequence
from functools import wraps
from types import FrameType
from typing import Any

import click

from cfi_pipelines.settings import ConfigError, get_settings

EXIT_OK, EXIT_FAILED, EXIT_INCIDENT = 0, 1, 2
VIEW_NAMES = ("stocks", "operations", "invoices", "campaigns")


def _exits(fn: Callable[..., int | None]) -> Callable[..., None]:
    """Turn a command's return value into its exit code; configuration errors into one line."""

    @wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            code = fn(*args, **kwargs)
        except ConfigError as exc:
            click.echo(f"error: {exc}", err=True)
            code = EXIT_FAILED
        except BrokenPipeError:  # `cfi-pipelines kpis --json | head`
            sys.stderr.close()
            code = EXIT_OK
        sys.exit(int(code or 0))

    return run


def _stops_on_signals(fn: Callable[..., int | None]) -> Callable[..., int | None]:
    """For the long-running commands: SIGINT and SIGTERM stop them cleanly, whatever the
    parent left them. A background job (`cmd &`) starts with SIGINT ignored, and a process
    that ran Dagster code has SIGTERM following SIGINT (Dagster copies SIGINT's handler onto
    SIGTERM), so an inherited "ignore" would make the server unstoppable but by SIGKILL. The
    handler raises KeyboardInterrupt, which each command already turns into a clean stop."""

    @wraps(fn)
    def run(*args: Any, **kwargs: Any) -> int | None:
        def _interrupt(signum: int, frame: FrameType | None) -> None:
            raise KeyboardInterrupt(signal.Signals(signum).name)

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _interrupt)
        return fn(*args, **kwargs)

    return run


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """cfi-pipelines: keeps MyCfia's read cache of CFI data fresh and delivers campaigns to CFI."""


@cli.command()
@click.option("--scale", type=click.IntRange(min=1), default=1, help="1 ≈ 10k stock rows, 100 ≈ 1M")
@click.option("--seed", type=int, default=0, help="random seed (same seed, same data)")
@click.option(
    "--only",
    type=click.Choice(["source", "common", "mycfia"]),
    multiple=True,
    help="seed only this database (repeatable); replaces its data if it holds any",
)
@click.option("--force", is_flag=True, help="replace the data of every database seeded")
@_exits
def seed(scale: int, seed: int, only: Sequence[str], force: bool) -> int:
    """Create and fill the databases with demo data: CFI's source, the common DB's schema,
    MyCfia's campaigns. A database that holds data is replaced only when named with --only
    or with --force; otherwise nothing is written and each database is listed."""
    from cfi_pipelines.devtools.seed import seed_all
    from cfi_pipelines.devtools.seed_plan import SeedRefused, prepare

    s = get_settings()
    try:
        targets, replacing = prepare(s, only, force)
    except SeedRefused as exc:
        for line in exc.listing:
            click.echo(line)
        click.echo(f"error: {exc}", err=True)
        return EXIT_FAILED
    for line in [*replacing, *seed_all(s, scale=scale, seed=seed, only=targets)]:
        click.echo(line)
    return EXIT_OK


@cli.command()
@click.option(
    "--scale",
    type=click.IntRange(min=1),
    default=1,
    help="data size when the databases must be seeded: 1 ≈ 10k stock rows, 100 ≈ 1M",
)
@_exits
def demo(scale: int) -> int:
    """Seed if needed, refresh, check, snapshot, export; print a summary."""
    from cfi_pipelines.devtools.demo import run_demo

    return run_demo(scale=scale)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@_exits
def status(as_json: bool) -> int:
    """Views and exports at a glance (exit 2 on an incident)."""
    from cfi_pipelines.ops.status import collect_status, format_status

    st = collect_status()
    if as_json:
        click.echo(json.dumps(st, indent=2, default=str))
    else:
        for line in format_status(st):
            click.echo(line)
    return st["exit_code"]


@cli.command()
@click.argument("views", nargs=-1, metavar="[VIEW]...")
@click.option("--full", is_flag=True, help="full rebuild instead of incremental")
@click.option("--force", is_flag=True, help="swap in even if the row count dropped a lot")
@_exits
def refresh(views: Sequence[str], full: bool, force: bool) -> int:
    """Refresh views now, through Dagster (VIEW: stocks operations invoices campaigns; default all)."""
    from cfi_pipelines.views.spec import get_view

    try:
        names = [get_view(v).name for v in views] or list(VIEW_NAMES)
    except ValueError as exc:
        click.echo(f"error: {exc}", err=True)
        return EXIT_FAILED
    from cfi_pipelines.ops.runs import materializations, run_refresh, step_failures

    result = run_refresh(names, mode="full" if full else "auto", force=force)
    for view, md in materializations(result).items():
        click.echo(
            f"{view:<11} {md['mode']:<12} {md['rows']:>9} rows  +{md['inserted']} ~{md['updated']} "
            f"-{md['deleted']}  {md['duration_s']:.2f}s"
        )
    for failure in step_failures(result):
        click.echo(f"FAILED {failure}", err=True)
    click.echo(f"run {result.run_id}: {'success' if result.success else 'failure'}")
    return EXIT_OK if result.success else EXIT_FAILED


@cli.command()
@click.argument("campaign_id", type=int)
@click.option("--force", is_flag=True, help="send again even if already delivered")
@_exits
def export(campaign_id: int, force: bool) -> int:
    """Export one campaign now (manual re-export), through Dagster's campaign_export job."""
    from cfi_pipelines.ops.runs import run_export

    outcome = run_export(campaign_id, force=force)
    click.echo(outcome.message)
    return outcome.code


@cli.command()
@click.option(
    "--window-hours",
    type=click.FloatRange(min=0, min_open=True),
    default=24.0,
    show_default=True,
    help="how far back the refresh log and the export history are read",
)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@_exits
def kpis(window_hours: float, as_json: bool) -> int:
    """The mission's targets against what the logs show (exit 1 when one is missed)."""
    from cfi_pipelines.ops.kpis import report

    return report(window_hours, as_json)


@cli.command()
@click.option("--port", type=int, default=9464, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="0.0.0.0 in a container")
@click.option("--probe-tenant", type=int, default=None, help="tenant id of the probe read")
@_exits
@_stops_on_signals
def metrics(port: int, host: str, probe_tenant: int | None) -> int:
    """Serve Prometheus metrics at /metrics."""
    from cfi_pipelines.ops.metrics import serve_metrics

    return serve_metrics(port=port, host=host, probe_tenant=probe_tenant)


@cli.command()
@click.option("--port", type=int, default=3000, show_default=True, help="Dagster UI port")
@click.option(
    "--api-port",
    type=int,
    default=8765,
    show_default=True,
    help="fake CFI API port when CFI_API_URL is unset (0: any free port)",
)
@_exits
@_stops_on_signals
def dev(port: int, api_port: int) -> int:
    """Embedded servers + dagster dev with schedules and sensors running (Ctrl-C stops all)."""
    from cfi_pipelines.devtools.dev import run_dev

    return run_dev(port, api_port)


@cli.command("sftp-server")
@click.option("--port", type=int, default=None, help="port on 127.0.0.1 (default 2222)")
@_exits
@_stops_on_signals
def sftp_server(port: int | None) -> int:
    """Run the embedded development SFTP server."""
    from cfi_pipelines.devtools.sftp_server import serve

    return serve(port)


@cli.command("fake-cfi-api")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8765, show_default=True)
@click.option("--source-url", default=None, help="source DB URL (default: CFI_SOURCE_URL)")
@click.option("--token", default=None, help="bearer token (default: CFI_API_TOKEN, else dev-token)")
@click.option("--latency-ms", type=float, default=0.0, help="added to every request")
@click.option("--fail-429", type=int, default=0, metavar="N", help="answer 429 to N requests")
@click.option("--retry-after", default="1", help="Retry-After of those 429s (seconds)")
@click.option("--fail-500", type=int, default=0, metavar="N", help="answer 500 to N requests")
@click.option(
    "--malformed",
    type=click.Choice(
        ["bad_json", "not_object", "missing_field", "extra_field", "wrong_type", "missing_cursor"]
    ),
    default=None,
    help="break one page this way",
)
@click.option("--malformed-page", type=int, default=1, help="which page to break (1-based)")
@_exits
@_stops_on_signals
def fake_cfi_api(
    host: str,
    port: int,
    source_url: str | None,
    token: str | None,
    latency_ms: float,
    fail_429: int,
    retry_after: str,
    fail_500: int,
    malformed: str | None,
    malformed_page: int,
) -> int:
    """Serve CFI's API contract from the source DB (with fault injection)."""
    from cfi_pipelines.devtools.fake_cfi_api import Faults, serve

    faults = Faults(
        latency_s=latency_ms / 1000,
        fail_429=fail_429,
        retry_after=retry_after,
        fail_500=fail_500,
        malformed=malformed,
        malformed_page=malformed_page,
    )
    return serve(host=host, port=port, source_url=source_url, token=token, faults=faults)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--selftest", is_flag=True, help="run the refresh's SQL on scratch tables")
@click.option("--send-test-alert", is_flag=True, help="send one test alert to every channel")
@_exits
def doctor(as_json: bool, selftest: bool, send_test_alert: bool) -> int:
    """Check the configuration and every server it names (exit 1 when one fails)."""
    from cfi_pipelines.ops.doctor import report

    return report(as_json=as_json, selftest=selftest, send_test_alert=send_test_alert)


@cli.command()
@click.option("--tenant", required=True, metavar="CODE", help="CFI tenant code, e.g. NORD-01")
@click.argument("sql")
@click.option("--max-rows", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=5.0, show_default=True,
              help="seconds")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@_exits
def query(tenant: str, sql: str, max_rows: int, timeout: float, as_json: bool) -> int:
    """One read as a tenant, through the binding MyCfia uses (exit 1: refused, one line why)."""
    from cfi_pipelines.settings import tenant_secret
    from cfi_pipelines.tenancy.query import report

    return report(
        get_settings().common_url, tenant, sql, secret=tenant_secret(),
        max_rows=max_rows, timeout_s=timeout, as_json=as_json,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point (``cfi-pipelines``); returns the exit code when called from Python."""
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="cfi-pipelines")
    except SystemExit as exc:
        if isinstance(exc.code, str):  # sys.exit("message"): say it, as Python itself would
            print(exc.code, file=sys.stderr)
            return 1
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
