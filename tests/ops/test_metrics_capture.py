"""The change-capture slot's series, scraped from a real PostgreSQL with logical decoding."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from cfi_pipelines.model import cfi_source as src
from cfi_pipelines.ops.metrics import MetricsConfig, start_metrics_server
from cfi_pipelines.settings import get_settings
from cfi_pipelines.views.refresh import refresh_view
from cfi_pipelines.views.spec import get_view
from tests.ops.test_metrics import scrape, value

pytestmark = pytest.mark.postgres


def test_the_slot_s_retained_wal_is_served_and_grows_while_nothing_advances_it(pg_logical_dbs):
    dbs = pg_logical_dbs
    refresh_view(get_view("stocks"), dbs.source, dbs.common)  # creates the slot
    slot = get_settings().capture_slot
    config = MetricsConfig(
        common_url=dbs.common_url, mycfia_url=dbs.common_url, source_url=dbs.source_url,
        capture_slot=slot,
    )  # fmt: skip
    with start_metrics_server(port=0, config=config) as server:
        _, before = scrape(server.url)
        with dbs.source.begin() as conn:  # changes nobody applies: the slot keeps their WAL
            sl = src.stock_levels
            conn.execute(sl.update().values(quantity=sl.c.quantity + 1))
        _, after = scrape(server.url)
    held = value(before, "cfi_capture_slot_retained_wal_bytes", slot=slot)
    assert value(after, "cfi_capture_slot_retained_wal_bytes", slot=slot) > held
    assert value(after, "cfi_capture_slot_lost", slot=slot) == 0
    with dbs.source.connect() as conn:
        assert conn.scalar(sa.text("SELECT count(*) FROM pg_replication_slots")) >= 1
