"""The ``cfi-pipelines`` command: set-up, demo, admin and on-call commands.

Everything that changes data goes through Dagster (runs recorded in the local
instance, visible in the UI); read-only commands (``status``) read the databases.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_INCIDENT = 0, 1, 2


# --------------------------------------------------------------------------- seed


def cmd_seed(args: argparse.Namespace) -> int:
    from cfi_pipelines.db import engine_for, redact
    from cfi_pipelines.devtools.seed import seed_source
    from cfi_pipelines.devtools.seed_mycfia import seed_mycfia
    from cfi_pipelines.refresh import init_common
    from cfi_pipelines.settings import get_settings

    s = get_settings()
    source, common, mycfia = (
        engine_for(s.source_url),
        engine_for(s.common_url),
        engine_for(s.mycfia_url),
    )
    counts = seed_source(source, scale=args.scale, seed=args.seed)
    print(
        f"CFI source DB ({redact(s.source_url)}): "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
    )
    init_common(common)
    print(f"common DB ({redact(s.common_url)}): schema ready")
    mcounts = seed_mycfia(mycfia, source, scale=args.scale, seed=args.seed)
    print(
        f"MyCfia DB ({redact(s.mycfia_url)}): " + ", ".join(f"{k} {v}" for k, v in mcounts.items())
    )
    return EXIT_OK


def source_is_seeded() -> bool:
    import sqlalchemy as sa

    from cfi_pipelines.db import engine_for
    from cfi_pipelines.settings import get_settings

    s = get_settings()
    try:
        with engine_for(s.source_url).connect() as conn:
            return sa.inspect(conn).has_table("stock_levels")
    except sa.exc.OperationalError:
        return False


# --------------------------------------------------------------------------- refresh


def run_refresh(
    views: Sequence[str],
    *,
    mode: str = "auto",
    force: bool = False,
    tags: dict | None = None,
    run_config: dict | None = None,
):
    """Refresh ``views`` through Dagster's ``refresh_views`` job on the local instance
    (``run_config``: extra run config, e.g. loggers)."""
    from cfi_pipelines.assets.views import RefreshConfig, view_key, view_op_name
    from cfi_pipelines.definitions import build_defs
    from cfi_pipelines.instance import local_instance

    job = build_defs().resolve_job_def("refresh_views")
    ops = {
        view_op_name(v): {"config": RefreshConfig(mode=mode, force=force).model_dump()}
        for v in views
    }
    return job.execute_in_process(
        instance=local_instance(),
        run_config={**(run_config or {}), "ops": ops},
        asset_selection=[view_key(v) for v in views],
        raise_on_error=False,
        tags={"cfi/trigger": "cli", **(tags or {})},
    )


def materializations(result) -> dict[str, dict[str, Any]]:
    out = {}
    for event in result.get_asset_materialization_events():
        mat = event.materialization
        out[mat.asset_key.path[-1]] = {k: v.value for k, v in mat.metadata.items()}
    return out


def step_failures(result) -> list[str]:
    """One line per failed step of an in-process result: step key and first error line."""
    out = []
    for ev in result.all_events:
        if ev.is_step_failure:
            err = ev.step_failure_data.error
            first = (err.message.strip().splitlines() or [""])[0] if err else ""
            out.append(f"{ev.step_key}: {first}")
    return out


def cmd_refresh(args: argparse.Namespace) -> int:
    from cfi_pipelines.views import VIEWS, get_view

    try:
        views = [get_view(v).name for v in args.views] or [v.name for v in VIEWS]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    mode = "full" if args.full else "auto"
    result = run_refresh(views, mode=mode, force=args.force)
    for view, md in materializations(result).items():
        print(
            f"{view:<11} {md['mode']:<12} {md['rows']:>9} rows  +{md['inserted']} ~{md['updated']} "
            f"-{md['deleted']}  {md['duration_s']:.2f}s"
        )
    for failure in step_failures(result):
        print(f"FAILED {failure}", file=sys.stderr)
    print(f"run {result.run_id}: {'success' if result.success else 'failure'}")
    return EXIT_OK if result.success else EXIT_FAILED


# --------------------------------------------------------------------------- status


def collect_status() -> dict[str, Any]:
    """Views (age, rows, source, check state) and exports (counts by status), for humans and machines."""
    import sqlalchemy as sa

    from cfi_pipelines.assets.views import freshness_severity
    from cfi_pipelines.db import engine_for
    from cfi_pipelines.model import mycfia
    from cfi_pipelines.refresh import read_status, utcnow, view_age
    from cfi_pipelines.settings import get_settings
    from cfi_pipelines.views import VIEWS

    s = get_settings()
    now = utcnow()
    out: dict[str, Any] = {
        "generated_at": now.isoformat() + "Z",
        "views": [],
        "exports": {},
        "problems": [],
    }
    try:
        status = read_status(engine_for(s.common_url))
    except sa.exc.SQLAlchemyError as exc:
        status = {}
        out["problems"].append(f"common DB unreachable: {type(exc).__name__}")
    for spec in VIEWS:
        row = status.get(spec.name) or {}
        age = view_age(row, now)
        passed, severity = freshness_severity(age)
        check = "PASS" if passed else severity.value
        out["views"].append(
            {
                "view": spec.name,
                "rows": row.get("rows"),
                "source": row.get("source"),
                "mode": row.get("mode"),
                "last_success_at": row["last_success_at"].isoformat()
                if row.get("last_success_at")
                else None,
                "age_s": round(age.total_seconds(), 1) if age is not None else None,
                "freshness": check,
                "consecutive_failures": row.get("consecutive_failures") or 0,
                "error": row.get("error"),
            }
        )
        if check == "ERROR":
            out["problems"].append(
                f"view {spec.name}: "
                + ("never refreshed" if age is None else f"{age.total_seconds() / 60:.0f} min old")
            )
    try:
        e = mycfia.campaign_exports.c
        with engine_for(s.mycfia_url).connect() as conn:
            latest = (
                sa.select(e.campaign_id, sa.func.max(e.revision).label("revision"))
                .group_by(e.campaign_id)
                .subquery()
            )
            rows = conn.execute(
                sa.select(e.status, sa.func.count(), sa.func.min(e.requested_at))
                .select_from(
                    mycfia.campaign_exports.join(
                        latest,
                        sa.and_(
                            latest.c.campaign_id == e.campaign_id, latest.c.revision == e.revision
                        ),
                    )
                )
                .group_by(e.status)
            ).all()
        out["exports"] = {st: n for st, n, _ in rows}
        oldest = [t for st, _, t in rows if st == "pending" and t is not None]
        out["exports_oldest_pending"] = min(oldest).isoformat() if oldest else None
        if out["exports"].get("failed"):
            out["problems"].append(
                f"{out['exports']['failed']} campaign export(s) failed after their retries"
            )
    except sa.exc.SQLAlchemyError:
        out["exports_error"] = "MyCfia DB unreachable or not seeded"
    return out


def fmt_age(age_s: float | None) -> str:
    if age_s is None:
        return "never"
    return f"updated {age_s / 60:.0f} min ago" if age_s >= 60 else f"updated {age_s:.0f} s ago"


def cmd_status(args: argparse.Namespace) -> int:
    st = collect_status()
    code = EXIT_INCIDENT if st["problems"] else EXIT_OK
    if args.json:
        print(json.dumps({**st, "exit_code": code}, indent=2, default=str))
        return code
    print(f"{'view':<11} {'rows':>9} {'source':<8} {'freshness':<9} last refresh")
    for v in st["views"]:
        err = f"  last error: {v['error'][:80]}" if v["error"] else ""
        print(
            f"{v['view']:<11} {v['rows'] if v['rows'] is not None else '-':>9} {v['source'] or '-':<8} "
            f"{v['freshness']:<9} {fmt_age(v['age_s'])}{err}"
        )
    if st.get("exports_error"):
        print(f"exports: {st['exports_error']}")
    else:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(st["exports"].items())) or "none yet"
        pending = (
            f" (oldest pending since {st['exports_oldest_pending']})"
            if st.get("exports_oldest_pending")
            else ""
        )
        print(f"exports: {counts}{pending}")
    for p in st["problems"]:
        print(f"PROBLEM: {p}")
    return code


# --------------------------------------------------------------------------- export


def cmd_export(args: argparse.Namespace) -> int:
    from cfi_pipelines.exports_defs import export_command

    return export_command(args.campaign_id, force=args.force)


# --------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    from cfi_pipelines.devtools.demo import run_demo

    return run_demo(scale=args.scale)


# --------------------------------------------------------------------------- servers


def cmd_sftp_server(args: argparse.Namespace) -> int:
    from cfi_pipelines.devtools.sftp_server import main as sftp_main

    return sftp_main(args.rest)


def cmd_fake_api(args: argparse.Namespace) -> int:
    from cfi_pipelines.devtools.fake_cfi_api import main as api_main

    return api_main(args.rest)


def cmd_dev(args: argparse.Namespace) -> int:
    from cfi_pipelines.devtools.dev import main as dev_main

    return dev_main(args.rest)


def cmd_metrics(args: argparse.Namespace) -> int:
    from cfi_pipelines.metrics import main as metrics_main

    return metrics_main(args.rest)


def cmd_kpis(args: argparse.Namespace) -> int:
    from cfi_pipelines.kpis import main as kpis_main

    return kpis_main(args.rest)


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cfi-pipelines", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("seed", help="create and fill the three embedded/configured databases")
    sp.add_argument("--scale", type=int, default=1, help="1 ≈ 10k stock rows, 100 ≈ 1M")
    sp.add_argument("--seed", type=int, default=0, help="random seed (same seed, same data)")
    sp.set_defaults(func=cmd_seed)

    sp = sub.add_parser("demo", help="seed if needed, refresh, check, export; print a summary")
    sp.add_argument("--scale", type=int, default=1)
    sp.set_defaults(func=cmd_demo)

    sp = sub.add_parser("status", help="views and exports at a glance (exit 2 on an incident)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_status)

    sp = sub.add_parser("refresh", help="refresh views now, through Dagster")
    sp.add_argument(
        "views",
        nargs="*",
        metavar="VIEW",
        help="stocks operations invoices campaigns (default: all)",
    )
    sp.add_argument("--full", action="store_true", help="full rebuild instead of incremental")
    sp.add_argument(
        "--force", action="store_true", help="swap in even if the row count dropped a lot"
    )
    sp.set_defaults(func=cmd_refresh)

    sp = sub.add_parser(
        "export", help="export one campaign now (manual re-export), through Dagster"
    )
    sp.add_argument("campaign_id", type=int)
    sp.add_argument("--force", action="store_true", help="send again even if already delivered")
    sp.set_defaults(func=cmd_export)

    for name, func, help_ in (
        ("sftp-server", cmd_sftp_server, "run the embedded development SFTP server"),
        ("fake-cfi-api", cmd_fake_api, "serve the CFI API contract from the source DB"),
        ("dev", cmd_dev, "embedded servers + dagster dev with schedules and sensors running"),
        ("metrics", cmd_metrics, "serve Prometheus metrics on 127.0.0.1 at /metrics"),
        ("kpis", cmd_kpis, "the mission's targets against what the logs show"),
    ):
        sp = sub.add_parser(name, help=help_, add_help=False)
        sp.add_argument("rest", nargs=argparse.REMAINDER)
        sp.set_defaults(func=func)
    return p


PASSTHROUGH = {
    "sftp-server": cmd_sftp_server,
    "fake-cfi-api": cmd_fake_api,
    "dev": cmd_dev,
    "metrics": cmd_metrics,
    "kpis": cmd_kpis,
}
"""Commands that parse their own options (argparse's REMAINDER would drop ``--port``)."""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:
        return int(PASSTHROUGH[argv[0]](argparse.Namespace(rest=argv[1:])) or 0)
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
