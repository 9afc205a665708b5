"""The sensor tests share the lag tests' seeded databases and test instance."""

from tests.sensors.test_lag import fresh, fresh_template, instance  # noqa: F401
