"""The `noop` baseline: an ext_authz server that allows everything and does nothing else.

Same runtime as extproc (grpc.aio on uvloop, one process), so the difference between
`noop` and `authz+als` is extproc's own work, and `noop` against `none` is the floor
cost of a Python gRPC hop on the request path.

    python -m bench.harness.noop_authz --listen 127.0.0.1:9001
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc
import uvloop
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

_OK = external_auth_pb2.CheckResponse()
_OK.status.code = 0
_OK.ok_response.SetInParent()


class NoopAuthorization(external_auth_pb2_grpc.AuthorizationServicer):
    async def Check(self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext):
        return _OK


async def serve(listen: str) -> None:
    server = grpc.aio.server()
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(NoopAuthorization(), server)
    if server.add_insecure_port(listen) == 0 and not listen.startswith("unix:"):
        raise SystemExit(f"noop_authz: cannot listen on {listen}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"noop ext_authz serving on {listen}", flush=True)
    await stop.wait()
    await server.stop(grace=1.0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True, metavar="HOST:PORT")
    args = p.parse_args(argv)
    uvloop.run(serve(args.listen))


if __name__ == "__main__":
    main()
