"""The CFI API client against the fake API over real HTTP."""

import time
from datetime import UTC, date, datetime
from decimal import Decimal

import dagster as dg
import pytest
import sqlalchemy as sa

from cfi_pipelines.db import engine_for
from cfi_pipelines.devtools.fake_cfi_api import FakeCfiApi
from cfi_pipelines.fallback.api_client import (
    API_VIEWS,
    CfiApiAuthError,
    CfiApiClient,
    CfiApiContractError,
    CfiApiNotConfigured,
    CfiApiUnavailable,
    get_api_view,
    parse_page,
    retry_after_seconds,
)
from cfi_pipelines.resources.cfi_api import CfiApiResource, cfi_api_resource
from cfi_pipelines.settings import get_settings
from cfi_pipelines.views.spec import VIEWS, get_view
from tests.fallback.scripted_api import ScriptedApi, item, page
from tests.fixtures.http import API_TOKEN, free_port


class Waits(list):
    """Records the waits the client asks for instead of sleeping."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def client(api: FakeCfiApi, **kw) -> CfiApiClient:
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("sleep", Waits())
    return CfiApiClient(api.url, API_TOKEN, **kw)


def source_keys(url: str, view: str) -> list[tuple]:
    spec = get_view(view)
    sub = spec.query().subquery()
    with engine_for(url).connect() as conn:
        return sorted(
            tuple(r) for r in conn.execute(sa.select(*(sub.c[k] for k in spec.key)), spec.params())
        )


# --------------------------------------------------------------------------- mapping


def test_mapping_follows_the_view_tables():
    for spec in VIEWS:
        mapping = API_VIEWS[spec.name]
        assert mapping.columns == spec.columns
        assert mapping.path == f"/api/v1/views/{spec.name}"
        assert mapping.arrow_schema().names == spec.columns
    with pytest.raises(ValueError, match="unknown view 'nope'; views are: stocks"):
        get_api_view("nope")


def test_values_are_converted_to_the_column_types():
    mapping = get_api_view("invoices")
    item = {
        "tenant_id": 1,
        "invoice_id": 2,
        "number": "FAC-1",
        "client_id": 3,
        "client_name": "Ada",
        "client_city": None,  # nullable column
        "issued_on": "2026-01-31",
        "due_on": "2026-02-28",
        "status": "open",
        "total_excl_tax": "100.5",
        "total_tax": 20.1,
        "total_incl_tax": 120.6,
        "paid": 0,
        "outstanding": "120.60",
        "overdue": True,
        "source_updated_at": "2026-01-31T10:00:00+02:00",
    }
    body = {"items": [item], "next_cursor": None, "as_of": "2026-02-01T00:00:00Z"}
    import json

    rows, nxt, as_of = parse_page(mapping, json.dumps(body).encode(), number=1, cursor=None)
    (row,) = rows
    assert nxt is None and as_of == datetime(2026, 2, 1)
    assert row[5] is None
    assert row[6] == date(2026, 1, 31)
    assert row[9:14] == (
        Decimal("100.50"),
        Decimal("20.10"),
        Decimal("120.60"),
        Decimal("0.00"),
        Decimal("120.60"),
    )
    assert row[14] is True
    assert row[15] == datetime(2026, 1, 31, 8, 0)  # converted to naive UTC


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("overdue", 1, "expected true or false"),
        ("tenant_id", True, "expected an integer"),
        ("tenant_id", "1", "expected an integer"),
        ("issued_on", "2026-01-31T00:00:00", "expected an ISO 8601 date"),
        ("source_updated_at", "yesterday", "expected an ISO 8601 date-time"),
        ("paid", "12,5", "expected a decimal number"),
        ("paid", "1e20", "does not fit NUMERIC(14, 2)"),
        ("number", "x" * 33, "exceeds the column's 32"),
        ("client_name", None, "is null but the column is NOT NULL"),
    ],
)
def test_a_wrong_value_names_view_page_item_and_field(field, value, why):
    import json

    mapping = get_api_view("invoices")
    good = dict.fromkeys(mapping.api_names)
    good.update(
        tenant_id=1,
        invoice_id=1,
        number="F",
        client_id=1,
        client_name="A",
        issued_on="2026-01-01",
        due_on="2026-01-01",
        status="open",
        total_excl_tax="1",
        total_tax="1",
        total_incl_tax="1",
        paid="1",
        outstanding="0",
        overdue=False,
        source_updated_at="2026-01-01T00:00:00",
    )
    bad = {**good, field: value}
    body = json.dumps({"items": [good, bad], "next_cursor": None, "as_of": "2026-01-01T00:00:00Z"})
    with pytest.raises(CfiApiContractError) as err:
        parse_page(mapping, body.encode(), number=3, cursor="abc")
    e = err.value
    assert (e.view, e.page, e.cursor, e.item, e.field) == ("invoices", 3, "abc", 1, field)
    assert why in str(e)
    assert str(e).startswith(
        f"CFI API, view invoices, page 3 (cursor 'abc'), item 1, field '{field}'"
    )


def test_retry_after_accepts_seconds_and_http_dates():
    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds("Thu, 01 Jan 2026 12:00:30 GMT", now) == 30.0
    assert retry_after_seconds("garbage") is None
    assert retry_after_seconds(None) is None


# --------------------------------------------------------------------------- pagination


def test_reads_every_page_to_the_end(fake_api, api_source_url):
    with client(fake_api, page_size=997) as c:
        pages = list(c.iter_pages("stocks"))
    rows = [r for p in pages for r in p.rows]
    expected = source_keys(api_source_url, "stocks")
    assert len(pages) == -(-len(expected) // 997) and len(pages) > 5
    assert [p.number for p in pages] == list(range(1, len(pages) + 1))
    assert pages[-1].next_cursor is None and all(p.next_cursor for p in pages[:-1])
    assert sorted((r[1], r[2]) for r in rows) == expected  # every row once (composite key)
    assert len({p.as_of for p in pages}) == 1  # one snapshot time for the whole read
    assert all(len(p.rows) <= 997 for p in pages)
    assert fake_api.log.statuses() == [200] * len(pages)


def test_values_match_the_source_query(fake_api, api_source_url):
    spec = get_view("campaigns")
    with client(fake_api, page_size=3) as c:
        rows, _ = c.fetch_all("campaigns")
    with engine_for(api_source_url).connect() as conn:
        src = {r.campaign_id: r for r in conn.execute(spec.query(), spec.params())}
    assert len(rows) == len(src) > 3
    for row in rows:
        s = src[row[1]]
        assert row[2] == s.code and row[8] == s.starts_on and row[17] == s.source_updated_at
        assert row[16] == Decimal(str(s.revenue)).quantize(Decimal("0.01"))


def test_fixed_as_of_is_reported(api_source_url):
    as_of = datetime(2026, 3, 1, 12, 30)
    with FakeCfiApi(api_source_url, token=API_TOKEN, as_of=as_of) as api, client(api) as c:
        _, got = c.fetch_all("operations")
    assert got == as_of


# --------------------------------------------------------------------------- retries


def test_429_honours_retry_after(fake_api):
    fake_api.faults.fail_429, fake_api.faults.retry_after = 2, "3"
    waits = Waits()
    with client(fake_api, sleep=waits) as c:
        rows, _ = c.fetch_all("operations")
    assert len(rows) == 20
    assert waits == [3.0, 3.0]  # the server's word, not the (tiny) backoff
    assert fake_api.log.statuses()[:3] == [429, 429, 200]


def test_429_really_waits(fake_api):
    fake_api.faults.fail_429, fake_api.faults.retry_after = 1, "1"
    started = time.monotonic()
    with CfiApiClient(fake_api.url, API_TOKEN, backoff_s=0.01) as c:
        c.fetch_all("operations")
    assert time.monotonic() - started >= 1.0


def test_backoff_is_exponential_without_retry_after(fake_api):
    fake_api.faults.fail_500, fake_api.faults.retry_after = 3, None
    waits = Waits()
    with client(fake_api, sleep=waits, backoff_s=1.0, max_retries=3) as c:
        c.fetch_all("operations")
    assert len(waits) == 3
    for i, w in enumerate(waits):  # base * 2^i with jitter in [0.5, 1]
        assert 0.5 * 2**i <= w <= 2**i


def test_500_then_success(fake_api):
    fake_api.faults.fail_500 = 2
    with client(fake_api) as c:
        rows, _ = c.fetch_all("campaigns")
        assert c.stats.retries == 2
    assert len(rows) == 10
    assert fake_api.log.statuses() == [500, 500, 200]


def test_500_beyond_the_retries_fails_naming_the_page(fake_api):
    fake_api.faults.fail_500 = 10
    with client(fake_api, max_retries=2) as c, pytest.raises(CfiApiUnavailable) as err:
        c.fetch_all("stocks")
    assert err.value.page == 1 and err.value.status == 500
    assert "view stocks, page 1" in str(err.value) and "after 3 attempts" in str(err.value)


def test_read_timeout_is_retried_then_reported(api_source_url):
    with FakeCfiApi(api_source_url, token=API_TOKEN) as api:
        api.faults.latency_s = 0.5
        with (
            client(api, read_timeout_s=0.05, max_retries=1) as c,
            pytest.raises(CfiApiUnavailable, match="ReadTimeout.*after 2 attempts"),
        ):
            c.fetch_all("operations")


def test_connection_refused_is_reported():
    with (
        CfiApiClient(f"http://127.0.0.1:{free_port()}", "t", max_retries=1, sleep=Waits()) as c,
        pytest.raises(CfiApiUnavailable, match="ConnectError"),
    ):
        c.fetch_all("stocks")


# --------------------------------------------------------------------------- contract errors


@pytest.mark.parametrize(
    ("kind", "match", "field"),
    [
        ("bad_json", "the response is not JSON", None),
        ("not_object", "expected a JSON object, got list", None),
        ("missing_field", r"missing field\(s\) \['tenant_id'\]", "tenant_id"),
        ("extra_field", r"unexpected field\(s\) \['surprise'\]", "surprise"),
        ("wrong_type", "expected an integer, got '#", "tenant_id"),
        ("missing_cursor", "missing", "next_cursor"),
    ],
)
def test_malformed_page_fails_with_page_and_field(fake_api, kind, match, field):
    fake_api.faults.malformed, fake_api.faults.malformed_page = kind, 2
    with (
        client(fake_api, page_size=1000) as c,
        pytest.raises(CfiApiContractError, match=match) as err,
    ):
        list(c.iter_pages("stocks"))
    assert err.value.view == "stocks" and err.value.page == 2 and err.value.cursor
    assert err.value.field == field
    assert "nothing was loaded" in str(err.value)
    # not retried: a bad page is not transient
    assert fake_api.log.statuses() == [200, 200]


def test_wrong_token_is_refused_without_retry(fake_api):
    with (
        CfiApiClient(fake_api.url, "wrong-secret", sleep=Waits()) as c,
        pytest.raises(CfiApiAuthError, match="HTTP 401.*Check CFI_API_TOKEN") as err,
    ):
        c.fetch_all("stocks")
    assert "wrong-secret" not in str(err.value)
    assert fake_api.log.statuses() == [401]


def test_a_repeated_cursor_is_a_contract_error():
    # A local server that always answers with the same next_cursor (one new row a page).
    with (
        ScriptedApi(lambda n, cursor: (page([item("campaigns", n)], "same"), 0.0)) as api,
        CfiApiClient(api.url, "t") as c,
        pytest.raises(CfiApiContractError, match="already returned"),
    ):
        list(c.iter_pages("campaigns"))


# --------------------------------------------------------------------------- resource


def test_resource_without_url_says_fallback_unavailable():
    res = cfi_api_resource(get_settings())
    assert not res.configured
    with pytest.raises(CfiApiNotConfigured, match="CFI_API_URL is not set"):
        res.client()


def test_resource_reads_url_and_token_from_env_vars(fake_api, monkeypatch):
    monkeypatch.setenv("CFI_API_URL", fake_api.url)
    monkeypatch.setenv("CFI_API_TOKEN", API_TOKEN)
    res = cfi_api_resource(get_settings())

    @dg.asset
    def count_campaigns(cfi_api: CfiApiResource) -> dg.MaterializeResult:
        with cfi_api.client() as c:
            rows, _ = c.fetch_all("campaigns")
        return dg.MaterializeResult(metadata={"rows": len(rows)})

    result = dg.materialize([count_campaigns], resources={"cfi_api": res})
    mat = result.asset_materializations_for_node("count_campaigns")[0]
    assert mat.metadata["rows"].value == 10
    # the token stays an EnvVar: it is not in the run's config
    assert API_TOKEN not in str(result.dagster_run.run_config)
