"""Tenant isolation enforced by the common DB: how a reader is bound to a tenant.

A tenant sees its own rows and its descendants' (``cfi_tenant_closure``), never a
sibling's, whatever SQL it sends. PostgreSQL enforces it with forced row-level
security and one login role per tenant (:mod:`.roles`, :mod:`.policies`,
:mod:`.reader_pg`); SQL Server with a security policy and a read-only session
context (``deploy/sql/sqlserver_row_level_security.sql``); SQLite, which has no
row-level security, through the reference reader (:mod:`.reader_sqlite`).
:mod:`.binding` holds names, credentials and limits; :mod:`.query` is
``cfi-pipelines query --tenant CODE``.
"""
