"""A misbehaving CFI API for the tests: a real HTTP server answering from a script.

``ScriptedApi(respond)`` serves ``respond(n, cursor) -> (body, trickle_s)`` for the
n-th request (1-based): ``trickle_s > 0`` sends the body one byte at a time, that
many seconds apart (interrupted as soon as the server stops).
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cfi_pipelines.fallback.api_client import get_api_view
from cfi_pipelines.views.spec import get_view

Respond = Callable[[int, str | None], tuple[bytes, float]]

_SAMPLE = {
    "int": 1,
    "bigint": 1,
    "str": "x",
    "decimal": "1",
    "date": "2026-01-01",
    "datetime": "2026-01-01T00:00:00Z",
    "bool": False,
    "float": 1.0,
}


def item(view: str, n: int) -> dict[str, Any]:
    """A valid item of ``view`` whose key columns are all ``n``."""
    key = get_view(view).key
    return {
        f.api_name: n if f.column in key else _SAMPLE[f.kind] for f in get_api_view(view).fields
    }


def page(items: list[dict], next_cursor: str | None, as_of: str = "2026-01-01T00:00:00Z") -> bytes:
    return json.dumps({"items": items, "next_cursor": next_cursor, "as_of": as_of}).encode()


class ScriptedApi:
    def __init__(self, respond: Respond):
        self.respond = respond
        self.requests = 0
        self.stopping = threading.Event()
        self._count = itertools.count(1)
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                n = next(api._count)
                api.requests = n
                cursor = parse_qs(urlsplit(self.path).query).get("cursor", [None])[0]
                body, trickle = api.respond(n, cursor)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    if not trickle:
                        self.wfile.write(body)
                        return
                    for i in range(len(body)):
                        self.wfile.write(body[i : i + 1])
                        self.wfile.flush()
                        if api.stopping.wait(trickle):
                            return
                except OSError:  # the client gave up
                    return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> ScriptedApi:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
