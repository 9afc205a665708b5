"""The common DB: MyCfia's read cache of CFI data (read-only to MyCfia).

Four denormalised views (``cfi_stocks``, ``cfi_operations``, ``cfi_invoices``,
``cfi_campaigns``), the tenant closure that makes "a tenant sees itself and all
its descendants" one indexed join, the tenants' codes and login roles
(``cfi_tenants``, what row-level security binds a reader to), the freshness
status of each view, and the refresh history. The view tables are *rebuilt* by
every full refresh (a staging copy swapped in), so their indexes are declared
here for ``create_all`` and re-created by the refresh under per-refresh names.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

Money = sa.Numeric(14, 2)

cfi_stocks = sa.Table(
    "cfi_stocks",
    metadata,
    sa.Column("tenant_id", sa.Integer, nullable=False),
    sa.Column("product_id", sa.Integer, nullable=False),
    sa.Column("warehouse_id", sa.Integer, nullable=False),
    sa.Column("sku", sa.String(32), nullable=False),
    sa.Column("product_name", sa.String(200), nullable=False),
    sa.Column("category", sa.String(100), nullable=False),
    sa.Column("warehouse_code", sa.String(32), nullable=False),
    sa.Column("warehouse_city", sa.String(100), nullable=False),
    sa.Column("quantity", sa.Integer, nullable=False),
    sa.Column("reserved", sa.Integer, nullable=False),
    sa.Column("available", sa.Integer, nullable=False),
    sa.Column("unit_price", Money, nullable=False),
    sa.Column("stock_value", Money, nullable=False),
    sa.Column("source_updated_at", sa.DateTime, nullable=False),
)

cfi_operations = sa.Table(
    "cfi_operations",
    metadata,
    sa.Column("tenant_id", sa.Integer, nullable=False),
    sa.Column("operation_id", sa.Integer, nullable=False),
    sa.Column("code", sa.String(32), nullable=False),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("starts_on", sa.Date, nullable=False),
    sa.Column("ends_on", sa.Date, nullable=False),
    sa.Column("budget", Money, nullable=False),
    sa.Column("product_count", sa.Integer, nullable=False),
    sa.Column("avg_discount_pct", sa.Numeric(5, 2)),
    sa.Column("campaign_count", sa.Integer, nullable=False),
    sa.Column("source_updated_at", sa.DateTime, nullable=False),
)

cfi_invoices = sa.Table(
    "cfi_invoices",
    metadata,
    sa.Column("tenant_id", sa.Integer, nullable=False),
    sa.Column("invoice_id", sa.Integer, nullable=False),
    sa.Column("number", sa.String(32), nullable=False),
    sa.Column("client_id", sa.Integer, nullable=False),
    sa.Column("client_name", sa.String(200), nullable=False),
    sa.Column("client_city", sa.String(100)),
    sa.Column("issued_on", sa.Date, nullable=False),
    sa.Column("due_on", sa.Date, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("total_excl_tax", Money, nullable=False),
    sa.Column("total_tax", Money, nullable=False),
    sa.Column("total_incl_tax", Money, nullable=False),
    sa.Column("paid", Money, nullable=False),
    sa.Column("outstanding", Money, nullable=False),
    sa.Column("overdue", sa.Boolean, nullable=False),
    sa.Column("source_updated_at", sa.DateTime, nullable=False),
)

cfi_campaigns = sa.Table(
    "cfi_campaigns",
    metadata,
    sa.Column("tenant_id", sa.Integer, nullable=False),
    sa.Column("campaign_id", sa.Integer, nullable=False),
    sa.Column("code", sa.String(32), nullable=False),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("channel", sa.String(32), nullable=False),
    sa.Column("operation_id", sa.Integer),
    sa.Column("operation_code", sa.String(32)),
    sa.Column("starts_on", sa.Date, nullable=False),
    sa.Column("ends_on", sa.Date, nullable=False),
    sa.Column("budget", Money, nullable=False),
    sa.Column("targets", sa.Integer, nullable=False),
    sa.Column("sent", sa.Integer, nullable=False),
    sa.Column("opened", sa.Integer, nullable=False),
    sa.Column("clicked", sa.Integer, nullable=False),
    sa.Column("converted", sa.Integer, nullable=False),
    sa.Column("revenue", Money, nullable=False),
    sa.Column("source_updated_at", sa.DateTime, nullable=False),
)

cfi_tenant_closure = sa.Table(
    "cfi_tenant_closure",
    metadata,
    sa.Column("ancestor", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("descendant", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("depth", sa.Integer, nullable=False),
    sa.Index("ix_cfi_tenant_closure_descendant", "descendant"),
)

cfi_tenants = sa.Table(
    "cfi_tenants",
    metadata,
    sa.Column("tenant_id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("code", sa.String(32), nullable=False, unique=True),
    # PostgreSQL: the LOGIN role bound to this tenant (cfi_pipelines.tenancy.roles);
    # the row-level security policies map current_user to tenant_id through it.
    sa.Column("role_name", sa.String(63), nullable=False, unique=True),
    sa.Column("secret_fingerprint", sa.String(32)),
)

cfi_view_status = sa.Table(
    "cfi_view_status",
    metadata,
    sa.Column("view", sa.String(32), primary_key=True),
    sa.Column("last_success_at", sa.DateTime),
    sa.Column("source_snapshot_at", sa.DateTime),
    sa.Column("rows", sa.BigInteger),
    sa.Column("mode", sa.String(16)),
    sa.Column("source", sa.String(16)),  # db / cfi_api
    sa.Column("duration_s", sa.Float),
    sa.Column("watermark", sa.DateTime),
    sa.Column("last_attempt_at", sa.DateTime),
    sa.Column("consecutive_failures", sa.Integer, nullable=False, server_default="0"),
    sa.Column("error", sa.Text),
)

cfi_refresh_log = sa.Table(
    "cfi_refresh_log",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("view", sa.String(32), nullable=False),
    sa.Column("started_at", sa.DateTime, nullable=False),
    sa.Column("finished_at", sa.DateTime, nullable=False),
    sa.Column("source_snapshot_at", sa.DateTime),
    sa.Column("mode", sa.String(16), nullable=False),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),  # success / failed / refused
    sa.Column("rows", sa.BigInteger),
    sa.Column("inserted", sa.BigInteger),
    sa.Column("updated", sa.BigInteger),
    sa.Column("deleted", sa.BigInteger),
    sa.Column("duration_s", sa.Float),
    sa.Column("error", sa.Text),
    sa.Index("ix_cfi_refresh_log_view_started", "view", "started_at"),
)

cfi_capture_state = sa.Table(
    "cfi_capture_state",
    metadata,
    sa.Column("view", sa.String(32), primary_key=True),
    sa.Column("mode", sa.String(32), nullable=False),  # pg_logical / mssql_ct / ...
    sa.Column("position", sa.String(200), nullable=False),  # opaque, the capture's own token
    sa.Column("updated_at", sa.DateTime, nullable=False),
)
"""Per view: the change-capture position its data has applied up to (written in the same
transaction as the view's rows and status; a full refresh records the position it took
before reading the source)."""

VIEW_TABLES: dict[str, sa.Table] = {
    "stocks": cfi_stocks,
    "operations": cfi_operations,
    "invoices": cfi_invoices,
    "campaigns": cfi_campaigns,
}
