"""pgoutput messages as PostgreSQL sends them, built byte by byte: the row images are
decoded only where read, and read right (column order, NULL, an unchanged TOAST value
that is not sent, the new image after a whole old one, UTF-8)."""

from __future__ import annotations

import struct

from cfi_pipelines.model import cfi_source as src
from cfi_pipelines.views.capture.pgoutput import parse_messages, typed

OID = 16_400
COLUMNS = ("id", "tenant_id", "product_id", "warehouse_id", "quantity", "reserved", "updated_at")


def _relation() -> bytes:
    out = b"R" + struct.pack("!I", OID) + b"public\0stock_levels\0" + b"f"
    out += struct.pack("!h", len(COLUMNS))
    for i, name in enumerate(COLUMNS):
        out += struct.pack("!B", 1 if i == 0 else 0) + name.encode() + b"\0"
        out += struct.pack("!Ii", 23, -1)
    return out


def _tuple(values: list) -> bytes:
    """TupleData: text, None → NULL, ... → an unchanged TOAST value (not sent)."""
    out = struct.pack("!h", len(values))
    for v in values:
        if v is None:
            out += b"n"
        elif v is Ellipsis:
            out += b"u"
        else:
            data = str(v).encode()
            out += b"t" + struct.pack("!i", len(data)) + data
    return out


def _tx(*changes: bytes, xid: int = 7) -> list[bytes]:
    begin = b"B" + struct.pack("!QqI", 0x100, 0, xid)
    commit = b"C" + struct.pack("!BQQq", 0, 0x100, 0x180, 0)
    return [begin, _relation(), *changes, commit]


ROW = [5, 1, 42, 3, 10, 2, "2026-12-03 08:00:00"]


def test_an_update_s_new_image_is_read_after_the_whole_old_one():
    old, new = list(ROW), [5, 1, 43, 4, 11, None, "2026-12-03 08:00:01"]
    msg = b"U" + struct.pack("!I", OID) + b"O" + _tuple(old) + b"N" + _tuple(new)
    (tx,) = parse_messages(_tx(msg), {})
    (ch,) = tx.changes
    assert (ch.op, ch.old_is_full, tx.end_lsn) == ("U", True, 0x180)
    before, after = typed(src.stock_levels, ch.old), typed(src.stock_levels, ch.new)
    # picked in any order, typed as the table's columns
    assert before.pick(("warehouse_id", "product_id")) == (3, 42)
    assert after.pick(("product_id", "warehouse_id")) == (43, 4)
    assert after["quantity"] == 11 and after["reserved"] is None
    assert after.pick(("reserved",)) == (None,)
    assert dict(after)["updated_at"].second == 1
    assert ch.new.values["product_id"] == "43"


def test_an_unchanged_toast_value_is_not_in_the_image():
    new = [5, 1, 42, ..., 10, 2, "2026-12-03 08:00:00"]
    msg = b"U" + struct.pack("!I", OID) + b"N" + _tuple(new)
    (tx,) = parse_messages(_tx(msg), {})
    row = typed(src.stock_levels, tx.changes[0].new)
    assert "warehouse_id" not in row and "product_id" in row
    assert row.pick(("product_id", "warehouse_id")) is None  # the apply then reconciles
    assert row.pick(("product_id",)) == (42,)
    assert "warehouse_id" not in tx.changes[0].new.values and len(row) == len(COLUMNS) - 1


def test_inserts_deletes_and_key_only_old_images():
    ins = b"I" + struct.pack("!I", OID) + b"N" + _tuple(ROW)
    key_only = [5, None, None, None, None, None, None]
    dele = b"D" + struct.pack("!I", OID) + b"K" + _tuple(key_only)
    (tx,) = parse_messages(_tx(ins, dele), {})
    i, d = tx.changes
    assert (i.op, i.old, d.op, d.new, d.old_is_full) == ("I", None, "D", None, False)
    assert typed(src.stock_levels, i.new).pick(("id", "quantity")) == (5, 10)
    assert typed(src.stock_levels, d.old).pick(("id",)) == (5,)
    assert typed(src.stock_levels, d.old)["product_id"] is None


def test_text_is_utf8_and_columns_past_the_image_are_absent():
    short = [5, 1, "prodé"]  # an image with fewer columns than the relation
    msg = b"I" + struct.pack("!I", OID) + b"N" + _tuple(short)
    (tx,) = parse_messages(_tx(msg), {})
    image = tx.changes[0].new
    assert image.values == {"id": "5", "tenant_id": "1", "product_id": "prodé"}
    assert typed(src.stock_levels, image).pick(("quantity",)) is None


def test_a_change_outside_a_transaction_or_of_an_unknown_kind_is_skipped():
    stray = b"I" + struct.pack("!I", OID) + b"N" + _tuple(ROW)
    relations: dict = {}
    assert parse_messages([_relation(), stray], relations) == []
    assert relations[OID].name == "stock_levels"
    message = b"M" + b"\0" * 12
    (tx,) = parse_messages(_tx(message), {})
    assert tx.changes == []
