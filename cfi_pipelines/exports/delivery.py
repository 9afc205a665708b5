"""Deliver an export bundle over SFTP: atomic, idempotent, manifest last.

Each file is written as ``<final name>.part`` (truncating what a killed upload
left), its size is checked, then it is renamed onto the final name with the
``posix-rename@openssh.com`` extension (plain SFTP rename fails when the target
exists). The manifest, CFI's "ready" marker, goes last. So a dropped connection
never leaves a partial file under a final name, and re-delivering the same
revision atomically replaces identical files.
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
import time
from dataclasses import dataclass
from pathlib import Path

import paramiko

from cfi_pipelines.exports.document import ExportBundle
from cfi_pipelines.exports.errors import DeliveryError
from cfi_pipelines.exports.sftp_client import SAFE_WRITE_SIZE, SFTPPermanentError

log = logging.getLogger(__name__)

WRITE_CHUNK = SAFE_WRITE_SIZE
"""Default bytes per SFTP write, which every server accepts; a connection opened by
:class:`~cfi_pipelines.exports.sftp_client.SFTPResource` negotiates larger writes where the
server takes them (``SFTPConnection.write_size``)."""
ORDER = ("json", "csv", "manifest")  # the manifest last: it says "complete"


@dataclass(frozen=True)
class Delivery:
    """What was delivered where."""

    remote_paths: dict[str, str]
    bytes: int
    seconds: float


def remote_paths(bundle: ExportBundle, remote_dir: str) -> dict[str, str]:
    """Final remote path of each file: ``<remote_dir>/<tenant code>/<name>``."""
    folder = posixpath.join(remote_dir or "/", bundle.tenant_code)
    return {kind: posixpath.join(folder, bundle.files[kind]["name"]) for kind in ORDER}


def makedirs(sftp: paramiko.SFTPClient, path: str) -> None:
    """``mkdir -p`` on the server (tolerates a concurrent creator)."""
    current = "/" if path.startswith("/") else ""
    for part in [p for p in path.split("/") if p]:
        current = posixpath.join(current, part) if current else part
        try:
            sftp.stat(current)
            continue
        except FileNotFoundError:
            pass
        try:
            sftp.mkdir(current)
        except OSError:
            sftp.stat(current)  # someone else created it meanwhile; else this raises


def _rename_over(sftp: paramiko.SFTPClient, src: str, dst: str) -> None:
    try:
        sftp.posix_rename(src, dst)
    except OSError as exc:
        # Servers without the extension answer "unsupported": fall back to
        # remove + rename (a short window without the file, never a partial one).
        if "unsupported" not in str(exc).lower():
            raise
        with contextlib.suppress(FileNotFoundError):
            sftp.remove(dst)
        sftp.rename(src, dst)


LINK_LOST = (TimeoutError, EOFError, ConnectionError, paramiko.SSHException)
"""What says the connection itself is gone or stalled (not an SFTP status from the server)."""


def abandon(sftp: paramiko.SFTPClient, why: BaseException) -> None:
    """Close the transport of ``sftp`` after ``why`` stalled or broke it.

    On a black-holed connection every later request (closing the file: wait for
    the pipelined acknowledgements; closing the session) would wait another
    ``io_timeout`` for an answer that never comes: 60 s an attempt instead of 30.
    A closed transport makes them all fail at once, so one attempt costs one
    ``io_timeout``. (A stalled ``Packetizer`` write is also released by it.)"""
    channel = sftp.get_channel()
    transport = channel.get_transport() if channel is not None else None
    if transport is not None and transport.is_active():
        log.info("SFTP connection abandoned after %s: closing its transport", type(why).__name__)
        transport.close()


def upload_atomic(
    sftp: paramiko.SFTPClient, local: Path, remote: str, size: int, write_size: int = WRITE_CHUNK
) -> None:
    """Upload ``local`` to ``remote`` through ``remote.part``, size-checked, then renamed."""
    tmp = remote + ".part"
    dst = sftp.open(tmp, "wb", bufsize=0)
    try:
        with open(local, "rb") as src:
            # Pipelined writes: don't wait for each acknowledgement (checked at close).
            dst.set_pipelined(True)
            dst.MAX_REQUEST_SIZE = max(write_size, dst.MAX_REQUEST_SIZE)  # paramiko splits above
            while chunk := src.read(write_size):
                dst.write(chunk)
        dst.close()  # waits for every pipelined acknowledgement
    except LINK_LOST as exc:
        abandon(sftp, exc)
        dst.close()  # the transport is closed: returns at once (paramiko ignores the EOF)
        raise
    except BaseException:
        # The server answered (e.g. disk full): the link works, close the handle; the
        # first error is the one reported.
        try:
            dst.close()
        except LINK_LOST as exc:
            abandon(sftp, exc)
        except Exception:  # noqa: S110 - the original error matters, this one follows from it
            pass
        raise
    remote_size = sftp.stat(tmp).st_size
    if remote_size != size:
        sftp.remove(tmp)
        raise DeliveryError(f"{remote}: uploaded {remote_size} bytes, expected {size}")
    _rename_over(sftp, tmp, remote)


def deliver(
    sftp: paramiko.SFTPClient, bundle: ExportBundle, remote_dir: str, write_size: int = WRITE_CHUNK
) -> Delivery:
    """Upload the bundle's JSON, CSV, then manifest under ``remote_dir/<tenant code>/``."""
    if not bundle.valid or bundle.directory is None:
        raise ValueError(
            f"campaign {bundle.campaign_id} r{bundle.revision} has no valid export to deliver"
        )
    started = time.perf_counter()
    paths = remote_paths(bundle, remote_dir)
    total = 0
    try:
        makedirs(sftp, posixpath.dirname(paths["json"]))
        for kind in ORDER:
            size = bundle.files[kind]["bytes"]
            upload_atomic(sftp, bundle.local_path(kind), paths[kind], size, write_size)
            total += size
    except LINK_LOST as exc:  # a stalled stat/rename: closing the session must not wait again
        abandon(sftp, exc)
        raise
    return Delivery(remote_paths=paths, bytes=total, seconds=time.perf_counter() - started)


