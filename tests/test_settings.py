"""Configuration errors name the variable, say what is wrong and what to do; never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cfi_pipelines.exports.sftp_client import AuthError, EmbeddedServerDown, HostKeyError
from cfi_pipelines.resources.sftp import sftp_resource
from cfi_pipelines.settings import ConfigError, get_settings
from tests.fixtures.http import free_port

CLI = Path(sys.executable).with_name("cfi-pipelines")


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("CFI_COMMON_URL", "notaurl", "CFI_COMMON_URL is not a SQLAlchemy URL"),
        ("CFI_SFTP_PORT", "abc", "CFI_SFTP_PORT='abc' is not a whole number"),
        ("CFI_EXPORT_RETRY_DELAY", "-1", "CFI_EXPORT_RETRY_DELAY='-1' is negative"),
        ("CFI_ENV", "staging", "CFI_ENV='staging': use 'local' or 'production'"),
    ],
)
def test_a_bad_value_names_its_variable(cfi_home, monkeypatch, tmp_path, name, value, says):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=says.replace("(", r"\(").replace("'", "'")):
        get_settings()
    proc = subprocess.run([str(CLI), "status"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and says in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_production_without_a_key_or_known_hosts_says_which_variable(
    cfi_home, monkeypatch, tmp_path
):
    monkeypatch.setenv("CFI_SFTP_HOST", "127.0.0.1")
    monkeypatch.setenv("CFI_SFTP_PORT", str(free_port()))
    s = get_settings()
    assert s.environment == "production"
    with pytest.raises(AuthError, match="CFI_SFTP_KEY is not set"):
        sftp_resource(s).open()
    key = tmp_path / "id"
    key.write_text("not a key")
    monkeypatch.setenv("CFI_SFTP_KEY", str(key))
    monkeypatch.setenv("CFI_SFTP_KNOWN_HOSTS", str(tmp_path / "missing_known_hosts"))
    res = sftp_resource(get_settings()).model_copy(update={"private_key": str(key)})
    with pytest.raises(AuthError, match=r"CFI_SFTP_KEY\) cannot be loaded"):
        res.open()


def test_missing_known_hosts_names_the_variable(cfi_home, monkeypatch, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = tmp_path / "id_ed25519"
    key.write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    monkeypatch.setenv("CFI_SFTP_HOST", "127.0.0.1")
    monkeypatch.setenv("CFI_SFTP_KNOWN_HOSTS", str(tmp_path / "missing_known_hosts"))
    res = sftp_resource(get_settings()).model_copy(update={"private_key": str(key)})
    with pytest.raises(HostKeyError, match="Set CFI_SFTP_KNOWN_HOSTS"):
        res.open()


def test_the_embedded_server_not_running_says_how_to_start_it(cfi_home, monkeypatch):
    monkeypatch.setenv("CFI_SFTP_PORT", str(free_port()))
    s = get_settings()
    assert s.environment == "local"
    with pytest.raises(EmbeddedServerDown, match="cfi-pipelines sftp-server"):
        sftp_resource(s).open()  # no keys yet: never created by a mere load
    (s.dev_sftp_dir).mkdir(parents=True)
    (s.dev_sftp_dir / "client_ed25519").write_text("x")
    with pytest.raises(EmbeddedServerDown, match="not running on 127.0.0.1"):
        sftp_resource(s).model_copy(update={"private_key": _real_key(s.dev_sftp_dir)}).open()


def _real_key(base: Path) -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    path = base / "client_ed25519"
    path.write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    (base / "known_hosts").write_text("")
    return str(path)


def test_children_get_every_default_path_and_url_absolute(monkeypatch, tmp_path):
    """Issue 16 item 1: `dev` starts Dagster in another directory; `./.cfi`, a relative SQLite
    URL or a relative key path must name the same files there as in the parent."""
    from cfi_pipelines.settings import child_environment

    monkeypatch.delenv("CFI_HOME")  # the documented default, ./.cfi
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MYCFIA_URL", "sqlite:///data/mycfia.db")
    monkeypatch.setenv("CFI_COMMON_URL", "sqlite+pysqlite:///./common.db?timeout=5")
    monkeypatch.setenv("CFI_SOURCE_URL", "postgresql+psycopg://u:p%40ss@db:5432/cfi")
    monkeypatch.setenv("CFI_SFTP_KEY", "keys/id_ed25519")
    monkeypatch.setenv("CFI_SFTP_KNOWN_HOSTS", "~/known_hosts")
    monkeypatch.setenv("DAGSTER_HOME", "inst")
    env = child_environment(EXTRA="1")
    assert env["CFI_HOME"] == str(tmp_path / ".cfi")
    assert env["MYCFIA_URL"] == f"sqlite:///{tmp_path}/data/mycfia.db"
    assert env["CFI_COMMON_URL"] == f"sqlite+pysqlite:///{tmp_path}/common.db?timeout=5"
    assert env["CFI_SOURCE_URL"] == "postgresql+psycopg://u:p%40ss@db:5432/cfi"  # untouched
    assert env["CFI_SFTP_KEY"] == str(tmp_path / "keys" / "id_ed25519")
    assert env["CFI_SFTP_KNOWN_HOSTS"] == str(Path.home() / "known_hosts")
    assert env["DAGSTER_HOME"] == str(tmp_path / "inst")
    assert env["EXTRA"] == "1"
    # the settings a child reads from that environment, in another directory, are the parent's
    parent = get_settings()
    monkeypatch.chdir(tmp_path.parent)
    for name, value in env.items():
        if name.startswith(("CFI_", "MYCFIA_", "DAGSTER_")):
            monkeypatch.setenv(name, value)
    child = get_settings()
    assert (child.home, child.mycfia_url, child.common_url) == (
        parent.home,
        parent.mycfia_url,
        parent.common_url,
    )
    assert child.dagster_home == parent.dagster_home == tmp_path / "inst"


def test_key_text_and_memory_urls_are_passed_on_as_they_are(monkeypatch, tmp_path):
    from cfi_pipelines.settings import child_environment

    monkeypatch.chdir(tmp_path)
    key = "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----\n"
    monkeypatch.setenv("CFI_SFTP_KEY", key)
    monkeypatch.setenv("MYCFIA_URL", "sqlite://")
    monkeypatch.setenv("CFI_COMMON_URL", "sqlite:///:memory:")
    env = child_environment()
    assert env["CFI_SFTP_KEY"] == key
    assert (env["MYCFIA_URL"], env["CFI_COMMON_URL"]) == ("sqlite://", "sqlite:///:memory:")
