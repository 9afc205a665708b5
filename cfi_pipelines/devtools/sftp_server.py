"""Embedded development SFTP server: a real SSH/SFTP server (paramiko) on 127.0.0.1.

Used when ``CFI_SFTP_HOST`` is unset. Its state lives in ``CFI_HOME/sftp``:
``host_ed25519`` (server key), ``client_ed25519`` (the client's key),
``known_hosts`` (written for the client) and ``root/`` (what clients see as ``/``).
The export assets reach it through the very same :class:`SFTPResource` code path
as CFI's production server: key auth, host-key verification, posix-rename.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import posixpath
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from cfi_pipelines.resources.sftp import SFTPResource
from cfi_pipelines.settings import DEV_SFTP_PORT, DEV_SFTP_USER, ConfigError, get_settings

log = logging.getLogger(__name__)

DEFAULT_DEV_PORT = DEV_SFTP_PORT
DEV_USER = DEV_SFTP_USER


@dataclass(frozen=True)
class DevPaths:
    """Files of the dev server under ``CFI_HOME/sftp``."""

    base: Path

    @property
    def host_key(self) -> Path:
        return self.base / "host_ed25519"

    @property
    def client_key(self) -> Path:
        return self.base / "client_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.base / "known_hosts"

    @property
    def root(self) -> Path:
        return self.base / "root"


def dev_port() -> int:
    """``CFI_SFTP_PORT`` when set to something else than 22, else 2222."""
    return get_settings().dev_sftp_port


def _write_key(path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # two processes racing both end with a whole key


def ensure_dev_keys(port: int | None = None, base: Path | None = None) -> DevPaths:
    """Create the keys (once), the root dir, and a known_hosts for ``port``."""
    paths = DevPaths(base or get_settings().dev_sftp_dir)
    paths.root.mkdir(parents=True, exist_ok=True)
    for key in (paths.host_key, paths.client_key):
        if not key.exists():
            _write_key(key)
    host = paramiko.Ed25519Key(filename=str(paths.host_key))
    line = f"[127.0.0.1]:{port or dev_port()} {host.get_name()} {host.get_base64()}\n"
    if not paths.known_hosts.exists() or paths.known_hosts.read_text() != line:
        paths.known_hosts.write_text(line)
    return paths


def dev_sftp_resource(port: int | None = None) -> SFTPResource:
    """Resource settings that reach the embedded dev server (its keys are created if needed)."""
    port = port or dev_port()
    paths = ensure_dev_keys(port)
    return SFTPResource(
        host="127.0.0.1",
        port=port,
        username=DEV_USER,
        private_key=str(paths.client_key),
        known_hosts=str(paths.known_hosts),
        remote_dir="/",
    )


class _Auth(paramiko.ServerInterface):
    def __init__(self, authorized: paramiko.PKey) -> None:
        self.authorized = authorized

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        return paramiko.AUTH_SUCCESSFUL if key == self.authorized else paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED


class _RootedSFTP(paramiko.SFTPServerInterface):
    """A file system rooted at ``root``: no path can escape it."""

    def __init__(self, server: paramiko.ServerInterface, root: str, *args, **kwargs) -> None:
        super().__init__(server, *args, **kwargs)
        self.root = root

    def _real(self, path: str) -> str:
        clean = posixpath.normpath("/" + path.replace("\\", "/"))  # '..' cannot climb above '/'
        return os.path.join(self.root, clean.lstrip("/"))

    @staticmethod
    def _err(exc: OSError) -> int:
        return paramiko.SFTPServer.convert_errno(exc.errno)

    def canonicalize(self, path: str) -> str:
        return posixpath.normpath("/" + path)

    def list_folder(self, path: str):
        try:
            real = self._real(path)
            out = []
            for name in os.listdir(real):
                attr = paramiko.SFTPAttributes.from_stat(os.stat(os.path.join(real, name)))
                attr.filename = name
                out.append(attr)
            return out
        except OSError as exc:
            return self._err(exc)

    def stat(self, path: str):
        try:
            return paramiko.SFTPAttributes.from_stat(os.stat(self._real(path)))
        except OSError as exc:
            return self._err(exc)

    lstat = stat

    def open(self, path: str, flags: int, attr):
        real = self._real(path)
        try:
            fd = os.open(real, flags | getattr(os, "O_BINARY", 0), 0o644)
        except OSError as exc:
            return self._err(exc)
        if flags & os.O_WRONLY:
            mode = "ab" if flags & os.O_APPEND else "wb"
        elif flags & os.O_RDWR:
            mode = "a+b" if flags & os.O_APPEND else "r+b"
        else:
            mode = "rb"
        handle = paramiko.SFTPHandle(flags)
        handle.filename = real
        handle.readfile = handle.writefile = os.fdopen(fd, mode)
        return handle

    def remove(self, path: str) -> int:
        try:
            os.remove(self._real(path))
        except OSError as exc:
            return self._err(exc)
        return paramiko.SFTP_OK

    def rename(self, oldpath: str, newpath: str) -> int:
        # SFTP's plain rename must not overwrite (as OpenSSH): posix_rename does.
        if os.path.exists(self._real(newpath)):
            return self._err(OSError(errno.EEXIST, "exists"))
        return self.posix_rename(oldpath, newpath)

    def posix_rename(self, oldpath: str, newpath: str) -> int:
        try:
            os.replace(self._real(oldpath), self._real(newpath))
        except OSError as exc:
            return self._err(exc)
        return paramiko.SFTP_OK

    def mkdir(self, path: str, attr) -> int:
        try:
            os.mkdir(self._real(path))
        except OSError as exc:
            return self._err(exc)
        return paramiko.SFTP_OK

    def rmdir(self, path: str) -> int:
        try:
            os.rmdir(self._real(path))
        except OSError as exc:
            return self._err(exc)
        return paramiko.SFTP_OK

    def chattr(self, path: str, attr) -> int:
        return paramiko.SFTP_OK


class DevSFTPServer:
    """The running server: ``port``, ``paths``; :meth:`stop` closes everything."""

    def __init__(self, port: int = 0, base: Path | None = None, host: str = "127.0.0.1") -> None:
        self._sock = socket.create_server((host, port))
        self.port = self._sock.getsockname()[1]
        self.paths = ensure_dev_keys(self.port, base)
        self._host_key = paramiko.Ed25519Key(filename=str(self.paths.host_key))
        self._client_key = paramiko.Ed25519Key(filename=str(self.paths.client_key))
        self._transports: list[paramiko.Transport] = []
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="dev-sftp", daemon=True)
        self._thread.start()

    def resource(self) -> SFTPResource:
        """Client settings for this server."""
        return SFTPResource(
            host="127.0.0.1",
            port=self.port,
            username=DEV_USER,
            private_key=str(self.paths.client_key),
            known_hosts=str(self.paths.known_hosts),
            remote_dir="/",
        )

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            transport = paramiko.Transport(conn, default_window_size=64 * 1024 * 1024)
            transport.add_server_key(self._host_key)
            transport.set_subsystem_handler(
                "sftp", paramiko.SFTPServer, _RootedSFTP, str(self.paths.root)
            )
            self._transports = [t for t in self._transports if t.is_active()] + [transport]
            try:
                transport.start_server(server=_Auth(self._client_key))
            except (paramiko.SSHException, EOFError, OSError) as exc:
                log.info("dev SFTP: handshake failed: %s", exc)

    def stop(self) -> None:
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._sock.close()
        for t in self._transports:
            t.close()
        self._thread.join(timeout=5)


def start_dev_server(port: int, *, port_option: bool = False) -> DevSFTPServer:
    """The dev server on ``port``; a taken port is a :class:`ConfigError` naming it and
    ``CFI_SFTP_PORT`` (and ``--port`` when the command has one), never a traceback."""
    try:
        return DevSFTPServer(port=port)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        raise ConfigError(
            f"port {port} on 127.0.0.1 is taken (a `cfi-pipelines dev`, `demo` or `sftp-server` "
            "still running, or another SSH server?): the embedded SFTP server cannot start. "
            "Stop what listens there, or set CFI_SFTP_PORT to a free port"
            + (" (or pass --port P)" if port_option else "")
        ) from None


def serve(port: int | None = None) -> int:
    """``cfi-pipelines sftp-server [--port P]``: run the dev server until Ctrl-C."""
    server = start_dev_server(port or dev_port(), port_option=True)
    try:  # entered before the banner: a stop signal right after it is a clean stop too
        print(
            f"dev SFTP server on 127.0.0.1:{server.port}, user {DEV_USER!r}, "
            f"root {server.paths.root}"
        )
        print(
            f"  client key  {server.paths.client_key}\n  known_hosts {server.paths.known_hosts}",
            flush=True,
        )
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
