"""A throw-away PostgreSQL server on 127.0.0.1 (tests, benchmarks, demos).

PostgreSQL refuses to run as root, so when we are root the cluster belongs to
the ``postgres`` system user (created by Debian's package) and the server runs
as that user. The data directory is removed on stop.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cfi_pipelines.settings import child_environment

SUPERUSER = "cfi"
PASSWORD = "cfi-test-only"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    raise RuntimeError(f"{name} not found: install PostgreSQL (apt-get install postgresql)")


@dataclass
class TempPostgres:
    """``with TempPostgres() as pg: pg.url("dbname")`` — a real server, gone afterwards."""

    port: int = field(default_factory=free_port)
    root: Path | None = None
    settings: tuple[str, ...] = ()
    """Extra server settings, ``name=value`` each (e.g. ``wal_level=logical``)."""
    _owns_root: bool = False

    def _run_as(self) -> dict:
        if os.geteuid() != 0:
            return {}
        pw = pwd.getpwnam("postgres")
        return {"user": pw.pw_uid, "group": pw.pw_gid}

    def start(self) -> TempPostgres:
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="cfi-pg-"))
            self._owns_root = True
        as_user = self._run_as()
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORD)
        if as_user:
            for p in (self.root, data, pwfile):
                os.chown(p, as_user["user"], as_user["group"])
        env = child_environment(LC_ALL="C.UTF-8", LANG="C.UTF-8")
        subprocess.run(
            [_bin("initdb"), "-D", str(data), "-U", SUPERUSER, "--pwfile", str(pwfile),
             "-A", "scram-sha-256", "-E", "UTF8", "--no-sync"],
            check=True, capture_output=True, env=env, **as_user,
        )  # fmt: skip
        opts = (
            f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100"
            + "".join(f" -c {setting}" for setting in self.settings)
        )
        subprocess.run(
            [_bin("pg_ctl"), "-D", str(data), "-o", opts, "-l", str(self.root / "log"), "-w", "-t", "60", "start"],
            check=True, capture_output=True, env=env, **as_user,
        )  # fmt: skip
        return self

    def stop(self) -> None:
        if self.root is None:
            return
        subprocess.run(
            [_bin("pg_ctl"), "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop"],
            capture_output=True, **self._run_as(),
        )  # fmt: skip
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(
        self, database: str = "postgres", user: str = SUPERUSER, password: str = PASSWORD
    ) -> str:
        return f"postgresql+psycopg://{user}:{password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create database ``name`` and return its URL."""
        import psycopg

        with psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=SUPERUSER,
            password=PASSWORD,
            dbname="postgres",
            autocommit=True,
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def __enter__(self) -> TempPostgres:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
