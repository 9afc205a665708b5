"""Shared fixtures. Servers (PostgreSQL, OpenSSH sshd, HTTP) are real processes
started on 127.0.0.1 by the fixture modules below and stopped afterwards."""

pytest_plugins = [
    "tests.fixtures.common",
    "tests.fixtures.sshd",
    "tests.fixtures.http",
]
