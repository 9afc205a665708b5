"""Keep ``cfi_tenants`` and the tenants' PostgreSQL login roles in sync with CFI.

Called by the refresh after it wrote the closure. ``cfi_tenants`` (every engine)
maps each CFI tenant to its code and to its login role; on PostgreSQL, once
``deploy/sql/postgresql_row_level_security.sql`` created the group
``cfi_tenant_reader``, each tenant also gets its LOGIN role ``cfi_tenant_<id>``:
no superuser, no BYPASSRLS, no CREATEROLE/CREATEDB, member of the group only, with
a password derived from ``CFI_TENANT_SECRET`` (set as a SCRAM verifier computed
here: the password never reaches the server or its logs), a read-only default,
a statement timeout and an idle-in-transaction timeout. A tenant gone from CFI
loses LOGIN (its role is kept: dropping one that holds grants fails).

Fail-closed by construction: the closure, not this map, decides what a tenant
sees, so a role created late only delays a new tenant's first read.

Cost, per refresh: one read of CFI's tenants (``id, code``: O(tenants), the table the
refresh reads for the closure anyway). When their fingerprint (with the secret's) is the
one this process last synced to the same common DB, nothing else: no query on the
common DB, no role DDL (every refresh after the first of a process, with unchanged
tenants). Otherwise one read of the map and of the roles, then writes of only what
changed, under a table lock so parallel refreshes do not race.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cfi_pipelines.db import write_transaction
from cfi_pipelines.model import cfi_common as common
from cfi_pipelines.model import cfi_source as src
from cfi_pipelines.tenancy.binding import (
    READER_GROUP,
    derive_password,
    role_name,
    secret_fingerprint,
)

log = logging.getLogger(__name__)

ROLE_DEFAULTS = {
    "default_transaction_read_only": "on",
    "statement_timeout": "5s",
    "idle_in_transaction_session_timeout": "30s",
}
"""Defaults of each tenant role: a backstop only (a role may change its own
defaults); the binding sets the time limit and read-only default in the login's
startup options, and rolls every read back."""
SCRAM_ITERATIONS = 4096


@dataclass(frozen=True)
class SyncResult:
    mapped: int  # rows written to cfi_tenants
    roles_created: int
    passwords_set: int
    roles_disabled: int
    roles_managed: bool  # False: not PostgreSQL, or RLS not installed
    checked: bool = True  # False: same tenants as last synced here, the common DB untouched


_synced: dict[str, tuple[str, bool]] = {}
"""Per common DB (its URL, password hidden): the fingerprint this process last found
in sync there, and whether it manages roles. A role dropped by hand since is created
again by the next process (or after :func:`forget_synced`); ``doctor`` reports it."""


def tenants_fingerprint(tenants: dict[int, str], secret_fp: str) -> str:
    """A digest of CFI's tenants (ids and codes) and of the secret's fingerprint."""
    h = hashlib.sha256(secret_fp.encode())
    for tid in sorted(tenants):
        h.update(f"\x00{tid}\x00{tenants[tid]}".encode())
    return h.hexdigest()


def forget_synced() -> None:
    """Check the common DB again at the next sync (tests; a DBA who dropped roles by
    hand restarts the process or calls this)."""
    _synced.clear()


def scram_verifier(password: str, salt: bytes | None = None) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (RFC 5802/7677)."""
    salt = salt or secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, SCRAM_ITERATIONS)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"SCRAM-SHA-256${SCRAM_ITERATIONS}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def read_tenants(source: Engine) -> dict[int, str]:
    """CFI's tenants, ``{id: code}`` (O(tenants))."""
    with source.connect() as conn:
        return dict(conn.execute(sa.select(src.tenants.c.id, src.tenants.c.code)).all())


