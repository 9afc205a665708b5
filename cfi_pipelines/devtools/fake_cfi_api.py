"""A fake CFI HTTP API, served from the CFI source DB (development and tests only).

``cfi-pipelines fake-cfi-api [--host H] [--port P]`` serves the contract of
:mod:`cfi_pipelines.fallback.api_client` over real HTTP: bearer-token check, keyset
pagination on the view's key (the cursor is opaque to clients and carries the
snapshot's ``as_of``, so every page of one read reports the same time), and
switches that inject latency, 429s with ``Retry-After``, 500s and malformed
pages. Tests use :class:`FakeCfiApi` directly::

    with FakeCfiApi(source_url, token="t") as api:
        api.faults.fail_429 = 1
        client = CfiApiClient(api.url, "t")
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import sqlalchemy as sa

from cfi_pipelines.clock import utcnow
from cfi_pipelines.db import engine_for, redact
from cfi_pipelines.fallback.api_client import API_VIEWS, ApiField, ApiView
from cfi_pipelines.settings import get_settings
from cfi_pipelines.views.spec import VIEWS_BY_NAME

log = logging.getLogger(__name__)

DEFAULT_PORT = 8765
DEFAULT_LIMIT = 1000
MAX_LIMIT = 10_000
MALFORMED_KINDS = (
    "bad_json",  # not JSON at all
    "not_object",  # a JSON list instead of an object
    "missing_field",  # an item without its first field
    "extra_field",  # an item with an unknown field
    "wrong_type",  # an integer field given as a string
    "missing_cursor",  # no next_cursor key
)


@dataclass
class Faults:
    """What the fake does wrong. Counters are consumed one request at a time."""

    latency_s: float = 0.0  # added to every request (use > the client's read timeout to time out)
    fail_429: int = 0  # the next N requests answer 429
    retry_after: str | None = "1"  # Retry-After header of those 429s (None: no header)
    fail_500: int = 0  # the next N requests answer 500
    malformed: str | None = None  # one of MALFORMED_KINDS
    malformed_page: int = 1  # which page (1-based) is malformed
    trickle_s: float = 0.0  # 200 bodies are sent one byte at a time, this many seconds apart
    empty_page: int = 0  # this page (1-based) is empty but has a fresh next_cursor (0: off)
    duplicate_page: int = 0  # this page (>= 2) starts again at the previous page's last row

    def __post_init__(self) -> None:
        if self.malformed is not None and self.malformed not in MALFORMED_KINDS:
            raise ValueError(f"malformed must be one of {MALFORMED_KINDS}, got {self.malformed!r}")
        if self.duplicate_page == 1:
            raise ValueError("duplicate_page repeats the previous page's last row: use >= 2")


@dataclass
class _Cursor:
    after: list[Any]
    page: int  # the page number this cursor asks for
    as_of: str

    def encode(self) -> str:
        raw = json.dumps({"a": self.after, "p": self.page, "t": self.as_of}, default=str)
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> _Cursor:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        data = json.loads(raw)
        return cls(list(data["a"]), int(data["p"]), str(data["t"]))


def _json_value(f: ApiField, v: Any) -> Any:
    """The API's representation of a column value (decimals as exact strings)."""
    if v is None:
        return None
    if f.kind == "decimal":
        d = Decimal(str(v))
        return str(d.quantize(Decimal(1).scaleb(-f.scale)) if f.scale is not None else d)
    if f.kind == "datetime":
        if isinstance(v, str):
            v = datetime.fromisoformat(v)
        return v.isoformat() + "Z"  # naive UTC in the DB
    if f.kind == "date":
        return v.isoformat() if isinstance(v, date) else str(v)
    if f.kind == "bool":
        return bool(v)
    if f.kind in ("int", "bigint"):
        return int(v)
    if f.kind == "float":
        return float(v)
    return v


