"""The code location: the one place where Definitions are assembled.

Load it with ``dagster dev`` (pyproject's ``[tool.dagster]``), ``workspace.yaml``,
or ``dagster … -m cfi_pipelines.definitions``.
"""

from __future__ import annotations

import dagster as dg

from cfi_pipelines.assets.views import build_view_defs
from cfi_pipelines.exports_defs import build_export_defs
from cfi_pipelines.fallback_defs import build_fallback_defs
from cfi_pipelines.resources.databases import DatabaseResource
from cfi_pipelines.settings import env_or_default, get_settings


def build_resources() -> dict[str, object]:
    """Resources from the environment; URLs go in as ``EnvVar`` when set (they may hold passwords)."""
    s = get_settings()
    return {
        "cfi_source": DatabaseResource(url=env_or_default("CFI_SOURCE_URL", s.source_url)),
        "cfi_common": DatabaseResource(url=env_or_default("CFI_COMMON_URL", s.common_url)),
        "mycfia": DatabaseResource(url=env_or_default("MYCFIA_URL", s.mycfia_url)),
    }


def build_defs() -> dg.Definitions:
    parts = [build_view_defs(), build_export_defs(), build_fallback_defs()]
    return dg.Definitions.merge(*parts, dg.Definitions(resources=build_resources()))


defs = build_defs()
