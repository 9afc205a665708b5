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


def with_ecma_anchors(node: Any) -> Any:
    """A copy of a schema whose ``pattern`` anchors behave as in ECMA 262.

    JSON Schema patterns are ECMA regexes, where ``$`` is the very end of the
    string; Python's ``re.search`` (used by jsonschema) also lets ``$`` match
    before a final newline, so ``"T001\\n"`` would pass ``^[A-Z0-9]+$`` and become
    a folder name with a newline in it. A trailing ``$`` becomes ``\\Z``.
    """
    if isinstance(node, dict):
        out = {k: with_ecma_anchors(v) for k, v in node.items()}
        pattern = node.get("pattern")
        if isinstance(pattern, str) and pattern.endswith("$") and not pattern.endswith("\\$"):
            out["pattern"] = pattern[:-1] + "\\Z"
        return out
    if isinstance(node, list):
        return [with_ecma_anchors(v) for v in node]
    return node
