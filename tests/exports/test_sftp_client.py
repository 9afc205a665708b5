"""The SFTP client and atomic delivery against a real OpenSSH sshd on loopback."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import paramiko
import pytest

from cfi_pipelines.db import create_engine
from cfi_pipelines.devtools.seed_mycfia import add_campaign, default_targets
from cfi_pipelines.devtools.sftp_server import DevSFTPServer
from cfi_pipelines.exports import build_export, deliver
from cfi_pipelines.exports.delivery import BUG, PERMANENT, TRANSIENT, classify_error
from cfi_pipelines.exports.errors import DeliveryError
from cfi_pipelines.exports.sftp_client import (
    LARGE_WRITE_SIZE,
    SAFE_WRITE_SIZE,
    AuthError,
    AuthInterrupted,
    HostKeyError,
    load_known_hosts,
    load_private_key,
    server_write_limit,
)
from cfi_pipelines.model import mycfia
from cfi_pipelines.resources.sftp import SFTPResource

pytestmark = pytest.mark.sshd


def resource(server, drop: Path, **over) -> SFTPResource:
    config = {
        "host": "127.0.0.1",
        "port": server.port,
        "username": server.user,
        "private_key": str(server.client_key),
        "known_hosts": str(server.known_hosts),
        "remote_dir": str(drop),
        "connect_timeout": 5.0,
        "io_timeout": 10.0,
    }
    config.update(over)
    return SFTPResource(**config)


@pytest.fixture
def bundle(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'mycfia.db'}")
    mycfia.metadata.create_all(engine)
    with engine.begin() as conn:
        add_campaign(conn, 5, tenant_code="T007", revision=2, targets=default_targets(3000))
        result = build_export(conn, 5, tmp_path / "outbox")
    engine.dispose()
    assert result.valid
    return result


def test_delivery_layout_and_content(sshd, tmp_path, bundle):
    drop = tmp_path / "drop" / "nested"  # remote dirs are created as needed
    with resource(sshd, drop).connect() as sftp:
        delivery = deliver(sftp, bundle, str(drop))
    folder = drop / "T007"
    assert sorted(p.name for p in folder.iterdir()) == [
        "campaign_5_r2.csv",
        "campaign_5_r2.json",
        "campaign_5_r2.manifest.json",
    ]
    manifest = json.loads((folder / "campaign_5_r2.manifest.json").read_text())
    for kind in ("json", "csv"):
        data = (folder / manifest["files"][kind]["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == manifest["files"][kind]["sha256"]
    assert delivery.remote_paths["manifest"] == f"{drop}/T007/campaign_5_r2.manifest.json"
    assert delivery.bytes == sum(p.stat().st_size for p in folder.iterdir())


def test_redelivery_replaces_atomically_without_duplicates(sshd, tmp_path, bundle):
    drop = tmp_path / "drop"
    res = resource(sshd, drop)
    with res.connect() as sftp:
        deliver(sftp, bundle, str(drop))
        first = {p.name: p.read_bytes() for p in (drop / "T007").iterdir()}
        # A killed earlier upload left a .part behind: it is overwritten, then renamed away.
        (drop / "T007" / "campaign_5_r2.csv.part").write_bytes(b"garbage")
        deliver(sftp, bundle, str(drop))
    second = {p.name: p.read_bytes() for p in (drop / "T007").iterdir()}
    assert second == first


def test_key_given_as_text_and_ecdsa_keys(sshd, tmp_path, ssh_keys, bundle):
    text = Path(sshd.client_key).read_text()
    drop = tmp_path / "drop"
    with resource(sshd, drop, private_key=text).connect() as sftp:
        assert sftp.listdir(str(tmp_path)) is not None
    assert isinstance(load_private_key(str(ssh_keys["client_ecdsa"])), paramiko.ECDSAKey)


def test_unknown_host_key_refused_with_fingerprint(sshd, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("# nothing here\n")
    with pytest.raises(HostKeyError) as info:
        resource(sshd, tmp_path, known_hosts=str(empty)).open()
    message = str(info.value)
    fingerprint = paramiko.PKey.from_path(sshd.host_key).fingerprint
    assert f"[127.0.0.1]:{sshd.port} is not in {empty}" in message
    assert f"ssh-ed25519 key {fingerprint}" in message


def test_changed_host_key_refused(sshd, tmp_path, ssh_keys):
    other = Path(str(ssh_keys["other_host"]) + ".pub").read_text().split()
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {other[0]} {other[1]}\n")
    with pytest.raises(HostKeyError, match="has CHANGED"):
        resource(sshd, tmp_path, known_hosts=str(known)).open()


def test_revoked_line_does_not_crash_and_revokes(sshd, tmp_path):
    real = Path(str(sshd.host_key) + ".pub").read_text().split()
    known = tmp_path / "known_hosts"
    known.write_text(
        f"@cert-authority *.example.com {real[0]} {real[1]}\n"
        "garbage line\n"
        f"[127.0.0.1]:{sshd.port} {real[0]} {real[1]}\n"
        f"@revoked [127.0.0.1]:{sshd.port} {real[0]} {real[1]}\n"
    )
    with pytest.raises(
        paramiko.hostkeys.InvalidHostKey
    ):  # what paramiko's own loader does with such a file
        paramiko.HostKeys(str(known))
    assert len(load_known_hosts(known).revoked) == 1
    with pytest.raises(HostKeyError, match="REVOKED"):
        resource(sshd, tmp_path, known_hosts=str(known)).open()


def test_hashed_known_hosts_entry_accepted(sshd, tmp_path):
    real = Path(str(sshd.host_key) + ".pub").read_text().split()
    hashed = paramiko.HostKeys.hash_host(f"[127.0.0.1]:{sshd.port}")
    known = tmp_path / "known_hosts"
    known.write_text(f"{hashed} {real[0]} {real[1]}\n")
    with resource(sshd, tmp_path, known_hosts=str(known)).connect() as sftp:
        assert sftp.stat(str(tmp_path)).st_mode


def test_wrong_client_key_refused(sshd, tmp_path, ssh_keys):
    with pytest.raises(AuthError, match="refused the key ssh-ed25519"):
        resource(sshd, tmp_path, private_key=str(ssh_keys["stranger"])).open()


def _via_proxy(sshd, proxy, tmp_path, drop: Path, **over) -> SFTPResource:
    # known_hosts names the proxy's port: same server key, different "[host]:port".
    real = Path(str(sshd.host_key) + ".pub").read_text().split()
    kh = tmp_path / f"kh_{proxy.port}"
    kh.write_text(f"[127.0.0.1]:{proxy.port} {real[0]} {real[1]}\n")
    return resource(sshd, drop, port=proxy.port, known_hosts=str(kh), **over)


def test_connection_cut_during_authentication_is_transient(sshd, cut_proxy, tmp_path, ssh_keys):
    # ~1,400 client bytes: past the key exchange (host key verified), inside userauth,
    # where paramiko says AuthenticationException("... transport shut down or saw EOF").
    proxy = cut_proxy(sshd.port, cut_after=1_400)
    res = _via_proxy(sshd, proxy, tmp_path, tmp_path)
    with pytest.raises(AuthInterrupted, match="lost during authentication") as info:
        res.open()
    assert proxy.cut_count == 1
    assert "transport shut down or saw EOF" in str(info.value)
    assert not isinstance(info.value, AuthError)
    assert classify_error(info.value) == TRANSIENT
    # paramiko's own exception for it, should it escape elsewhere, is transient too
    assert classify_error(info.value.__cause__) == TRANSIENT
    with res.connect() as sftp:  # the retry, through the same proxy, goes through
        assert sftp.stat(str(tmp_path)).st_mode
    # ... while a live server that refuses the key is still permanent, through the proxy too
    refused = _via_proxy(sshd, proxy, tmp_path, tmp_path, private_key=str(ssh_keys["stranger"]))
    with pytest.raises(AuthError, match="refused the key") as info:
        refused.open()
    assert classify_error(info.value) == PERMANENT


def test_unreadable_key_is_an_auth_error_that_hides_the_value(sshd, tmp_path):
    secret = (
        "-----BEGIN OPENSSH PRIVATE KEY-----\nnot-a-key-SECRET\n-----END OPENSSH PRIVATE KEY-----"
    )
    with pytest.raises(AuthError) as info:
        resource(sshd, tmp_path, private_key=secret).open()
    assert "SECRET" not in str(info.value)


def test_server_down_is_a_transient_os_error(sshd_factory, tmp_path):
    server = sshd_factory()  # never started: nothing listens on its port
    with pytest.raises(ConnectionRefusedError):
        resource(server, tmp_path).open()


def test_connection_cut_mid_upload_leaves_no_final_file(sshd, cut_proxy, tmp_path, bundle):
    proxy = cut_proxy(sshd.port, cut_after=60_000)
    drop = tmp_path / "drop"
    # known_hosts names the proxy's port: same server key, different "[host]:port".
    real = Path(str(sshd.host_key) + ".pub").read_text().split()
    (tmp_path / "kh").write_text(f"[127.0.0.1]:{proxy.port} {real[0]} {real[1]}\n")
    res = resource(sshd, drop, port=proxy.port, known_hosts=str(tmp_path / "kh"))
    with pytest.raises((OSError, EOFError, paramiko.SSHException)), res.connect() as sftp:
        deliver(sftp, bundle, str(drop))
    assert proxy.cut_count == 1
    finals = [p.name for p in drop.rglob("*") if not p.name.endswith(".part") and p.is_file()]
    assert "campaign_5_r2.csv" not in finals and "campaign_5_r2.manifest.json" not in finals
    with res.connect() as sftp:  # the retry goes through
        deliver(sftp, bundle, str(drop))
    names = sorted(p.name for p in (drop / "T007").iterdir())
    assert names == ["campaign_5_r2.csv", "campaign_5_r2.json", "campaign_5_r2.manifest.json"]


def test_write_size_is_negotiated_large_with_openssh(sshd, tmp_path, bundle):
    with resource(sshd, tmp_path).session() as conn:
        # OpenSSH announces its limit (limits@openssh.com): 256 KiB messages less headers
        assert server_write_limit(conn.sftp) == 261_120
        assert conn.write_size == LARGE_WRITE_SIZE
        drop = tmp_path / "drop"
        deliver(conn.sftp, bundle, str(drop), conn.write_size)  # 255,000-byte writes land whole
    csv = drop / "T007" / "campaign_5_r2.csv"
    assert csv.stat().st_size > LARGE_WRITE_SIZE
    assert csv.read_bytes() == bundle.local_path("csv").read_bytes()
    with resource(sshd, tmp_path, write_size=SAFE_WRITE_SIZE).session() as conn:
        assert conn.write_size == SAFE_WRITE_SIZE  # configured: used as given
    with resource(sshd, tmp_path, write_size=1_000_000).session() as conn:
        assert conn.write_size == 261_120  # ... but never above what the server takes


def test_write_size_stays_safe_with_other_servers(tmp_path, monkeypatch):
    monkeypatch.setenv("CFI_HOME", str(tmp_path))
    server = DevSFTPServer(port=0)  # paramiko's server: no limits extension, not OpenSSH
    try:
        with server.resource().session() as conn:
            assert not conn.transport.remote_version.startswith("SSH-2.0-OpenSSH")
            assert server_write_limit(conn.sftp) is None
            assert conn.write_size == SAFE_WRITE_SIZE
    finally:
        server.stop()


KEY = paramiko.ECDSAKey.generate()


@pytest.mark.parametrize(
    "exc, kind",
    [
        (ConnectionRefusedError(111, "Connection refused"), TRANSIENT),
        (ConnectionResetError(104, "reset"), TRANSIENT),
        (TimeoutError("timed out"), TRANSIENT),  # socket.timeout is TimeoutError
        (EOFError(), TRANSIENT),
        (paramiko.SSHException("Server connection dropped: "), TRANSIENT),
        (paramiko.SSHException("Error reading SSH protocol banner"), TRANSIENT),
        (OSError("Failure"), TRANSIENT),  # SFTP "Failure": e.g. server disk full
        (DeliveryError("uploaded 10 bytes, expected 20"), TRANSIENT),
        (paramiko.SSHException("Incompatible ssh peer (no acceptable kex algorithm)"), PERMANENT),
        (paramiko.AuthenticationException("Authentication failed."), PERMANENT),
        (paramiko.BadAuthenticationType("Bad authentication type", ["password"]), PERMANENT),
        (
            paramiko.AuthenticationException(
                "Authentication failed: transport shut down or saw EOF"
            ),
            TRANSIENT,
        ),
        (paramiko.AuthenticationException("Authentication timeout."), TRANSIENT),
        (AuthInterrupted("lost during authentication"), TRANSIENT),
        (paramiko.BadHostKeyException("h", KEY, KEY), PERMANENT),
        (AuthError("refused the key"), PERMANENT),
        (HostKeyError("has CHANGED"), PERMANENT),
        (PermissionError(13, "Permission denied"), PERMANENT),
        (KeyError("csv"), BUG),
        (TypeError("unexpected keyword"), BUG),
        (AttributeError("x"), BUG),
        (ValueError("no valid export"), BUG),
    ],
)
def test_delivery_errors_are_classified(exc, kind):
    assert classify_error(exc) == kind


def _keygen(path: Path, *args: str) -> Path:
    import subprocess

    subprocess.run(["ssh-keygen", "-q", *args, "-f", str(path)], check=True)
    return path


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda d: d / "absent", "does not exist"),
        (lambda d: d, "is a directory, not a key file"),
        (
            lambda d: Path(str(_keygen(d / "id", "-t", "ed25519", "-N", "")) + ".pub"),
            "is a public key",
        ),
        (lambda d: _keygen(d / "id", "-t", "ed25519", "-N", "secret1"), "is encrypted"),
        (
            lambda d: _keygen(d / "id", "-t", "rsa", "-b", "2048", "-m", "PEM", "-N", "secret1"),
            "is encrypted",
        ),
        (lambda d: (d / "id").write_text("hello\n") and d / "id", "is not a private key"),
    ],
    ids=["missing", "directory", "public", "encrypted-openssh", "encrypted-pem", "garbage"],
)
def test_key_errors_name_the_file_the_reason_and_the_variable(tmp_path, make, reason):
    path = make(tmp_path)
    with pytest.raises(AuthError) as info:
        load_private_key(str(path))
    message = str(info.value)
    assert str(path) in message and reason in message, message
    assert "CFI_SFTP_KEY" in message and "CFI_SFTP_USER" not in message
    assert "Error" not in message  # the reason, not an exception's name


def test_key_given_as_text_that_is_not_a_key_says_so_without_echoing_it():
    text = (
        "-----BEGIN OPENSSH PRIVATE KEY-----\nc2VjcmV0LXN0dWZm\n-----END OPENSSH PRIVATE KEY-----"
    )
    with pytest.raises(AuthError) as info:
        load_private_key(text)
    message = str(info.value)
    assert "the key text in CFI_SFTP_KEY" in message and "c2VjcmV0" not in message


def test_wrong_passphrase_is_named(tmp_path):
    path = _keygen(tmp_path / "id", "-t", "ed25519", "-N", "secret1")
    with pytest.raises(AuthError, match="the passphrase does not decrypt it"):
        load_private_key(str(path), "wrong")
    assert load_private_key(str(path), "secret1").get_name() == "ssh-ed25519"
