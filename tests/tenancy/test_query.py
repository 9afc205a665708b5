"""``cfi-pipelines query --tenant CODE "SQL"`` as a user runs it: the embedded SQLite
defaults and a real PostgreSQL; rows printed, or one ``refused:`` line and exit 1."""

from __future__ import annotations

import json

import pytest

from cfi_pipelines.cli import main
from cfi_pipelines.views.refresh import refresh_view
from cfi_pipelines.views.spec import VIEWS

GROUP_BY = "SELECT tenant_id, count(*) AS n FROM cfi_stocks GROUP BY tenant_id ORDER BY 1"


def _query(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["query", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _check_parent_leaf_and_refusals(capsys) -> None:
    code, out, err = _query(capsys, "--tenant", "NORD", GROUP_BY)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "tenant_id\tn"
    assert [line.split("\t")[0] for line in lines[1:]] == ["3", "4", "5"]  # the 3 stores
    assert "as NORD, tenant 2" in err
    code, out, err = _query(capsys, "--tenant", "NORD-01", GROUP_BY)
    assert code == 0 and [line.split("\t")[0] for line in out.splitlines()[1:]] == ["3"]

    code, out, _ = _query(capsys, "--tenant", "NORD-01", "--json", "--max-rows", "2",
                          "SELECT tenant_id, sku FROM cfi_stocks")  # fmt: skip
    doc = json.loads(out)
    assert code == 0 and doc["truncated"] and len(doc["rows"]) == 2
    assert {r["tenant_id"] for r in doc["rows"]} == {3}

    for sql in ("DELETE FROM cfi_stocks", "SELECT 1; SELECT 2", "SELECT * FROM cfi_refresh_log"):
        code, out, err = _query(capsys, "--tenant", "NORD-01", sql)
        assert code == 1 and out == ""
        assert err.startswith("refused: ") and err.count("\n") == 1, err
    code, _, err = _query(capsys, "--tenant", "NOPE", "SELECT 1")
    assert code == 1 and "unknown tenant 'NOPE'" in err and err.count("\n") == 1


def test_query_on_the_embedded_sqlite_defaults(sqlite_dbs, capsys):
    for spec in VIEWS:
        refresh_view(spec, sqlite_dbs.source, sqlite_dbs.common, mode="full")
    _check_parent_leaf_and_refusals(capsys)
    code, _, err = _query(capsys, "--tenant", "CFI", "--timeout", "0.3",
                          "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) "
                          "SELECT count(*) FROM r")  # fmt: skip
    assert code == 1 and "time limit (0.3 s)" in err


@pytest.mark.postgres
def test_query_on_postgresql(rls_db, capsys, monkeypatch):
    monkeypatch.setenv("CFI_COMMON_URL", rls_db.url)
    _check_parent_leaf_and_refusals(capsys)
    code, _, err = _query(capsys, "--tenant", "CFI", "--timeout", "0.3", "SELECT pg_sleep(60)")
    assert code == 1 and "time limit (0.3 s)" in err
    monkeypatch.delenv("CFI_TENANT_SECRET")
    code, _, err = _query(capsys, "--tenant", "CFI", "SELECT 1")
    assert code == 1 and "CFI_TENANT_SECRET" in err and err.count("\n") == 1
