"""Campaign exports as plain functions: build, validate, render, deliver.

No Dagster here: ``cfi_pipelines.assets.exports`` wires these into assets.
"""

from cfi_pipelines.exports.csvfile import CSV_COLUMNS, neutralise
from cfi_pipelines.exports.delivery import (
    Delivery,
    classify_error,
    deliver,
    makedirs,
    remote_paths,
    upload_atomic,
)
from cfi_pipelines.exports.document import ExportBundle, Issue, build_export
from cfi_pipelines.exports.errors import CampaignNotExportable, DeliveryError, ExportError

__all__ = [
    "CSV_COLUMNS",
    "CampaignNotExportable",
    "Delivery",
    "DeliveryError",
    "ExportBundle",
    "ExportError",
    "Issue",
    "build_export",
    "classify_error",
    "deliver",
    "makedirs",
    "neutralise",
    "remote_paths",
    "upload_atomic",
]
