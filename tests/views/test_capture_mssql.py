"""SQL Server Change Tracking (views/capture/mssql.py). No SQL Server can run here: every
statement is compiled with the ``mssql+pyodbc`` dialect, the DBA script is checked
against the tables the views read, and the decisions (idle, moved, changes gone -> full
refresh) run against a scripted stand-in connection that compiles each statement it is
given with that dialect and answers with the rows a server would return."""

from __future__ import annotations

from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects.mssql import pyodbc

from cfi_pipelines.model import cfi_source as src
from cfi_pipelines.ops import doctor
from cfi_pipelines.views.capture import CaptureLost, CaptureUnavailable
from cfi_pipelines.views.capture.mssql import (
    MssqlChangeTracking,
    changes_sql,
    cut,
    moved_tables_sql,
    row_change,
    versions_sql,
)
from cfi_pipelines.views.probe import source_tables
from cfi_pipelines.views.selftest import change_tracking_roundtrip, compiled_statements

DIALECT = pyodbc.dialect(paramstyle="qmark")  # as with the driver loaded
PREP = DIALECT.identifier_preparer
SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "sql" / "sqlserver_change_tracking.sql"
FOLLOWED = source_tables()


def compiled(stmt) -> str:
    return str(stmt.compile(dialect=DIALECT))


# --------------------------------------------------------------------------- stand-in


