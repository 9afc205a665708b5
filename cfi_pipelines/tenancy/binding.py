"""Binding a reader to a tenant: names, credentials, limits, and the reference read.

The tenant is bound *outside* the SQL a reader sends. On PostgreSQL the reader logs
in as the tenant's own role (``cfi_tenant_<id>``), whose password MyCfia and this
project both derive from ``CFI_TENANT_SECRET`` (HMAC-SHA256 of the role name), so no
per-tenant secret has to be stored or shipped; the policies map ``current_user`` to
the tenant. On SQLite the reference reader (:mod:`.reader_sqlite`) is the binding.
Each read gets a time limit (on PostgreSQL set by the login, and every read rolled
back so that none can lift it for the next) and a row cap.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from cfi_pipelines.model import cfi_common as common

ROLE_PREFIX = "cfi_tenant_"
READER_GROUP = "cfi_tenant_reader"
"""The group of every tenant role: it holds the grants and maps to no tenant."""
DEFAULT_MAX_ROWS = 1000
DEFAULT_TIMEOUT_S = 5.0
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01", "55P03", "55006"})
"""Errors a reader may retry as is (serialization, deadlock, lock not available,
object in use): a refresh swapping a view in at that instant can cause them."""


class Refused(Exception):
    """A read that was not run or was stopped; the message is one line saying why."""

    def __init__(self, reason: str, *, retryable: bool = False) -> None:
        super().__init__(" ".join(reason.split()))
        self.retryable = retryable


@dataclass
class ReadResult:
    tenant_code: str
    tenant_id: int
    binding: str
    columns: list[str]
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    truncated: bool = False


def role_name(tenant_id: int) -> str:
    """The login role of a tenant: by id, which never changes (codes can)."""
    return f"{ROLE_PREFIX}{int(tenant_id)}"


def derive_password(secret: str, role: str) -> str:
    """The password of ``role``: base64url(HMAC-SHA256(secret, role)), 43 characters."""
    digest = hmac.new(secret.encode(), role.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def secret_fingerprint(secret: str | None) -> str:
    """A short fingerprint of the secret (stored beside each role: a changed secret
    makes the refresh set every role's password again); ``""`` without a secret."""
    if not secret:
        return ""
    return hmac.new(secret.encode(), b"cfi-tenant-fingerprint", hashlib.sha256).hexdigest()[:16]


def lookup_tenant(engine: sa.Engine, code: str) -> tuple[int, str]:
    """``(tenant_id, role_name)`` of the tenant ``code``, read from ``cfi_tenants``
    (O(1), one indexed row). Raises :class:`Refused` for an unknown code."""
    t = common.cfi_tenants
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table(t.name):
            raise Refused("the common DB has no cfi_tenants table yet: run `cfi-pipelines refresh`")
        row = conn.execute(sa.select(t.c.tenant_id, t.c.role_name).where(t.c.code == code)).first()
    if row is None:
        raise Refused(
            f"unknown tenant {code!r} (codes are CFI's tenant codes, e.g. CFI or NORD-01; "
            "a new tenant appears after the next refresh)"
        )
    return int(row.tenant_id), str(row.role_name)
