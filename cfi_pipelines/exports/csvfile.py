"""The targets CSV: fixed columns, UTF-8, RFC 4180 (CRLF, minimal quoting), header row.

A cell with a control character (C0, DEL, C1) or U+2028/U+2029 is always quoted.

Cells a spreadsheet would execute are neutralised: a cell starting with ``=``,
``+``, ``-``, ``@``, tab or carriage return gets a leading apostrophe, unless it
is a plain number (``+33 6 12 34 56 78``, ``-12.5``), which spreadsheets read as
a number, never as a formula.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import IO, Any

CSV_COLUMNS: tuple[str, ...] = (
    "campaign_id",
    "revision",
    "position",
    "client_reference",
    "email",
    "phone",
    "segment",
    "first_name",
    "last_name",
    "personalisation",
)
"""The documented columns of ``campaign_<id>_r<revision>.csv``, in order."""

_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?[0-9]+(?:[ .,][0-9]+)*")


def neutralise(cell: str) -> str:
    """``cell``, prefixed with ``'`` when a spreadsheet would evaluate it as a formula."""
    if cell and cell[0] in _FORMULA_STARTS and not _PLAIN_NUMBER.fullmatch(cell):
        return "'" + cell
    return cell


_MUST_QUOTE = re.compile('[",\x00-\x1f\x7f-\x9f\u2028\u2029]')
"""Cells quoted: the delimiter, the quote, and every control character (C0, DEL, C1)
or Unicode line/paragraph separator, which some readers (``str.splitlines``, editors)
take for a line break. The schema rejects them in text; this is defence in depth."""


def needs_quoting(cell: str) -> bool:
    """True when ``cell`` is written between double quotes."""
    return _MUST_QUOTE.search(cell) is not None


class CSVWriter:
    """RFC 4180 rows (CRLF, minimal quoting) where "minimal" also covers every control
    character and U+2028/U+2029 (``csv``'s QUOTE_MINIMAL would leave ``\x85`` bare)."""

    def __init__(self, stream: IO[str]) -> None:
        self._write = stream.write

    def writerow(self, row: Iterable[Any]) -> None:
        cells = []
        for value in row:
            cell = "" if value is None else str(value)
            if _MUST_QUOTE.search(cell):
                cell = '"' + cell.replace('"', '""') + '"'
            cells.append(cell)
        self._write(",".join(cells) + "\r\n")

    def writerows(self, rows: Iterable[Iterable[Any]]) -> None:
        for row in rows:
            self.writerow(row)


def open_writer(stream: IO[str]) -> CSVWriter:
    """A CSV writer on ``stream`` (opened with ``newline=""``), RFC 4180 dialect, with
    every control character quoted (see :class:`CSVWriter`)."""
    return CSVWriter(stream)


def write_rows(stream: IO[str], rows: Iterable[Sequence[Any]]) -> int:
    """Write the header then ``rows`` (neutralised), streaming; returns the row count."""
    writer = open_writer(stream)
    writer.writerow(CSV_COLUMNS)
    count = 0
    for row in rows:
        writer.writerow([neutralise("" if v is None else str(v)) for v in row])
        count += 1
    return count
