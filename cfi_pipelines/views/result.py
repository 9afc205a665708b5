"""What a refresh returns and raises: :class:`RefreshResult`, :class:`RefreshError`,
:class:`RefreshRefused`, and the row-count guard's default share.

Shared by every step of a refresh (load, swap, incremental apply) and by the API
fallback; no database access here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime

DEFAULT_MAX_DROP_SHARE = 0.5
"""The row-count guard: a refresh that would remove more than this share of a view
is refused unless forced."""


class RefreshError(Exception):
    """A refresh that did not swap anything in; the live view is untouched."""


class RefreshRefused(RefreshError):
    """The row-count guard refused the swap (the source looks broken)."""

    def __init__(self, view: str, staging_rows: int, live_rows: int, max_drop_share: float):
        self.view, self.staging_rows, self.live_rows = view, staging_rows, live_rows
        super().__init__(
            f"view {view}: the new data has {staging_rows} rows against {live_rows} live "
            f"(a drop of more than {max_drop_share:.0%}); not swapped in. If the source really "
            f"shrank, refresh with force (cfi-pipelines refresh {view} --full --force)."
        )


@dataclass(frozen=True)
class RefreshResult:
    view: str
    mode: str  # full / incremental / apply
    source: str  # db / cfi_api
    rows: int  # rows in the view afterwards
    loaded: int  # rows read from the source
    inserted: int
    updated: int
    deleted: int
    duration_s: float
    source_snapshot_at: datetime
    watermark: datetime | None
    capture_mode: str = ""  # how the source's changes were found (views.capture), if known
    position: str = ""  # the capture position the view's data is at afterwards
    changes: int = 0  # row changes read from the source's change log (apply)
    keys: int = 0  # view keys recomputed (apply)

    def as_dict(self) -> dict:
        return asdict(self)
