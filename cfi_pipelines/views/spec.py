"""The four views of the common DB, declared once.

A :class:`ViewSpec` says everything that differs between views: the read-model
table, its natural key, its tenant-scoped indexes, the query that builds it from
CFI's source DB and the source columns that tell which rows changed. The refresh
engine (:mod:`cfi_pipelines.views.refresh`), the Dagster asset factory
(:mod:`cfi_pipelines.assets.views`) and the API fallback all work from this list.

Business vocabulary (French → here): stocks → stocks, opérations commerciales →
operations, factures → invoices, campagnes → campaigns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import date, datetime

import sqlalchemy as sa

from cfi_pipelines.model import cfi_common as common
from cfi_pipelines.model import cfi_source as src
from cfi_pipelines.views.keys import VALUES, Dependency, Keys, key_predicate

SINCE = sa.bindparam("since", type_=sa.DateTime)
"""Lower bound of an incremental read (last watermark minus the overlap window)."""
TODAY = sa.bindparam("today", type_=sa.Date)
"""The refresh's date (for 'overdue')."""


def _only(q: sa.Select, column: sa.ColumnElement, keys: Keys | None) -> sa.Select:
    """``q`` restricted to ``column IN keys`` when keys are given (pushed into each child
    aggregate as well as the parent: a keyed query never aggregates a whole child table)."""
    return q if keys is None else q.where(key_predicate((column,), keys))


@dataclass(frozen=True)
class ViewSpec:
    """One view of the common DB and how to build it from the source."""

    name: str  # stocks / operations / invoices / campaigns: asset key, API path, status row
    description: str
    table: sa.Table
    key: tuple[str, ...]
    indexes: tuple[tuple[str, ...], ...]  # non-unique indexes, tenant-scoped lookups first
    build_query: Callable[..., sa.Select]  # (incremental, keys=None) -> SELECT, the table's columns
    change_columns: tuple[sa.Column, ...]  # source updated_at columns; max() is the watermark
    aggregate_columns: tuple[str, ...] = ()
    dependencies: tuple[Dependency, ...] = ()
    """Per followed source table, how its row changes name this view's keys (the apply)."""
    """View columns computed from *child* rows (or from the refresh date).

    A child that moves to another parent or is deleted leaves no trace under the
    old parent's updated_at, so each incremental refresh compares these columns
    of the cache with the source (:meth:`check_query`) and reloads the parents
    that differ (:func:`cfi_pipelines.views.refresh.stale_keys`)."""

    @property
    def table_name(self) -> str:
        return self.table.name

    @property
    def driving_table(self) -> sa.Table:
        """The source table with one row per view row (its count says whether the source is empty)."""
        return self.change_columns[0].table

    @property
    def columns(self) -> list[str]:
        return [c.name for c in self.table.columns]

    def query(self, *, incremental: bool = False) -> sa.Select:
        """The SELECT that produces the view's rows, columns in table order."""
        q = self.build_query(incremental)
        names = [c.name for c in q.selected_columns]
        if names != self.columns:  # a spec bug, caught by the first test that builds it
            raise ValueError(
                f"view {self.name}: query columns {names} != table columns {self.columns}"
            )
        return q

    def check_query(self) -> sa.Select:
        """Key and :attr:`aggregate_columns` of every view row, computed on the source, in key order.

        The same expressions as the view (a projection of :meth:`query`), so an
        unchanged row compares equal to its cached copy. Cost: the view's child
        aggregates once (one GROUP BY per child table, each over its parent-id
        index) and a scan of the parent table; no row is written.
        """
        sub = self.query().subquery("view_check")
        return sa.select(
            *(sub.c[k] for k in self.key), *(sub.c[c] for c in self.aggregate_columns)
        ).order_by(*(sub.c[k] for k in self.key))

    def keyed_query(self, keys: Keys, dialect: str | None = None) -> sa.Select:
        """The view's rows for ``keys`` (tuples in key order), computed on the source
        (``dialect``: the source's, for the fastest composite-key predicate).

        Cost O(len(keys)): the restriction is applied to the driving table and inside each
        child aggregate, so every table is read through its key or parent-id index. Keep
        ``keys`` to a few hundred per query (bound parameters)."""
        q = self.build_query(False, keys=list(keys), dialect=dialect)
        names = [c.name for c in q.selected_columns]
        if names != self.columns:
            raise ValueError(f"view {self.name}: keyed query columns {names} != {self.columns}")
        return q

    def dependency(self, table: str) -> Dependency | None:
        """How changes of source table ``table`` reach this view (None: it does not follow it)."""
        return next((d for d in self.dependencies if d.table.name == table), None)

    def for_keys(self, keys: Iterable) -> ViewSpec:
        """This view restricted to the rows whose (single-column) key is in ``keys``
        (through :meth:`keyed_query`: O(len(keys)))."""
        keys = [(k,) for k in keys]
        full = self.build_query

        def build(incremental: bool, keys_: Keys | None = None, dialect: str | None = None):
            return full(False, keys=keys)

        return replace(self, build_query=build)

    def params(self, *, since: datetime | None = None, today: date | None = None) -> dict:
        """Bind parameters for :meth:`query` (only those it uses)."""
        out: dict = {}
        compiled_params = self.query(incremental=since is not None).compile().params
        if "since" in compiled_params:
            out["since"] = since
        if "today" in compiled_params:
            out["today"] = today or date.today()
        return out


