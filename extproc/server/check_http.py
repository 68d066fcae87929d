"""The listener for Envoy's HTTP authorization checks (ext_authz `http_service`).

A raw `asyncio.Protocol` with httptools, the C HTTP/1.1 parser uvicorn uses, and no framework:
on this machine an empty check costs ~15 µs of CPU this way against ~300 µs for an empty
Python gRPC call (../shared/DESIGN.md), so everything between the socket and the handler is
kept to the parser's callbacks and one `transport.write`. The admin server
(extproc/server/http.py) is a general router with a task per connection; this one answers a
check whose decision is cached synchronously, inside `data_received`, and creates a task
only when the handler must wait (a CUSTOM provider, a key fetch).

What it guarantees, whatever arrives:
* keep-alive, every method (the check mirrors the client's method; HEAD is answered without a
  body), pipelined requests answered in order;
* the request head is bounded (431), the body too (413), a parse error is answered with 400;
  each of those closes the connection after the answers already owed;
* an `Upgrade` request is answered like any other and the connection stays HTTP/1.1 (Envoy
  forwards a WebSocket request's `upgrade` header to the check; we never switch protocols);
* a handler that raises gets a 500 (Envoy's ext_authz treats a 5xx as an error, so the request
  fails closed) and is logged; the server keeps serving.

The handler sees the request already decoded: method, request-target, headers with lower-case
names (repeated names joined with "," and their entries kept apart in `lines`, as
extproc/services/headers.py does for Envoy's raw header maps), the body, and the name of a
header whose value was not UTF-8 (or "", or ":path" for the request-target), and the size of
the request head (target, names and values).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httptools
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from extproc.attributes import NO_LINES, HeaderLines

log = logging.getLogger("extproc.http_check")

DEFAULT_MAX_HEAD_BYTES = 128 * 1024
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
MAX_PENDING = 64  # answers owed on one connection before it stops reading
LINGER_S = 2.0  # how long a refused connection is read and discarded before it is closed

# method, target, headers, lines, body, bad, head size -> the response, or something to await for it
Handler = Callable[[str, str, dict[str, str], HeaderLines, bytes, str, int], "bytes | Awaitable[bytes]"]

_REFUSALS = {
    400: b"HTTP/1.1 400 Bad Request\r\ncontent-length: 12\r\nconnection: close\r\n\r\nbad request\n",
    413: b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 18\r\nconnection: close\r\n\r\npayload too large\n",
    431: b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 18\r\nconnection: close\r\n\r\n"
    b"headers too large\n",
}
INTERNAL_ERROR = b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 15\r\n\r\ninternal error\n"
_CLOSE = b""  # in the queue of owed answers: close the connection here


class _Refused(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


class ListenerStats:
    """What the listener refused or failed to answer, counted, and logged once per kind: a
    client sending garbage learns nothing from the log, and an operator still sees it."""

    _WHY = {
        400: "a request that is not HTTP/1.1",
        413: "a body over the limit",
        431: "a request head over the limit",
    }

    def __init__(self) -> None:
        self.refused: dict[int, int] = {}

    def failed(self) -> None:
        """A handler raised (logged with its traceback where it happened): answered 500."""
        self.refused[500] = self.refused.get(500, 0) + 1

    def refuse(self, status: int) -> None:
        n = self.refused.get(status, 0)
        self.refused[status] = n + 1
        if n == 0:
            log.warning(
                "HTTP check listener: answered %s to %s and closed the connection (further ones are counted in "
                "extproc_http_check_refused_total, not logged)",
                status,
                self._WHY.get(status, "a bad request"),
            )


class CheckProtocol(asyncio.Protocol):
    """One connection from Envoy's ext_authz HTTP client."""

    def __init__(
        self,
        handler: Handler,
        max_head: int,
        max_body: int,
        live: set[CheckProtocol],
        stats: ListenerStats | None = None,
    ) -> None:
        self.handler = handler
        self.stats = stats if stats is not None else ListenerStats()
        self.max_head = max_head
        self.max_body = max_body
        self.live = live
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        # Answers owed, in request order, once one of them had to wait: bytes are ready, a
        # task is still deciding, _CLOSE ends the connection.
        self.pending: collections.deque[bytes | asyncio.Task[bytes]] = collections.deque()
        self.refused = False
        self.paused = False
        self._url = b""
        self._headers: dict[str, str] = {}
        self._lines: dict[str, tuple[str, ...]] | None = None
        self._size = 0
        self._body: bytes = b""
        self._bad = ""

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.live.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.live.discard(self)
        for item in self.pending:
            if isinstance(item, asyncio.Task):
                item.remove_done_callback(self._flush)
        self.pending.clear()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            # The request was complete and has been answered; we do not switch protocols, so
            # what follows is the next request, read by a fresh parser.
            self.parser = httptools.HttpRequestParser(self)
            rest = data[e.args[0] :] if e.args and isinstance(e.args[0], int) else b""
            if rest:
                self.data_received(rest)
        except (httptools.HttpParserError, _Refused) as e:
            # httptools wraps an exception raised in a callback; the limits raise _Refused.
            cause = e if isinstance(e, _Refused) else e.__cause__ or e.__context__
            self._refuse(cause.status if isinstance(cause, _Refused) else 400)

    # --- httptools callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._lines = None
        self._size = 0
        self._body = b""
        self._bad = ""

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._size += len(url)
        if self._size > self.max_head:
            raise _Refused(431)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._size += len(name) + len(value)
        if self._size > self.max_head:
            raise _Refused(431)
        key = name.decode("latin-1").lower()
        try:
            text = value.decode()
        except UnicodeDecodeError:
            self._bad = self._bad or key
            text = value.decode("latin-1")
        headers = self._headers
        prev = headers.get(key)
        if prev is None:
            headers[key] = text
            return
        headers[key] = f"{prev},{text}"
        lines = self._lines
        if lines is None:
            lines = self._lines = {}
        seen = lines.get(key)
        lines[key] = (prev, text) if seen is None else (*seen, text)

    def on_headers_complete(self) -> None:
        declared = self._headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            raise _Refused(413)  # refused before the body is read, not after

    def on_body(self, body: bytes) -> None:
        if len(self._body) + len(body) > self.max_body:
            raise _Refused(413)
        self._body += body

    def on_message_complete(self) -> None:
        try:
            target = self._url.decode()
            bad = self._bad
        except UnicodeDecodeError:
            target = self._url.decode("latin-1")
            bad = ":path"
        method = self.parser.get_method().decode("latin-1")
        lines = self._lines if self._lines is not None else NO_LINES
        try:
            answer = self.handler(method, target, self._headers, lines, self._body, bad, self._size)
        except Exception:
            log.exception("internal error while answering a check; answering 500 (Envoy fails it closed)")
            self.stats.failed()
            answer = INTERNAL_ERROR
        keep_alive = self.parser.should_keep_alive()
        if isinstance(answer, bytes):
            if self.pending:
                self.pending.append(answer)
            elif self.transport is not None:
                self.transport.write(answer)
        else:
            task = asyncio.ensure_future(answer)
            self.pending.append(task)
            task.add_done_callback(self._flush)
        if not keep_alive:
            self._finish(_CLOSE)
        elif len(self.pending) >= MAX_PENDING and self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()  # a client pipelining without reading waits for its answers

    # --- answering ----------------------------------------------------------------------

    def _flush(self, _: Any = None) -> None:
        """Write the owed answers that are ready, in order."""
        t = self.transport
        pending = self.pending
        while pending:
            item = pending[0]
            if isinstance(item, asyncio.Task):
                if not item.done():
                    return
                try:
                    data = item.result()
                    if not isinstance(data, bytes):
                        raise TypeError(f"a check answered {type(data).__name__}, not bytes")
                except Exception:
                    log.exception("internal error while answering a check; answering 500 (Envoy fails it closed)")
                    self.stats.failed()
                    data = INTERNAL_ERROR
            else:
                data = item
            pending.popleft()
            if t is None or t.is_closing():
                continue
            if data is _CLOSE:
                pending.clear()
                if self.refused and t.can_write_eof():
                    # Lingering close: a client still sending its oversized request would get a
                    # reset, and lose our answer, if we closed with its bytes unread. Stop
                    # writing, read and discard (data_received) for a moment, then close.
                    t.write_eof()
                    asyncio.get_running_loop().call_later(LINGER_S, t.close)
                else:
                    t.close()
                return
            t.write(data)
        if self.paused and t is not None and not t.is_closing():
            self.paused = False
            t.resume_reading()

    def _finish(self, data: bytes) -> None:
        """Send `data` after the answers owed, then close (`data` may be _CLOSE alone)."""
        if data:
            self.pending.append(data)
        self.pending.append(_CLOSE)
        self._flush()

    def _refuse(self, status: int) -> None:
        """Bad input: the requests before it are answered, then this status, then the connection closes."""
        self.refused = True
        self.stats.refuse(status)
        self._finish(_REFUSALS[status])


