"""Demo campaigns: deterministic, built on CFI source rows, with a few invalid ones."""

from __future__ import annotations

from datetime import date, datetime

import sqlalchemy as sa

from cfi_pipelines.db import create_engine
from cfi_pipelines.devtools.seed_mycfia import INVALID_KINDS, seed_mycfia
from cfi_pipelines.exports import build_export
from cfi_pipelines.model import cfi_source, mycfia

NOW = datetime(2030, 1, 1)


def source(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'src.db'}")
    cfi_source.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            sa.insert(cfi_source.tenants),
            [
                {"id": 1, "code": "CFI", "name": "CFI", "parent_id": None, "updated_at": NOW},
                {"id": 2, "code": "CFI-NORD", "name": "Nord", "parent_id": 1, "updated_at": NOW},
            ],
        )
        conn.execute(
            sa.insert(cfi_source.operations),
            [
                {
                    "id": 1,
                    "tenant_id": 2,
                    "code": "OP-1",
                    "name": "Printemps",
                    "kind": "promotion",
                    "status": "active",
                    "starts_on": date(2030, 3, 1),
                    "ends_on": date(2030, 3, 31),
                    "budget": 1000,
                    "updated_at": NOW,
                },
            ],
        )
        conn.execute(
            sa.insert(cfi_source.clients),
            [
                {
                    "id": i,
                    "tenant_id": 1 + i % 2,
                    "reference": f"CL{i:05d}",
                    "name": f"Jean Dupont{i}",
                    "email": f"jean{i}@example.fr",
                    "phone": "+33612345678",
                    "city": "Lille",
                    "postal_code": "59000",
                    "segment": "all",
                    "updated_at": NOW,
                }
                for i in range(1, 400)
            ],
        )
    return engine


def test_seed_is_deterministic_and_shows_both_paths(tmp_path):
    src = source(tmp_path)
    dst = create_engine(f"sqlite:///{tmp_path / 'mycfia.db'}")
    counts = seed_mycfia(dst, src, seed=3)
    assert (
        counts["invalid"] == len(INVALID_KINDS)
        and counts["validated"] >= 5
        and counts["draft"] >= 2
    )
    with dst.connect() as conn:
        first = conn.execute(sa.select(mycfia.campaigns.c.id, mycfia.campaigns.c.content)).all()
        validated = (
            conn.execute(
                sa.select(mycfia.campaigns.c.id).where(mycfia.campaigns.c.status == "validated")
            )
            .scalars()
            .all()
        )
    assert seed_mycfia(dst, src, seed=3) == counts
    with dst.connect() as conn:
        assert (
            conn.execute(sa.select(mycfia.campaigns.c.id, mycfia.campaigns.c.content)).all()
            == first
        )
    outcomes = {}
    with dst.begin() as conn:
        for cid in validated:
            outcomes[cid] = build_export(conn, cid, tmp_path / "out").valid
    assert sum(outcomes.values()) == counts["validated"]
    assert list(outcomes.values()).count(False) == counts["invalid"]