def _money(x) -> sa.ColumnElement:
    """``x`` rounded to the cent, never negative zero, on every dialect.

    SQLite computes in binary floats: a sum of rounded amounts is stored as is in
    a NUMERIC column (724.0799999999999), and ROUND of a tiny negative difference
    is -0.0 in the query's output; ``+ 0`` turns -0.0 into 0.0 there and is a
    no-op on PostgreSQL and SQL Server (exact decimals).
    """
    return sa.func.round(x, 2) + 0


def _any_changed(table: sa.FromClause) -> sa.Subquery:
    """One row if a row of ``table`` changed since ``:since``, else none (its index)."""
    any_row = sa.select(sa.literal(1).label("changed")).where(table.c.updated_at > SINCE)
    return any_row.limit(1).subquery(f"{table.name}_any")


def _stocks(incremental: bool, keys: Keys | None = None, dialect: str | None = None) -> sa.Select:
    sl, p, w = src.stock_levels, src.products, src.warehouses
    q = sa.select(
        sl.c.tenant_id,
        sl.c.product_id,
        sl.c.warehouse_id,
        p.c.sku,
        p.c.name.label("product_name"),
        p.c.category,
        w.c.code.label("warehouse_code"),
        w.c.city.label("warehouse_city"),
        sl.c.quantity,
        sl.c.reserved,
        (sl.c.quantity - sl.c.reserved).label("available"),
        p.c.unit_price,
        _money(sl.c.quantity * p.c.unit_price).label("stock_value"),
        sl.c.updated_at.label("source_updated_at"),
    ).select_from(sl.join(p, p.c.id == sl.c.product_id).join(w, w.c.id == sl.c.warehouse_id))
    if incremental:
        # One indexed lookup per source table, not an OR across the join (which no
        # planner serves from the updated_at indexes: it scans the whole join).
        sl2, p2, w2 = sl.alias("sl_changed"), p.alias("p_changed"), w.alias("w_changed")
        changed = sa.union(
            sa.select(sl2.c.id).where(sl2.c.updated_at > SINCE),
            sa.select(sl2.c.id).where(
                sl2.c.product_id.in_(sa.select(p2.c.id).where(p2.c.updated_at > SINCE))
            ),
            # CFI's schema has no index on stock_levels.warehouse_id: this branch scans
            # the stock rows, so it is joined to "some warehouse changed" (zero or one
            # row): no change, no scan (SQLite scanned 1M index entries on every
            # incremental, 0.05-0.08 s, to find that no warehouse had changed)
            sa.select(sl2.c.id)
            .select_from(_any_changed(w2).join(sl2, sa.true()))
            .where(sl2.c.warehouse_id.in_(sa.select(w2.c.id).where(w2.c.updated_at > SINCE))),
        )
        q = q.where(sl.c.id.in_(changed))
    if keys is not None:
        q = q.where(key_predicate((sl.c.product_id, sl.c.warehouse_id), keys, dialect))
    return q


