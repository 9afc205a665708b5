"""Demo data: deterministic, realistic enough to exercise every view."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import pytest
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


STOCK_TABLES = ("tenants", "channels", "warehouses", "products", "stock_levels")


def test_fast_seed_is_deterministic_and_shaped_like_the_seed(tmp_path):
    from cfi_pipelines.devtools.seed import seed_source_fast

    day = date(2026, 3, 1)
    a, b, c, ref = (create_engine(f"sqlite:///{tmp_path / n}.db") for n in ("a", "b", "c", "ref"))
    counts = seed_source_fast(a, scale=2, seed=3, today=day)
    seed_source_fast(b, scale=2, seed=3, today=day)
    seed_source_fast(c, scale=2, seed=4, today=day)
    expected = seed_source(ref, scale=2, seed=3, today=day)
    assert counts == {t: expected[t] for t in STOCK_TABLES}
    fa, fb, fc = _fingerprint(a), _fingerprint(b), _fingerprint(c)
    assert fa == fb
    assert all(fa[t] != fc[t] for t in ("warehouses", "products", "stock_levels"))
    assert all(fa[t][0] == 0 for t in fa if t not in STOCK_TABLES)  # the rest stays empty
    with a.connect() as conn:
        sl, p = src.stock_levels, src.products
        stats = conn.execute(
            sa.select(
                sa.func.min(sl.c.quantity),
                sa.func.max(sl.c.quantity),
                sa.func.max(sl.c.reserved * 4 - sl.c.quantity),
                sa.func.min(sl.c.updated_at),
                sa.func.max(sl.c.updated_at),
                sa.func.count(sa.distinct(sl.c.quantity)),
            )
        ).one()
        assert (stats[0], stats[1]) == (0, 499) and stats[2] <= 3 and stats[5] == 500
        assert date(2026, 1, 29) <= stats[3].date() and stats[4].date() <= day
        prices = conn.execute(
            sa.select(sa.func.min(p.c.unit_price), sa.func.max(p.c.unit_price))
        ).one()
        assert prices[0] >= Decimal("1.50") and prices[1] <= Decimal("89.99")
        # each stock row: a product and a warehouse of the product's own store
        mismatched = conn.scalar(
            sa.select(sa.func.count())
            .select_from(
                sl.join(p, p.c.id == sl.c.product_id).join(
                    src.warehouses, src.warehouses.c.id == sl.c.warehouse_id
                )
            )
            .where(
                sa.or_(
                    p.c.tenant_id != sl.c.tenant_id, src.warehouses.c.tenant_id != sl.c.tenant_id
                )
            )
        )
        assert mismatched == 0


def test_fast_seed_feeds_the_stocks_view(tmp_path):
    from cfi_pipelines.devtools.seed import seed_source_fast
    from cfi_pipelines.views.refresh import refresh_view
    from cfi_pipelines.views.spec import get_view

    source = create_engine(f"sqlite:///{tmp_path / 'source.db'}")
    common = create_engine(f"sqlite:///{tmp_path / 'common.db'}")
    counts = seed_source_fast(source, scale=1, seed=0)
    full = refresh_view(get_view("stocks"), source, common, mode="full")
    assert full.rows == counts["stock_levels"]
    # stamps stored in SQLAlchemy's format: the incremental's bound comparisons hold
    again = refresh_view(get_view("stocks"), source, common)
    assert again.mode == "incremental" and again.loaded < counts["stock_levels"] // 100


@pytest.mark.postgres
def test_fast_seed_gives_the_same_data_on_postgresql(tmp_path, pg_url):
    from cfi_pipelines.devtools.seed import seed_source_fast

    day = date(2026, 3, 1)
    lite, pg = create_engine(f"sqlite:///{tmp_path / 'a.db'}"), create_engine(pg_url)
    assert seed_source_fast(lite, scale=1, seed=5, today=day) == seed_source_fast(
        pg, scale=1, seed=5, today=day
    )
    for table in (src.products, src.stock_levels):
        q = sa.select(table).order_by(table.c.id)
        with lite.connect() as a, pg.connect() as b:
            mine = [tuple(r) for r in a.execute(q)]
            theirs = [tuple(r) for r in b.execute(q)]
        assert mine == theirs
