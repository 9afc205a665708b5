"""Building and validating a large campaign export: targets/s and peak RSS.

    python benchmarks/export_build.py [--targets 100000] [--small 10000]

Seeds a SQLite MyCfia DB with one campaign of ``--targets`` targets and one of
``--small`` targets (rows are generated and inserted in batches, never held in
memory), then builds each export in a fresh child process and prints its time,
targets/s and peak RSS. Streaming means the peak RSS of the large build stays
close to the small one's. Also times per-target validation alone, jsonschema's
``is_valid`` against our specialised check, on the same records.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cfi_pipelines.db import create_engine  # noqa: E402
from cfi_pipelines.devtools.seed_mycfia import add_campaign  # noqa: E402
from cfi_pipelines.exports import build_export  # noqa: E402
from cfi_pipelines.model import mycfia  # noqa: E402


def targets(n: int) -> Iterator[dict[str, Any]]:
    """``n`` valid, varied targets, generated lazily."""
    for i in range(1, n + 1):
        yield {
            "client_reference": f"C{i:07d}",
            "email": f"client.{i}@example.fr",
            "phone": f"+33 6 12 {i % 100:02d} {i % 97:02d} {i % 89:02d}",
            "segment": "all",
            "first_name": "Camille",
            "last_name": f"Martin-Lefèvre {i}",
            "personalisation": {"city": "Lyon", "offer": f"{i % 50}%"},
        }


def build_in_child(url: str, campaign_id: int, outbox: str) -> dict[str, float]:
    """Build in this (fresh) process; print the figures as JSON."""
    engine = create_engine(url)
    started = time.perf_counter()
    with engine.begin() as conn:
        bundle = build_export(conn, campaign_id, Path(outbox))
    seconds = time.perf_counter() - started
    assert bundle.valid, bundle.error_text()
    return {
        "rows": bundle.row_count,
        "seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def validation_only(n: int) -> tuple[float, float | None]:
    """Per-target validation rate (targets/s): jsonschema ``is_valid``, specialised check."""
    from cfi_pipelines.exports import document

    _, validator = document.validators()
    records = []
    for t in targets(n):
        records.append(t)
    started = time.perf_counter()
    assert all(validator.is_valid(r) for r in records)
    slow = n / (time.perf_counter() - started)
    check = getattr(document, "target_is_valid", None)
    if check is None:
        return slow, None
    started = time.perf_counter()
    assert all(check(r) for r in records)
    return slow, n / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--child", nargs=3, metavar=("URL", "ID", "OUTBOX"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        url, cid, outbox = args.child
        print(json.dumps(build_in_child(url, int(cid), outbox)))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/mycfia.db"
        engine = create_engine(url)
        mycfia.metadata.create_all(engine)
        sizes = {1: args.small, 2: args.targets}
        with engine.begin() as conn:
            for cid, n in sizes.items():
                add_campaign(conn, cid, tenant_code="T001", targets=targets(n))
        engine.dispose()
        print(f"build_export (fresh process each, SQLite, {Path(tmp).name}):")
        for cid, n in sizes.items():
            out = subprocess.run(
                [sys.executable, __file__, "--child", url, str(cid), f"{tmp}/outbox{cid}"],
                check=True,
                capture_output=True,
                text=True,
            )
            fig = json.loads(out.stdout.strip().splitlines()[-1])
            assert fig["rows"] == n
            print(
                f"  {n:>8,} targets  {fig['seconds']:6.2f} s  {n / fig['seconds']:9,.0f} targets/s"
                f"  peak RSS {fig['peak_rss_mb']:6.1f} MB"
            )
    slow, fast = validation_only(min(args.targets, 50_000))
    print("per-target validation only:")
    print(f"  jsonschema is_valid   {slow:9,.0f} targets/s")
    if fast is not None:
        print(f"  specialised check     {fast:9,.0f} targets/s  ({fast / slow:.0f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
