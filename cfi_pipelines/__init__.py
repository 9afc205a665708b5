"""cfi-pipelines: the Dagster code location behind MyCfia's read cache of CFI data
and the delivery of validated campaigns to CFI over SFTP."""

__version__ = "0.1.0"
