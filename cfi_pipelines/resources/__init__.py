"""Thin Dagster resources: configuration in, a client or connection out."""
