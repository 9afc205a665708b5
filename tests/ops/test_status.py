"""``cfi-pipelines status`` answers "which campaign?", in one time format, errors whole."""

from __future__ import annotations

import json
import re
from pathlib import Path

from cfi_pipelines.cli import main as cli_main
from cfi_pipelines.db import create_engine, write_transaction
from cfi_pipelines.exports.records import record_export
from cfi_pipelines.model import mycfia
from cfi_pipelines.ops.status import collect_status, format_status
from cfi_pipelines.views.refresh import refresh_view
from cfi_pipelines.views.spec import VIEWS
from tests.fixtures.common import Databases

LONG_ERROR = (
    "campaign 7 r1 to cfi@sftp.cfi.example:22, attempt 4/4: TimeoutError: timed out. "
    "The SFTP server sftp.cfi.example:22 was unreachable or dropped the connection on every "
    "attempt: check that it is up and reachable from Dagster (host, port, firewall), then "
    "`cfi-pipelines export 7 --force`."
)
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def _exports(cfi_home: Path) -> None:
    engine = create_engine(f"sqlite:///{cfi_home}/mycfia.db")
    mycfia.metadata.create_all(engine)
    with write_transaction(engine) as conn:
        record_export(
            conn, 5, 1, status="delivered", manifest_path="/T/campaign_5_r1.manifest.json"
        )
        record_export(conn, 6, 2, status="pending")
        record_export(conn, 7, 1, status="failed", error=LONG_ERROR)
        record_export(conn, 8, 3, status="rejected", error="/targets/1/email: not an e-mail")
    engine.dispose()


def _timestamps(value, key=""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _timestamps(v, k)
    elif isinstance(value, list):
        for v in value:
            yield from _timestamps(v, key)
    elif key.endswith("_at") and value is not None:
        yield key, value


def test_status_names_the_campaigns_with_whole_errors(sqlite_dbs: Databases, cfi_home: Path):
    for spec in VIEWS:
        refresh_view(spec, sqlite_dbs.source, sqlite_dbs.common)
    _exports(cfi_home)
    st = collect_status()
    ids = {k: [(c["campaign_id"], c["revision"]) for c in v] for k, v in st["campaigns"].items()}
    assert ids == {"failed": [(7, 1)], "pending": [(6, 2)], "rejected": [(8, 3)]}
    assert st["campaigns"]["failed"][0]["error"] == LONG_ERROR  # never cut mid-string
    assert st["exit_code"] == 2  # a failed delivery is an incident
    stamps = dict(_timestamps(st))
    assert stamps and all(ISO_Z.match(v) for v in stamps.values()), stamps
    text = "\n".join(format_status(st))
    assert "failed: 7 r1" in text and "pending: 6 r2" in text and "rejected: 8 r3" in text
    assert "`cfi-pipelines export 7 --force`." in text
    # how changes are found, and what that proves, in one line
    assert st["capture"]["mode"] == "sqlite_data_version" and not st["capture"]["exact"]
    assert "capture: sqlite_data_version (embedded SQLite" in text and "updated_at" in text


def test_status_json_through_the_cli(sqlite_dbs: Databases, cfi_home: Path, capsys):
    _exports(cfi_home)
    assert cli_main(["status", "--json"]) == 2
    st = json.loads(capsys.readouterr().out)
    assert st["campaigns"]["failed"][0]["campaign_id"] == 7
    assert ISO_Z.match(st["generated_at"])


def test_status_counts_and_lists_only_each_campaign_latest_revision(cfi_home: Path):
    engine = create_engine(f"sqlite:///{cfi_home}/mycfia.db")
    mycfia.metadata.create_all(engine)
    with write_transaction(engine) as conn:
        record_export(conn, 1, 1, status="failed", error="r1 failed")
        record_export(conn, 1, 2, status="delivered")  # the fix was delivered
        record_export(conn, 2, 1, status="delivered")
        record_export(conn, 2, 3, status="pending")
        record_export(conn, 3, 2, status="rejected", error="/budget: required")
        record_export(conn, 4, 1, status="failed", error=LONG_ERROR)
    engine.dispose()
    st = collect_status()
    assert st["exports"] == {"delivered": 1, "pending": 1, "rejected": 1, "failed": 1}
    ids = {k: [(c["campaign_id"], c["revision"]) for c in v] for k, v in st["campaigns"].items()}
    assert ids == {"failed": [(4, 1)], "pending": [(2, 3)], "rejected": [(3, 2)]}


def test_status_lists_rejected_campaigns_with_their_errors(cfi_home: Path):
    engine = create_engine(f"sqlite:///{cfi_home}/mycfia.db")
    mycfia.metadata.create_all(engine)
    errors = "/targets/1/email: not an e-mail\n/targets/4/phone: too long"
    with write_transaction(engine) as conn:
        record_export(conn, 8, 3, status="rejected", error=errors)
    engine.dispose()
    lines = format_status(collect_status())
    at = lines.index("  rejected: 8 r3")
    assert lines[at + 1 : at + 4] == [
        "    8 r3:",
        "      /targets/1/email: not an e-mail",
        "      /targets/4/phone: too long",
    ], lines
