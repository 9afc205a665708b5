"""`cfi-pipelines doctor` against real servers: PostgreSQL, OpenSSH sshd, the fake
CFI API and an HTTP receiver as webhook. One healthy deployment, then one broken
component at a time: its line names the variable to fix, the others stay OK."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from cfi_pipelines.cli import main
from cfi_pipelines.db import create_engine
from cfi_pipelines.model import mycfia
from cfi_pipelines.tenancy.roles import sync_tenants
from tests.fixtures.http import API_TOKEN, free_port

pytestmark = [pytest.mark.sshd]
GRANTS = Path(__file__).resolve().parents[2] / "deploy" / "sql" / "postgresql_readonly.sql"
CLI = Path(sys.executable).with_name("cfi-pipelines")


def _doctor(capsys, *args: str) -> tuple[int, dict[str, dict]]:
    code = main(["doctor", "--json", *args])
    out = json.loads(capsys.readouterr().out)
    return code, {c["component"]: c for c in out}


@pytest.fixture
def env(monkeypatch, tmp_path, sqlite_dbs, sshd, fake_api, http_receiver):
    """A healthy deployment on SQLite databases; returns a setter for one more variable."""
    drop = tmp_path / "drop"
    drop.mkdir()
    mycfia_url = f"sqlite:///{tmp_path / 'mycfia.db'}"
    engine = create_engine(mycfia_url)
    mycfia.metadata.create_all(engine)
    engine.dispose()
    values = {
        "CFI_SOURCE_URL": sqlite_dbs.source_url,
        "CFI_COMMON_URL": sqlite_dbs.common_url,
        "MYCFIA_URL": mycfia_url,
        "CFI_SFTP_HOST": "127.0.0.1",
        "CFI_SFTP_PORT": str(sshd.port),
        "CFI_SFTP_USER": sshd.user,
        "CFI_SFTP_KEY": str(sshd.client_key),
        "CFI_SFTP_KNOWN_HOSTS": str(sshd.known_hosts),
        "CFI_SFTP_DIR": str(drop),
        "CFI_API_URL": fake_api.url,
        "CFI_API_TOKEN": API_TOKEN,
        "CFI_ALERT_WEBHOOK_URL": http_receiver.url + "/hook",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return monkeypatch.setenv


def _only_failure(checks: dict[str, dict], component: str, variable: str) -> dict:
    failed = {k: c for k, c in checks.items() if c["status"] != "OK"}
    assert list(failed) == [component], failed
    line = failed[component]
    assert line["status"] == "FAIL" and line["variable"] == variable
    assert variable in line["detail"]
    return line


@pytest.mark.postgres
def test_healthy_on_postgres_every_line_ok_with_selftest(
    env, pg_dbs, capsys, http_receiver, tmp_path
):
    with pg_dbs.common.begin() as conn:
        conn.exec_driver_sql(GRANTS.read_text())
        conn.exec_driver_sql((GRANTS.parent / "postgresql_row_level_security.sql").read_text())
    sync_tenants(pg_dbs.source, pg_dbs.common, None)  # the refresh creates the tenant roles
    env("CFI_SOURCE_URL", pg_dbs.source_url)
    env("CFI_COMMON_URL", pg_dbs.common_url)
    code, checks = _doctor(capsys, "--selftest")
    assert code == 0, checks
    # this server runs without logical decoding: the capture line says so, as a warning
    capture = checks.pop("source:capture")
    assert capture["status"] == "WARN" and "pg_counters: wal_level is replica" in capture["detail"]
    assert "postgresql_logical_decoding.sql" in capture["detail"]
    assert all(c["status"] == "OK" for c in checks.values()), checks
    for component in (
        "cfi_source",
        "common",
        "common:readonly",
        "common:tenancy",
        "mycfia",
        "sftp",
        "cfi_api",
        "alert:webhook",
        "selftest:upsert",
        "selftest:swap",
        "selftest:cleanup",
    ):
        assert component in checks
    assert "COPY" in checks["selftest:bulk_load"]["detail"]
    assert http_receiver.requests == []  # nothing sent without --send-test-alert
    assert list((tmp_path / "drop").iterdir()) == []  # the probe file was removed


def test_healthy_through_the_installed_entry_point(env, tmp_path):
    proc = subprocess.run(
        [str(CLI), "doctor"], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    # databases (3), SFTP, CFI API, alerts, the source's change capture, tenancy
    assert len(lines) == 8 and all(line.startswith("OK ") for line in lines), lines
    assert any("source:capture" in line for line in lines)
    assert any("common:tenancy" in line and "reference reader" in line for line in lines)
    assert "Traceback" not in proc.stderr


def test_send_test_alert_goes_through_the_webhook(env, capsys, http_receiver):
    code, checks = _doctor(capsys, "--send-test-alert")
    assert code == 0
    assert checks["alert:webhook"]["status"] == "OK"
    assert len(http_receiver.requests) == 1
    assert http_receiver.requests[0].json()["title"] == "cfi-pipelines doctor: test alert"


def test_unparsable_db_url_fails_its_line_only(env, capsys):
    env("CFI_SOURCE_URL", "not a url")
    code, checks = _doctor(capsys)
    assert code == 1
    _only_failure(checks, "cfi_source", "CFI_SOURCE_URL")


@pytest.mark.postgres
def test_unreachable_db(env, capsys, postgres):
    env("MYCFIA_URL", f"postgresql+psycopg://u:p@127.0.0.1:{free_port()}/nope")
    code, checks = _doctor(capsys)
    assert code == 1
    assert "unreachable" in _only_failure(checks, "mycfia", "MYCFIA_URL")["detail"]


def test_missing_common_tables(env, capsys, tmp_path):
    empty = tmp_path / "empty_common.db"
    sa.create_engine(f"sqlite:///{empty}").connect().close()
    env("CFI_COMMON_URL", f"sqlite:///{empty}")
    code, checks = _doctor(capsys)
    assert code == 1
    detail = _only_failure(checks, "common", "CFI_COMMON_URL")["detail"]
    assert "cfi_view_status" in detail and "cfi_stocks" in detail


@pytest.mark.postgres
def test_readonly_role_without_select_fails(env, pg_dbs, capsys):
    with pg_dbs.common.begin() as conn:
        conn.exec_driver_sql(GRANTS.read_text())
        conn.exec_driver_sql("REVOKE SELECT ON cfi_invoices FROM mycfia_readonly")
    env("CFI_COMMON_URL", pg_dbs.common_url)
    code, checks = _doctor(capsys)
    assert code == 1
    line = checks["common:readonly"]
    assert line["status"] == "FAIL" and "lacks SELECT on cfi_invoices" in line["detail"]
    assert checks["common"]["status"] == "OK"


def test_sftp_host_key_unknown(env, capsys, tmp_path):
    known = tmp_path / "known_hosts_empty"
    known.write_text("# nothing\n")
    env("CFI_SFTP_KNOWN_HOSTS", str(known))
    code, checks = _doctor(capsys)
    assert code == 1
    assert "is not in" in _only_failure(checks, "sftp", "CFI_SFTP_KNOWN_HOSTS")["detail"]


def test_sftp_dir_not_writable(env, capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    env("CFI_SFTP_DIR", str(blocker / "drop"))  # under a regular file: nothing can be created
    code, checks = _doctor(capsys)
    assert code == 1
    assert "not writable" in _only_failure(checks, "sftp", "CFI_SFTP_DIR")["detail"]


def test_sftp_server_down(env, capsys):
    env("CFI_SFTP_PORT", str(free_port()))
    code, checks = _doctor(capsys)
    assert code == 1
    assert "cannot connect" in _only_failure(checks, "sftp", "CFI_SFTP_HOST")["detail"]


def test_local_dev_server_down_says_how_to_start_it(env, capsys, monkeypatch):
    for name in ("CFI_SFTP_HOST", "CFI_SFTP_USER", "CFI_SFTP_KEY", "CFI_SFTP_KNOWN_HOSTS"):
        monkeypatch.delenv(name)
    env("CFI_SFTP_PORT", str(free_port()))
    code, checks = _doctor(capsys)
    assert code == 1
    assert "cfi-pipelines sftp-server" in _only_failure(checks, "sftp", "CFI_SFTP_HOST")["detail"]


def test_api_token_refused(env, capsys):
    env("CFI_API_TOKEN", "wrong-token")
    code, checks = _doctor(capsys)
    assert code == 1
    assert "refused the token" in _only_failure(checks, "cfi_api", "CFI_API_TOKEN")["detail"]


def test_api_not_configured_is_a_warning(env, capsys, monkeypatch):
    monkeypatch.delenv("CFI_API_URL")
    code, checks = _doctor(capsys)
    assert code == 0
    assert checks["cfi_api"]["status"] == "WARN" and checks["cfi_api"]["variable"] == "CFI_API_URL"


def test_webhook_unreachable(env, capsys):
    env("CFI_ALERT_WEBHOOK_URL", f"http://127.0.0.1:{free_port()}/hook")
    code, checks = _doctor(capsys)
    assert code == 1
    _only_failure(checks, "alert:webhook", "CFI_ALERT_WEBHOOK_URL")


def test_no_alert_channel_means_logged_only(env, capsys, monkeypatch):
    monkeypatch.delenv("CFI_ALERT_WEBHOOK_URL")
    code, checks = _doctor(capsys)
    assert code == 0
    assert checks["alerts"]["status"] == "WARN" and "only logged" in checks["alerts"]["detail"]


def test_smtp_channel_ehlo(env, capsys, smtp_server, monkeypatch):
    monkeypatch.delenv("CFI_ALERT_WEBHOOK_URL")
    env("CFI_ALERT_SMTP_HOST", smtp_server.host)
    env("CFI_ALERT_SMTP_PORT", str(smtp_server.port))
    env("CFI_ALERT_SMTP_TO", "ops@example.com")
    code, checks = _doctor(capsys)
    assert code == 0, checks
    assert checks["alert:email"]["status"] == "OK"
    assert smtp_server.mailbox.messages == []


def test_sftp_key_missing_names_the_file_and_only_its_variable(env, capsys, tmp_path):
    env("CFI_SFTP_KEY", str(tmp_path / "no_such_key"))
    code, checks = _doctor(capsys)
    assert code == 1
    detail = _only_failure(checks, "sftp", "CFI_SFTP_KEY")["detail"]
    assert f"{tmp_path / 'no_such_key'}, which does not exist" in detail
    assert "CFI_SFTP_USER" not in detail and "FileNotFoundError" not in detail


def _readme_readonly_step() -> str:
    readme = (GRANTS.parents[2] / "README.md").read_text()
    section = readme.split("### PostgreSQL or SQL Server", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    steps = [line for line in block.splitlines() if "postgresql_readonly.sql" in line]
    assert steps, "the README's PostgreSQL steps never run deploy/sql/postgresql_readonly.sql"
    return steps[0]


@pytest.mark.postgres
def test_the_readmes_postgres_steps_give_a_passing_readonly_check(env, pg_dbs, capsys):
    import re

    step = _readme_readonly_step()
    superuser_url = pg_dbs.common_url.replace("postgresql+psycopg://", "postgresql://")
    # The README's placeholder URL (quoted) stands for this test's common DB.
    command = re.sub(r"'postgresql://[^']*'", f"'{superuser_url}'", step)
    assert command != step, step
    subprocess.run(command, shell=True, check=True, cwd=GRANTS.parents[2], capture_output=True)
    env("CFI_COMMON_URL", pg_dbs.common_url)
    code, checks = _doctor(capsys)
    assert checks["common:readonly"]["status"] == "OK", checks["common:readonly"]


@pytest.mark.postgres
def test_readonly_fail_says_what_to_run_and_where(env, pg_dbs, capsys):
    env("CFI_COMMON_URL", pg_dbs.common_url)
    code = main(["doctor"])
    out = capsys.readouterr().out
    assert code == 1
    line = next(x for x in out.splitlines() if "common:readonly" in x)
    assert "FAIL" in line and "psql" in line and "postgresql_readonly.sql" in line
    assert line.endswith("[fix: CFI_COMMON_URL]"), line


def test_a_renamed_source_column_is_named_not_reachable_and_in_place(env, capsys, sqlite_dbs):
    with sqlite_dbs.source.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE products RENAME COLUMN name TO label")
    code, checks = _doctor(capsys)
    assert code == 1
    detail = _only_failure(checks, "cfi_source", "CFI_SOURCE_URL")["detail"]
    assert "CFI's schema changed: products.name is missing (read by stocks)" in detail
    assert "tables in place" not in detail


def test_the_source_line_says_what_each_count_counts(sqlite_dbs):
    """Issue 16 item 15: seed writes 15 tables, the views read 14, the UI shows 12 cfi_source
    assets; doctor's line named only "14 tables in place"."""
    from cfi_pipelines.assets.sources import source_assets
    from cfi_pipelines.ops.doctor import check_database

    line = check_database("cfi_source", "CFI_SOURCE_URL", sqlite_dbs.source_url)[0]
    assert line.status == "OK", line
    assert (
        f"reachable, 15 of CFI's tables in place; the views read 14 of them and follow "
        f"{len(source_assets)} for changes (the cfi_source assets)"
    ) in line.detail
    assert len(source_assets) == 12