def _operations(
    incremental: bool, keys: Keys | None = None, dialect: str | None = None
) -> sa.Select:
    o, op, c = src.operations, src.operation_products, src.campaigns
    products = (
        _only(
            sa.select(
                op.c.operation_id,
                sa.func.count().label("n"),
                sa.func.round(sa.func.avg(op.c.discount_pct), 2).label("avg_discount"),
            ),
            op.c.operation_id,
            keys,
        )
        .group_by(op.c.operation_id)
        .subquery("op_agg")
    )
    camps = (
        _only(sa.select(c.c.operation_id, sa.func.count().label("n")), c.c.operation_id, keys)
        .where(c.c.operation_id.is_not(None))
        .group_by(c.c.operation_id)
        .subquery("camp_agg")
    )
    q = sa.select(
        o.c.tenant_id,
        o.c.id.label("operation_id"),
        o.c.code,
        o.c.name,
        o.c.kind,
        o.c.status,
        o.c.starts_on,
        o.c.ends_on,
        o.c.budget,
        sa.func.coalesce(products.c.n, 0).label("product_count"),
        products.c.avg_discount.label("avg_discount_pct"),
        sa.func.coalesce(camps.c.n, 0).label("campaign_count"),
        o.c.updated_at.label("source_updated_at"),
    ).select_from(
        o.outerjoin(products, products.c.operation_id == o.c.id).outerjoin(
            camps, camps.c.operation_id == o.c.id
        )
    )
    if incremental:
        q = q.where(
            sa.or_(
                o.c.updated_at > SINCE,
                o.c.id.in_(sa.select(op.c.operation_id).where(op.c.updated_at > SINCE)),
                o.c.id.in_(sa.select(c.c.operation_id).where(c.c.updated_at > SINCE)),
            )
        )
    return _only(q, o.c.id, keys)


def _invoices(incremental: bool, keys: Keys | None = None, dialect: str | None = None) -> sa.Select:
    i, li, pay, cl = src.invoices, src.invoice_lines, src.payments, src.clients
    lines = (
        _only(
            sa.select(
                li.c.invoice_id,
                sa.func.sum(li.c.quantity * li.c.unit_price).label("excl"),
                sa.func.sum(li.c.quantity * li.c.unit_price * li.c.vat_rate).label("tax"),
            ),
            li.c.invoice_id,
            keys,
        )
        .group_by(li.c.invoice_id)
        .subquery("line_agg")
    )
    paid = (
        _only(
            sa.select(pay.c.invoice_id, sa.func.sum(pay.c.amount).label("paid")),
            pay.c.invoice_id,
            keys,
        )
        .group_by(pay.c.invoice_id)
        .subquery("pay_agg")
    )
    excl = _money(sa.func.coalesce(lines.c.excl, 0))
    tax = _money(sa.func.coalesce(lines.c.tax, 0))
    paid_amount = _money(sa.func.coalesce(paid.c.paid, 0))
    outstanding = sa.case((i.c.status == "cancelled", 0), else_=_money(excl + tax - paid_amount))
    q = sa.select(
        i.c.tenant_id,
        i.c.id.label("invoice_id"),
        i.c.number,
        i.c.client_id,
        cl.c.name.label("client_name"),
        cl.c.city.label("client_city"),
        i.c.issued_on,
        i.c.due_on,
        i.c.status,
        excl.label("total_excl_tax"),
        tax.label("total_tax"),
        _money(excl + tax).label("total_incl_tax"),
        paid_amount.label("paid"),
        outstanding.label("outstanding"),
        sa.case(
            (
                sa.and_(i.c.due_on < TODAY, i.c.status != "cancelled", outstanding > 0.005),
                sa.true(),
            ),
            else_=sa.false(),
        ).label("overdue"),
        i.c.updated_at.label("source_updated_at"),
    ).select_from(
        i.join(cl, cl.c.id == i.c.client_id)
        .outerjoin(lines, lines.c.invoice_id == i.c.id)
        .outerjoin(paid, paid.c.invoice_id == i.c.id)
    )
    if incremental:
        q = q.where(
            sa.or_(
                i.c.updated_at > SINCE,
                cl.c.updated_at > SINCE,
                i.c.id.in_(sa.select(li.c.invoice_id).where(li.c.updated_at > SINCE)),
                i.c.id.in_(sa.select(pay.c.invoice_id).where(pay.c.updated_at > SINCE)),
            )
        )
    return _only(q, i.c.id, keys)


