"""Database resources: a SQLAlchemy URL in, a pooled engine out."""

from __future__ import annotations

import dagster as dg
from sqlalchemy.engine import Engine

from cfi_pipelines.db import engine_for, redact


class DatabaseResource(dg.ConfigurableResource):
    """One database by SQLAlchemy URL (``sqlite:///…``, ``postgresql+psycopg://…``,
    ``mssql+pyodbc://…``). Pass the URL as ``EnvVar`` when it holds a password."""

    url: str

    def engine(self) -> Engine:
        """The process-wide pooled engine for this URL."""
        return engine_for(self.url)

    @property
    def display_url(self) -> str:
        """The URL with its password hidden (for logs and metadata)."""
        return redact(self.url)
