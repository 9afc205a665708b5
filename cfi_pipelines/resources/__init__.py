"""Thin Dagster resources, built once, here, from :func:`cfi_pipelines.settings.get_settings`.

Each holds configuration and hands out a client: an engine (:mod:`.databases`),
an SFTP connection (:mod:`.sftp`), a CFI API client (:mod:`.cfi_api`), an
alerter (:mod:`.alerter`). Secrets go in as ``dagster.EnvVar``. Building them
touches nothing: no file, no key, no connection.
"""

from __future__ import annotations

from cfi_pipelines.resources.alerter import alerts_resource
from cfi_pipelines.resources.cfi_api import cfi_api_resource
from cfi_pipelines.resources.databases import DatabaseResource
from cfi_pipelines.resources.sftp import sftp_resource
from cfi_pipelines.settings import Settings, env_or_default, get_settings


def build_resources(settings: Settings | None = None) -> dict[str, object]:
    """Every resource the code location needs, by key; the local environment gets the
    embedded development SFTP server, production CFI's (see ``Settings.environment``)."""
    s = settings or get_settings()
    return {
        "cfi_source": DatabaseResource(url=env_or_default("CFI_SOURCE_URL", s.source_url)),
        "cfi_common": DatabaseResource(url=env_or_default("CFI_COMMON_URL", s.common_url)),
        "mycfia": DatabaseResource(url=env_or_default("MYCFIA_URL", s.mycfia_url)),
        "sftp": sftp_resource(s),
        "cfi_api": cfi_api_resource(s),
        "alerts": alerts_resource(s),
    }
