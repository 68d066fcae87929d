"""The HTTP check listener (extproc/server/check_http.py) against raw bytes on a real socket:
keep-alive, order, HEAD, limits, and input meant to break it."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop

from extproc.server import check_http


def _echo(method: str, target: str, headers: dict[str, str], lines: Any, body: bytes, bad: str, size: int) -> bytes:
    text = f"{method} {target} bad={bad} size={size} lines={dict(lines)} body={body!r} x={headers.get('x')}"
    payload = b"" if method == "HEAD" else text.encode()
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(text.encode()), payload)


def run(handler: Callable[..., Any], script: Callable[[int], Awaitable[Any]], **kw: Any) -> Any:
    async def main() -> Any:
        server = await check_http.serve(handler, "127.0.0.1:0", **kw)
        try:
            return await script(server.port)
        finally:
            await server.close()

    return uvloop.run(main())


async def exchange(port: int, data: bytes, *, until_close: bool = True, timeout: float = 2.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    out = b""
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), timeout)
            if not chunk:
                break
            out += chunk
            if not until_close and out.count(b"HTTP/1.1") >= 1 and out.endswith(b"\r\n\r\n") is False:
                pass
    except TimeoutError:
        if until_close:
            out += b"<open>"
    writer.close()
    return out


def responses(raw: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each response in a stream of HTTP/1.1 responses."""
    out = []
    rest = raw.replace(b"<open>", b"")
    while rest.startswith(b"HTTP/1.1 "):
        head, _, rest = rest.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body, rest = rest[:length], rest[length:]
        out.append((status, body))
    return out


def test_keep_alive_answers_every_request_in_order_on_one_connection() -> None:
    reqs = b"".join(b"GET /r%d HTTP/1.1\r\nhost: h\r\nx: %d\r\n\r\n" % (i, i) for i in range(20))
    raw = run(_echo, lambda port: exchange(port, reqs, timeout=0.5))
    got = responses(raw)
    assert [s for s, _ in got] == [200] * 20
    assert [b.split(b" ")[1] for _, b in got] == [b"/r%d" % i for i in range(20)]
    assert raw.endswith(b"<open>")  # still open: keep-alive


def test_answers_stay_in_order_when_an_earlier_check_waits() -> None:
    def handler(method: str, target: str, *rest: Any) -> Any:
        if target == "/slow":

            async def later() -> bytes:
                await asyncio.sleep(0.2)
                return _echo(method, target, *rest)

            return later()
        return _echo(method, target, *rest)

    reqs = b"GET /slow HTTP/1.1\r\nhost: h\r\n\r\nGET /fast HTTP/1.1\r\nhost: h\r\n\r\n"
    got = responses(run(handler, lambda port: exchange(port, reqs, timeout=0.6)))
    assert [b.split(b" ")[1] for _, b in got] == [b"/slow", b"/fast"]


def test_every_method_is_answered_and_head_gets_no_body() -> None:
    methods = [b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"HEAD", b"GET"]
    reqs = b"".join(m + b" /m HTTP/1.1\r\nhost: h\r\ncontent-length: 0\r\n\r\n" for m in methods)
    raw = run(_echo, lambda port: exchange(port, reqs, timeout=0.5))
    # HEAD's response declares a length but carries no body: the one after it must still parse.
    assert raw.count(b"HTTP/1.1 200 OK") == len(methods)
    assert raw.removesuffix(b"<open>").endswith(b"x=None")
    assert b"HEAD /m" not in raw


def test_body_and_repeated_headers_and_bad_encoding_reach_the_handler() -> None:
    req = b"POST /b HTTP/1.1\r\nhost: h\r\nx: 1\r\nx: 2\r\nv: caf\xe9\r\ncontent-length: 5\r\n\r\nhello"
    raw = run(_echo, lambda port: exchange(port, req, timeout=0.5))
    body = responses(raw)[0][1].decode()
    assert "body=b'hello'" in body and "x=1,2" in body
    assert "lines={'x': ('1', '2')}" in body
    assert "bad=v" in body


def test_a_request_target_that_is_not_ascii_is_refused() -> None:
    # The parser refuses it (Envoy would deny the request with that status); it never reaches a handler.
    raw = run(_echo, lambda port: exchange(port, b"GET /caf\xe9 HTTP/1.1\r\nhost: h\r\n\r\n", timeout=0.5))
    assert raw.startswith(b"HTTP/1.1 400 ")


@pytest.mark.parametrize(
    "garbage",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET / HTTP/1.1\r\nbad header line\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: h\r\ncontent-length: -5\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        b"\x00\x01\x02\x03\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: h\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
    ],
)
def test_malformed_input_is_answered_400_and_the_connection_closed(garbage: bytes) -> None:
    raw = run(_echo, lambda port: exchange(port, garbage))
    assert raw.startswith(b"HTTP/1.1 400 Bad Request") and raw.endswith(b"bad request\n")  # closed, not "<open>"


