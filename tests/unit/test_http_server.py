"""The admin endpoint's HTTP/1.1 server, over a real socket: keep-alive, pipelining, HEAD,
404/405, bounded heads and bodies, malformed input, a failing handler."""

from __future__ import annotations

import asyncio
import socket

import pytest

from extproc.server import http


def _routes() -> http.Routes:
    routes = http.Routes()

    async def hello(_: http.Request) -> http.Response:
        return http.Response(200, b"hello\n")

    async def echo(req: http.Request) -> http.Response:
        return http.Response(200, req.body + req.query.encode() + req.headers.get("x-h", "").encode())

    async def boom(_: http.Request) -> http.Response:
        raise RuntimeError("bug")

    async def slow(_: http.Request) -> http.Response:
        await asyncio.sleep(0.05)
        return http.Response(200, b"slow\n")

    routes.add("GET", "/hello", hello)
    routes.add("POST", "/echo", echo)
    routes.add("GET", "/boom", boom)
    routes.add("GET", "/slow", slow)
    return routes


def exchange(raw: bytes, *, max_head: int = http.MAX_HEAD_BYTES, max_body: int = http.MAX_BODY_BYTES) -> bytes:
    """Send `raw` on one connection to a fresh server and read until the server closes it."""

    async def run() -> bytes:
        live: set[http.HttpProtocol] = set()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: http.HttpProtocol(_routes(), max_head, max_body, live), "127.0.0.1", 0
        )
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        await writer.drain()
        try:
            data = await asyncio.wait_for(reader.read(), timeout=5)
        finally:
            writer.close()
            server.close()
        return data

    return asyncio.run(run())


def responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split a stream of HTTP/1.1 responses (Content-Length framed)."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:])}
        n = int(headers["content-length"])
        body = rest[:n]
        out.append((status, headers, body))
        data = rest[len(body) :]
    return out


def test_keep_alive_and_pipelined_requests_are_answered_in_order() -> None:
    raw = (
        b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n"
        b"POST /echo?q=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nX-H: h\r\n\r\nbody"
        b"GET /hello HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    got = responses(exchange(raw))
    assert [(s, b) for s, _, b in got] == [(200, b"slow\n"), (200, b"hello\n"), (200, b"bodyq=1h"), (200, b"hello\n")]
    assert got[-1][1]["connection"] == "close"


def test_head_gets_the_headers_of_get_without_a_body() -> None:
    data = exchange(b"HEAD /hello HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"content-length: 6" in head
    assert body == b""


@pytest.mark.parametrize(
    ("raw", "status", "extra"),
    [
        (b"GET /nothing HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", 404, None),
        (b"POST /hello HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", 405, "GET, HEAD"),
        (b"GET /boom HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", 500, None),
    ],
)
def test_unknown_paths_wrong_methods_and_failing_handlers(raw: bytes, status: int, extra: str | None) -> None:
    ((got, headers, _),) = responses(exchange(raw))
    assert got == status
    if extra is not None:
        assert headers["allow"] == extra


@pytest.mark.parametrize(
    ("raw", "status", "limits"),
    [
        (b"this is not http\r\n\r\n", 400, {}),
        (b"GET /hello HTTP/1.1\r\nHost: a\r\nX-Big: " + b"v" * 2000 + b"\r\n\r\n", 431, {"max_head": 1024}),
        (b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000, 413, {"max_body": 1024}),
    ],
)
def test_bad_input_is_answered_once_and_the_connection_closed(raw: bytes, status: int, limits: dict[str, int]) -> None:
    got = responses(exchange(raw + b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n", **limits))
    assert [s for s, _, _ in got] == [status]
    assert got[0][1]["connection"] == "close"


def test_requests_before_a_bad_one_are_still_answered() -> None:
    got = responses(exchange(b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\nGARBAGE\r\n\r\n"))
    assert [s for s, _, _ in got] == [200, 400]


def test_close_ends_keep_alive_connections() -> None:
    async def run() -> bytes:
        server = await http.serve(_routes(), "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n")
        await writer.drain()
        first = await reader.readuntil(b"hello\n")
        await asyncio.wait_for(server.close(), timeout=5)
        rest = await asyncio.wait_for(reader.read(), timeout=5)  # EOF: the server closed it
        writer.close()
        return first + rest

    assert asyncio.run(run()).endswith(b"hello\n")


def test_a_client_that_vanishes_mid_request_does_not_break_the_server() -> None:
    async def run() -> list[tuple[int, dict[str, str], bytes]]:
        server = await http.serve(_routes(), "127.0.0.1", 0)
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\npartial")
        s.close()
        await asyncio.sleep(0.05)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /hello HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), timeout=5)
        writer.close()
        await server.close()
        return responses(data)

    assert [s for s, _, _ in asyncio.run(run())] == [200]


def test_an_upgrade_is_ignored_and_the_connection_then_closed() -> None:
    raw = b"GET /hello HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x05frame"
    assert [(s, b) for s, _, b in responses(exchange(raw))] == [(200, b"hello\n")]


def test_a_streamed_body_is_sent_chunked_and_the_connection_kept() -> None:
    routes = _routes()

    async def big(_: http.Request) -> http.Response:
        async def pieces():  # type: ignore[no-untyped-def]
            for i in range(50):
                yield (f"line {i}\n" * 2000).encode()

        return http.Response(200, stream=pieces())

    routes.add("GET", "/big", big)

    async def run() -> bytes:
        server = await http.serve(routes, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\nGET /hello HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)  # the client reads late: the server waits for room, it does not buffer it all
        data = await asyncio.wait_for(reader.read(), timeout=10)
        writer.close()
        await server.close()
        return data

    data = asyncio.run(run())
    head, _, rest = data.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head and b"content-length" not in head
    body = b""
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        n = int(size_line, 16)
        if n == 0:
            rest = rest[2:]
            break
        body += rest[:n]
        rest = rest[n + 2 :]
    assert body == b"".join((f"line {i}\n" * 2000).encode() for i in range(50))
    assert responses(rest) == [(200, responses(rest)[0][1], b"hello\n")]  # keep-alive: the next request answered
