"""Why a refresh failed on a database error, in one line an operator can act on.

A database error during a refresh has three usual causes, told apart here after the
fact: CFI's schema changed (a column or table the view reads is gone: named, with the
views that read it), CFI's source DB is unreachable, or the common DB is. Each names
the variable to check, as ``doctor`` does. Cost, on the failure path only: one
connection to each database and one catalog read per source table the view reads
(:mod:`cfi_pipelines.views.schema`); nothing on the success path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cfi_pipelines.views.result import RefreshError
from cfi_pipelines.views.schema import Difference, compare, describe
from cfi_pipelines.views.spec import ViewSpec

Kind = Literal["schema", "source_down", "common_down", "database"]


@dataclass(frozen=True)
class Diagnosis:
    kind: Kind
    message: str  # one line, no driver dump
    differences: tuple[Difference, ...] = field(default=())


class DiagnosedFailure(RefreshError):
    """A refresh that failed on a database error, with its cause (``diagnosis``)."""

    def __init__(self, view: str, diagnosis: Diagnosis):
        self.view, self.diagnosis = view, diagnosis
        super().__init__(f"view {view}: {diagnosis.message}")


def first_line(exc: BaseException) -> str:
    """``Type: first line`` of a driver error (no SQL, no link, no continuation lines)."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.orig is not None:
        exc = exc.orig
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0].strip() if text else repr(exc)}"


def _unreachable(what: str, engine: Engine, variable: str, exc: BaseException) -> str:
    where = engine.url.render_as_string(hide_password=True)
    return (
        f"{what} {where} is unreachable ({first_line(exc)}): "
        f"check {variable} (host, port, database, credentials)"
    )


def diagnose(
    spec: ViewSpec, source: Engine, target: Engine, exc: BaseException
) -> Diagnosis | None:
    """The cause of ``exc`` (raised by a refresh of ``spec``), or None for an error that
    is not a database one (those say what they are already)."""
    if not isinstance(exc, sa.exc.DBAPIError):
        return None
    try:
        with source.connect() as conn:
            differences = compare(conn, [spec])
    except Exception as probe:  # the source itself does not answer
        return Diagnosis(
            "source_down", _unreachable("CFI's source DB", source, "CFI_SOURCE_URL", probe)
        )
    if differences:
        return Diagnosis("schema", describe(differences), tuple(differences))
    try:
        with target.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as probe:
        return Diagnosis(
            "common_down", _unreachable("the common DB", target, "CFI_COMMON_URL", probe)
        )
    return Diagnosis(
        "database",
        f"database error ({first_line(exc)}); source "
        f"{source.url.render_as_string(hide_password=True)}, common "
        f"{target.url.render_as_string(hide_password=True)}",
    )
