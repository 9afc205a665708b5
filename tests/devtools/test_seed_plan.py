"""`cfi-pipelines seed` never wipes a database that holds data unless told to for it (issue 16
item 2): run as documented (no CFI_HOME: ./.cfi), CFI's source and common DBs on PostgreSQL,
MyCfia's DB left at its default and holding export history."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from cfi_pipelines.db import create_engine, redact
from cfi_pipelines.model import mycfia

pytestmark = pytest.mark.postgres

CLI = str(Path(sys.executable).with_name("cfi-pipelines"))


def _seed(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CLI, "seed", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )


def _history(url: str) -> tuple[int, int]:
    """(campaigns, exports) in MyCfia's DB."""
    with create_engine(url).connect() as conn:
        count = lambda t: conn.scalar(sa.select(sa.func.count()).select_from(t))  # noqa: E731
        return count(mycfia.campaigns), count(mycfia.campaign_exports)


def _tables(url: str) -> list[str]:
    engine = create_engine(url)
    try:
        return sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()


def test_seed_refuses_to_wipe_mycfia_history_and_seeds_only_what_it_is_told(
    tmp_path, monkeypatch, postgres
):
    monkeypatch.delenv("CFI_HOME")
    env = {k: v for k, v in os.environ.items() if k != "CFI_HOME"}
    first = _seed(env=env, cwd=tmp_path)  # a fresh machine: everything is empty, nothing asked
    assert first.returncode == 0, first.stderr
    mycfia_url = f"sqlite:///{tmp_path}/.cfi/mycfia.db"
    with create_engine(mycfia_url).begin() as conn:  # MyCfia delivered one export since
        now = datetime(2026, 1, 1)
        conn.execute(
            mycfia.campaign_exports.insert().values(
                campaign_id=1001, revision=1, status="delivered", attempts=1,
                requested_at=now, delivered_at=now, updated_at=now,
            )
        )  # fmt: skip
    before = _history(mycfia_url)
    assert before[1] == 1

    env["CFI_SOURCE_URL"] = postgres.create_database("seed_plan_src")
    env["CFI_COMMON_URL"] = postgres.create_database("seed_plan_common")
    refused = _seed(env=env, cwd=tmp_path)
    assert refused.returncode == 1
    out = refused.stdout + refused.stderr
    assert "Traceback" not in out
    # one line per database: its URL (no password) and what it holds
    assert f"MyCfia DB ({mycfia_url}): 13 campaigns, 1 export (1 delivered)" in out, out
    assert f"CFI source DB ({redact(env['CFI_SOURCE_URL'])}): empty" in out, out
    assert "--only mycfia" in refused.stderr and "--force" in refused.stderr, refused.stderr
    # and the exact way to seed only the empty ones
    assert "seed only the others with --only source --only common" in refused.stderr
    assert _history(mycfia_url) == before
    assert _tables(env["CFI_SOURCE_URL"]) == []  # nothing half-written: the source untouched too

    some = _seed("--only", "source", "--only", "common", env=env, cwd=tmp_path)
    assert some.returncode == 0, some.stderr
    assert "15 tables: tenants 21," in some.stdout and "stock_levels 9984" in some.stdout
    assert "MyCfia" not in some.stdout
    assert _history(mycfia_url) == before  # MyCfia's history kept
    assert "stock_levels" in _tables(env["CFI_SOURCE_URL"])
    assert "cfi_view_status" in _tables(env["CFI_COMMON_URL"])

    again = _seed("--only", "source", env=env, cwd=tmp_path)  # told: replaced, and said so
    assert again.returncode == 0, again.stderr
    assert "CFI source DB (postgresql+psycopg://" in again.stdout
    assert "replacing" in again.stdout and "21 tenants" in again.stdout, again.stdout

    mine = _seed("--only", "mycfia", env=env, cwd=tmp_path)
    assert mine.returncode == 0, mine.stderr
    assert f"MyCfia DB ({mycfia_url}): 13 campaigns, 1 export (1 delivered)" in mine.stdout
    assert _history(mycfia_url) == (13, 0)

    forced = _seed("--force", env=env, cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.count("replacing") == 2  # source and MyCfia; common is never dropped


def test_seed_mycfia_alone_needs_a_seeded_source(tmp_path, monkeypatch):
    env = {**os.environ}
    proc = _seed("--only", "mycfia", env=env, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and "--only source" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
