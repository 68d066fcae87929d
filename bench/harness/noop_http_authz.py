"""The `noop-http` baseline: an HTTP authorization server (ext_authz `http_service`) that allows
everything, and an access log service that reads and drops every entry.

The checks are served by extproc's own check listener (extproc/server/check_http.py: a raw
asyncio protocol with httptools on uvloop, every header parsed) with a handler that answers
200 at once; the access log streams Envoy opens, as it does in `authz-http`, go to a grpc.aio
AccessLogService on the same loop that reads each message and does nothing with it. So the
sidecar Envoy does all of `authz-http`'s work and the difference between `noop-http` and
`authz-http` is extproc's own (JWT, policies, trace context, metrics).

    python -m bench.harness.noop_http_authz --listen 127.0.0.1:9003 --als-listen 127.0.0.1:9001
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator

import grpc
import uvloop
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from extproc.attributes import HeaderLines
from extproc.server import check_http

_OK = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"


def allow(
    method: str, target: str, headers: dict[str, str], lines: HeaderLines, body: bytes, bad: str, size: int
) -> bytes:
    return _OK


class DropAccessLogs(als_pb2_grpc.AccessLogServiceServicer):
    async def StreamAccessLogs(
        self, request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage], context: grpc.aio.ServicerContext
    ) -> als_pb2.StreamAccessLogsResponse:
        async for _ in request_iterator:
            pass
        return als_pb2.StreamAccessLogsResponse()


async def serve(listen: str, als_listen: str | None) -> None:
    server = await check_http.serve(allow, listen)
    als = None
    if als_listen:
        als = grpc.aio.server()
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(DropAccessLogs(), als)
        if als.add_insecure_port(als_listen) == 0 and not als_listen.startswith("unix:"):
            raise SystemExit(f"noop_http_authz: cannot listen on {als_listen}")
        await als.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"noop HTTP ext_authz serving on {listen}, access logs dropped on {als_listen}", flush=True)
    await stop.wait()
    if als is not None:
        await als.stop(grace=1.0)
    await server.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="HTTP checks")
    p.add_argument("--als-listen", metavar="HOST:PORT", help="gRPC access log service that drops every entry")
    args = p.parse_args(argv)
    uvloop.run(serve(args.listen, args.als_listen))


if __name__ == "__main__":
    main()
