"""The fake CFI API speaks the contract over real HTTP."""

import subprocess
import sys
import time

import httpx
import pytest

from cfi_pipelines.devtools.fake_cfi_api import FakeCfiApi, Faults
from tests.fixtures.http import API_TOKEN, free_port
from tests.fixtures.processes import stop_process

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


def test_serves_pages_with_an_opaque_cursor_and_one_as_of(fake_api):
    url = f"{fake_api.url}/api/v1/views/operations"
    first = httpx.get(url, params={"limit": 8}, headers=AUTH).json()
    assert set(first) == {"items", "next_cursor", "as_of"}
    assert len(first["items"]) == 8 and first["next_cursor"]
    second = httpx.get(
        url, params={"limit": 8, "cursor": first["next_cursor"]}, headers=AUTH
    ).json()
    third = httpx.get(
        url, params={"limit": 8, "cursor": second["next_cursor"]}, headers=AUTH
    ).json()
    assert third["next_cursor"] is None and len(third["items"]) == 4
    ids = [i["operation_id"] for p in (first, second, third) for i in p["items"]]
    assert ids == sorted(ids) and len(set(ids)) == 20  # keyset order, nothing twice
    assert first["as_of"] == second["as_of"] == third["as_of"]
    assert first["as_of"].endswith("Z")
    item = first["items"][0]
    assert isinstance(item["budget"], str) and item["budget"].count(".") == 1  # exact decimals


@pytest.mark.parametrize(
    ("path", "params", "headers", "status"),
    [
        ("/api/v1/views/stocks", {}, {}, 401),
        ("/api/v1/views/stocks", {}, {"Authorization": "Bearer nope"}, 401),
        ("/api/v1/views/nope", {}, AUTH, 404),
        ("/api/v1/views/stocks", {"limit": "0"}, AUTH, 400),
        ("/api/v1/views/stocks", {"limit": "many"}, AUTH, 400),
        ("/api/v1/views/stocks", {"cursor": "!!not-a-cursor"}, AUTH, 400),
        ("/healthz", {}, {}, 200),
    ],
)
def test_refuses_what_the_contract_does_not_allow(fake_api, path, params, headers, status):
    resp = httpx.get(f"{fake_api.url}{path}", params=params, headers=headers)
    assert resp.status_code == status
    if status == 401:
        assert resp.headers["WWW-Authenticate"] == "Bearer"


def test_injected_faults_are_consumed_in_order(api_source_url):
    faults = Faults(fail_429=1, retry_after="2", fail_500=1)
    with FakeCfiApi(api_source_url, token=API_TOKEN, faults=faults) as api:
        url = f"{api.url}/api/v1/views/campaigns"
        r1, r2, r3 = (httpx.get(url, headers=AUTH) for _ in range(3))
    assert (r1.status_code, r1.headers["Retry-After"]) == (429, "2")
    assert r2.status_code == 500
    assert r3.status_code == 200 and len(r3.json()["items"]) == 10


def test_latency_is_added(fake_api):
    fake_api.faults.latency_s = 0.2
    started = time.monotonic()
    httpx.get(f"{fake_api.url}/healthz")
    assert time.monotonic() - started >= 0.2


def test_unknown_malformed_kind_is_refused():
    with pytest.raises(ValueError, match="malformed must be one of"):
        Faults(malformed="weird")


def test_a_broken_source_answers_503(tmp_path):
    # an empty SQLite file: "no such table" is what an unreachable source looks like here
    with FakeCfiApi(f"sqlite:///{tmp_path / 'empty.db'}", token="t") as api:
        resp = httpx.get(f"{api.url}/api/v1/views/stocks", headers={"Authorization": "Bearer t"})
    assert resp.status_code == 503
    assert resp.json() == {"error": "source database unavailable"}


def test_command_line_serves_until_stopped(api_source_url):
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cfi_pipelines.cli",
            "fake-cfi-api",
            "--port",
            str(port),
            "--source-url",
            api_source_url,
            "--token",
            "cli-token",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        banner = proc.stdout.readline()  # printed once the socket is bound
        assert f"http://127.0.0.1:{port}" in banner
        resp = httpx.get(
            f"http://127.0.0.1:{port}/api/v1/views/campaigns",
            headers={"Authorization": "Bearer cli-token"},
        )
        assert resp.status_code == 200 and len(resp.json()["items"]) == 10
    finally:
        stop_process(proc)


def test_trickle_sends_the_body_one_byte_at_a_time(fake_api):
    fake_api.faults.trickle_s = 0.01
    url = f"{fake_api.url}/api/v1/views/campaigns"
    with httpx.stream("GET", url, headers=AUTH) as resp:
        chunks = [c for _, c in zip(range(3), resp.iter_raw(), strict=False)]
    assert resp.status_code == 200 and [len(c) for c in chunks] == [1, 1, 1]


def test_empty_page_and_duplicate_page_switches(fake_api):
    url = f"{fake_api.url}/api/v1/views/operations"
    fake_api.faults.empty_page = 2
    first = httpx.get(url, params={"limit": 8}, headers=AUTH).json()
    second = httpx.get(
        url, params={"limit": 8, "cursor": first["next_cursor"]}, headers=AUTH
    ).json()
    assert second["items"] == [] and second["next_cursor"] not in (None, first["next_cursor"])

    fake_api.faults.empty_page, fake_api.faults.duplicate_page = 0, 2
    second = httpx.get(
        url, params={"limit": 8, "cursor": first["next_cursor"]}, headers=AUTH
    ).json()
    assert second["items"][0] == first["items"][-1]  # page 2 starts again at page 1's last
    with pytest.raises(ValueError, match="use >= 2"):
        Faults(duplicate_page=1)
