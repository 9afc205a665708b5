"""MyCfia's database (the campaign generator's side): campaigns, their targets and
the log of every export attempt.

Portable types only (SQLite, PostgreSQL, SQL Server). The generated content of a
campaign (messages, segments, schedule, budget) is stored as a JSON document in a
text column: MyCfia writes it, the export validates it against the JSON Schema.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

CAMPAIGN_STATUSES = ("draft", "validated", "archived")
EXPORT_STATUSES = ("pending", "delivered", "failed", "rejected")

campaigns = sa.Table(
    "campaigns",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    # The CFI tenant (id and code as in CFI's tenants table): the code names the drop folder.
    sa.Column("tenant_id", sa.Integer, nullable=False, index=True),
    sa.Column("tenant_code", sa.String(64), nullable=False),
    # The CFI marketing operation the campaign belongs to (optional).
    sa.Column("operation_id", sa.Integer, nullable=True),
    sa.Column("operation_code", sa.String(64), nullable=True),
    sa.Column("name", sa.Unicode(400), nullable=False),
    sa.Column("channel", sa.String(16), nullable=False),  # email / sms / push / mail
    sa.Column("status", sa.String(16), nullable=False),  # draft / validated / archived
    sa.Column("revision", sa.Integer, nullable=False),  # grows on every edit
    sa.Column("validated_at", sa.DateTime, nullable=True),
    # JSON: {"messages": [...], "segments": [...], "schedule": {...}, "budget": {...}}
    sa.Column("content", sa.UnicodeText, nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("updated_at", sa.DateTime, nullable=False),
    # The validated-campaigns sensor reads "validated, changed since <cursor>".
    sa.Index("ix_campaigns_status_updated_at", "status", "updated_at"),
    sa.Index("ix_campaigns_updated_at", "updated_at"),
)

campaign_targets = sa.Table(
    "campaign_targets",
    metadata,
    sa.Column("campaign_id", sa.Integer, sa.ForeignKey("campaigns.id"), primary_key=True),
    sa.Column("position", sa.Integer, primary_key=True, autoincrement=False),  # CSV row order
    sa.Column("client_reference", sa.String(64), nullable=False),
    sa.Column("email", sa.Unicode(320), nullable=True),
    sa.Column("phone", sa.String(32), nullable=True),
    sa.Column("segment", sa.String(64), nullable=True),
    sa.Column("first_name", sa.Unicode(200), nullable=True),
    sa.Column("last_name", sa.Unicode(200), nullable=True),
    # JSON object of personalisation fields (flat string -> string).
    sa.Column("personalisation", sa.UnicodeText, nullable=True),
)

campaign_exports = sa.Table(
    "campaign_exports",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("campaign_id", sa.Integer, nullable=False),
    sa.Column("revision", sa.Integer, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # pending / delivered / failed / rejected
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("run_id", sa.String(64), nullable=True),
    sa.Column("json_path", sa.Unicode(1000), nullable=True),
    sa.Column("csv_path", sa.Unicode(1000), nullable=True),
    sa.Column("manifest_path", sa.Unicode(1000), nullable=True),
    sa.Column("json_sha256", sa.String(64), nullable=True),
    sa.Column("json_bytes", sa.BigInteger, nullable=True),
    sa.Column("csv_sha256", sa.String(64), nullable=True),
    sa.Column("csv_bytes", sa.BigInteger, nullable=True),
    sa.Column("row_count", sa.Integer, nullable=True),
    sa.Column("validated_at", sa.DateTime, nullable=True),  # of this revision
    sa.Column("local_manifest", sa.Unicode(1000), nullable=True),  # the built files (outbox)
    sa.Column("error", sa.UnicodeText, nullable=True),
    sa.Column("requested_at", sa.DateTime, nullable=False),
    sa.Column("delivered_at", sa.DateTime, nullable=True),
    sa.Column("updated_at", sa.DateTime, nullable=False),
    # Of a 'failed' row: "transient" (SFTP down: retried later by the sensor) or
    # "permanent" (host key, auth, bug, files gone: the operator must act).
    sa.Column("failure_kind", sa.String(16), nullable=True),
    # Delivery runs of this revision that ended failed-transient (the backoff's exponent
    # and the bound of automatic re-tries); None counts as 0.
    sa.Column("transient_failures", sa.Integer, nullable=True),
    # When the sensor requests the next automatic re-try of a failed-transient row;
    # None: not retried automatically (delivered, permanent, or re-tries exhausted).
    sa.Column("next_attempt_at", sa.DateTime, nullable=True),
    # One row per (campaign, revision): a re-export updates it (attempts grow).
    sa.UniqueConstraint("campaign_id", "revision", name="uq_campaign_exports_campaign_revision"),
    sa.Index("ix_campaign_exports_status", "status"),
    # The sensor reads "failed, next attempt due" every tick.
    sa.Index("ix_campaign_exports_status_next_attempt_at", "status", "next_attempt_at"),
)