def _campaigns(
    incremental: bool, keys: Keys | None = None, dialect: str | None = None
) -> sa.Select:
    c, ch, o, t, r = (
        src.campaigns,
        src.channels,
        src.operations,
        src.campaign_targets,
        src.campaign_results,
    )
    targets = (
        _only(sa.select(t.c.campaign_id, sa.func.count().label("n")), t.c.campaign_id, keys)
        .group_by(t.c.campaign_id)
        .subquery("target_agg")
    )
    results = (
        _only(
            sa.select(
                r.c.campaign_id,
                sa.func.sum(r.c.sent).label("sent"),
                sa.func.sum(r.c.opened).label("opened"),
                sa.func.sum(r.c.clicked).label("clicked"),
                sa.func.sum(r.c.converted).label("converted"),
                sa.func.sum(r.c.revenue).label("revenue"),
            ),
            r.c.campaign_id,
            keys,
        )
        .group_by(r.c.campaign_id)
        .subquery("result_agg")
    )
    q = sa.select(
        c.c.tenant_id,
        c.c.id.label("campaign_id"),
        c.c.code,
        c.c.name,
        c.c.status,
        ch.c.code.label("channel"),
        c.c.operation_id,
        o.c.code.label("operation_code"),
        c.c.starts_on,
        c.c.ends_on,
        c.c.budget,
        sa.func.coalesce(targets.c.n, 0).label("targets"),
        sa.func.coalesce(results.c.sent, 0).label("sent"),
        sa.func.coalesce(results.c.opened, 0).label("opened"),
        sa.func.coalesce(results.c.clicked, 0).label("clicked"),
        sa.func.coalesce(results.c.converted, 0).label("converted"),
        _money(sa.func.coalesce(results.c.revenue, 0)).label("revenue"),
        c.c.updated_at.label("source_updated_at"),
    ).select_from(
        c.join(ch, ch.c.id == c.c.channel_id)
        .outerjoin(o, o.c.id == c.c.operation_id)
        .outerjoin(targets, targets.c.campaign_id == c.c.id)
        .outerjoin(results, results.c.campaign_id == c.c.id)
    )
    if incremental:
        o2 = o.alias("o_changed")
        q = q.where(
            sa.or_(
                c.c.updated_at > SINCE,
                c.c.id.in_(sa.select(t.c.campaign_id).where(t.c.updated_at > SINCE)),
                c.c.id.in_(sa.select(r.c.campaign_id).where(r.c.updated_at > SINCE)),
                # operation_code: a renamed operation re-computes its campaigns
                c.c.operation_id.in_(sa.select(o2.c.id).where(o2.c.updated_at > SINCE)),
            )
        )
    return _only(q, c.c.id, keys)


