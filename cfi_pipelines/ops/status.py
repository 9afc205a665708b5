"""``cfi-pipelines status``: views and exports at a glance, for humans and machines."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from cfi_pipelines.clock import iso_z, utcnow
from cfi_pipelines.db import engine_for
from cfi_pipelines.model import mycfia
from cfi_pipelines.settings import get_settings
from cfi_pipelines.views.capture import choose_capture
from cfi_pipelines.views.freshness import format_age, freshness_state, view_age
from cfi_pipelines.views.positions import read_modes
from cfi_pipelines.views.refresh import read_status
from cfi_pipelines.views.spec import VIEWS

EXIT_OK, EXIT_INCIDENT = 0, 2
IDS_SHOWN = 20
"""Campaign ids listed per export status (failed, pending, rejected); the counts are exact."""


def collect_status() -> dict[str, Any]:
    """Views (age, rows, source, check state) and exports (counts by status)."""
    s = get_settings()
    now = utcnow()
    out: dict[str, Any] = {"generated_at": iso_z(now), "views": [], "exports": {}, "problems": []}
    try:
        status = read_status(engine_for(s.common_url))
    except sa.exc.SQLAlchemyError as exc:
        status = {}
        out["problems"].append(f"common DB unreachable: {type(exc).__name__}")
    out["capture"] = capture_summary(s.source_url)
    try:
        positions = read_modes(engine_for(s.common_url))
    except sa.exc.SQLAlchemyError:
        positions = {}
    for spec in VIEWS:
        row = status.get(spec.name) or {}
        age = view_age(row, now)
        state = freshness_state(age)
        out["views"].append(
            {
                "view": spec.name,
                "rows": row.get("rows"),
                "source": row.get("source"),
                "mode": row.get("mode"),
                "last_success_at": iso_z(row.get("last_success_at")),
                "age_s": round(age.total_seconds(), 1) if age is not None else None,
                "freshness": state,
                "consecutive_failures": row.get("consecutive_failures") or 0,
                "error": row.get("error"),
                "capture_position": (positions.get(spec.name) or ("", None))[1],
            }
        )
        if state == "ERROR":
            out["problems"].append(f"view {spec.name}: {format_age(age)}")
    try:
        e = mycfia.campaign_exports.c
        # the campaign's latest revision: no newer row of the same campaign (one index probe
        # on (campaign_id, revision) per row), not a GROUP BY over the whole table joined back
        newer = mycfia.campaign_exports.alias("newer")
        latest = ~sa.exists().where(
            (newer.c.campaign_id == e.campaign_id) & (newer.c.revision > e.revision)
        )
        with engine_for(s.mycfia_url).connect() as conn:
            rows = conn.execute(
                sa.select(e.status, sa.func.count(), sa.func.min(e.requested_at))
                .where(latest)
                .group_by(e.status)
            ).all()
        out["exports"] = {st: n for st, n, _ in rows}
        oldest = [t for st, _, t in rows if st == "pending" and t is not None]
        out["exports_oldest_pending"] = iso_z(min(oldest)) if oldest else None
        out["campaigns"] = {}
        with engine_for(s.mycfia_url).connect() as conn:
            for st in ("failed", "pending", "rejected"):
                if not out["exports"].get(st):
                    continue
                found = conn.execute(  # index on status: the rows of that status only
                    sa.select(e.campaign_id, e.revision, e.error, e.updated_at)
                    .where(e.status == st, latest)
                    .order_by(e.updated_at.desc())
                    .limit(IDS_SHOWN)
                ).all()
                out["campaigns"][st] = [
                    {
                        "campaign_id": cid,
                        "revision": rev,
                        "updated_at": iso_z(at),
                        "error": error,
                    }
                    for cid, rev, error, at in found
                ]
        if out["exports"].get("failed"):
            out["problems"].append(
                f"{out['exports']['failed']} campaign export(s) failed after their retries"
            )
    except sa.exc.SQLAlchemyError:
        out["exports_error"] = "MyCfia DB unreachable or not seeded"
    out["exit_code"] = EXIT_INCIDENT if out["problems"] else EXIT_OK
    return out


def _error_lines(label: str, error: str | None, indent: str = "    ") -> list[str]:
    """``label: error`` on one line, or ``label:`` then each line of a longer error."""
    text = (error or "").strip().splitlines()
    if len(text) <= 1:
        return [f"{indent}{label}: {text[0] if text else ''}".rstrip()]
    return [f"{indent}{label}:", *(f"{indent}  {line}" for line in text)]


def capture_summary(source_url: str) -> dict[str, Any]:
    """How CFI's changes are found (:func:`cfi_pipelines.views.capture.choose_capture`:
    a few catalog queries on the source, no table read), or why it is unknown."""
    try:
        capture = choose_capture(engine_for(source_url))
    except Exception as exc:  # the source down must not hide the rest of the report
        return {"mode": None, "error": f"{type(exc).__name__}: {str(exc).strip()[:200]}"}
    try:
        return {
            "mode": capture.mode,
            "exact": capture.exact,
            "why": capture.why,
            "guarantee": capture.guarantee,
        }
    finally:
        capture.close()


def format_status(st: dict[str, Any]) -> list[str]:
    """The human-readable lines of :func:`collect_status`'s report."""
    lines = [f"{'view':<11} {'rows':>9} {'source':<8} {'freshness':<9} age"]
    for v in st["views"]:
        # one line per view; an error of several lines (an older record) goes below it
        error = (v["error"] or "").strip().splitlines()
        err = f"  last error: {error[0]}" if len(error) == 1 else ""
        rows = v["rows"] if v["rows"] is not None else "-"
        lines.append(
            f"{v['view']:<11} {rows:>9} {v['source'] or '-':<8} "
            f"{v['freshness']:<9} {format_age(v['age_s'])}{err}"
        )
        if len(error) > 1:
            lines += _error_lines("last error", v["error"], indent="  ")
    cap = st.get("capture") or {}
    if cap.get("mode"):
        lines.append(f"capture: {cap['mode']} ({cap['why']}); guarantees {cap['guarantee']}")
    else:
        lines.append(f"capture: unknown ({cap.get('error') or 'not probed'})")
    if st.get("exports_error"):
        lines.append(f"exports: {st['exports_error']}")
    else:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(st["exports"].items())) or "none yet"
        pending = st.get("exports_oldest_pending")
        lines.append(
            f"exports: {counts}" + (f" (oldest pending since {pending})" if pending else "")
        )
        for status_name, items in (st.get("campaigns") or {}).items():
            total = st["exports"].get(status_name, len(items))
            ids = ", ".join(f"{c['campaign_id']} r{c['revision']}" for c in items)
            extra = f" (+{total - len(items)} more)" if total > len(items) else ""
            lines.append(f"  {status_name}: {ids}{extra}")
            if status_name in ("failed", "rejected"):  # each with its whole error
                for c in items:
                    lines += _error_lines(f"{c['campaign_id']} r{c['revision']}", c["error"])
    lines += [f"PROBLEM: {p}" for p in st["problems"]]
    return lines
