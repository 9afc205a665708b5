"""SFTP throughput: our client vs OpenSSH's ``sftp`` (batch mode), same local sshd, same run.

    python benchmarks/sftp.py [--mb 100] [--files 1000] [--kb 10]

Starts a private OpenSSH sshd on 127.0.0.1 (as the tests do), uploads one large
file and many small files with (a) cfi_pipelines' client (AES-GCM, large window,
pipelined writes of the negotiated size, 255,000 bytes on OpenSSH, atomic .part +
posix-rename), (a') the same forced to 32,675-byte writes (what any server takes),
(b) paramiko with its defaults, (c) ``sftp -b``; prints times, MB/s and ratios
(>1 = we are faster).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paramiko  # noqa: E402

from cfi_pipelines.exports.delivery import upload_atomic  # noqa: E402
from cfi_pipelines.exports.sftp_client import load_private_key, open_sftp  # noqa: E402
from tests.fixtures.sshd import Sshd, keygen  # noqa: E402


def openssh(server: Sshd, commands: list[str], workdir: Path) -> float:
    batch = workdir / "batch.txt"
    batch.write_text("\n".join(commands) + "\n")
    args = [
        "sftp", "-q", "-b", str(batch), "-i", str(server.client_key), "-P", str(server.port),
        "-o", f"UserKnownHostsFile={server.known_hosts}", "-o", "StrictHostKeyChecking=yes",
        f"{server.user}@127.0.0.1",
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True)
    return time.perf_counter() - started


def ours(server: Sshd, files: list[Path], remote: Path, write_size: int = 0) -> float:
    """Our client; ``write_size`` 0 = negotiated with the server, as in production."""
    started = time.perf_counter()
    conn = open_sftp(
        "127.0.0.1",
        server.port,
        server.user,
        load_private_key(str(server.client_key)),
        server.known_hosts,
        write_size=write_size,
    )
    try:
        for f in files:
            upload_atomic(conn.sftp, f, str(remote / f.name), f.stat().st_size, conn.write_size)
    finally:
        conn.close()
    return time.perf_counter() - started


def paramiko_defaults(server: Sshd, files: list[Path], remote: Path) -> float:
    started = time.perf_counter()
    client = paramiko.SSHClient()
    client.load_host_keys(str(server.known_hosts))
    client.connect("127.0.0.1", server.port, server.user, key_filename=str(server.client_key),
                   allow_agent=False, look_for_keys=False)  # fmt: skip
    sftp = client.open_sftp()
    for f in files:
        sftp.put(str(f), str(remote / f.name))
    client.close()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--kb", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server = Sshd(
            workdir=work, host_key=keygen(work / "host"), client_key=keygen(work / "client")
        ).start()
        try:
            big = work / "big.bin"
            big.write_bytes(os.urandom(args.mb * 1024 * 1024))
            small_dir = work / "small"
            small_dir.mkdir()
            smalls = []
            for i in range(args.files):
                p = small_dir / f"f{i:05d}.csv"
                p.write_bytes(os.urandom(args.kb * 1024))
                smalls.append(p)
            results: dict[str, dict[str, float]] = {"big": {}, "small": {}}
            for name in ("openssh", "ours", "ours-32k", "paramiko"):
                for kind in ("big", "small"):
                    remote = work / f"drop-{name}-{kind}"
                    remote.mkdir()
                    files = [big] if kind == "big" else smalls
                    if name == "openssh":
                        t = openssh(server, [f"put {f} {remote / f.name}" for f in files], work)
                    elif name == "ours":
                        t = ours(server, files, remote)
                    elif name == "ours-32k":
                        t = ours(server, files, remote, 32_675)
                    else:
                        t = paramiko_defaults(server, files, remote)
                    assert sum(p.stat().st_size for p in remote.iterdir()) == sum(
                        f.stat().st_size for f in files
                    )
                    results[kind][name] = t
        finally:
            server.stop()
    size_mb = args.mb * 1024 * 1024 / 1e6
    print(f"{args.mb} MiB file:")
    for name, t in results["big"].items():
        print(f"  {name:10s} {t:7.3f} s  {size_mb / t:7.1f} MB/s")
    big = results["big"]
    print(
        f"  ratio ours/openssh throughput: {big['openssh'] / big['ours']:.2f} (target >= 1.0); "
        f"with 32,675-byte writes {big['openssh'] / big['ours-32k']:.2f}"
    )
    print(f"{args.files} x {args.kb} KiB files, one connection:")
    for name, t in results["small"].items():
        print(f"  {name:10s} {t:7.3f} s")
    print(
        f"  ratio ours/openssh time: {results['small']['ours'] / results['small']['openssh']:.2f} (target <= 1.5)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