TRANSIENT = "transient"
PERMANENT = "permanent"
BUG = "bug"


def classify_error(exc: BaseException) -> str:
    """Whether a delivery error is worth a retry.

    - ``permanent``: the server refused us (host key, authentication, no common
      algorithm) or forbids the write (permission denied): an operator must act.
    - ``transient``: the network or the server hiccuped (refused, reset or dropped
      connection, also during authentication, timeout, SSH protocol error, size mismatch, I/O error): retry.
    - ``bug``: anything else (``KeyError``, ``TypeError``...) is a defect of the
      export code: retrying runs the same code on the same data, so it fails at once.
    """
    if isinstance(exc, SFTPPermanentError | PermissionError):
        return PERMANENT
    if isinstance(exc, paramiko.AuthenticationException) and not isinstance(
        exc, paramiko.BadAuthenticationType
    ):
        # paramiko's words for a transport that died (or never answered) mid-auth:
        # no server refused anything (open_sftp raises AuthInterrupted for these)
        text = str(exc).lower()
        if "transport shut down" in text or "saw eof" in text or "timeout" in text:
            return TRANSIENT
    if isinstance(exc, paramiko.AuthenticationException | paramiko.BadHostKeyException):
        return PERMANENT
    if isinstance(exc, paramiko.SSHException):
        # "Incompatible ssh peer (no acceptable kex algorithm)": configuration, not luck
        return PERMANENT if "incompatible" in str(exc).lower() else TRANSIENT
    # socket.timeout is TimeoutError; both it and ConnectionError are OSErrors
    if isinstance(exc, TimeoutError | ConnectionError | EOFError | OSError | DeliveryError):
        return TRANSIENT
    return BUG