VIEWS: tuple[ViewSpec, ...] = (
    ViewSpec(
        name="stocks",
        description="Stock per product and warehouse: quantity, reserved, available, value.",
        table=common.cfi_stocks,
        key=("product_id", "warehouse_id"),
        indexes=(("tenant_id", "sku"), ("tenant_id", "warehouse_id")),
        build_query=_stocks,
        change_columns=(
            src.stock_levels.c.updated_at,
            src.products.c.updated_at,
            src.warehouses.c.updated_at,
        ),
        dependencies=(
            Dependency(src.stock_levels, ("product_id", "warehouse_id")),
            Dependency(
                src.products,
                ("id",),
                # the unique (product_id, warehouse_id) index serves it
                sa.select(src.stock_levels.c.product_id, src.stock_levels.c.warehouse_id).where(
                    src.stock_levels.c.product_id.in_(VALUES)
                ),
            ),
            Dependency(
                src.warehouses,
                ("id",),
                # no index on warehouse_id in CFI's schema: a scan of stock_levels, but a
                # warehouse change touches a large share of its rows anyway
                sa.select(src.stock_levels.c.product_id, src.stock_levels.c.warehouse_id).where(
                    src.stock_levels.c.warehouse_id.in_(VALUES)
                ),
            ),
        ),
    ),
    ViewSpec(
        name="operations",
        description="Marketing operations (opérations commerciales) with their products and campaigns.",
        table=common.cfi_operations,
        key=("operation_id",),
        indexes=(("tenant_id", "status"), ("tenant_id", "starts_on")),
        build_query=_operations,
        change_columns=(
            src.operations.c.updated_at,
            src.operation_products.c.updated_at,
            src.campaigns.c.updated_at,
        ),
        aggregate_columns=("product_count", "avg_discount_pct", "campaign_count"),
        dependencies=(
            Dependency(src.operations, ("id",)),
            Dependency(src.operation_products, ("operation_id",)),
            Dependency(src.campaigns, ("operation_id",)),
        ),
    ),
    ViewSpec(
        name="invoices",
        description="Invoices (factures) with totals, paid, outstanding and overdue flag.",
        table=common.cfi_invoices,
        key=("invoice_id",),
        # (tenant_id, issued_on): "the last N days of invoices", a tenant's typical read
        indexes=(
            ("tenant_id", "client_id"),
            ("tenant_id", "overdue", "due_on"),
            ("tenant_id", "issued_on"),
        ),
        build_query=_invoices,
        change_columns=(
            src.invoices.c.updated_at,
            src.invoice_lines.c.updated_at,
            src.payments.c.updated_at,
            src.clients.c.updated_at,
        ),
        # overdue: also depends on the refresh date (an invoice falls due overnight)
        aggregate_columns=("total_excl_tax", "total_tax", "paid", "overdue"),
        dependencies=(
            Dependency(src.invoices, ("id",)),
            Dependency(src.invoice_lines, ("invoice_id",)),
            Dependency(src.payments, ("invoice_id",)),
            Dependency(
                src.clients,
                ("id",),
                sa.select(src.invoices.c.id).where(src.invoices.c.client_id.in_(VALUES)),
            ),
        ),
    ),
    ViewSpec(
        name="campaigns",
        description="CFI campaigns (campagnes) with targets and results.",
        table=common.cfi_campaigns,
        key=("campaign_id",),
        indexes=(("tenant_id", "status"), ("tenant_id", "operation_id")),
        build_query=_campaigns,
        change_columns=(
            src.campaigns.c.updated_at,
            src.campaign_targets.c.updated_at,
            src.campaign_results.c.updated_at,
            src.operations.c.updated_at,
        ),
        aggregate_columns=("targets", "sent", "opened", "clicked", "converted", "revenue"),
        dependencies=(
            Dependency(src.campaigns, ("id",)),
            Dependency(src.campaign_targets, ("campaign_id",)),
            Dependency(src.campaign_results, ("campaign_id",)),
            Dependency(
                src.operations,
                ("id",),
                # no index on campaigns.operation_id in CFI's schema: a scan of campaigns
                sa.select(src.campaigns.c.id).where(src.campaigns.c.operation_id.in_(VALUES)),
            ),
        ),
    ),
)

VIEWS_BY_NAME: dict[str, ViewSpec] = {v.name: v for v in VIEWS}


def get_view(name: str) -> ViewSpec:
    """The spec of view ``name``, or a ValueError listing the valid names."""
    try:
        return VIEWS_BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown view {name!r}; views are: {', '.join(VIEWS_BY_NAME)}") from None
