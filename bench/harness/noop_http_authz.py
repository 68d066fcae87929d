"""The `noop-http` baseline: an HTTP authorization server (ext_authz `http_service`) that allows
everything and does nothing else.

It is extproc's own check listener (extproc/server/check_http.py: a raw asyncio protocol with
httptools on uvloop, every header parsed) with a handler that answers 200 at once, so the
difference between `noop-http` and `authz-http` is extproc's own work, and `noop-http` against
`none` is the floor cost of this transport on the request path.

    python -m bench.harness.noop_http_authz --listen 127.0.0.1:9003
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import uvloop

from extproc.attributes import HeaderLines
from extproc.server import check_http

_OK = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"


def allow(
    method: str, target: str, headers: dict[str, str], lines: HeaderLines, body: bytes, bad: str, size: int
) -> bytes:
    return _OK


async def serve(listen: str) -> None:
    server = await check_http.serve(allow, listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"noop HTTP ext_authz serving on {listen}", flush=True)
    await stop.wait()
    await server.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--listen", required=True, metavar="HOST:PORT")
    args = p.parse_args(argv)
    uvloop.run(serve(args.listen))


if __name__ == "__main__":
    main()
