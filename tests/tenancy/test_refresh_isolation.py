"""Isolation holds while the views are rebuilt: a reader per tenant polls through
20 full refreshes and swaps (real PostgreSQL, threads) and never sees a foreign row,
never a view without its policy, never an error other than a retryable one."""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from cfi_pipelines.tenancy import reader_pg
from cfi_pipelines.tenancy.binding import Refused, derive_password
from cfi_pipelines.views.refresh import refresh_view
from cfi_pipelines.views.spec import VIEWS
from tests.tenancy.conftest import SECRET, TENANTS

pytestmark = pytest.mark.postgres

REFRESHES = 20
READ = (
    "SELECT 'stocks', tenant_id, count(*) FROM cfi_stocks GROUP BY tenant_id "
    "UNION ALL SELECT 'invoices', tenant_id, count(*) FROM cfi_invoices GROUP BY tenant_id "
    "UNION ALL SELECT 'operations', tenant_id, count(*) FROM cfi_operations GROUP BY tenant_id "
    "UNION ALL SELECT 'campaigns', tenant_id, count(*) FROM cfi_campaigns GROUP BY tenant_id"
)


def _session(rls_db, code: str) -> reader_pg.TenantSession:
    role = rls_db.role(code)
    return reader_pg.connect(rls_db.url, role, derive_password(SECRET, role), timeout_s=5)


def test_readers_see_their_subtree_only_through_full_refreshes(rls_db):
    expected = {}
    for code in TENANTS:
        with _session(rls_db, code) as session:
            _, rows, _ = session.read(READ, max_rows=1000)
        expected[code] = sorted(rows)
        assert {r[1] for r in rows} <= rls_db.subtree(code)
        assert rows  # every tenant of the suite has rows
    done = threading.Event()
    foreign: list[tuple] = []
    wrong: list[tuple] = []
    errors: list[str] = []
    retried: Counter[str] = Counter()
    reads: Counter[str] = Counter()

    def poll(code: str) -> None:
        subtree = rls_db.subtree(code)
        with _session(rls_db, code) as session:  # one pooled connection, as MyCfia's
            while not done.is_set():
                try:
                    _, rows, _ = session.read(READ, max_rows=1000)
                except Refused as exc:
                    if exc.retryable:
                        retried[code] += 1
                    else:
                        errors.append(f"{code}: {exc}")
                    continue
                reads[code] += 1
                foreign.extend((code, r) for r in rows if r[1] not in subtree)
                if sorted(rows) != expected[code]:
                    wrong.append((code, sorted(rows)))

    threads = [threading.Thread(target=poll, args=(c,), daemon=True) for c in TENANTS]
    for t in threads:
        t.start()
    try:
        for i in range(REFRESHES):
            result = refresh_view(VIEWS[i % len(VIEWS)], rls_db.source, rls_db.common, mode="full")
            assert result.mode == "full"
    finally:
        done.set()
        for t in threads:
            t.join(timeout=30)
    assert not foreign, foreign[:5]
    assert not errors, errors[:5]
    assert not wrong, wrong[:2]  # never an empty or partial view either
    assert all(reads[c] > 0 for c in TENANTS) and sum(reads.values()) > REFRESHES, reads
    with rls_db.superuser() as su:  # the rebuilt tables carry RLS and both policies
        for spec in VIEWS:
            row = su.execute(
                "SELECT c.relrowsecurity, c.relforcerowsecurity, count(p.polname) "
                "FROM pg_class c LEFT JOIN pg_policy p ON p.polrelid = c.oid "
                "WHERE c.relname = %s GROUP BY 1, 2",
                (spec.table_name,),
            ).fetchone()
            assert row == (True, True, 2), (spec.table_name, row)
