"""What ``cfi-pipelines seed`` would replace, and whether it was told to.

``seed`` drops and re-creates CFI's source schema and deletes MyCfia's campaigns and
their export history before writing the demo data; the common DB is only given its
schema (idempotent: its views keep their rows until the next refresh). A database
that holds data is replaced only when the operator named it (``--only source``,
``--only mycfia``) or said ``--force``; otherwise nothing is written at all, and
each database is listed with what it holds.

Cost: a handful of ``count(*)`` per database (O(table) on the counted tables:
tenants, stock_levels, campaigns, campaign_exports, the four views).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from cfi_pipelines.db import engine_for, redact
from cfi_pipelines.devtools.seed import source_is_seeded
from cfi_pipelines.model import cfi_common as common
from cfi_pipelines.model import cfi_source as src
from cfi_pipelines.model import mycfia
from cfi_pipelines.settings import Settings

TARGETS = ("source", "common", "mycfia")
"""The databases ``seed`` writes, by their ``--only`` name."""
WIPED = ("source", "mycfia")
"""The ones whose data seeding replaces (the common DB only gets its schema)."""

_VIEW_TABLES = (common.cfi_stocks, common.cfi_operations, common.cfi_invoices, common.cfi_campaigns)
_LABELS = {"source": "CFI source DB", "common": "common DB", "mycfia": "MyCfia DB"}
_VARIABLES = {"source": "CFI_SOURCE_URL", "common": "CFI_COMMON_URL", "mycfia": "MYCFIA_URL"}


class SeedRefused(Exception):
    """A database cannot be read, or holds data ``seed`` was not told to replace.

    ``listing``: one line per database (what it holds), printed before the message."""

    def __init__(self, message: str, listing: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.listing = list(listing)


@dataclass(frozen=True)
class Holding:
    """One database as ``seed`` found it."""

    target: str
    url: str
    holds: str | None
    """What it holds (``"13 campaigns, 1 export (1 delivered)"``), None when empty."""

    @property
    def line(self) -> str:
        """``<label> (<url without password>): <what it holds, or empty>``."""
        return f"{_LABELS[self.target]} ({redact(self.url)}): {self.holds or 'empty'}"


def _count(conn: sa.Connection, table: sa.Table) -> int:
    return int(conn.scalar(sa.select(sa.func.count()).select_from(table)) or 0)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _source(conn: sa.Connection, have: set[str]) -> str | None:
    if not have & set(src.metadata.tables):
        return None
    present = [t for t in src.metadata.sorted_tables if t.name in have]
    counts = {t.name: _count(conn, t) for t in present if t.name in ("tenants", "stock_levels")}
    if not any(_count(conn, t) for t in present):
        return f"{len(present)} empty tables"
    return f"{len(present)} tables, " + ", ".join(f"{n} {name}" for name, n in counts.items())


def _common(conn: sa.Connection, have: set[str]) -> str | None:
    views = [t for t in _VIEW_TABLES if t.name in have]
    if not views:
        return None
    rows = {t.name: _count(conn, t) for t in views}
    if not any(rows.values()):
        return "schema in place, views empty"
    return "views " + ", ".join(f"{n} {r} rows" for n, r in rows.items()) + " (kept)"


def _mycfia(conn: sa.Connection, have: set[str]) -> str | None:
    if "campaigns" not in have:
        return None
    campaigns = _count(conn, mycfia.campaigns)
    exports = 0
    by_status: dict[str, int] = {}
    if "campaign_exports" in have:
        e = mycfia.campaign_exports.c
        by_status = dict(
            conn.execute(sa.select(e.status, sa.func.count()).group_by(e.status)).all()
        )
        exports = sum(by_status.values())
    if not campaigns and not exports:
        return None
    text = f"{_plural(campaigns, 'campaign')}, {_plural(exports, 'export')}"
    if by_status:
        text += " (" + ", ".join(f"{n} {s}" for s, n in sorted(by_status.items())) + ")"
    return text


_READERS = {"source": _source, "common": _common, "mycfia": _mycfia}


def inspect(settings: Settings, targets: Sequence[str] = TARGETS) -> list[Holding]:
    """What each of ``targets`` holds now (read only). Raises :class:`SeedRefused` naming the
    variable when a database cannot be reached."""
    urls = {
        "source": settings.source_url,
        "common": settings.common_url,
        "mycfia": settings.mycfia_url,
    }
    out = []
    for target in targets:
        url = urls[target]
        try:
            with engine_for(url).connect() as conn:
                have = set(sa.inspect(conn).get_table_names())
                out.append(Holding(target, url, _READERS[target](conn, have)))
        except sa.exc.SQLAlchemyError as exc:
            reason = str(exc.orig if getattr(exc, "orig", None) else exc).splitlines()[0]
            raise SeedRefused(
                f"{_LABELS[target]} ({redact(url)}) cannot be read ({type(exc).__name__}: "
                f"{reason}): check {_VARIABLES[target]} (host, port, database, credentials)"
            ) from None
    return out


def refused(holdings: Sequence[Holding], told: Sequence[str], force: bool) -> list[Holding]:
    """The databases that hold data ``seed`` would replace without having been told to."""
    return [
        h for h in holdings if h.target in WIPED and h.holds and not force and h.target not in told
    ]


def refusal_message(blocked: Sequence[Holding], targets: Sequence[str] = TARGETS) -> str:
    """One line: what would be lost, and how to say yes for one database, for all, or for
    only the ``targets`` that are not blocked."""
    names = " ".join(f"--only {h.target}" for h in blocked)
    others = [t for t in targets if t not in {h.target for h in blocked}]
    rest = (
        "; seed only the others with " + " ".join(f"--only {t}" for t in others) if others else ""
    )
    return (
        "seed would replace data in "
        + " and ".join(_LABELS[h.target] for h in blocked)
        + f" (listed above); nothing was written. To replace it, name it ({names}) or use "
        f"--force{rest}"
    )


def prepare(settings: Settings, only: Sequence[str], force: bool) -> tuple[list[str], list[str]]:
    """The databases to seed (``only``, else all three) and the lines to print first (one per
    database whose data is about to be replaced). Raises :class:`SeedRefused` when one holds
    data it was not told to replace, or when MyCfia alone is asked for on an empty source."""
    targets = [t for t in TARGETS if t in only] if only else list(TARGETS)
    holdings = inspect(settings, targets)
    blocked = refused(holdings, only, force)
    if blocked:
        raise SeedRefused(refusal_message(blocked, targets), [h.line for h in holdings])
    if "mycfia" in targets and "source" not in targets and not source_is_seeded(settings):
        raise SeedRefused(
            "MyCfia's demo campaigns are drawn from CFI's source DB, which is not seeded: run "
            "`cfi-pipelines seed --only source` first (or seed both)"
        )
    return targets, [f"replacing {h.line}" for h in holdings if h.holds and h.target in WIPED]
