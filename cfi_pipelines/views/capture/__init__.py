"""How changes in CFI's source are found: one module per engine behind :mod:`.base`.

:func:`capture_for` (in :mod:`.select`) picks the mode for an engine and says why.
"""

from cfi_pipelines.views.capture.base import (
    Capture,
    CaptureLost,
    CaptureUnavailable,
    ChangeSet,
    Gate,
    RowChange,
)

__all__ = ["Capture", "CaptureLost", "CaptureUnavailable", "ChangeSet", "Gate", "RowChange"]
