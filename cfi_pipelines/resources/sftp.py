"""The SFTP resource: configuration of CFI's drop in, a verified connection out.

The client itself (host-key verification, timeouts, write-size negotiation) is
:mod:`cfi_pipelines.exports.sftp_client`.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import paramiko
from pydantic import Field

from cfi_pipelines.exports.sftp_client import (
    EmbeddedServerDown,
    KeyLoadError,
    SFTPConnection,
    load_private_key,
    open_sftp,
)
from cfi_pipelines.settings import DEV_SFTP_USER, Settings, env_or_default


class SFTPResource(dg.ConfigurableResource):
    """CFI's SFTP drop. ``private_key`` comes from ``EnvVar("CFI_SFTP_KEY")`` in production."""

    host: str = Field(description="SFTP server (CFI_SFTP_HOST)")
    port: int = Field(default=22, description="CFI_SFTP_PORT")
    username: str = Field(description="CFI_SFTP_USER")
    private_key: str = Field(
        default="", description="Path to the client private key, or the key itself (CFI_SFTP_KEY)"
    )
    private_key_passphrase: str | None = Field(
        default=None, description="Passphrase of the key, if any"
    )
    known_hosts: str = Field(
        description="known_hosts file; the host key is always verified (CFI_SFTP_KNOWN_HOSTS)"
    )
    remote_dir: str = Field(default="/", description="Remote root of the drop (CFI_SFTP_DIR)")
    connect_timeout: float = Field(
        default=10.0, description="Seconds for TCP connect, banner, key exchange, auth"
    )
    io_timeout: float = Field(
        default=30.0, description="Seconds without progress on the SFTP channel"
    )
    write_size: int = Field(
        default=0,
        ge=0,
        description="Bytes per SFTP write request; 0 (default) negotiates with the server: "
        "255000 on OpenSSH, 32675 elsewhere (CFI_SFTP_WRITE_SIZE)",
    )
    embedded: bool = Field(
        default=False,
        description="The embedded development server (local environment): a missing server "
        "is reported with how to start it",
    )

    @property
    def target(self) -> str:
        """``user@host:port`` for messages (no secret in it)."""
        return f"{self.username}@{self.host}:{self.port}"

    def open(self) -> SFTPConnection:
        """A new, verified and authenticated connection (caller closes it)."""
        if self.embedded and not Path(self.private_key).exists():
            raise EmbeddedServerDown(self.host, self.port, "its keys were never created")
        if not self.private_key:
            raise KeyLoadError(
                "CFI_SFTP_KEY is not set: CFI_SFTP_HOST names CFI's server, so the client "
                "private key is needed (a path, or the key itself)"
            )
        pkey = load_private_key(self.private_key, self.private_key_passphrase)
        try:
            return open_sftp(
                self.host,
                self.port,
                self.username,
                pkey,
                self.known_hosts,
                connect_timeout=self.connect_timeout,
                io_timeout=self.io_timeout,
                write_size=self.write_size,
            )
        except ConnectionRefusedError:
            if self.embedded:
                raise EmbeddedServerDown(self.host, self.port, "nothing listens there") from None
            raise

    @contextmanager
    def session(self) -> Iterator[SFTPConnection]:
        """One connection for a whole run, with its negotiated ``write_size``."""
        conn = self.open()
        try:
            yield conn
        finally:
            conn.close()

    @contextmanager
    def connect(self) -> Iterator[paramiko.SFTPClient]:
        """One SFTP session for a whole run: ``with sftp.connect() as client: ...``."""
        with self.session() as conn:
            yield conn.sftp


def sftp_resource(settings: Settings) -> SFTPResource:
    """CFI's SFTP in production (``CFI_SFTP_*``, the key as ``EnvVar``); locally the
    embedded development server's files under ``CFI_HOME/sftp`` (created by the
    commands that start the server, never here)."""
    if settings.local:
        base = settings.dev_sftp_dir
        return SFTPResource(
            host="127.0.0.1",
            port=settings.dev_sftp_port,
            username=DEV_SFTP_USER,
            private_key=str(base / "client_ed25519"),
            known_hosts=str(base / "known_hosts"),
            remote_dir="/",
            embedded=True,
        )
    return SFTPResource(
        host=settings.sftp_host or "",
        port=settings.sftp_port,
        username=settings.sftp_user or "cfi",
        private_key=env_or_default("CFI_SFTP_KEY", ""),
        known_hosts=settings.sftp_known_hosts or "~/.ssh/known_hosts",
        remote_dir=settings.sftp_dir,
        # 0: negotiated with the server (large writes on OpenSSH), see exports/sftp_client.py
        write_size=settings.sftp_write_size,
    )
