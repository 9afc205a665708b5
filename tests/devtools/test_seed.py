"""Demo data: deterministic, realistic enough to exercise every view."""

from __future__ import annotations

from datetime import date

import sqlalchemy as sa

from cfi_pipelines.db import create_engine
from cfi_pipelines.devtools.seed import seed_source
from cfi_pipelines.model import cfi_source as src


def _fingerprint(engine: sa.Engine) -> dict[str, tuple]:
    out = {}
    with engine.connect() as conn:
        for table in src.metadata.sorted_tables:
            rows = conn.execute(sa.select(table).order_by(*table.primary_key.columns)).all()
            out[table.name] = (len(rows), hash(tuple(map(tuple, rows))))
    return out


def test_same_seed_same_data_other_seed_other_data(tmp_path):
    day = date(2026, 3, 1)
    a, b, c = (create_engine(f"sqlite:///{tmp_path / n}.db") for n in "abc")
    seed_source(a, scale=1, seed=3, today=day)
    seed_source(b, scale=1, seed=3, today=day)
    seed_source(c, scale=1, seed=4, today=day)
    assert _fingerprint(a) == _fingerprint(b)
    assert _fingerprint(a) != _fingerprint(c)


def test_scale_one_is_a_quick_realistic_demo(sqlite_dbs):
    with sqlite_dbs.source.connect() as conn:
        count = lambda t: conn.scalar(sa.select(sa.func.count()).select_from(t))  # noqa: E731
        assert 9_000 <= count(src.stock_levels) <= 11_000
        assert len(src.metadata.tables) == 15
        # a 3-level hierarchy: group -> region -> store
        depth = conn.execute(
            sa.text(
                "SELECT count(*) FROM tenants s JOIN tenants r ON s.parent_id = r.id "
                "JOIN tenants g ON r.parent_id = g.id WHERE g.parent_id IS NULL"
            )
        ).scalar()
        assert depth >= 12
        # tenants with no activity at all
        idle = conn.execute(
            sa.text(
                "SELECT count(*) FROM tenants t WHERE t.code LIKE '%-NEW' AND NOT EXISTS "
                "(SELECT 1 FROM invoices i WHERE i.tenant_id = t.id) AND NOT EXISTS "
                "(SELECT 1 FROM products p WHERE p.tenant_id = t.id)"
            )
        ).scalar()
        assert idle == 4
        # some late invoices: past due, issued, unpaid
        late = conn.execute(
            sa.select(sa.func.count()).where(
                src.invoices.c.status == "issued", src.invoices.c.due_on < date.today()
            )
        ).scalar()
        assert 0 < late < count(src.invoices) / 4
        assert conn.scalar(sa.select(src.clients.c.city).where(src.clients.c.id == 1)) in {
            "Lille", "Roubaix", "Amiens", "Arras", "Marseille", "Nice", "Toulon", "Montpellier",
            "Nantes", "Rennes", "Brest", "Angers", "Lyon", "Grenoble", "Saint-Étienne", "Annecy",
        }  # fmt: skip
