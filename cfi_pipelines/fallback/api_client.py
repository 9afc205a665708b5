"""Client of CFI's HTTP API, the fallback source when CFI's databases are out of reach.

The contract (see the README):

``GET {base}/api/v1/views/{view}?cursor=…&limit=…`` with ``Authorization: Bearer …``
returns ``{"items": [{one row}], "next_cursor": "…" | null, "as_of": "<ISO 8601>"}``.

Everything that ties the API to our views lives in :data:`API_VIEWS`, derived from
the view tables (:mod:`cfi_pipelines.views.spec`): the path, and per column the API's
field name and the typed conversion into the column's type. Plugging in another
real API means editing :data:`API_PATHS` / :data:`API_FIELD_NAMES` only.

Validation is strict: a page that is not JSON, lacks a field, has an extra one or
a value of the wrong type raises :class:`CfiApiContractError` naming the view, the
page, the cursor, the item and the field. Callers stream pages into a temporary
file and only publish it when the last page is read, so a bad page never leaves
half a snapshot behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import pyarrow as pa
import sqlalchemy as sa

from cfi_pipelines.clock import utcnow
from cfi_pipelines.views.spec import VIEWS, ViewSpec

log = logging.getLogger(__name__)

API_PATHS: dict[str, str] = {v.name: f"/api/v1/views/{v.name}" for v in VIEWS}
"""URL path of each view, relative to ``CFI_API_URL``."""

API_FIELD_NAMES: dict[str, dict[str, str]] = {}
"""Per view, ``{column: API field}`` where the API's name differs from the column's
(empty: the contract uses the view's column names)."""

TOP_LEVEL_FIELDS = ("items", "next_cursor", "as_of")


# --------------------------------------------------------------------------- errors


class CfiApiError(Exception):
    """The API could not give a complete view; names the view, page and cursor."""

    def __init__(
        self,
        reason: str,
        *,
        view: str,
        page: int | None = None,
        cursor: str | None = None,
        field: str | None = None,
        item: int | None = None,
        status: int | None = None,
        hint: str = "",
    ):
        self.reason, self.view, self.page, self.cursor = reason, view, page, cursor
        self.field, self.item, self.status, self.hint = field, item, status, hint
        where = f"CFI API, view {view}"
        if page is not None:
            where += f", page {page} (cursor {cursor!r})"
        if item is not None:
            where += f", item {item}"
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {reason}" + (f". {hint}" if hint else ""))

    def metadata(self) -> dict[str, Any]:
        """The error's coordinates, for ``dagster.Failure(metadata=…)``."""
        out: dict[str, Any] = {"view": self.view}
        for name in ("page", "cursor", "item", "field", "status"):
            if (value := getattr(self, name)) is not None:
                out[name] = value
        return out


class CfiApiContractError(CfiApiError):
    """The response does not follow the contract: a retry will not fix it."""


class CfiApiAuthError(CfiApiError):
    """401/403: the token is missing, wrong or lacks the right."""


class CfiApiUnavailable(CfiApiError):
    """Connection errors, timeouts, 429 or 5xx that outlasted the retries."""


class CfiApiTimeout(CfiApiUnavailable):
    """The whole snapshot did not complete within the client's ``max_snapshot_seconds``."""


class CfiApiNotConfigured(Exception):
    """``CFI_API_URL`` is not set: no fallback is possible."""


# --------------------------------------------------------------------------- mapping


class _BadValue(Exception):
    """A value that does not fit its column (message = why)."""


@dataclass(frozen=True)
class ApiField:
    """One column of a view and how the API's value becomes that column's value."""

    column: str
    api_name: str
    kind: str  # int / bigint / str / decimal / date / datetime / bool / float
    nullable: bool
    max_length: int | None = None
    precision: int | None = None
    scale: int | None = None

    def convert(self, value: Any) -> Any:
        """The typed value, or :class:`_BadValue` saying why not."""
        if value is None:
            if self.nullable:
                return None
            raise _BadValue("is null but the column is NOT NULL")
        return _CONVERTERS[self.kind](self, value)

    def arrow_type(self) -> pa.DataType:
        return {
            "int": pa.int32(),
            "bigint": pa.int64(),
            "str": pa.string(),
            "date": pa.date32(),
            "datetime": pa.timestamp("us"),
            "bool": pa.bool_(),
            "float": pa.float64(),
        }.get(self.kind) or pa.decimal128(self.precision or 38, self.scale or 0)


def _got(value: Any) -> str:
    text = repr(value)
    return f"{text[:60]}{'…' if len(text) > 60 else ''} ({type(value).__name__})"


def _to_int(f: ApiField, v: Any) -> int:
    if type(v) is int:  # bool is an int subclass: refused
        return v
    if isinstance(v, Decimal) and v == v.to_integral_value():
        return int(v)
    raise _BadValue(f"expected an integer, got {_got(v)}")


def _to_str(f: ApiField, v: Any) -> str:
    if not isinstance(v, str):
        raise _BadValue(f"expected a string, got {_got(v)}")
    if f.max_length is not None and len(v) > f.max_length:
        raise _BadValue(f"string of {len(v)} characters exceeds the column's {f.max_length}")
    return v


def _to_decimal(f: ApiField, v: Any) -> Decimal:
    if isinstance(v, bool) or not isinstance(v, int | Decimal | str | float):
        raise _BadValue(f"expected a decimal number (number or string), got {_got(v)}")
    try:
        d = Decimal(str(v).strip())
    except InvalidOperation:
        raise _BadValue(f"expected a decimal number, got {_got(v)}") from None
    if not d.is_finite():
        raise _BadValue(f"expected a finite decimal number, got {_got(v)}")
    if f.scale is not None:
        d = d.quantize(Decimal(1).scaleb(-f.scale))
    if f.precision is not None and len(d.as_tuple().digits) > f.precision:
        raise _BadValue(f"{d} does not fit NUMERIC({f.precision}, {f.scale})")
    return d


def _to_date(f: ApiField, v: Any) -> date:
    if isinstance(v, str) and len(v) == 10:
        try:
            return date.fromisoformat(v)
        except ValueError:
            pass
    raise _BadValue(f"expected an ISO 8601 date (YYYY-MM-DD), got {_got(v)}")


def parse_datetime(v: Any) -> datetime:
    """ISO 8601 → naive UTC (aware values are converted, naive ones are taken as UTC)."""
    if isinstance(v, str):
        try:
            d = datetime.fromisoformat(v)
        except ValueError:
            pass
        else:
            return d.astimezone(UTC).replace(tzinfo=None) if d.tzinfo else d
    raise _BadValue(f"expected an ISO 8601 date-time, got {_got(v)}")


def _to_datetime(f: ApiField, v: Any) -> datetime:
    return parse_datetime(v)


def _to_bool(f: ApiField, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    raise _BadValue(f"expected true or false, got {_got(v)}")


def _to_float(f: ApiField, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float | Decimal):
        raise _BadValue(f"expected a number, got {_got(v)}")
    return float(v)


_CONVERTERS: dict[str, Callable[[ApiField, Any], Any]] = {
    "int": _to_int,
    "bigint": _to_int,
    "str": _to_str,
    "decimal": _to_decimal,
    "date": _to_date,
    "datetime": _to_datetime,
    "bool": _to_bool,
    "float": _to_float,
}


def _kind(column: sa.Column) -> dict[str, Any]:
    t = column.type
    # Order matters: BigInteger is an Integer, DateTime is not a Date, Float is a Numeric.
    if isinstance(t, sa.BigInteger):
        return {"kind": "bigint"}
    if isinstance(t, sa.Integer):
        return {"kind": "int"}
    if isinstance(t, sa.Boolean):
        return {"kind": "bool"}
    if isinstance(t, sa.DateTime):
        return {"kind": "datetime"}
    if isinstance(t, sa.Date):
        return {"kind": "date"}
    if isinstance(t, sa.Float):
        return {"kind": "float"}
    if isinstance(t, sa.Numeric):
        return {"kind": "decimal", "precision": t.precision, "scale": t.scale}
    if isinstance(t, sa.String):
        return {"kind": "str", "max_length": t.length}
    raise TypeError(f"column {column.table.name}.{column.name}: no API mapping for {t!r}")


@dataclass(frozen=True)
class ApiView:
    """How one view is read from the API: its path and its fields, in column order."""

    view: str
    path: str
    fields: tuple[ApiField, ...]
    key: tuple[str, ...] = ()  # the view's natural key (ViewSpec.key): unique per snapshot

    @property
    def columns(self) -> list[str]:
        return [f.column for f in self.fields]

    @property
    def key_indexes(self) -> tuple[int, ...]:
        """Positions of the key columns in a row."""
        columns = self.columns
        return tuple(columns.index(k) for k in self.key)

    @property
    def api_names(self) -> frozenset[str]:
        return frozenset(f.api_name for f in self.fields)

    def arrow_schema(self) -> pa.Schema:
        """The Parquet schema of a snapshot: the view's columns, types and nullability."""
        return pa.schema(
            [pa.field(f.column, f.arrow_type(), nullable=f.nullable) for f in self.fields],
            metadata={"cfi.view": self.view},
        )


def api_view_for(spec: ViewSpec) -> ApiView:
    """The API mapping of ``spec``, from its table's columns and the overrides above."""
    names = API_FIELD_NAMES.get(spec.name, {})
    return ApiView(
        view=spec.name,
        path=API_PATHS[spec.name],
        fields=tuple(
            ApiField(
                column=c.name, api_name=names.get(c.name, c.name), nullable=c.nullable, **_kind(c)
            )
            for c in spec.table.columns
        ),
        key=tuple(spec.key),
    )


API_VIEWS: dict[str, ApiView] = {v.name: api_view_for(v) for v in VIEWS}


def get_api_view(view: str) -> ApiView:
    """The API mapping of ``view`` (ValueError naming the valid views otherwise)."""
    try:
        return API_VIEWS[view]
    except KeyError:
        raise ValueError(f"unknown view {view!r}; views are: {', '.join(API_VIEWS)}") from None


# --------------------------------------------------------------------------- pages


@dataclass
class Page:
    """One validated page: rows as tuples in column order."""

    view: str
    number: int  # 1-based
    cursor: str | None  # the cursor that asked for it
    rows: list[tuple]
    next_cursor: str | None
    as_of: datetime  # naive UTC
    bytes: int
    attempts: int = 1


def parse_page(
    mapping: ApiView, content: bytes, *, number: int, cursor: str | None
) -> tuple[list[tuple], str | None, datetime]:
    """Validate one response body against the contract → (rows, next_cursor, as_of)."""
    where = {"view": mapping.view, "page": number, "cursor": cursor}
    hint = "The API does not follow the contract; nothing was loaded"
    try:
        # parse_float=Decimal: money stays exact on its way to NUMERIC columns
        body = json.loads(content, parse_float=Decimal)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CfiApiContractError(
            f"the response is not JSON ({exc}); it starts with {content[:80]!r}", hint=hint, **where
        ) from None
    if not isinstance(body, dict):
        raise CfiApiContractError(
            f"expected a JSON object, got {type(body).__name__}", hint=hint, **where
        )
    for name in TOP_LEVEL_FIELDS:
        if name not in body:
            raise CfiApiContractError("missing", field=name, hint=hint, **where)
    extra = sorted(set(body) - set(TOP_LEVEL_FIELDS))
    if extra:
        raise CfiApiContractError(f"unexpected field(s) {extra}", hint=hint, **where)
    items, next_cursor = body["items"], body["next_cursor"]
    if not isinstance(items, list):
        raise CfiApiContractError(
            f"expected a list, got {_got(items)}", field="items", hint=hint, **where
        )
    if next_cursor is not None and (not isinstance(next_cursor, str) or not next_cursor):
        raise CfiApiContractError(
            f"expected a non-empty string or null, got {_got(next_cursor)}",
            field="next_cursor",
            hint=hint,
            **where,
        )
    try:
        as_of = parse_datetime(body["as_of"])
    except _BadValue as exc:
        raise CfiApiContractError(str(exc), field="as_of", hint=hint, **where) from None

    expected = mapping.api_names
    rows: list[tuple] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise CfiApiContractError(
                f"expected an object, got {_got(item)}", item=i, hint=hint, **where
            )
        if item.keys() != expected:
            missing = sorted(expected - item.keys())
            extra = sorted(item.keys() - expected)
            problem = "; ".join(
                p
                for p in (
                    f"missing field(s) {missing}" if missing else "",
                    f"unexpected field(s) {extra}" if extra else "",
                )
                if p
            )
            raise CfiApiContractError(
                problem, item=i, field=(missing or extra)[0], hint=hint, **where
            )
        row = []
        for f in mapping.fields:
            try:
                row.append(f.convert(item[f.api_name]))
            except _BadValue as exc:
                raise CfiApiContractError(
                    str(exc), item=i, field=f.api_name, hint=hint, **where
                ) from None
        rows.append(tuple(row))
    return rows, next_cursor, as_of


# --------------------------------------------------------------------------- client


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or HTTP-date), None when absent/garbled."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


@dataclass
class ClientStats:
    requests: int = 0
    retries: int = 0
    waited_s: float = 0.0
    waits: list[float] = field(default_factory=list)


class _Overdue(Exception):
    """A response that was not complete by its deadline (message = why)."""


class _Watchdog:
    """Shuts down ``resp``'s socket at ``until`` (monotonic), waking a blocked read.

    httpx fixes a response's read timeout when its body starts, so a server sending a
    byte just inside each read timeout would otherwise hold the response past its
    deadline by up to one read timeout.
    """

    def __init__(self, resp: httpx.Response, until: float) -> None:
        self.fired = False
        stream = resp.extensions.get("network_stream")
        self._sock = stream.get_extra_info("socket") if stream is not None else None
        self._timer = threading.Timer(max(0.0, until - time.monotonic()), self._fire)
        self._timer.daemon = True
        if self._sock is not None:
            self._timer.start()

    def _fire(self) -> None:
        self.fired = True
        with contextlib.suppress(OSError):  # already closed
            self._sock.shutdown(socket.SHUT_RDWR)

    def cancel(self) -> None:
        self._timer.cancel()


# A page (page_size rows, ~200 kB) takes well under a second: 30 s is generous, and
# bounds a trickling server (see worst_case_page_seconds).
DEFAULT_RESPONSE_DEADLINE_S = 30.0
DEFAULT_MAX_SNAPSHOT_SECONDS = 600.0
DEFAULT_MAX_PAGES = 100_000
DEFAULT_MAX_CLOCK_SKEW_S = 300.0


class CfiApiClient:
    """Reads whole views from the CFI API: pagination, retries, validation, deadlines.

    ``max_concurrency`` bounds the requests in flight through this client (views
    read from several threads share it); ``sleep`` is the waiting function (the
    tests record what it is asked to wait).

    httpx's ``read_timeout_s`` bounds each read only: a server that sends a byte
    every few seconds, or paginates without end, would never trip it. So:

    * ``response_deadline_s`` bounds the total time to receive one response (the body
      is streamed and the deadline checked after each chunk, and no single read may
      wait longer than what is left): an overdue response is retried like a timeout;
    * ``max_snapshot_seconds`` bounds a whole :meth:`iter_pages` read, retries and
      waits included (:class:`CfiApiTimeout`, not retried);
    * ``max_pages`` bounds the number of pages, and an empty page that still has a
      ``next_cursor`` is a contract error (an API that paginates without end);
    * an ``as_of`` later than now + ``max_clock_skew_s`` is a contract error;
    * the view's key (``ViewSpec.key``) must be unique across the pages of one read.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 30.0,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        max_backoff_s: float = 60.0,
        page_size: int = 1000,
        max_concurrency: int = 4,
        response_deadline_s: float = DEFAULT_RESPONSE_DEADLINE_S,
        max_snapshot_seconds: float = DEFAULT_MAX_SNAPSHOT_SECONDS,
        max_pages: int = DEFAULT_MAX_PAGES,
        max_clock_skew_s: float = DEFAULT_MAX_CLOCK_SKEW_S,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if not base_url:
            raise CfiApiNotConfigured(
                "CFI_API_URL is not set: the fallback to CFI's HTTP API is unavailable"
            )
        self.base_url = base_url.rstrip("/")
        self.page_size = page_size
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.response_deadline_s = response_deadline_s
        self.max_snapshot_seconds = max_snapshot_seconds
        self.max_pages = max(1, max_pages)
        self.max_clock_skew_s = max_clock_skew_s
        self.stats = ClientStats()
        self._sleep = sleep
        self._gate = threading.BoundedSemaphore(max(1, max_concurrency))
        headers = {"Accept": "application/json", "User-Agent": "cfi-pipelines"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(read_timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=max(1, max_concurrency)),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CfiApiClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        # exponential with jitter, so that many clients do not retry in step
        delay = self.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.0)
        if retry_after is not None:
            delay = max(delay, retry_after)  # the server knows best
        return min(delay, self.max_backoff_s)

    def worst_case_page_seconds(self) -> float:
        """How long one page can hold a snapshot before it fails: every attempt
        running to ``response_deadline_s``, plus the longest backoffs between them
        (without a Retry-After; ``max_snapshot_seconds`` bounds the whole anyway)."""
        backoffs = sum(
            min(self.backoff_s * 2 ** (a - 1), self.max_backoff_s)
            for a in range(1, self.max_retries + 1)
        )
        return (self.max_retries + 1) * self.response_deadline_s + backoffs

    def _snapshot_overdue(self, where: dict[str, Any], problem: str = "") -> CfiApiTimeout:
        return CfiApiTimeout(
            f"the snapshot did not complete within max_snapshot_seconds="
            f"{self.max_snapshot_seconds:g}s" + (f" ({problem})" if problem else ""),
            hint=(
                "The CFI API is too slow or paginates without end; nothing was loaded. "
                "Retry later, raise CfiApiResource.max_snapshot_seconds if the view is "
                "really that large, or ask CFI"
            ),
            **where,
        )

    def _fetch(
        self, path: str, params: dict[str, Any], until: float, why: str
    ) -> tuple[int, httpx.Headers, bytes]:
        """One GET, its body streamed and complete by ``until`` (monotonic) or :class:`_Overdue`.

        Each read is capped at what is left, and a watchdog shuts the socket down at
        ``until``: a read in progress cannot carry the response past its deadline.
        """
        left = until - time.monotonic()
        if left <= 0:
            raise _Overdue(why)
        read = max(0.001, min(self.read_timeout_s, left))  # no read may outlast the deadline
        timeout = httpx.Timeout(read, connect=min(self.connect_timeout_s, read))
        body = bytearray()
        with self._http.stream("GET", path, params=params, timeout=timeout) as resp:
            watchdog = _Watchdog(resp, until)
            try:
                for chunk in resp.iter_bytes():
                    body += chunk
                    if time.monotonic() > until:
                        raise _Overdue(f"{why}; {len(body)} bytes received")
            except httpx.TransportError:
                if watchdog.fired or time.monotonic() >= until:
                    raise _Overdue(f"{why}; {len(body)} bytes received") from None
                raise
            finally:
                watchdog.cancel()
            return resp.status_code, resp.headers, bytes(body)

    def _get(
        self, mapping: ApiView, cursor: str | None, number: int, deadline: float | None = None
    ) -> tuple[bytes, int]:
        """The body of one 200 response (retried), and the attempts it took.

        ``deadline`` (monotonic) is the whole snapshot's: past it, :class:`CfiApiTimeout`.
        """
        params: dict[str, Any] = {"limit": self.page_size}
        if cursor is not None:
            params["cursor"] = cursor
        where = {"view": mapping.view, "page": number, "cursor": cursor}
        attempt = 0
        while True:
            attempt += 1
            retry_after: float | None = None
            status: int | None = None
            until = time.monotonic() + self.response_deadline_s
            why = f"the response was not complete within {self.response_deadline_s:g}s"
            if deadline is not None and deadline < until:
                until = deadline
                why = "the snapshot's deadline passed while reading the response"
            try:
                with self._gate:
                    self.stats.requests += 1
                    status, headers, content = self._fetch(mapping.path, params, until, why)
            except _Overdue as exc:
                if deadline is not None and until == deadline:
                    raise self._snapshot_overdue(where, str(exc)) from None
                problem = str(exc)
            except httpx.TransportError as exc:  # connect errors, timeouts, protocol errors
                problem = f"{type(exc).__name__}: {exc or 'no detail'}"
            else:
                if status == 200:
                    return content, attempt
                if status in (401, 403):
                    raise CfiApiAuthError(
                        f"HTTP {status}: the API refused the token",
                        status=status,
                        hint="Check CFI_API_TOKEN (bearer token of the CFI API)",
                        **where,
                    )
                if status != 429 and status < 500:
                    text = content.decode("utf-8", "replace")
                    raise CfiApiError(
                        f"HTTP {status}: {text[:200]!r}",
                        status=status,
                        hint=f"Check CFI_API_URL ({self.base_url}) and the API path",
                        **where,
                    )
                retry_after = retry_after_seconds(headers.get("Retry-After"))
                problem = f"HTTP {status}"
            if deadline is not None and time.monotonic() >= deadline:
                raise self._snapshot_overdue(where, problem)
            if attempt > self.max_retries:
                raise CfiApiUnavailable(
                    f"{problem}, still failing after {attempt} attempts",
                    status=status,
                    hint="The CFI API is unavailable; retry later or ask CFI",
                    **where,
                )
            delay = self._backoff(attempt, retry_after)
            if deadline is not None and time.monotonic() + delay >= deadline:
                raise self._snapshot_overdue(
                    where, f"{problem}; the next retry is {delay:.1f}s away"
                )
            log.warning(
                "CFI API %s page %d: %s; retry %d/%d in %.2fs",
                mapping.view,
                number,
                problem,
                attempt,
                self.max_retries,
                delay,
            )
            self.stats.retries += 1
            self.stats.waited_s += delay
            self.stats.waits.append(delay)
            self._sleep(delay)

    def get_page(
        self,
        view: str,
        cursor: str | None = None,
        number: int = 1,
        *,
        deadline: float | None = None,
    ) -> Page:
        """One page of ``view`` (retried, validated; ``deadline``: see :meth:`_get`)."""
        mapping = get_api_view(view)
        content, attempts = self._get(mapping, cursor, number, deadline)
        rows, next_cursor, as_of = parse_page(mapping, content, number=number, cursor=cursor)
        latest = utcnow() + timedelta(seconds=self.max_clock_skew_s)
        if as_of > latest:
            raise CfiApiContractError(
                f"as_of {as_of.isoformat()}Z is in the future (later than now + "
                f"{self.max_clock_skew_s:g}s, {latest.isoformat(timespec='seconds')}Z)",
                view=view,
                page=number,
                cursor=cursor,
                field="as_of",
                hint=(
                    "The API's clock or data is wrong; nothing was loaded (a future as_of "
                    "would make the view look fresh). Ask CFI to check the API's as_of"
                ),
            )
        return Page(view, number, cursor, rows, next_cursor, as_of, len(content), attempts)

    def iter_pages(self, view: str) -> Iterator[Page]:
        """Every page of ``view``, following ``next_cursor`` until it is null.

        Bounded by ``max_snapshot_seconds`` (from the first request, the caller's work
        between pages included) and ``max_pages``; raises a :class:`CfiApiContractError`
        on an empty page with a ``next_cursor``, a ``next_cursor`` seen before, or a key
        seen before (the caller publishes nothing then).
        """
        mapping = get_api_view(view)
        deadline = time.monotonic() + self.max_snapshot_seconds
        key_at = mapping.key_indexes
        keys: dict[tuple, int] = {}  # key -> page it was first seen on
        cursor: str | None = None
        seen: set[str] = set()
        number = 1
        hint = "The API does not follow the contract; nothing was loaded"
        while True:
            where = {"view": view, "page": number, "cursor": cursor}
            if time.monotonic() >= deadline:
                raise self._snapshot_overdue(where, f"{number - 1} pages read")
            page = self.get_page(view, cursor, number, deadline=deadline)
            if key_at:
                for i, row in enumerate(page.rows):
                    key = tuple(row[k] for k in key_at)
                    first = keys.get(key)
                    if first is not None:
                        shown = ", ".join(
                            f"{c}={v!r}" for c, v in zip(mapping.key, key, strict=True)
                        )
                        raise CfiApiContractError(
                            f"duplicate key ({shown}), already returned on page {first}",
                            item=i,
                            hint=(
                                "The view's key must be unique; the API returned a row twice "
                                "(a pagination bug?); nothing was loaded. Ask CFI to fix it"
                            ),
                            **where,
                        )
                    keys[key] = number
            if not page.rows and page.next_cursor is not None:
                raise CfiApiContractError(
                    f"an empty page with a next_cursor ({page.next_cursor!r}): the API "
                    "paginates without end",
                    field="next_cursor",
                    hint=hint + "; ask CFI to fix the pagination",
                    **where,
                )
            yield page
            if page.next_cursor is None:
                return
            if page.next_cursor in seen:  # a server bug would otherwise loop forever
                raise CfiApiContractError(
                    f"next_cursor {page.next_cursor!r} was already returned by an earlier page",
                    view=view,
                    page=number,
                    cursor=cursor,
                    field="next_cursor",
                )
            if number >= self.max_pages:
                raise CfiApiContractError(
                    f"still a next_cursor after max_pages={self.max_pages} pages",
                    field="next_cursor",
                    hint=(
                        "The API paginates without end; nothing was loaded. If the view is "
                        "really that large, raise CfiApiResource.max_pages or page_size"
                    ),
                    **where,
                )
            seen.add(page.next_cursor)
            cursor, number = page.next_cursor, number + 1

    def fetch_all(self, view: str) -> tuple[list[tuple], datetime]:
        """The whole view in memory (small views, tests) and the oldest page's ``as_of``."""
        rows: list[tuple] = []
        as_of: datetime | None = None
        for page in self.iter_pages(view):
            rows.extend(page.rows)
            as_of = page.as_of if as_of is None else min(as_of, page.as_of)
        assert as_of is not None
        return rows, as_of