def roles_managed(conn: sa.Connection) -> bool:
    """PostgreSQL with the row-level security script installed (the group exists)."""
    if conn.dialect.name != "postgresql":
        return False
    return bool(
        conn.scalar(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :g"), {"g": READER_GROUP})
    )


def _existing_roles(conn: sa.Connection, names: list[str]) -> dict[str, bool]:
    rows = conn.execute(
        sa.text("SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname = ANY(:n)"),
        {"n": names},
    ).all()
    return {r[0]: bool(r[1]) for r in rows}


def sync_tenants(source: Engine, target: Engine, secret: str | None) -> SyncResult:
    """Bring ``cfi_tenants`` and the tenant roles in line with CFI's tenants."""
    tenants = read_tenants(source)
    fingerprint = secret_fingerprint(secret)
    key, digest = str(target.url), tenants_fingerprint(tenants, fingerprint)
    if key in _synced and _synced[key][0] == digest:  # unchanged since last synced here
        return SyncResult(0, 0, 0, 0, _synced[key][1], checked=False)
    want = {tid: (code, role_name(tid)) for tid, code in tenants.items()}
    t = common.cfi_tenants
    with target.connect() as conn:  # the cheap path: nothing to do
        managed = roles_managed(conn)
        have = {r.tenant_id: r for r in conn.execute(sa.select(t))}
        roles = _existing_roles(conn, [r for _, r in want.values()]) if managed else {}
        conn.rollback()
    if _in_sync(want, have, roles, fingerprint, managed):
        if managed or target.dialect.name != "postgresql":
            # not remembered on a PostgreSQL without the RLS script: the DBA may install
            # it at any time, and the next refresh must then create the roles
            _synced[key] = (digest, managed)
        return SyncResult(0, 0, 0, 0, managed)
    _synced.pop(key, None)
    with write_transaction(target) as conn:
        if conn.dialect.name == "postgresql":
            # serialises parallel refreshes; a table lock, not an advisory one: tenants
            # cannot take it (they have SELECT only, and their transactions roll back)
            conn.exec_driver_sql("LOCK TABLE cfi_tenants IN SHARE ROW EXCLUSIVE MODE")
        have = {r.tenant_id: r for r in conn.execute(sa.select(t))}
        gone = set(have) - set(want)
        mapped = 0
        for tid in gone:
            conn.execute(t.delete().where(t.c.tenant_id == tid))
            mapped += 1
        for tid, (code, role) in want.items():
            row = {"tenant_id": tid, "code": code, "role_name": role}
            old = have.get(tid)
            if old is None:
                # a code taken over from a removed tenant is freed above
                conn.execute(t.insert().values(**row, secret_fingerprint=None))
                mapped += 1
            elif (old.code, old.role_name) != (code, role):
                conn.execute(t.update().where(t.c.tenant_id == tid).values(**row))
                mapped += 1
    created = passwords = disabled = 0
    if managed:  # its own transaction: without CREATEROLE the map above is still written
        with write_transaction(target) as conn:
            conn.exec_driver_sql("LOCK TABLE cfi_tenants IN SHARE ROW EXCLUSIVE MODE")
            have = {r.tenant_id: r for r in conn.execute(sa.select(t))}
            created, passwords, disabled = _sync_roles(conn, want, have, gone, secret, fingerprint)
    log.info(
        "tenants: %d map rows written, %d roles created, %d passwords set, %d disabled",
        mapped, created, passwords, disabled,
    )  # fmt: skip
    # the next sync checks once more (cheap) before it trusts the fingerprint
    return SyncResult(mapped, created, passwords, disabled, managed)


def _in_sync(want, have, roles, fingerprint, managed) -> bool:
    if set(want) != set(have):
        return False
    for tid, (code, role) in want.items():
        row = have[tid]
        if (row.code, row.role_name) != (code, role):
            return False
        if managed and (not roles.get(role) or (row.secret_fingerprint or "") != fingerprint):
            return False
    return True


def _sync_roles(conn, want, have, gone_ids, secret, fingerprint) -> tuple[int, int, int]:
    prep = conn.dialect.identifier_preparer
    t = common.cfi_tenants
    roles = _existing_roles(conn, [r for _, r in want.values()])
    created = passwords = 0
    for tid, (_code, role) in want.items():
        q = prep.quote(role)
        if role not in roles:
            conn.exec_driver_sql(
                f"CREATE ROLE {q} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE "
                f"NOREPLICATION INHERIT IN ROLE {prep.quote(READER_GROUP)}"
            )
            for name, value in ROLE_DEFAULTS.items():
                conn.exec_driver_sql(f"ALTER ROLE {q} SET {name} = '{value}'")
            created += 1
        elif not roles[role]:
            conn.exec_driver_sql(f"ALTER ROLE {q} LOGIN")
        old = have.get(tid)
        if role not in roles or old is None or (old.secret_fingerprint or "") != fingerprint:
            if secret:
                verifier = scram_verifier(derive_password(secret, role))
                conn.exec_driver_sql(f"ALTER ROLE {q} PASSWORD '{verifier}'")
            else:
                conn.exec_driver_sql(f"ALTER ROLE {q} PASSWORD NULL")
            conn.execute(
                t.update().where(t.c.tenant_id == tid).values(secret_fingerprint=fingerprint)
            )
            passwords += 1
    gone = [role_name(tid) for tid in gone_ids]
    disabled = 0
    for role, can_login in _existing_roles(conn, gone).items():
        if can_login:
            conn.exec_driver_sql(f"ALTER ROLE {prep.quote(role)} NOLOGIN")
            disabled += 1
    return created, passwords, disabled


def sync_after_refresh(source: Engine, target: Engine) -> SyncResult | None:
    """:func:`sync_tenants` for the refresh: never fails a refresh (a role not yet
    created only delays that tenant's reads; ``doctor`` reports it), logs instead."""
    from cfi_pipelines.settings import tenant_secret

    try:
        return sync_tenants(source, target, tenant_secret())
    except Exception as exc:  # noqa: BLE001 - the view refresh must go on
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        log.warning("tenants: login roles not synchronised: %s", first)
        return None
