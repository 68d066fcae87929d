"""The load generator's script with a real wrk: each request takes its path and its headers from the list.

A small HTTP/1.1 server records what every connection received; no Envoy is needed, and the
run lasts one second at a low fixed rate. Nothing here is timed.
"""

from __future__ import annotations

import shutil
import threading
from collections import defaultdict
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bench.harness import load

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is installed by ./scripts/setup"),
]


class _Recorder(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as wrk expects
    seen: dict[int, list[tuple[str, str]]]  # client port -> (path, authorization) in arrival order
    lock: threading.Lock

    def do_GET(self) -> None:
        with self.lock:
            self.seen[self.client_address[1]].append((self.path, self.headers.get("authorization", "")))
        status = 403 if self.path.startswith("/denied") else 200
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[tuple[int, dict[int, list[tuple[str, str]]]]]:
    seen: dict[int, list[tuple[str, str]]] = defaultdict(list)
    handler = type("Handler", (_Recorder,), {"seen": seen, "lock": threading.Lock()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()


def test_wrk_sends_each_entry_with_its_own_path_and_token_in_list_order(
    recorder: tuple[int, dict[int, list[tuple[str, str]]]], tmp_path: Path
) -> None:
    port, seen = recorder
    requests = [
        load.Request(f"/denied/{i}" if i % 5 == 4 else f"/item/{i}", {"authorization": f"Bearer token-{i % 3}"})
        for i in range(10)
    ]
    spec = load.LoadSpec([port], connections=2, duration_s=1, rate=100, requests=requests, threads=2)
    result, _argv = load.run_wrk(spec, tmp_path, "check")

    entries = [(r.path, r.headers["authorization"]) for r in requests]
    by_connection = [got for got in seen.values() if got]
    assert len(by_connection) == 2
    for got in by_connection:
        assert len(got) >= 10, got
        assert set(got) <= set(entries)
        # One connection per thread: its requests follow the list, one entry after the other, round again.
        start = entries.index(got[0])
        assert got == [entries[(start + i) % len(entries)] for i in range(len(got))]
    # The answers the script counted are the server's: 403 for the denied fifth of the list.
    assert set(result.status) <= {"200", "403"}
    assert result.status.get("403", 0) > 0
