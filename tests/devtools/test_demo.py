"""`cfi-pipelines demo` as a user runs it: a real subprocess on a fresh CFI_HOME."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from cfi_pipelines.devtools.demo import judge, planted_defect
from tests.fixtures.http import free_port

BIN = Path(sys.executable).parent
VIEWS = ("stocks", "operations", "invoices", "campaigns")


def _cli(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "cfi-pipelines"), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=110,
    )


def _kpis(env: dict, cwd: Path) -> dict[str, dict]:
    """``cfi-pipelines kpis --json``, which must exit 0 (all met), by KPI name."""
    proc = _cli(["kpis", "--json"], env, cwd)
    assert proc.returncode == 0, proc.stdout
    return {k["name"]: k for k in json.loads(proc.stdout)["kpis"]}


@pytest.mark.timeout(280)
def test_demo_runs_everything_through_dagster(tmp_path: Path, cfi_home: Path) -> None:
    env = {**os.environ, "CFI_HOME": str(cfi_home), "CFI_SFTP_PORT": str(free_port())}
    proc = _cli(["demo"], env, tmp_path)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]
    assert out.rstrip().splitlines()[-1].startswith("demo: OK")
    for n in range(1, 7):
        assert f"[{n}/6]" in out  # the progress lines
    assert "fake CFI API on http://127.0.0.1:" in out
    assert "('Invalide: formula in a target email')" in out  # names are not cut (issue 16)
    assert "Traceback" not in proc.stderr and " - dagster - " not in out  # quiet console

    # each view with its rows and its two passing checks
    for view in VIEWS:
        m = re.search(rf"^  {view}\s+(\d+) rows .*checks: (.*)$", out, re.M)
        assert m, f"no summary line for {view}:\n{out}"
        assert int(m.group(1)) > 0
        assert m.group(2).split() == ["freshness=PASS", "not_empty=PASS"]

    # campaigns: the valid ones delivered, the 4 planted invalid ones rejected with their errors
    delivered = re.findall(r"^  campaign (\d+) r(\d+): delivered -> (/\S+)$", out, re.M)
    rejected = re.findall(r"^  campaign (\d+) r\d+: REJECTED  (.+)$", out, re.M)
    assert len(delivered) == 6, out
    assert len(rejected) == 4, out
    assert any("'budget' is a required property" in err for _, err in rejected)
    assert "6 delivered, 4 rejected (4 planted invalid on purpose)" in out

    # the files on the embedded SFTP server's root, the manifest describing both files
    root = cfi_home / "sftp" / "root"
    for cid, rev, manifest_path in delivered:
        manifest = root / manifest_path.lstrip("/")
        assert manifest.name == f"campaign_{cid}_r{rev}.manifest.json"
        doc = json.loads(manifest.read_text())
        assert (doc["campaign_id"], doc["revision"]) == (int(cid), int(rev))
        for ext in ("json", "csv"):
            data = manifest.with_name(f"campaign_{cid}_r{rev}.{ext}").read_bytes()
            assert doc["files"][ext]["sha256"] == hashlib.sha256(data).hexdigest()
    assert not list(root.rglob("*.part"))  # nothing half-written

    # every step is a run in the local instance, visible in the UI afterwards
    with dg.DagsterInstance.from_config(str(cfi_home / "dagster")) as instance:
        runs = instance.get_runs()
        by_job: dict[str, list[dg.DagsterRun]] = {}
        for run in runs:
            by_job.setdefault(run.job_name, []).append(run)
            assert run.tags.get("cfi/trigger") == "demo"
        assert {j: len(r) for j, r in by_job.items()} == {
            "refresh_views": 1,
            "check_views": 1,
            "fallback_snapshots": 1,
            "campaign_export": 10,
        }
        for job in ("refresh_views", "check_views", "fallback_snapshots"):
            assert by_job[job][0].status == dg.DagsterRunStatus.SUCCESS
        export_status = {r.tags["dagster/partition"]: r.status for r in by_job["campaign_export"]}
        # a rejected campaign is a failed check, not a failed run: every export run succeeded
        assert set(export_status.values()) == {dg.DagsterRunStatus.SUCCESS}

    # right after a clean demo, every KPI the demo can measure is met (exit 0)
    by_name = _kpis(env, tmp_path)
    assert by_name["campaign export success"]["value"] == 1.0  # rejects are not export failures
    assert by_name["campaign export success"]["details"]["rejected"] == 4
    assert by_name["fallback success"]["status"] == "OK"  # the 4 snapshots count
    latency = by_name["SFTP export latency"]["value"]

    # a second demo sends nothing again: the latency KPI is not inflated by re-sends
    again = _cli(["demo"], env, tmp_path)
    assert again.returncode == 0, again.stdout[-3000:]
    assert again.stdout.count("(not sent again;") == 10
    again_by_name = _kpis(env, tmp_path)
    assert again_by_name["SFTP export latency"]["value"] == latency


class _Row:
    def __init__(self, status: str, error: str | None = None) -> None:
        self.status, self.error, self.manifest_path = status, error, "/T/m.manifest.json"


def test_exit_code_rule_is_precise_about_planted_campaigns() -> None:
    assert planted_defect("Invalide: missing budget") == "missing budget"
    assert planted_defect("Promo\x07 printemps") == "control character in the name"
    assert planted_defect("Campagne 1001") is None
    assert planted_defect("Invalide: something else") is None

    budget_error = "campaign 1 r1: /campaign: 'budget' is a required property"
    # a planted campaign must be rejected, and for its planted defect
    assert judge(1, 1, "Invalide: missing budget", _Row("rejected", budget_error), None).ok
    assert not judge(1, 1, "Invalide: missing budget", _Row("delivered"), True).ok
    assert not judge(
        1, 1, "Invalide: missing budget", _Row("rejected", "/campaign/name: bad"), None
    ).ok
    # any other campaign must be delivered, its manifest on the drop
    assert judge(2, 1, "Campagne 2", _Row("delivered"), True).ok
    assert not judge(2, 1, "Campagne 2", _Row("delivered"), False).ok
    assert not judge(2, 1, "Campagne 2", _Row("rejected", budget_error), None).ok
    assert not judge(2, 1, "Campagne 2", _Row("failed", "refused"), None).ok
    assert not judge(2, 1, "Campagne 2", None, None).ok
