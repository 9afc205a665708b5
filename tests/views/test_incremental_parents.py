"""Incremental refreshes and the parents a change *leaves*: a child moved to another
parent or deleted must re-compute the old parent too (D13), on SQLite and PostgreSQL.
And money is stored rounded to the cent, never as -0.0."""

from __future__ import annotations

import math
from datetime import timedelta
from decimal import Decimal

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import mssql, postgresql, sqlite

from cfi_pipelines.model import cfi_common as common
from cfi_pipelines.model import cfi_source as src
from cfi_pipelines.views.refresh import refresh_view, utcnow
from cfi_pipelines.views.spec import get_view
from tests.fixtures.common import Databases
from tests.views.test_refresh import _expected, _norm, _rows

OPERATIONS, INVOICES, CAMPAIGNS = (
    get_view("operations"),
    get_view("invoices"),
    get_view("campaigns"),
)
AGGREGATE_VIEWS = (OPERATIONS, INVOICES, CAMPAIGNS)


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgresql", marks=pytest.mark.postgres),
        pytest.param("postgresql->sqlite", marks=pytest.mark.postgres),
    ]
)
def dbs(request) -> Databases:
    """Source and cache on SQLite, on PostgreSQL, and the portable (mixed) path."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_dbs")
    pg = request.getfixturevalue("pg_dbs")
    if request.param == "postgresql":
        return pg
    lite = request.getfixturevalue("sqlite_dbs")
    return Databases(pg.source_url, lite.common_url, pg.source, lite.common)


def _assert_cache_is_the_source_query(dbs: Databases, spec) -> None:
    got = _rows(dbs.common, spec.table, list(spec.key))
    assert _norm(got) == _norm(_expected(dbs, spec)), spec.name


def _cached(dbs: Databases, table: sa.Table, key: str, value, column: str):
    with dbs.common.connect() as conn:
        return conn.scalar(sa.select(table.c[column]).where(table.c[key] == value))


def _first_two(conn, column: sa.Column) -> tuple[int, int]:
    a, b = conn.scalars(sa.select(column).distinct().order_by(column).limit(2))
    return a, b


def test_moved_and_deleted_children_recompute_old_and_new_parents(dbs: Databases):
    for spec in AGGREGATE_VIEWS:
        refresh_view(spec, dbs.source, dbs.common, mode="full")
    pay, t, c = src.payments, src.campaign_targets, src.campaigns
    now = utcnow()
    with dbs.source.begin() as conn:
        # a payment moved from invoice A to invoice B
        moved = conn.execute(sa.select(pay.c.id, pay.c.invoice_id).order_by(pay.c.id)).first()
        inv_a = moved.invoice_id
        inv_b = conn.scalar(
            sa.select(src.invoices.c.id)
            .where(src.invoices.c.id.not_in(sa.select(pay.c.invoice_id)))
            .order_by(src.invoices.c.id)
        )
        conn.execute(
            pay.update().where(pay.c.id == moved.id).values(invoice_id=inv_b, updated_at=now)
        )
        # a payment deleted (its invoice D is touched by nothing else)
        gone = conn.execute(
            sa.select(pay.c.id, pay.c.invoice_id)
            .where(pay.c.invoice_id.not_in([inv_a, inv_b]), pay.c.amount > 0)
            .order_by(pay.c.id.desc())
        ).first()
        inv_d = gone.invoice_id
        conn.execute(pay.delete().where(pay.c.id == gone.id))
        # a target moved from campaign X to campaign Y
        camp_x, camp_y = _first_two(conn, t.c.campaign_id)
        target = conn.scalar(sa.select(t.c.id).where(t.c.campaign_id == camp_x).order_by(t.c.id))
        conn.execute(t.update().where(t.c.id == target).values(campaign_id=camp_y, updated_at=now))
        # a campaign moved from operation O1 to operation O2 (which had none)
        camp = conn.execute(
            sa.select(c.c.id, c.c.operation_id)
            .where(c.c.operation_id.is_not(None))
            .order_by(c.c.id)
        ).first()
        op_1 = camp.operation_id
        op_2 = conn.scalar(
            sa.select(src.operations.c.id)
            .where(src.operations.c.id.not_in(sa.select(c.c.operation_id).where(c.c.operation_id.is_not(None))))
            .order_by(src.operations.c.id)
        )  # fmt: skip
        conn.execute(c.update().where(c.c.id == camp.id).values(operation_id=op_2, updated_at=now))

    before = {
        "paid_a": _cached(dbs, common.cfi_invoices, "invoice_id", inv_a, "paid"),
        "paid_d": _cached(dbs, common.cfi_invoices, "invoice_id", inv_d, "paid"),
        "targets_x": _cached(dbs, common.cfi_campaigns, "campaign_id", camp_x, "targets"),
        "count_1": _cached(dbs, common.cfi_operations, "operation_id", op_1, "campaign_count"),
    }
    for spec in AGGREGATE_VIEWS:
        r = refresh_view(spec, dbs.source, dbs.common)
        assert r.mode == "incremental", spec.name
        _assert_cache_is_the_source_query(dbs, spec)
    # the old parents really changed (the comparison above is not vacuous)
    assert _cached(dbs, common.cfi_invoices, "invoice_id", inv_a, "paid") < before["paid_a"]
    assert _cached(dbs, common.cfi_invoices, "invoice_id", inv_d, "paid") < before["paid_d"]
    assert _cached(dbs, common.cfi_campaigns, "campaign_id", camp_x, "targets") == (
        before["targets_x"] - 1
    )
    assert _cached(dbs, common.cfi_operations, "operation_id", op_1, "campaign_count") == (
        before["count_1"] - 1
    )
    assert _cached(dbs, common.cfi_operations, "operation_id", op_2, "campaign_count") == 1


def test_deleted_children_alone_are_caught_without_any_updated_at_change(dbs: Databases):
    for spec in AGGREGATE_VIEWS:
        refresh_view(spec, dbs.source, dbs.common, mode="full")
    with dbs.source.begin() as conn:  # deletions leave no updated_at behind
        inv = conn.scalar(sa.select(src.payments.c.invoice_id).order_by(src.payments.c.id))
        conn.execute(src.payments.delete().where(src.payments.c.invoice_id == inv))
        line = conn.scalar(sa.select(src.invoice_lines.c.id).order_by(src.invoice_lines.c.id))
        conn.execute(src.invoice_lines.delete().where(src.invoice_lines.c.id == line))
        camp = conn.scalar(sa.select(src.campaign_results.c.campaign_id).limit(1))
        conn.execute(
            src.campaign_results.delete().where(src.campaign_results.c.campaign_id == camp)
        )
        conn.execute(
            src.campaign_targets.delete().where(src.campaign_targets.c.campaign_id == camp)
        )
        op = conn.scalar(sa.select(src.operation_products.c.operation_id).limit(1))
        conn.execute(
            src.operation_products.delete().where(src.operation_products.c.operation_id == op)
        )
    for spec in AGGREGATE_VIEWS:
        # no overlap window: only the parents whose aggregates differ are read
        r = refresh_view(spec, dbs.source, dbs.common, overlap=timedelta(0))
        assert r.mode == "incremental" and 1 <= r.loaded <= 2, (spec.name, r.loaded)
        _assert_cache_is_the_source_query(dbs, spec)
    assert _cached(dbs, common.cfi_invoices, "invoice_id", inv, "paid") == 0
    assert _cached(dbs, common.cfi_campaigns, "campaign_id", camp, "targets") == 0
    assert _cached(dbs, common.cfi_operations, "operation_id", op, "product_count") == 0


def test_a_renamed_operation_recomputes_its_campaigns(dbs: Databases):
    refresh_view(CAMPAIGNS, dbs.source, dbs.common, mode="full")
    o, c = src.operations, src.campaigns
    with dbs.source.begin() as conn:
        op = conn.scalar(sa.select(c.c.operation_id).where(c.c.operation_id.is_not(None)).limit(1))
        conn.execute(o.update().where(o.c.id == op).values(code="OP-RENAMED", updated_at=utcnow()))
    assert refresh_view(CAMPAIGNS, dbs.source, dbs.common).mode == "incremental"
    _assert_cache_is_the_source_query(dbs, CAMPAIGNS)
    with dbs.common.connect() as conn:
        assert "OP-RENAMED" in set(conn.scalars(sa.select(common.cfi_campaigns.c.operation_code)))


# --------------------------------------------------------------------------- rounding

MONEY = {
    "cfi_stocks": ("unit_price", "stock_value"),
    "cfi_invoices": ("total_excl_tax", "total_tax", "total_incl_tax", "paid", "outstanding"),
    "cfi_campaigns": ("budget", "revenue"),
}


def _is_cent_exact(v) -> bool:
    if v is None or isinstance(v, int):
        return True
    if isinstance(v, Decimal):
        return v == v.quantize(Decimal("0.01")) and not (v == 0 and v.is_signed())
    return repr(v) == repr(round(v, 2)) and not (v == 0 and math.copysign(1.0, v) < 0)


def _add_invoice_summing_to_negative_zero(conn) -> int:
    """0.70 + 0.10 - 0.80 is -1.1e-16 in binary floats: outstanding rounds to -0.0."""
    client = conn.execute(sa.select(src.clients).order_by(src.clients.c.id)).first()
    today, now = utcnow().date(), utcnow()
    conn.execute(
        src.invoices.insert().values(
            id=990001, tenant_id=client.tenant_id, client_id=client.id, number="F-NEGZERO",
            issued_on=today, due_on=today + timedelta(days=30), status="issued", updated_at=now,
        )
    )  # fmt: skip
    conn.execute(
        src.invoice_lines.insert().values(
            id=990001, invoice_id=990001, product_id=conn.scalar(sa.select(sa.func.min(src.products.c.id))),
            quantity=1, unit_price=Decimal("0.70"), vat_rate=Decimal("0.1429"), updated_at=now,
        )
    )  # fmt: skip
    conn.execute(
        src.payments.insert().values(
            id=990001, invoice_id=990001, amount=Decimal("0.80"), paid_on=today,
            method="card", updated_at=now,
        )
    )  # fmt: skip
    return 990001


def test_money_is_stored_rounded_to_the_cent_and_never_negative_zero(sqlite_dbs: Databases):
    """SQLite computes in floats: 724.0799999999999 and -0.0 must not reach the view."""
    dbs = sqlite_dbs
    with dbs.source.begin() as conn:
        inv = _add_invoice_summing_to_negative_zero(conn)
    for name in ("stocks", "invoices", "campaigns"):
        refresh_view(get_view(name), dbs.source, dbs.common, mode="full")
    with dbs.common.connect() as conn:
        for table, cols in MONEY.items():
            for col in cols:
                bad = [
                    v
                    for (v,) in conn.exec_driver_sql(f"SELECT {col} FROM {table}")
                    if not _is_cent_exact(v)
                ]
                assert not bad, (table, col, bad[:5])
    # what the view query itself says (the API fallback and the tests read it)
    q = INVOICES.query().subquery()
    sql = sa.select(q.c.total_incl_tax, q.c.outstanding).where(q.c.invoice_id == inv)
    sql = sql.params(**INVOICES.params())
    with dbs.source.connect() as conn:
        compiled = str(sql.compile(dbs.source, compile_kwargs={"literal_binds": True}))
        incl, outstanding = conn.exec_driver_sql(compiled).one()
    assert incl == 0.8 and _is_cent_exact(incl)
    assert outstanding == 0 and _is_cent_exact(outstanding), outstanding


@pytest.mark.parametrize("dialect", [sqlite.dialect(), postgresql.dialect(), mssql.dialect()])
def test_money_rounding_compiles_for_every_dialect(dialect):
    """Every computed money column is ROUND(…, 2) + 0 (no float noise, no -0.0)."""
    for spec, cols in (
        (get_view("stocks"), ("stock_value",)),
        (INVOICES, ("total_excl_tax", "total_tax", "total_incl_tax", "paid", "outstanding")),
        (CAMPAIGNS, ("revenue",)),
    ):
        q = spec.query()
        for col in cols:
            expr = str(q.selected_columns[col].compile(dialect=dialect)).lower()
            assert "round(" in expr and "+" in expr.rsplit("round(", 1)[-1], (spec.name, col, expr)
        if spec is INVOICES:
            incl = str(q.selected_columns["total_incl_tax"].compile(dialect=dialect)).lower()
            assert incl.count("round(") == 3, incl  # the sum itself is rounded
