"""Exceptions of the export path, split by whether a retry can help."""

from __future__ import annotations


class ExportError(Exception):
    """Base class of export errors."""


class CampaignNotExportable(ExportError):
    """The campaign is missing or not in the ``validated`` state: retrying cannot help."""


class DeliveryError(ExportError):
    """A transient delivery problem (size mismatch after upload, dropped link): retry."""
