"""Shared fixtures. Servers (PostgreSQL, OpenSSH sshd, HTTP) are real processes
started on 127.0.0.1 by the fixture modules below and stopped afterwards."""

import os

# The delivery's RetryPolicy reads CFI_EXPORT_RETRY_DELAY when the code location is
# loaded: retried deliveries in tests wait no base delay (set before any import of it).
os.environ.setdefault("CFI_EXPORT_RETRY_DELAY", "0")

pytest_plugins = [
    "tests.fixtures.common",
    "tests.fixtures.sshd",
    "tests.fixtures.http",
]