@dataclass
class RequestLog:
    """What the fake answered, for the tests."""

    entries: list[tuple[str, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, path: str, status: int) -> None:
        with self.lock:
            self.entries.append((path, status))

    def statuses(self) -> list[int]:
        with self.lock:
            return [s for _, s in self.entries]


class FakeCfiApi:
    """The fake API on a real socket; ``port=0`` picks a free port."""

    def __init__(
        self,
        source: str | sa.Engine,
        *,
        token: str = "dev-token",
        host: str = "127.0.0.1",
        port: int = 0,
        faults: Faults | None = None,
        as_of: datetime | None = None,
    ):
        self.engine = engine_for(source) if isinstance(source, str) else source
        self.token = token
        self.faults = faults or Faults()
        self.as_of = as_of  # fixed snapshot time (naive UTC); default: now at the first page
        self.log = RequestLog()
        self._lock = threading.Lock()
        self._stopping = threading.Event()  # ends trickled bodies when the server stops
        self._httpd = ThreadingHTTPServer((host, port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.app = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeCfiApi:
        """Serve in a background thread."""
        # a short poll interval: stop() returns quickly (tests start many servers)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fake-cfi-api",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread:
            self._thread.join(timeout=5)

    def serve_forever(self) -> None:
        try:
            self._httpd.serve_forever()
        finally:
            self._httpd.server_close()

    def __enter__(self) -> FakeCfiApi:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----------------------------------------------------------------- behaviour

    def take_fault(self) -> tuple[int, dict[str, str]] | None:
        """Consume one injected 429/500, if any: (status, headers)."""
        with self._lock:
            if self.faults.fail_429 > 0:
                self.faults.fail_429 -= 1
                ra = self.faults.retry_after
                return 429, ({"Retry-After": ra} if ra is not None else {})
            if self.faults.fail_500 > 0:
                self.faults.fail_500 -= 1
                return 500, {}
        return None

    def page(self, mapping: ApiView, cursor: _Cursor | None, limit: int) -> dict[str, Any]:
        """One page of the view, keyset-paginated on the view's key."""
        spec = VIEWS_BY_NAME[mapping.view]
        sub = spec.query().subquery("v")
        keys = [sub.c[k] for k in spec.key]
        q = sa.select(sub).order_by(*keys).limit(limit + 1)  # one more: is there a next page?
        number = cursor.page if cursor else 1
        if cursor is not None:
            if number == self.faults.duplicate_page:  # keyset bug: >= instead of >
                after = (
                    keys[0] >= cursor.after[0]
                    if len(keys) == 1
                    else (sa.tuple_(*keys) >= sa.tuple_(*cursor.after))
                )
            else:
                after = (
                    keys[0] > cursor.after[0]
                    if len(keys) == 1
                    else (sa.tuple_(*keys) > sa.tuple_(*cursor.after))
                )
            q = q.where(after)
        as_of = cursor.as_of if cursor else (self.as_of or utcnow()).isoformat() + "Z"
        if number == self.faults.empty_page:  # nothing, yet "there is more"
            after_key = cursor.after if cursor else [None] * len(keys)
            return {
                "items": [],
                "next_cursor": _Cursor(after_key, number + 1, as_of).encode(),
                "as_of": as_of,
                "_page": number,
            }
        with self.engine.connect() as conn:
            rows = conn.execute(q, spec.params()).all()
        more = len(rows) > limit
        rows = rows[:limit]
        items = [
            {f.api_name: _json_value(f, v) for f, v in zip(mapping.fields, r, strict=True)}
            for r in rows
        ]
        next_cursor = None
        if more:
            last = rows[-1]._mapping
            next_cursor = _Cursor([last[k] for k in spec.key], number + 1, as_of).encode()
        return {"items": items, "next_cursor": next_cursor, "as_of": as_of, "_page": number}

    def corrupt(self, body: dict[str, Any]) -> bytes | None:
        """The malformed rendering of ``body`` when this page is the one to break."""
        kind = self.faults.malformed
        if kind is None or body["_page"] != self.faults.malformed_page:
            return None
        body = {k: v for k, v in body.items() if k != "_page"}
        items = body["items"]
        if kind == "bad_json":
            return b'{"items": [ {"oops"'
        if kind == "not_object":
            return json.dumps(items).encode()
        if kind == "missing_cursor":
            body.pop("next_cursor")
        elif items:
            first = next(iter(items[-1]))
            if kind == "missing_field":
                items[-1].pop(first)
            elif kind == "extra_field":
                items[-1]["surprise"] = 1
            elif kind == "wrong_type":
                key = next(k for k, v in items[-1].items() if isinstance(v, int))
                items[-1][key] = f"#{items[-1][key]}"
        return json.dumps(body).encode()


class _Handler(BaseHTTPRequestHandler):
    server_version = "fake-cfi-api/1"
    protocol_version = "HTTP/1.1"

    @property
    def app(self) -> FakeCfiApi:
        return self.server.app  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s - %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        # logged before answering: once the client has the response, the log shows it
        self.app.log.add(self.path, status)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        trickle = self.app.faults.trickle_s if status == 200 else 0.0
        if not trickle:
            self.wfile.write(body)
            return
        for i in range(len(body)):  # a slow server: each read gets one byte
            try:
                self.wfile.write(body[i : i + 1])
                self.wfile.flush()
            except OSError:  # the client gave up
                return
            if self.app._stopping.wait(trickle):
                return

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps({"error": message}).encode(), headers)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        app = self.app
        if app.faults.latency_s:
            time.sleep(app.faults.latency_s)  # injected latency: the point of this switch
        url = urlsplit(self.path)
        if url.path == "/healthz":
            return self._send(200, b'{"ok": true}')
        prefix = "/api/v1/views/"
        view = url.path[len(prefix) :] if url.path.startswith(prefix) else None
        mapping = API_VIEWS.get(view or "")
        if mapping is None:
            return self._error(404, f"no such resource {url.path!r}")
        auth = self.headers.get("Authorization", "")
        if not hmac.compare_digest(auth.encode(), f"Bearer {app.token}".encode()):
            return self._error(
                401, "missing or invalid bearer token", {"WWW-Authenticate": "Bearer"}
            )
        if fault := app.take_fault():
            status, headers = fault
            return self._error(status, "injected failure", headers)
        qs = parse_qs(url.query)
        try:
            limit = int(qs.get("limit", [DEFAULT_LIMIT])[0])
            if not 1 <= limit <= MAX_LIMIT:
                raise ValueError
        except ValueError:
            return self._error(400, f"limit must be an integer in 1..{MAX_LIMIT}")
        cursor = None
        if "cursor" in qs:
            try:
                cursor = _Cursor.decode(qs["cursor"][0])
            except (ValueError, KeyError, TypeError, binascii.Error):
                return self._error(400, "invalid cursor")
        try:
            body = app.page(mapping, cursor, limit)
        except sa.exc.OperationalError as exc:
            log.warning("fake CFI API: source DB error: %s", exc.orig)
            return self._error(503, "source database unavailable")
        raw = app.corrupt(body)
        if raw is None:
            body.pop("_page")
            raw = json.dumps(body).encode()
        self._send(200, raw)


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    source_url: str | None = None,
    token: str | None = None,
    faults: Faults | None = None,
) -> int:
    """``cfi-pipelines fake-cfi-api``: serve until interrupted (token: CFI_API_TOKEN, else dev-token)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = get_settings()
    chosen = token or settings.api_token or "dev-token"
    source_url = source_url or settings.source_url
    api = FakeCfiApi(source_url, token=chosen, host=host, port=port, faults=faults)
    shown = "from CFI_API_TOKEN" if not token and settings.api_token else repr(chosen)
    # entered before the banner: a stop signal right after it is a clean stop too
    with contextlib.suppress(KeyboardInterrupt):
        print(f"fake CFI API on {api.url} from {redact(source_url)} (token {shown})", flush=True)
        print(f"  views: {', '.join(API_VIEWS)}; use CFI_API_URL={api.url}", flush=True)
        api.serve_forever()
    return 0