def test_requests_before_bad_input_are_answered_first() -> None:
    reqs = b"GET /ok HTTP/1.1\r\nhost: h\r\n\r\nBROKEN\r\n\r\n"
    got = responses(run(_echo, lambda port: exchange(port, reqs)))
    assert [s for s, _ in got] == [200, 400]


def test_a_head_over_the_limit_is_refused_431_and_closed() -> None:
    big = b"GET / HTTP/1.1\r\nhost: h\r\nx: " + b"a" * 5000 + b"\r\n\r\n"
    raw = run(_echo, lambda port: exchange(port, big), max_head=4096)
    assert raw.startswith(b"HTTP/1.1 431 ") and not raw.endswith(b"<open>")
    long_target = b"GET /" + b"p" * 5000 + b" HTTP/1.1\r\nhost: h\r\n\r\n"
    assert run(_echo, lambda port: exchange(port, long_target), max_head=4096).startswith(b"HTTP/1.1 431 ")


def test_a_body_over_the_limit_is_refused_413_and_closed() -> None:
    req = b"POST / HTTP/1.1\r\nhost: h\r\ncontent-length: 2000\r\n\r\n" + b"b" * 2000
    raw = run(_echo, lambda port: exchange(port, req), max_body=1000)
    assert raw.startswith(b"HTTP/1.1 413 ") and not raw.endswith(b"<open>")


def test_an_upgrade_request_is_answered_and_the_connection_stays_http() -> None:
    reqs = (
        b"GET /ws HTTP/1.1\r\nhost: h\r\nupgrade: websocket\r\nconnection: upgrade\r\ncontent-length: 0\r\n\r\n"
        b"GET /after HTTP/1.1\r\nhost: h\r\n\r\n"
    )
    got = responses(run(_echo, lambda port: exchange(port, reqs, timeout=0.5)))
    assert [b.split(b" ")[1] for _, b in got] == [b"/ws", b"/after"]


def test_connection_close_is_honoured() -> None:
    raw = run(_echo, lambda port: exchange(port, b"GET /c HTTP/1.1\r\nhost: h\r\nconnection: close\r\n\r\n"))
    assert raw.startswith(b"HTTP/1.1 200") and not raw.endswith(b"<open>")


def test_a_handler_that_raises_gets_500_and_the_server_keeps_serving() -> None:
    def handler(method: str, target: str, *rest: Any) -> Any:
        if target == "/boom":
            raise RuntimeError("bug")
        if target == "/late-boom":

            async def later() -> bytes:
                raise RuntimeError("bug")

            return later()
        return _echo(method, target, *rest)

    reqs = b"".join(b"GET %s HTTP/1.1\r\nhost: h\r\n\r\n" % t for t in (b"/boom", b"/late-boom", b"/fine"))
    got = responses(run(handler, lambda port: exchange(port, reqs, timeout=0.5)))
    assert [s for s, _ in got] == [500, 500, 200]


def test_a_client_that_disconnects_while_its_check_waits_does_not_break_the_server() -> None:
    def handler(method: str, target: str, *rest: Any) -> Any:
        async def later() -> bytes:
            await asyncio.sleep(0.1)
            return _echo(method, target, *rest)

        return later()

    async def script(port: int) -> bytes:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /gone HTTP/1.1\r\nhost: h\r\n\r\n")
        await writer.drain()
        writer.close()
        await asyncio.sleep(0.2)
        return await exchange(port, b"GET /next HTTP/1.1\r\nhost: h\r\nconnection: close\r\n\r\n")

    assert b"/next" in run(handler, script)


def test_a_unix_socket_listener(tmp_path: Any) -> None:
    path = str(tmp_path / "checks.sock")

    async def main() -> bytes:
        server = await check_http.serve(_echo, f"unix:{path}")
        try:
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(b"GET /u HTTP/1.1\r\nhost: h\r\nconnection: close\r\n\r\n")
            data = await reader.read()
            writer.close()
            return data
        finally:
            await server.close()

    assert b"GET /u" in uvloop.run(main())
    with pytest.raises(FileNotFoundError):
        socket.socket(socket.AF_UNIX).connect(path)


def test_a_declared_body_over_the_limit_is_refused_before_it_is_read() -> None:
    req = b"POST / HTTP/1.1\r\nhost: h\r\ncontent-length: 999999999\r\n\r\n" + b"b" * 10
    raw = run(_echo, lambda port: exchange(port, req), max_body=1000)
    assert raw.startswith(b"HTTP/1.1 413 ")


def test_a_refused_client_still_sending_gets_the_answer_not_a_reset() -> None:
    async def script(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\n" + b"x-a: b\r\n" * 2000)  # over the limit, and more to come
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b"x-b: c\r\n" * 2000 + b"\r\n")  # still sending after the refusal
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return data

    assert run(_echo, script, max_head=4096).startswith(b"HTTP/1.1 431 ")
