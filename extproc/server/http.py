"""A small HTTP/1.1 server: asyncio protocol, httptools (the C parser uvicorn uses), a route table.

It serves the admin endpoint (/metrics, /healthz, /readyz, /debug/...). A web framework did
this before and cost 14 MB of resident memory for six routes, a quarter of extproc's idle
footprint; this costs well under one. What it does, and nothing more:

* keep-alive (HTTP/1.1 by default, HTTP/1.0 with `Connection: keep-alive`), pipelined
  requests answered in order;
* GET, HEAD (answered without a body) and POST routes; 404 for an unknown path, 405 with
  `Allow` for a known path and another method;
* bounded request heads and bodies (431 / 413), a parse error answered with 400; each of
  those closes the connection; a handler that raises answers 500 and is logged, the server
  keeps serving;
* every response has a Content-Length.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus

import httptools

log = logging.getLogger("extproc.http")

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 1024 * 1024
MAX_PIPELINED = 16


@dataclass
class Request:
    method: str
    path: str  # without the query string
    query: str
    headers: Mapping[str, str]  # lower-case names
    body: bytes = b""


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()
    # A body produced piece by piece (sent with chunked transfer encoding) instead of `body`,
    # for responses too large to hold at once (/metrics of many series).
    stream: AsyncIterator[bytes] | None = None


Handler = Callable[[Request], Awaitable[Response]]


@dataclass
class Routes:
    """Exact paths to handlers per method (GET routes answer HEAD too)."""

    table: dict[str, dict[str, Handler]] = field(default_factory=dict)

    def add(self, method: str, path: str, handler: Handler) -> None:
        self.table.setdefault(path, {})[method] = handler

    def find(self, method: str, path: str) -> Handler | Response:
        methods = self.table.get(path)
        if methods is None:
            return Response(404, b"not found\n")
        handler = methods.get("GET" if method == "HEAD" else method)
        if handler is None:
            allowed = sorted({*methods, *(("HEAD",) if "GET" in methods else ())})
            return Response(405, b"method not allowed\n", headers=(("allow", ", ".join(allowed)),))
        return handler


class _Refused(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


class HttpProtocol(asyncio.Protocol):
    """One connection. Requests are parsed as bytes arrive and answered one at a time, in order."""

    def __init__(
        self,
        routes: Routes,
        max_head: int = MAX_HEAD_BYTES,
        max_body: int = MAX_BODY_BYTES,
        live: set[HttpProtocol] | None = None,
    ) -> None:
        self.routes = routes
        self.live = live if live is not None else set()
        self.max_head = max_head
        self.max_body = max_body
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        # Requests to answer in order; an int is a refusal (its status; 0: just close), None the end.
        self.queue: asyncio.Queue[tuple[Request, bool] | int | None] = asyncio.Queue()
        self.worker: asyncio.Task[None] | None = None
        self.refused = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._url = b""
        self._headers: dict[str, str] = {}
        self._head = 0
        self._body: list[bytes] = []
        self._body_size = 0

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.live.add(self)
        self.worker = asyncio.get_running_loop().create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The request itself was complete and is answered as if Upgrade were absent (a
            # server may ignore it); what follows is another protocol, so the connection ends.
            self.refused = True
            self.queue.put_nowait(0)
        except (httptools.HttpParserError, _Refused) as e:
            # httptools wraps an exception raised in a callback; the limits raise _Refused.
            cause = e if isinstance(e, _Refused) else e.__cause__ or e.__context__
            self._refuse(cause.status if isinstance(cause, _Refused) else 400)

    def connection_lost(self, exc: Exception | None) -> None:
        self.live.discard(self)
        self.queue.put_nowait(None)
        self._writable.set()  # a streaming writer waiting for room finds the transport closing

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # --- httptools callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._head = 0
        self._body = []
        self._body_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._grow(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._grow(len(name) + len(value))
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        prev = self._headers.get(key)
        self._headers[key] = text if prev is None else f"{prev},{text}"

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self.max_body:
            raise _Refused(413)
        self._body.append(body)

    def on_message_complete(self) -> None:
        url = httptools.parse_url(self._url)
        request = Request(
            method=self.parser.get_method().decode("ascii", "replace"),
            path=(url.path or b"/").decode("utf-8", "replace"),
            query=(url.query or b"").decode("utf-8", "replace"),
            headers=self._headers,
            body=b"".join(self._body),
        )
        self.queue.put_nowait((request, self.parser.should_keep_alive()))
        if self.queue.qsize() >= MAX_PIPELINED and self.transport is not None:
            self.transport.pause_reading()  # a client pipelining without reading waits for its answers

    def _grow(self, n: int) -> None:
        self._head += n
        if self._head > self.max_head:
            raise _Refused(431)

    # --- answering ----------------------------------------------------------------------

    async def _serve(self) -> None:
        while True:
            item = await self.queue.get()
            if item is None:
                return
            if item == 0:
                if self.transport is not None:
                    self.transport.close()
                return
            if isinstance(item, int):
                body = f"{HTTPStatus(item).phrase}\n".encode()
                self._write(Response(item, body), head_only=False, keep_alive=False)
                return
            request, keep_alive = item
            found = self.routes.find(request.method, request.path)
            if isinstance(found, Response):
                response = found
            else:
                try:
                    response = await found(request)
                except Exception:
                    log.exception("admin endpoint %s %s failed", request.method, request.path)
                    response = Response(500, b"internal error\n")
            head_only = request.method == "HEAD"
            if response.stream is not None:
                keep_alive = await self._write_stream(response, head_only=head_only, keep_alive=keep_alive)
            else:
                self._write(response, head_only=head_only, keep_alive=keep_alive)
            if not keep_alive:
                return
            if self.queue.empty() and self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    def _write(self, r: Response, *, head_only: bool, keep_alive: bool) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        phrase = HTTPStatus(r.status).phrase if r.status in HTTPStatus._value2member_map_ else ""
        lines = [f"HTTP/1.1 {r.status} {phrase}", f"content-type: {r.content_type}", f"content-length: {len(r.body)}"]
        lines.extend(f"{k}: {v}" for k, v in r.headers)
        if not keep_alive:
            lines.append("connection: close")
        t.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else r.body))
        if not keep_alive:
            t.close()

    async def _write_stream(self, r: Response, *, head_only: bool, keep_alive: bool) -> bool:
        """Send a streamed body with chunked encoding, waiting for the client to take each piece;
        whether the connection stays open."""
        assert r.stream is not None
        t = self.transport
        if t is None or t.is_closing():
            await _close(r.stream)
            return False
        phrase = HTTPStatus(r.status).phrase
        lines = [f"HTTP/1.1 {r.status} {phrase}", f"content-type: {r.content_type}", "transfer-encoding: chunked"]
        lines.extend(f"{k}: {v}" for k, v in r.headers)
        if not keep_alive:
            lines.append("connection: close")
        t.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if head_only:
            await _close(r.stream)
        else:
            try:
                async for chunk in r.stream:
                    if t.is_closing():
                        break
                    if chunk:
                        t.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        await self._writable.wait()
            finally:
                await _close(r.stream)
            t.write(b"0\r\n\r\n")
        if not keep_alive:
            t.close()
        return keep_alive and not t.is_closing()

    def _refuse(self, status: int) -> None:
        """Bad input: the requests before it are answered, then this status, then the connection closes."""
        self.refused = True
        self.queue.put_nowait(status)


async def _close(stream: AsyncIterator[bytes]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


class HttpServer:
    """A listening socket and its connections; `close` ends both (keep-alive clients included)."""

    def __init__(self, server: asyncio.Server, live: set[HttpProtocol]) -> None:
        self.server = server
        self.live = live

    @property
    def port(self) -> int:
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        self.server.close()
        for p in list(self.live):
            if p.transport is not None:
                p.transport.close()
        await self.server.wait_closed()


async def serve(routes: Routes, host: str, port: int) -> HttpServer:
    live: set[HttpProtocol] = set()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: HttpProtocol(routes, live=live), host, port, reuse_address=True)
    return HttpServer(server, live)