class CheckServer:
    """A listening socket and its connections; `close` ends both."""

    def __init__(
        self, server: asyncio.AbstractServer, live: set[CheckProtocol], path: str | None, stats: ListenerStats
    ) -> None:
        self.server = server
        self.live = live
        self.path = path
        self.stats = stats

    @property
    def port(self) -> int:
        sockets = getattr(self.server, "sockets", None) or ()
        return int(sockets[0].getsockname()[1]) if sockets and self.path is None else 0

    async def close(self) -> None:
        self.server.close()
        for p in list(self.live):
            if p.transport is not None:
                p.transport.close()
        await self.server.wait_closed()
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


async def serve(
    handler: Handler,
    address: str,
    *,
    max_head: int = DEFAULT_MAX_HEAD_BYTES,
    max_body: int = DEFAULT_MAX_BODY_BYTES,
) -> CheckServer:
    """Listen on HOST:PORT, [V6]:PORT or unix:PATH. Raises OSError when the address cannot be bound."""
    loop = asyncio.get_running_loop()
    live: set[CheckProtocol] = set()
    stats = ListenerStats()

    def factory() -> CheckProtocol:
        return CheckProtocol(handler, max_head, max_body, live, stats)

    if address.startswith("unix:"):
        path = address[len("unix:") :]
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(path).st_mode):
                os.unlink(path)  # a socket left by a previous run; anything else is an error below
        server = await loop.create_unix_server(factory, path)
        return CheckServer(server, live, path, stats)
    host, _, port = address.rpartition(":")
    server = await loop.create_server(factory, host.strip("[]"), int(port), reuse_address=True, backlog=1024)
    return CheckServer(server, live, None, stats)


class CheckListenerCollector(Collector):
    """The listener's own metrics, rendered at scrape time (prometheus_client's Collector protocol)."""

    def __init__(self, server: CheckServer, dropped_query_changes: Callable[[], int]) -> None:
        self.server = server
        self.dropped_query_changes = dropped_query_changes

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "extproc_http_check_connections",
            "Open connections from Envoy's HTTP ext_authz client (--http-listen)",
            value=len(self.server.live),
        )
        refused = CounterMetricFamily(
            "extproc_http_check_refused",
            "Requests the HTTP check listener answered with a 4xx or 500 of its own, by status: not HTTP/1.1 "
            "(400), a body or head over the limit (413, 431), an internal error (500)",
            labels=["status"],
        )
        for status, n in sorted(self.server.stats.refused.items()):
            refused.add_metric([str(status)], n)
        yield refused
        yield CounterMetricFamily(
            "extproc_http_check_query_changes_dropped",
            "Allowed checks whose query parameters a CUSTOM provider wanted set, which http_service cannot carry",
            value=self.dropped_query_changes(),
        )
