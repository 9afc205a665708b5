"""Parsing PostgreSQL's ``pgoutput`` logical replication messages (protocol version 1).

What :func:`pg_logical_slot_peek_binary_changes` returns with the ``pgoutput`` plugin:
one binary message per row (Begin ``B``, Commit ``C``, Relation ``R``, Type ``Y``,
Origin ``O``, Insert ``I``, Update ``U``, Delete ``D``, Truncate ``T``), layout as in
PostgreSQL's "Logical Replication Message Formats". Pure functions, no database: the
caller turns column text into Python values with the source table's SQLAlchemy types.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa


def lsn_to_int(text: str) -> int:
    """``"16/B374D848"`` → 0x16B374D848."""
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def int_to_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


@dataclass
class Relation:
    oid: int
    schema: str
    name: str
    replica_identity: str  # d default, f full, i index, n nothing
    columns: list[str]
    key_flags: list[bool]


@dataclass
class Tuple:
    """Column text by name (None for NULL); unchanged TOASTed columns are left out."""

    values: dict[str, str | None]


@dataclass
class Change:
    op: str  # I U D T
    relation: Relation
    new: Tuple | None = None
    old: Tuple | None = None
    old_is_full: bool = False  # 'O' (whole old row) rather than 'K' (key columns only)


@dataclass
class Transaction:
    xid: int
    final_lsn: int
    commit_lsn: int = 0
    end_lsn: int = 0
    changes: list[Change] = field(default_factory=list)


_STRUCTS: dict[str, struct.Struct] = {}
_INT16, _INT32 = struct.Struct("!h"), struct.Struct("!i")


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, fmt: str) -> Any:
        st = _STRUCTS.get(fmt) or _STRUCTS.setdefault(fmt, struct.Struct(fmt))
        (value,) = st.unpack_from(self.data, self.pos)
        self.pos += st.size
        return value

    def string(self) -> str:
        end = self.data.index(b"\0", self.pos)
        text = self.data[self.pos : end].decode()
        self.pos = end + 1
        return text

    def tuple(self, rel: Relation) -> Tuple:
        data, pos = self.data, self.pos
        (n,) = _INT16.unpack_from(data, pos)
        pos += 2
        values: dict[str, str | None] = {}
        columns = rel.columns
        for i in range(n):
            kind = data[pos]
            pos += 1
            if kind == 0x74:  # b"t" text (b"b" binary is only sent when asked for)
                (length,) = _INT32.unpack_from(data, pos)
                pos += 4
                values[columns[i]] = data[pos : pos + length].decode()
                pos += length
            elif kind == 0x6E:  # b"n" NULL
                values[columns[i]] = None
            # b"u": unchanged TOAST value, not sent
        self.pos = pos
        return Tuple(values)


def parse_messages(messages: list[bytes], relations: dict[int, Relation]) -> list[Transaction]:
    """The transactions in ``messages`` (in order), with their row changes.

    ``relations`` is filled with the Relation messages seen (and read for the ones sent
    earlier in the same decoding session)."""
    out: list[Transaction] = []
    tx: Transaction | None = None
    for raw in messages:
        r = _Reader(bytes(raw))
        kind = r.take("!c")
        if kind == b"B":
            final_lsn, _ts, xid = r.take("!Q"), r.take("!q"), r.take("!I")
            tx = Transaction(xid=xid, final_lsn=final_lsn)
        elif kind == b"C":
            r.take("!B")
            commit_lsn, end_lsn = r.take("!Q"), r.take("!Q")
            if tx is not None:
                tx.commit_lsn, tx.end_lsn = commit_lsn, end_lsn
                out.append(tx)
            tx = None
        elif kind == b"R":
            oid = r.take("!I")
            schema, name = r.string(), r.string()
            ident = r.take("!c").decode()
            ncols = r.take("!h")
            cols, keys = [], []
            for _ in range(ncols):
                flags = r.take("!B")
                cols.append(r.string())
                r.take("!I")  # type oid
                r.take("!i")  # type modifier
                keys.append(bool(flags & 1))
            relations[oid] = Relation(oid, schema or "pg_catalog", name, ident, cols, keys)
        elif kind in (b"I", b"U", b"D") and tx is not None:
            rel = relations[r.take("!I")]
            change = Change(op=kind.decode(), relation=rel)
            marker = r.take("!c")
            if marker in (b"K", b"O"):
                change.old, change.old_is_full = r.tuple(rel), marker == b"O"
                if kind == b"U":
                    marker = r.take("!c")
            if kind != b"D":
                change.new = r.tuple(rel)  # marker is b"N"
            tx.changes.append(change)
        elif kind == b"T" and tx is not None:
            nrel, _options = r.take("!i"), r.take("!B")
            for _ in range(nrel):
                oid = r.take("!I")
                if oid in relations:
                    tx.changes.append(Change(op="T", relation=relations[oid]))
        # b"Y" (type), b"O" (origin), b"M" (message): nothing the views need
    return out


def _converter(column: sa.Column):
    try:
        kind = column.type.python_type
    except NotImplementedError:
        return str
    if kind is bool:
        return lambda v: v == "t"
    if kind is int:
        return int
    if kind is Decimal:
        return Decimal
    if kind is datetime:
        return datetime.fromisoformat
    if kind is date:
        return date.fromisoformat
    return str


_CONVERTERS: dict[tuple[str, str], Any] = {}


def _convert(table: sa.Table, name: str, text: str | None) -> Any:
    if text is None:
        return None
    fn = _CONVERTERS.get((table.name, name))
    if fn is None:
        col = table.c.get(name)
        fn = _CONVERTERS.setdefault((table.name, name), str if col is None else _converter(col))
    return fn(text)


class TypedRow(Mapping[str, Any]):
    """A row image whose column text becomes the column's Python type when read: the
    apply reads the few columns that name view keys (converting every column of 10k
    row images cost more than decoding them)."""

    __slots__ = ("_table", "_text")

    def __init__(self, table: sa.Table, values: dict[str, str | None]) -> None:
        self._table, self._text = table, values

    def __getitem__(self, name: str) -> Any:
        return _convert(self._table, name, self._text[name])

    def __contains__(self, name: object) -> bool:
        return name in self._text

    def __iter__(self) -> Iterator[str]:
        return iter(self._text)

    def __len__(self) -> int:
        return len(self._text)

    def __repr__(self) -> str:
        return repr(dict(self))


def typed(table: sa.Table, values: dict[str, str | None]) -> Mapping[str, Any]:
    """Column text → the Python types of ``table``'s columns (unknown columns kept as
    text), converted when read (:class:`TypedRow`)."""
    return TypedRow(table, values)
