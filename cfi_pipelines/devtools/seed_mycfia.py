"""Demo data for MyCfia's DB: deterministic campaigns built on CFI's source data.

A handful of validated campaigns (exported by the sensor), some drafts, and a few
deliberately invalid validated ones, so the rejection path shows in the demo.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from cfi_pipelines.model import cfi_source, mycfia


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None, microsecond=0)


def valid_content(
    segment: str = "all", *, budget: float = 1500.0, start: datetime | None = None
) -> dict[str, Any]:
    """A schema-valid generated content (messages, segments, schedule, budget)."""
    start = start or datetime(2030, 1, 6, 9, 0)
    return {
        "budget": {"amount": budget, "currency": "EUR"},
        "schedule": {
            "starts_at": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "ends_at": (start + timedelta(days=14)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "timezone": "Europe/Paris",
        },
        "segments": [{"code": segment, "name": f"Segment {segment}"}],
        "messages": [
            {
                "segment": segment,
                "subject": "Nos offres de la semaine",
                "body": "Bonjour {{first_name}},\nDécouvrez nos offres.\n",
            }
        ],
    }


def add_campaign(
    conn: sa.Connection,
    campaign_id: int,
    *,
    tenant_id: int = 1,
    tenant_code: str = "T001",
    operation_id: int | None = None,
    operation_code: str | None = None,
    name: str | None = None,
    channel: str = "email",
    status: str = "validated",
    revision: int = 1,
    content: Mapping[str, Any] | str | None = None,
    targets: Iterable[Mapping[str, Any]] | None = None,
    updated_at: datetime | None = None,
) -> None:
    """Insert (or replace) one campaign and its targets; ``content`` may be raw text."""
    now = updated_at or _now()
    body = (
        content
        if isinstance(content, str)
        else json.dumps(content or valid_content(), ensure_ascii=False)
    )
    conn.execute(
        sa.delete(mycfia.campaign_targets).where(
            mycfia.campaign_targets.c.campaign_id == campaign_id
        )
    )
    conn.execute(sa.delete(mycfia.campaigns).where(mycfia.campaigns.c.id == campaign_id))
    conn.execute(
        sa.insert(mycfia.campaigns).values(
            id=campaign_id,
            tenant_id=tenant_id,
            tenant_code=tenant_code,
            operation_id=operation_id,
            operation_code=operation_code,
            name=name or f"Campagne {campaign_id}",
            channel=channel,
            status=status,
            revision=revision,
            validated_at=now if status == "validated" else None,
            content=body,
            created_at=now,
            updated_at=now,
        )
    )
    rows = []
    for position, t in enumerate(targets if targets is not None else default_targets(3), 1):
        rec = {
            "campaign_id": campaign_id,
            "position": position,
            "client_reference": None,
            "email": None,
            "phone": None,
            "segment": None,
            "first_name": None,
            "last_name": None,
            "personalisation": None,
        }
        rec.update(t)
        if isinstance(rec["personalisation"], dict):
            rec["personalisation"] = json.dumps(rec["personalisation"], ensure_ascii=False)
        rows.append(rec)
        if len(rows) >= 5000:
            conn.execute(sa.insert(mycfia.campaign_targets), rows)
            rows = []
    if rows:
        conn.execute(sa.insert(mycfia.campaign_targets), rows)


def default_targets(n: int, segment: str = "all", prefix: str = "C") -> list[dict[str, Any]]:
    """``n`` valid targets."""
    return [
        {
            "client_reference": f"{prefix}{i:06d}",
            "email": f"client{i}@example.fr",
            "phone": f"+3361234{i % 10000:04d}",
            "segment": segment,
            "first_name": "Camille",
            "last_name": f"Martin {i}",
            "personalisation": {"city": "Lyon", "offer": "10%"},
        }
        for i in range(1, n + 1)
    ]


# Deliberately broken campaigns: (name, what is wrong), shown rejected in the demo.
INVALID_KINDS = (
    "missing budget",
    "tenant code with a path",
    "formula in a target email",
    "control character in the name",
)


def seed_mycfia(
    mycfia_engine: sa.Engine, source_engine: sa.Engine, *, scale: int = 1, seed: int = 0
) -> dict:
    """Create MyCfia's schema and deterministic demo campaigns from CFI's source data.

    Returns counts: ``{"validated": n, "draft": n, "invalid": n, "targets": n}``.
    Replaces previous demo campaigns (same ids), so it can be run again.
    """
    rng = random.Random(seed)
    mycfia.metadata.create_all(mycfia_engine)
    with source_engine.connect() as src:
        tenants = src.execute(
            sa.select(cfi_source.tenants.c.id, cfi_source.tenants.c.code).order_by("id")
        ).all()
        operations = src.execute(
            sa.select(
                cfi_source.operations.c.id,
                cfi_source.operations.c.code,
                cfi_source.operations.c.tenant_id,
            )
            .order_by("id")
            .limit(200)
        ).all()
        clients = src.execute(
            sa.select(
                cfi_source.clients.c.tenant_id,
                cfi_source.clients.c.reference,
                cfi_source.clients.c.name,
                cfi_source.clients.c.email,
                cfi_source.clients.c.phone,
                cfi_source.clients.c.segment,
                cfi_source.clients.c.city,
            )
            .order_by(cfi_source.clients.c.id)
            .limit(5000 * scale)
        ).all()
    if not tenants:
        raise ValueError("CFI's source DB has no tenants: seed it first")
    by_tenant: dict[int, list[Any]] = {}
    for c in clients:
        by_tenant.setdefault(c.tenant_id, []).append(c)

    counts = {"validated": 0, "draft": 0, "invalid": 0, "targets": 0}
    base = datetime(2030, 1, 6, 9, 0)
    n_valid, n_draft = 6 * scale, 3 * scale
    now = _now()
    with mycfia_engine.begin() as conn:
        conn.execute(sa.delete(mycfia.campaign_exports))
        conn.execute(sa.delete(mycfia.campaign_targets))
        conn.execute(sa.delete(mycfia.campaigns))
        campaign_id = 1000
        for i in range(n_valid + n_draft + len(INVALID_KINDS)):
            campaign_id += 1
            tenant = tenants[i % len(tenants)]
            ops = [o for o in operations if o.tenant_id == tenant.id]
            op = rng.choice(ops) if ops else None
            pool = by_tenant.get(tenant.id) or clients
            size = min(len(pool), rng.randint(20, 200) * scale)
            chosen = rng.sample(pool, size) if pool else []
            segment = "all"
            targets = [
                {
                    "client_reference": c.reference,
                    "email": c.email,
                    "phone": c.phone,
                    "segment": segment,
                    "first_name": (c.name or "").split(" ")[0] or None,
                    "last_name": " ".join((c.name or "").split(" ")[1:]) or None,
                    "personalisation": {"city": c.city} if c.city else None,
                }
                for c in chosen
            ] or default_targets(5)
            kwargs: dict[str, Any] = {
                "tenant_id": tenant.id,
                "tenant_code": tenant.code,
                "operation_id": op.id if op else None,
                "operation_code": op.code if op else None,
                "channel": rng.choice(("email", "sms")),
                "revision": rng.randint(1, 3),
                "content": valid_content(
                    segment, budget=float(rng.randint(5, 200) * 100), start=base + timedelta(days=i)
                ),
                "targets": targets,
                "updated_at": now - timedelta(seconds=i),  # validated just now: a fair latency
            }
            if i < n_valid:
                counts["validated"] += 1
            elif i < n_valid + n_draft:
                kwargs["status"] = "draft"
                counts["draft"] += 1
            else:
                kind = INVALID_KINDS[i - n_valid - n_draft]
                kwargs["name"] = f"Invalide: {kind}"
                if kind == "missing budget":
                    kwargs["content"].pop("budget")
                elif kind == "tenant code with a path":
                    kwargs["tenant_code"] = "../" + tenant.code
                elif kind == "formula in a target email":
                    targets[0] = {**targets[0], "email": '=HYPERLINK("http://x")'}
                elif kind == "control character in the name":
                    kwargs["name"] = "Promo\x07 printemps"
                counts["invalid"] += 1
            add_campaign(conn, campaign_id, **kwargs)
            counts["targets"] += len(targets)
    return counts
