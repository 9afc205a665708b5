"""D3/D4/D5: deadlines, endless pagination, future as_of and duplicate keys, against
misbehaving real HTTP servers (the fake CFI API's fault switches, or a scripted server)."""

import time
from datetime import timedelta

import pytest

from cfi_pipelines.clock import utcnow
from cfi_pipelines.devtools.fake_cfi_api import FakeCfiApi
from cfi_pipelines.fallback.api_client import (
    CfiApiClient,
    CfiApiContractError,
    CfiApiError,
    CfiApiTimeout,
    CfiApiUnavailable,
)
from cfi_pipelines.fallback.snapshots import list_snapshots, write_snapshot
from cfi_pipelines.resources.cfi_api import CfiApiResource
from tests.fallback.scripted_api import ScriptedApi, page
from tests.fixtures.http import API_TOKEN

EMPTY_LAST = page([], None)  # ~65 bytes: 13 s at one byte every 0.2 s


class Waits(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def client(url: str, **kw) -> CfiApiClient:
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("sleep", Waits())
    return CfiApiClient(url, API_TOKEN, **kw)


# --------------------------------------------------------------------------- D3 deadlines


def test_a_trickled_response_hits_the_response_deadline():
    # one byte every 0.2 s: each read is well within read_timeout_s, the whole is not
    with (
        ScriptedApi(lambda n, cursor: (EMPTY_LAST, 0.2)) as api,
        client(api.url, read_timeout_s=5, response_deadline_s=1, max_retries=1) as c,
    ):
        started = time.monotonic()
        with pytest.raises(CfiApiUnavailable, match=r"view campaigns, page 1 .*") as err:
            c.fetch_all("campaigns")
        took = time.monotonic() - started
    message = str(err.value)
    assert "not complete within 1s" in message and "after 2 attempts" in message
    assert "retry later" in message
    assert not isinstance(err.value, CfiApiTimeout)
    assert api.requests == 2 and took < 5


def test_the_snapshot_deadline_stops_a_trickled_response():
    with (
        ScriptedApi(lambda n, cursor: (EMPTY_LAST, 0.2)) as api,
        client(api.url, read_timeout_s=5, response_deadline_s=60, max_snapshot_seconds=1) as c,
    ):
        started = time.monotonic()
        with pytest.raises(CfiApiTimeout, match=r"view campaigns, page 1 .*") as err:
            list(c.iter_pages("campaigns"))
        took = time.monotonic() - started
    assert "max_snapshot_seconds=1s" in str(err.value)
    assert "raise CfiApiResource.max_snapshot_seconds" in str(err.value)
    assert api.requests == 1 and took < 5  # not retried: the snapshot is out of time


def test_the_snapshot_deadline_bounds_many_slow_pages(api_source_url):
    # 20 pages of 0.3 s each: 6 s in all, against a 1 s snapshot deadline
    with FakeCfiApi(api_source_url, token=API_TOKEN) as api:
        api.faults.latency_s = 0.3
        with client(api.url, page_size=50, max_snapshot_seconds=1) as c:
            started = time.monotonic()
            with pytest.raises(CfiApiTimeout, match=r"view invoices, page \d+ ") as err:
                c.fetch_all("invoices")
            took = time.monotonic() - started
    assert isinstance(err.value, CfiApiError) and err.value.view == "invoices"
    assert 2 <= err.value.page < 20 and took < 4


def test_an_empty_page_with_a_cursor_is_a_contract_error(api_source_url, tmp_path):
    with FakeCfiApi(api_source_url, token=API_TOKEN) as api:
        api.faults.empty_page = 2
        with client(api.url, page_size=5) as c, pytest.raises(CfiApiContractError) as err:
            write_snapshot(c, "operations", tmp_path)
    message = str(err.value)
    assert "view operations, page 2" in message and "empty page with a next_cursor" in message
    assert "paginates without end" in message and err.value.field == "next_cursor"
    assert list_snapshots(tmp_path, "operations") == []


def test_the_number_of_pages_is_bounded(fake_api):
    with (
        client(fake_api.url, page_size=10, max_pages=5) as c,
        pytest.raises(CfiApiContractError) as err,
    ):
        c.fetch_all("stocks")
    message = str(err.value)
    assert "view stocks, page 5" in message and "max_pages=5" in message
    assert "raise CfiApiResource.max_pages" in message
    assert len(fake_api.log.statuses()) == 5


def test_the_resource_passes_the_deadlines_on():
    assert CfiApiResource().max_snapshot_seconds == 600
    res = CfiApiResource(
        base_url="http://127.0.0.1:1",
        response_deadline_s=7,
        max_snapshot_seconds=9,
        max_pages=11,
        max_clock_skew_s=13,
    )
    with res.client() as c:
        assert (c.response_deadline_s, c.max_snapshot_seconds) == (7, 9)
        assert (c.max_pages, c.max_clock_skew_s) == (11, 13)


# --------------------------------------------------------------------------- D4 future as_of


def test_an_as_of_in_the_future_is_a_contract_error(api_source_url):
    soon = utcnow() + timedelta(minutes=1)  # within the clock skew: accepted
    with FakeCfiApi(api_source_url, token=API_TOKEN, as_of=soon) as api, client(api.url) as c:
        rows, as_of = c.fetch_all("campaigns")
    assert len(rows) == 10 and as_of == soon

    future = (utcnow() + timedelta(days=3650)).replace(microsecond=0)
    with (
        FakeCfiApi(api_source_url, token=API_TOKEN, as_of=future) as api,
        client(api.url) as c,
        pytest.raises(CfiApiContractError) as err,
    ):
        c.fetch_all("campaigns")
    message = str(err.value)
    assert "view campaigns, page 1" in message and "field 'as_of'" in message
    assert f"as_of {future.isoformat()}Z is in the future" in message


# --------------------------------------------------------------------------- D5 duplicates


def test_a_duplicate_key_is_a_contract_error_and_nothing_is_written(api_source_url, tmp_path):
    with FakeCfiApi(api_source_url, token=API_TOKEN) as api:
        api.faults.duplicate_page = 3  # page 3 starts again with page 2's last row
        with client(api.url, page_size=100) as c:
            second = c.get_page("stocks").next_cursor
            last = c.get_page("stocks", second, 2).rows[-1]
            with pytest.raises(CfiApiContractError) as err:
                write_snapshot(c, "stocks", tmp_path)
    message = str(err.value)
    assert "view stocks, page 3" in message and "item 0" in message
    assert f"duplicate key (product_id={last[1]!r}, warehouse_id=" in message
    assert "already returned on page 2" in message
    assert (err.value.page, err.value.item) == (3, 0)
    assert list_snapshots(tmp_path, "stocks") == []
    assert list((tmp_path / "stocks").iterdir()) == []  # no temp file either


def test_the_response_deadline_is_total_not_per_read():
    # A byte every 2.5 s: each read is within read_timeout_s (10 s); the response must
    # still end at its 3 s deadline, not at the end of the read in progress (5 s).
    with (
        ScriptedApi(lambda n, cursor: (EMPTY_LAST, 2.5)) as api,
        client(api.url, read_timeout_s=10, response_deadline_s=3, max_retries=0) as c,
    ):
        started = time.monotonic()
        with pytest.raises(CfiApiUnavailable, match="not complete within 3s") as err:
            c.fetch_all("campaigns")
        took = time.monotonic() - started
    assert "bytes received" in str(err.value)
    assert took < 4.2, took


def test_a_response_is_bounded_by_what_a_page_needs_and_the_readme_says_the_worst_case():
    from pathlib import Path

    resource = CfiApiResource(base_url="http://127.0.0.1:9", token="t")
    assert resource.response_deadline_s <= 30
    with resource.client() as c:
        worst = c.worst_case_page_seconds()
        assert worst <= 5 * 30 + 10  # 5 attempts of 30 s, and the backoffs between them
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert f"{worst:.0f} s" in readme and f"{resource.max_snapshot_seconds:.0f} s" in readme
