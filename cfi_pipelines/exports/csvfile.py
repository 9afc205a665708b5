"""The targets CSV: fixed columns, UTF-8, RFC 4180 (CRLF, minimal quoting), header row.

Cells a spreadsheet would execute are neutralised: a cell starting with ``=``,
``+``, ``-``, ``@``, tab or carriage return gets a leading apostrophe, unless it
is a plain number (``+33 6 12 34 56 78``, ``-12.5``), which spreadsheets read as
a number, never as a formula.
"""

from __future__ import annotations

import csv
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


def open_writer(stream: IO[str]) -> Any:
    """A ``csv.writer`` on ``stream`` (opened with ``newline=""``), RFC 4180 dialect."""
    return csv.writer(stream, lineterminator="\r\n", quoting=csv.QUOTE_MINIMAL, strict=True)


def write_rows(stream: IO[str], rows: Iterable[Sequence[Any]]) -> int:
    """Write the header then ``rows`` (neutralised), streaming; returns the row count."""
    writer = open_writer(stream)
    writer.writerow(CSV_COLUMNS)
    count = 0
    for row in rows:
        writer.writerow([neutralise("" if v is None else str(v)) for v in row])
        count += 1
    return count
