"""A black-holed SFTP connection costs one ``io_timeout`` an attempt, not two.

The proxy forwards the SSH session until the upload is under way, then goes
silent: it keeps reading (and dropping) what the client sends, forwards nothing
either way and never closes, like a route that died. The SSH window (2 MB on
OpenSSH) then fills and the write waits ``io_timeout``; closing the file used to
wait another ``io_timeout`` for acknowledgements that never come.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import threading
from pathlib import Path

import paramiko
import pytest

from cfi_pipelines.exports.delivery import TRANSIENT, classify_error, upload_atomic
from cfi_pipelines.resources.sftp import SFTPResource

pytestmark = pytest.mark.sshd


class BlackHoleProxy:
    """Loopback proxy to ``target_port`` that goes silent after ``after`` client bytes."""

    def __init__(self, target_port: int, after: int) -> None:
        self.target_port = target_port
        self.after = after
        self.holed = threading.Event()
        self._stop = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._accept_thread = threading.Thread(target=self._accept, daemon=True)
        self._accept_thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            t = threading.Thread(target=self._pipe, args=(client,), daemon=True)
            self._threads.append(t)
            t.start()

    def _pipe(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        sel = selectors.DefaultSelector()
        sel.register(client, selectors.EVENT_READ, upstream)
        sel.register(upstream, selectors.EVENT_READ, client)
        sent = 0
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=0.2):
                    data = key.fileobj.recv(65536)
                    if not data:
                        return
                    if key.fileobj is client:
                        sent += len(data)
                        if sent > self.after:
                            self.holed.set()
                    if not self.holed.is_set():
                        key.data.sendall(data)
        except OSError:
            return
        finally:
            sel.close()
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.close()

    def close(self) -> None:
        self._stop.set()
        self._server.close()
        for t in self._threads:
            t.join(timeout=5)


@pytest.fixture
def black_hole():
    proxies: list[BlackHoleProxy] = []

    def make(target_port: int, after: int) -> BlackHoleProxy:
        proxies.append(BlackHoleProxy(target_port, after))
        return proxies[-1]

    yield make
    for p in proxies:
        p.close()


@pytest.fixture
def timeouts(monkeypatch):
    """Every ``io_timeout`` that expires on an SFTP channel, as (operation, timeout)."""
    seen: list[tuple[str, float | None]] = []
    for name in ("send", "recv"):
        original = getattr(paramiko.Channel, name)

        def spy(self, *args, _original=original, _name=name):
            try:
                return _original(self, *args)
            except TimeoutError:
                seen.append((_name, self.gettimeout()))
                raise

        monkeypatch.setattr(paramiko.Channel, name, spy)
    return seen


def test_black_holed_upload_costs_one_io_timeout(sshd, black_hole, tmp_path, timeouts):
    proxy = black_hole(sshd.port, after=300_000)  # handshake, open, first writes: through
    real = Path(str(sshd.host_key) + ".pub").read_text().split()
    kh = tmp_path / "kh"
    kh.write_text(f"[127.0.0.1]:{proxy.port} {real[0]} {real[1]}\n")
    res = SFTPResource(
        host="127.0.0.1",
        port=proxy.port,
        username=sshd.user,
        private_key=str(sshd.client_key),
        known_hosts=str(kh),
        connect_timeout=5.0,
        io_timeout=1.0,
    )
    local = tmp_path / "big.bin"
    local.write_bytes(os.urandom(8 * 1024 * 1024))  # well over OpenSSH's 2 MB window
    remote = str(tmp_path / "drop.bin")
    conn = res.open()
    try:
        with pytest.raises(TimeoutError) as info:
            upload_atomic(conn.sftp, local, remote, local.stat().st_size, conn.write_size)
        assert proxy.holed.is_set()
        assert classify_error(info.value) == TRANSIENT
        # The attempt gave up on the first expired io_timeout, and closed the transport,
        # so that closing the file did not wait for acknowledgements a second time ...
        assert timeouts == [("send", 1.0)]
        assert not conn.transport.is_active()
    finally:
        conn.close()  # ... and neither does closing the session
    assert timeouts == [("send", 1.0)]
    assert not Path(remote).exists()  # never renamed onto the final name
