"""The embedded dev SFTP server, reached through the production client code path."""

from __future__ import annotations

import pytest

from cfi_pipelines.db import create_engine
from cfi_pipelines.devtools.seed_mycfia import add_campaign
from cfi_pipelines.devtools.sftp_server import DevSFTPServer, dev_sftp_resource
from cfi_pipelines.exports import build_export, deliver
from cfi_pipelines.exports.sftp_client import AuthError, HostKeyError
from cfi_pipelines.model import mycfia


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("CFI_HOME", str(tmp_path / "home"))
    srv = DevSFTPServer(port=0)
    yield srv
    srv.stop()


def test_delivers_through_the_same_client(server, tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'm.db'}")
    mycfia.metadata.create_all(engine)
    with engine.begin() as conn:
        add_campaign(conn, 3, tenant_code="T001")
        bundle = build_export(conn, 3, tmp_path / "outbox")
    res = server.resource()
    for _ in range(2):  # the second time replaces the files atomically (posix-rename)
        with res.connect() as sftp:
            deliver(sftp, bundle, res.remote_dir)
    files = sorted(p.name for p in (server.paths.root / "T001").iterdir())
    assert files == ["campaign_3_r1.csv", "campaign_3_r1.json", "campaign_3_r1.manifest.json"]
    assert (server.paths.root / "T001" / "campaign_3_r1.csv").read_bytes() == bundle.local_path(
        "csv"
    ).read_bytes()


def test_paths_cannot_escape_the_root(server):
    with server.resource().connect() as sftp:
        sftp.mkdir("/../../escape")
    assert (server.paths.root / "escape").is_dir()
    assert not (server.paths.root.parent / "escape").exists()


def test_keys_are_stable_and_resource_matches(server):
    res = dev_sftp_resource(server.port)
    assert res.known_hosts == str(server.paths.known_hosts)
    first = server.paths.host_key.read_bytes()
    dev_sftp_resource(server.port)
    assert server.paths.host_key.read_bytes() == first  # generated once


def test_wrong_key_and_wrong_host_key_refused(server, tmp_path):
    from cfi_pipelines.devtools.sftp_server import _write_key

    _write_key(tmp_path / "other")
    with pytest.raises(AuthError):
        server.resource().model_copy(update={"private_key": str(tmp_path / "other")}).open()
    (tmp_path / "kh").write_text("")
    with pytest.raises(HostKeyError):
        server.resource().model_copy(update={"known_hosts": str(tmp_path / "kh")}).open()


@pytest.mark.parametrize("command", [["sftp-server"], ["demo"], ["dev", "--api-port", "0"]])
def test_a_taken_port_is_named_with_its_variable(tmp_path, command):
    """Issue 16 item 10: `demo` exited 1 without a word when its SFTP port was taken."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.create_server(("127.0.0.1", 0)) as taken:  # another dev server, say
        port = taken.getsockname()[1]
        env = {**os.environ, "CFI_SFTP_PORT": str(port), "CFI_AUTOMATION": "off"}
        proc = subprocess.run(
            [str(Path(sys.executable).with_name("cfi-pipelines")), *command],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"port {port}" in last and "CFI_SFTP_PORT" in last, (
        proc.stdout[-2000:] + proc.stderr[-2000:]
    )
    assert "Traceback" not in proc.stderr
    if command == ["sftp-server"]:
        assert "--port" in last
