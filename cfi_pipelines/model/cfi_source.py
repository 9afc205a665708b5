"""CFI's production database (the master data; read-only to us): 15 tables.

Portable types only, so the same metadata creates the schema on SQLite,
PostgreSQL and SQL Server. Every mutable table has an indexed ``updated_at``:
it is what incremental refreshes read.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

Money = sa.Numeric(14, 2)


def _updated_at() -> sa.Column:
    return sa.Column("updated_at", sa.DateTime, nullable=False, index=True)


tenants = sa.Table(
    "tenants",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("code", sa.String(32), nullable=False, unique=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("parent_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=True, index=True),
    _updated_at(),
)

channels = sa.Table(
    "channels",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("code", sa.String(32), nullable=False, unique=True),
    sa.Column("name", sa.String(100), nullable=False),
    _updated_at(),
)

clients = sa.Table(
    "clients",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False, index=True),
    sa.Column("reference", sa.String(32), nullable=False, unique=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("email", sa.String(200)),
    sa.Column("phone", sa.String(32)),
    sa.Column("city", sa.String(100)),
    sa.Column("postal_code", sa.String(10)),
    sa.Column("segment", sa.String(32)),
    _updated_at(),
)

products = sa.Table(
    "products",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False, index=True),
    sa.Column("sku", sa.String(32), nullable=False, unique=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("category", sa.String(100), nullable=False),
    sa.Column("unit_price", Money, nullable=False),
    _updated_at(),
)

warehouses = sa.Table(
    "warehouses",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False, index=True),
    sa.Column("code", sa.String(32), nullable=False, unique=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("city", sa.String(100), nullable=False),
    _updated_at(),
)

stock_levels = sa.Table(
    "stock_levels",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False, index=True),
    sa.Column("product_id", sa.Integer, sa.ForeignKey("products.id"), nullable=False),
    sa.Column("warehouse_id", sa.Integer, sa.ForeignKey("warehouses.id"), nullable=False),
    sa.Column("quantity", sa.Integer, nullable=False),
    sa.Column("reserved", sa.Integer, nullable=False),
    _updated_at(),
    sa.UniqueConstraint("product_id", "warehouse_id", name="uq_stock_levels_product_warehouse"),
)

stock_movements = sa.Table(
    "stock_movements",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column(
        "stock_level_id", sa.Integer, sa.ForeignKey("stock_levels.id"), nullable=False, index=True
    ),
    sa.Column("kind", sa.String(16), nullable=False),  # in / out / adjust
    sa.Column("quantity", sa.Integer, nullable=False),
    sa.Column("moved_at", sa.DateTime, nullable=False),
    _updated_at(),
)

operations = sa.Table(
    "operations",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False, index=True),
    sa.Column("code", sa.String(32), nullable=False, unique=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column(
        "kind", sa.String(32), nullable=False
    ),  # promotion / destockage / lancement / fidelite
    sa.Column("status", sa.String(16), nullable=False),  # planned / active / closed
    sa.Column("starts_on", sa.Date, nullable=False),
    sa.Column("ends_on", sa.Date, nullable=False),
    sa.Column("budget", Money, nullable=False),
    _updated_at(),
)

operation_products = sa.Table(
    "operation_products",
    metadata,
    sa.Column("operation_id", sa.Integer, sa.ForeignKey("operations.id"), primary_key=True),
    sa.Column("product_id", sa.Integer, sa.ForeignKey("products.id"), primary_key=True),
    sa.Column("discount_pct", sa.Numeric(5, 2), nullable=False),
    _updated_at(),
)

invoices = sa.Table(
    "invoices",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False, index=True),
    sa.Column("client_id", sa.Integer, sa.ForeignKey("clients.id"), nullable=False, index=True),
    sa.Column("number", sa.String(32), nullable=False, unique=True),
    sa.Column("issued_on", sa.Date, nullable=False),
    sa.Column("due_on", sa.Date, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # issued / paid / cancelled
    _updated_at(),
)

invoice_lines = sa.Table(
    "invoice_lines",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("invoice_id", sa.Integer, sa.ForeignKey("invoices.id"), nullable=False, index=True),
    sa.Column("product_id", sa.Integer, sa.ForeignKey("products.id"), nullable=False),
    sa.Column("quantity", sa.Integer, nullable=False),
    sa.Column("unit_price", Money, nullable=False),
    sa.Column("vat_rate", sa.Numeric(5, 4), nullable=False),
    _updated_at(),
)

payments = sa.Table(
    "payments",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("invoice_id", sa.Integer, sa.ForeignKey("invoices.id"), nullable=False, index=True),
    sa.Column("amount", Money, nullable=False),
    sa.Column("paid_on", sa.Date, nullable=False),
    sa.Column("method", sa.String(16), nullable=False),
    _updated_at(),
)

campaigns = sa.Table(
    "campaigns",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False, index=True),
    sa.Column("operation_id", sa.Integer, sa.ForeignKey("operations.id"), nullable=True),
    sa.Column("channel_id", sa.Integer, sa.ForeignKey("channels.id"), nullable=False),
    sa.Column("code", sa.String(32), nullable=False, unique=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # draft / scheduled / running / done
    sa.Column("starts_on", sa.Date, nullable=False),
    sa.Column("ends_on", sa.Date, nullable=False),
    sa.Column("budget", Money, nullable=False),
    _updated_at(),
)

campaign_targets = sa.Table(
    "campaign_targets",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("campaign_id", sa.Integer, sa.ForeignKey("campaigns.id"), nullable=False, index=True),
    sa.Column("client_id", sa.Integer, sa.ForeignKey("clients.id"), nullable=False),
    sa.Column("segment", sa.String(32)),
    _updated_at(),
)

campaign_results = sa.Table(
    "campaign_results",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("campaign_id", sa.Integer, sa.ForeignKey("campaigns.id"), nullable=False, index=True),
    sa.Column("measured_on", sa.Date, nullable=False),
    sa.Column("sent", sa.Integer, nullable=False),
    sa.Column("opened", sa.Integer, nullable=False),
    sa.Column("clicked", sa.Integer, nullable=False),
    sa.Column("converted", sa.Integer, nullable=False),
    sa.Column("revenue", Money, nullable=False),
    _updated_at(),
)