class Scripted:
    """A connection/engine stand-in: each statement is compiled for mssql+pyodbc (so an
    uncompilable one fails the test) and answered by the first ``(marker, rows)`` whose
    marker is in its SQL; ``rows`` is a list of dicts or a function of the params."""

    dialect = DIALECT

    def __init__(self, script: list[tuple[str, object]]):
        self.script = script
        self.sql: list[str] = []
        self.options: dict = {}
        self.in_transaction = False
        self.transactional: list[bool] = []

    # engine side
    def connect(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    # connection side
    def execution_options(self, **kw):
        self.options.update(kw)
        return self

    @contextmanager
    def begin(self):
        self.in_transaction = True
        try:
            yield self
        finally:
            self.in_transaction = False

    def rollback(self):
        return None

    def execute(self, stmt, params=None):
        sql = compiled(stmt)
        self.sql.append(sql)
        self.transactional.append(self.in_transaction)
        for marker, rows in self.script:
            if marker in sql:
                return _Result(rows(params) if callable(rows) else rows)
        raise AssertionError(f"unscripted statement: {sql}")


class _Result:
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def scalar(self):
        return next(iter(self.rows[0].values())) if self.rows else None

    def mappings(self):
        return self

    def one(self):
        assert len(self.rows) == 1, self.rows
        return self.rows[0]

    def all(self):
        return self.rows

    def __iter__(self):
        return iter(self.rows)


def capture(script) -> tuple[MssqlChangeTracking, Scripted]:
    conn = Scripted(script)
    return MssqlChangeTracking(conn, FOLLOWED, why="test"), conn  # type: ignore[arg-type]


def moved_row(**per_table: tuple[int | None, int | None]) -> list[dict]:
    """The moved-tables query's row: per followed table (newest change, min valid)."""
    row = {}
    for i, t in enumerate(FOLLOWED):
        row[f"l{i}"], row[f"m{i}"] = per_table.get(t.name, (None, 1))
    return [row]


GATE_SQL = "SELECT CHANGE_TRACKING_CURRENT_VERSION() AS v"


# --------------------------------------------------------------------------- statements


def test_every_statement_compiles_for_mssql_pyodbc():
    moved = compiled(moved_tables_sql(FOLLOWED, PREP))
    assert moved.count("CHANGETABLE(CHANGES ") == len(FOLLOWED)
    assert moved.count("CHANGE_TRACKING_MIN_VALID_VERSION(OBJECT_ID(N'") == len(FOLLOWED)
    assert "CHANGETABLE(CHANGES stock_levels, ?) AS c" in moved  # pyodbc's qmark
    versions = compiled(versions_sql(FOLLOWED, PREP))
    assert versions.startswith("SELECT CHANGE_TRACKING_CURRENT_VERSION() AS v, ")
    for table in FOLLOWED:
        sql = compiled(changes_sql(table, PREP))
        assert f"FROM CHANGETABLE(CHANGES {table.name}, ?) AS c LEFT OUTER JOIN" in sql
        assert "c.SYS_CHANGE_OPERATION AS ct_op" in sql
        assert sql.endswith("ORDER BY c.SYS_CHANGE_VERSION")
        for col in table.columns:
            assert f"t.{PREP.quote(col.name)} AS {PREP.quote(col.name)}" in sql
    # a composite primary key joins on every column of it
    sql = compiled(changes_sql(src.operation_products, PREP))
    assert "ON t.operation_id = c.operation_id AND t.product_id = c.product_id" in sql
    assert "c.operation_id AS ct_operation_id, c.product_id AS ct_product_id" in sql


def test_a_table_without_primary_key_is_refused():
    table = sa.Table("no_pk", sa.MetaData(), sa.Column("x", sa.Integer))
    with pytest.raises(CaptureUnavailable, match="no primary key"):
        changes_sql(table, PREP)


# --------------------------------------------------------------------------- gate


def test_idle_gate_is_one_query_and_says_nothing_changed():
    cap, conn = capture([(GATE_SQL, [{"v": 100}])])
    gate = cap.gate("100")
    assert conn.sql == [GATE_SQL]  # one query, whatever the size of the tables
    assert not gate.changed and gate.position == "100"
    assert gate.suspects(t.name for t in FOLLOWED) == set()


def test_first_gate_is_changed_without_naming_tables():
    cap, conn = capture([(GATE_SQL, [{"v": 7}])])
    gate = cap.gate(None)
    assert gate.changed and gate.tables is None and gate.position == "7"
    assert len(conn.sql) == 1


def test_moved_gate_names_the_changed_tables_and_their_newest_change():
    cap, conn = capture(
        [
            ("CHANGETABLE", lambda p: moved_row(stock_levels=(104, 1), products=(103, 1))),
            (GATE_SQL, [{"v": 105}]),
        ]
    )
    gate = cap.gate("100")
    assert len(conn.sql) == 2 and "CHANGETABLE(CHANGES stock_levels, ?)" in conn.sql[1]
    assert gate.changed and gate.position == "105"
    assert gate.tables == {"stock_levels", "products"}
    assert gate.latest == {"stock_levels": "104", "products": "103"}
    assert cap.sort_key("105") > cap.sort_key("99")  # numeric, not text order


def test_a_write_to_a_table_we_do_not_follow_moves_the_version_but_not_the_gate():
    cap, _ = capture([("CHANGETABLE", lambda p: moved_row()), (GATE_SQL, [{"v": 120}])])
    gate = cap.gate("100")
    assert not gate.changed and gate.position == "120"
    assert "no followed table changed" in gate.note


def test_gate_marks_a_table_whose_changes_are_gone_as_suspect():
    cap, _ = capture(
        [("CHANGETABLE", lambda p: moved_row(invoices=(None, 150))), (GATE_SQL, [{"v": 160}])]
    )
    gate = cap.gate("100")
    assert gate.changed and gate.tables == {"invoices"}
    assert "no longer available for invoices" in gate.note


def test_change_tracking_off_is_said_with_the_dba_script():
    cap, _ = capture([(GATE_SQL, [{"v": None}])])
    with pytest.raises(CaptureUnavailable, match="sqlserver_change_tracking.sql"):
        cap.gate("100")


# --------------------------------------------------------------------------- changes


def versions_row(current: int, **mins: int | None) -> list[dict]:
    row = {"v": current}
    for i, t in enumerate(FOLLOWED):
        row[f"m{i}"] = mins.get(t.name, 1)
    return [row]


def stock_row(op, version, id_, product_id=None, quantity=None) -> dict:
    row = {"ct_op": op, "ct_version": version, "ct_id": id_}
    present = product_id is not None
    for c in src.stock_levels.columns:
        row[c.name] = None
    if present:
        row.update(
            id=id_,
            product_id=product_id,
            warehouse_id=1,
            quantity=quantity,
            reserved=0,
            updated_at=datetime(2026, 1, 1),
        )
    return row


def changes_script(current: int, stock_rows: list[dict], **mins) -> list:
    def per_table(params):
        return []

    return [
        ("CHANGE_TRACKING_CURRENT_VERSION() AS v, ", versions_row(current, **mins)),
        ("CHANGES stock_levels", lambda p: stock_rows),
        ("CHANGETABLE", per_table),
    ]


def test_changes_read_keys_ops_and_rows_in_one_snapshot_transaction():
    rows = [
        stock_row("U", 103, 5, product_id=50, quantity=7),
        stock_row("I", 102, 9, product_id=90, quantity=1),
        stock_row("D", 104, 6),
    ]
    cap, conn = capture(changes_script(104, rows))
    cs = cap.changes("100")
    assert conn.options.get("isolation_level") == "SNAPSHOT"
    assert all(conn.transactional)  # version, keys and rows: one snapshot
    assert "CHANGE_TRACKING_MIN_VALID_VERSION" in conn.sql[0]  # checked before reading
    assert len(conn.sql) == 1 + len(FOLLOWED)  # then one CHANGETABLE per followed table
    assert (cs.since, cs.upto, cs.more, cs.transactions) == ("100", "104", False, 3)
    assert [(c.op, c.table) for c in cs.changes] == [
        ("I", "stock_levels"),  # commit (version) order
        ("U", "stock_levels"),
        ("D", "stock_levels"),
    ]
    ins, upd, dele = cs.changes
    assert ins.new["product_id"] == 90 and ins.old is None
    assert upd.new["quantity"] == 7 and upd.old == {"id": 5} and not upd.old_complete
    assert dele.new is None and dele.old == {"id": 6} and not dele.old_complete


def test_changes_past_the_minimum_valid_version_raise_capture_lost():
    cap, conn = capture(changes_script(300, [], payments=250))
    with pytest.raises(CaptureLost, match=r"payments \(min valid 250\).*full refresh"):
        cap.changes("200")
    assert len(conn.sql) == 1  # nothing read once the changes are known gone


def test_an_untracked_table_is_unavailable_not_lost():
    cap, _ = capture(changes_script(300, [], clients=None))
    with pytest.raises(CaptureUnavailable, match="clients"):
        cap.changes("200")


def test_nothing_since_the_position_reads_no_changetable():
    cap, conn = capture(changes_script(200, []))
    cs = cap.changes("200")
    assert cs.changes == () and cs.upto == "200" and len(conn.sql) == 1


def test_a_limit_cuts_at_a_version_boundary():
    rows = [stock_row("I", v, v, product_id=v, quantity=1) for v in (101, 102, 102, 103)]
    cap, _ = capture(changes_script(103, rows))
    cs = cap.changes("100", limit=2)
    # versions 101 and the whole of 102 (one transaction): 3 changes, then from 102 on
    assert cs.upto == "102" and cs.more and len(cs.changes) == 3 and cs.transactions == 2


def test_cut_keeps_everything_under_the_limit():
    assert cut([], 10, 5) == (10, [], False)


def test_a_changed_row_missing_from_the_snapshot_is_a_delete():
    change = row_change(src.stock_levels, stock_row("U", 5, 11))
    assert change.op == "D" and change.old == {"id": 11}


def test_row_values_keep_the_columns_types():
    sql = changes_sql(src.products, PREP)
    types = {c.name: c.type for c in sql.selected_columns}
    assert isinstance(types["unit_price"], sa.Numeric)
    assert isinstance(types["ct_id"], sa.Integer)


# --------------------------------------------------------------------------- DBA script


def test_the_dba_script_tracks_and_grants_every_table_the_views_read():
    sql = SCRIPT.read_text()
    assert "SET CHANGE_TRACKING = ON (CHANGE_RETENTION = 2 DAYS, AUTO_CLEANUP = ON)" in sql
    assert "SET ALLOW_SNAPSHOT_ISOLATION ON" in sql
    read = set(doctor.source_tables()) | {t.name for t in FOLLOWED}
    assert len(read) >= 12
    for name in read:
        assert f"ALTER TABLE dbo.{name} ENABLE CHANGE_TRACKING" in sql, name
        assert f"GRANT VIEW CHANGE TRACKING ON dbo.{name} TO [$(READER)];" in sql, name


# --------------------------------------------------------------------------- doctor


def catalog_row(*, enabled=True, snapshot=1, untracked=(), denied=()) -> list[dict]:
    row = {"v": 42 if enabled else None, "s": snapshot}
    for i, t in enumerate(FOLLOWED):
        row[f"m{i}"] = None if t.name in untracked else 1
        row[f"p{i}"] = 0 if t.name in denied else 1
    return [row]


def test_doctor_says_ok_when_everything_is_enabled():
    conn = Scripted([("HAS_PERMS_BY_NAME", catalog_row())])
    check = doctor.check_change_tracking(conn, "mssql://cfi")  # type: ignore[arg-type]
    assert check.status == doctor.OK and f"{len(FOLLOWED)} followed tables" in check.detail
    assert "VIEW CHANGE TRACKING" in conn.sql[0] and "snapshot_isolation_state" in conn.sql[0]


def test_doctor_names_what_the_dba_has_not_done():
    conn = Scripted(
        [
            (
                "HAS_PERMS_BY_NAME",
                catalog_row(snapshot=0, untracked=("payments",), denied=("clients",)),
            )
        ]
    )
    check = doctor.check_change_tracking(conn, "mssql://cfi")  # type: ignore[arg-type]
    assert check.status == doctor.WARN and check.variable == "CFI_SOURCE_URL"
    assert "not tracked (or not visible): payments" in check.detail
    assert "VIEW CHANGE TRACKING not granted on clients" in check.detail
    assert "ALLOW_SNAPSHOT_ISOLATION is off" in check.detail
    assert "deploy/sql/sqlserver_change_tracking.sql" in check.detail
    off = Scripted([("HAS_PERMS_BY_NAME", catalog_row(enabled=False))])
    assert "off on the database" in doctor.check_change_tracking(off, "x").detail  # type: ignore[arg-type]


# --------------------------------------------------------------------------- selftest


def test_selftest_compiles_the_change_tracking_round_trip_for_sql_server():
    sql = compiled_statements(DIALECT)["change_tracking"]
    assert sql[0] == "ALTER TABLE cfi_selftest_000000_ct ENABLE CHANGE_TRACKING"
    assert sql[1] == GATE_SQL
    assert "CHANGETABLE(CHANGES cfi_selftest_000000_ct, ?)" in sql[2]
    assert "change_tracking" not in compiled_statements(sa.create_engine("sqlite://").dialect)


def test_selftest_round_trip_is_skipped_where_change_tracking_is_off():
    engine = Scripted([(GATE_SQL, [{"v": None}])])
    ok, detail = change_tracking_roundtrip(engine, "cfi_selftest_x_ct")  # type: ignore[arg-type]
    assert ok and detail.startswith("skipped: Change Tracking is off")


def test_capture_for_picks_change_tracking_when_the_dba_script_was_run():
    from cfi_pipelines.views.capture.mssql import change_tracking_capture

    chosen = change_tracking_capture(Scripted([("HAS_PERMS_BY_NAME", catalog_row())]), FOLLOWED)  # type: ignore[arg-type]
    assert chosen.mode == "mssql_ct" and chosen.exact
    missing = Scripted([("HAS_PERMS_BY_NAME", catalog_row(untracked=("payments",)))])
    with pytest.raises(CaptureUnavailable, match="payments.*sqlserver_change_tracking.sql"):
        change_tracking_capture(missing, FOLLOWED)  # type: ignore[arg-type]
