"""Versioned JSON Schemas shipped with the package."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

CAMPAIGN_EXPORT_VERSION = "campaign_export.v1"
"""Value of ``schema_version`` in every export document and manifest."""


@lru_cache(maxsize=8)
def load_schema(name: str = CAMPAIGN_EXPORT_VERSION) -> dict[str, Any]:
    """The JSON Schema ``<name>.json`` from this package (parsed once)."""
    text = resources.files(__package__).joinpath(f"{name}.json").read_text(encoding="utf-8")
    return json.loads(text)
