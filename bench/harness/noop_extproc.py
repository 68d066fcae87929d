"""The `noop-extproc` baseline: an ext_proc server that changes nothing and ends each stream early.

Same runtime as extproc (grpc.aio on uvloop, one process), so the difference between
`noop-extproc` and `extproc` is extproc's own work, and `noop-extproc` against `none` is the
floor cost of a Python ext_proc hop on the request path: one side stream per request, a
message and an empty reply each way per processed phase.

It answers every message with the empty reply of its kind, and ends the stream itself as
soon as the last message Envoy will send has arrived, exactly when extproc does
(extproc/services/processor.py): after the response headers, or, for a gRPC response whose
grpc-status is still to come, after the response trailers. Without that Envoy keeps every
side stream open until ``deferred_close_timeout`` and the extproc cluster's circuit breaker
overflows under load (DESIGN.md), so a baseline that skipped it would not measure the same hop.

    python -m bench.harness.noop_extproc --listen 127.0.0.1:9001
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator

import grpc
import uvloop
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

# One empty reply per message kind; protobuf messages are only read when sent, so sharing is safe.
_REPLIES = {
    "request_headers": ep.ProcessingResponse(request_headers=ep.HeadersResponse()),
    "response_headers": ep.ProcessingResponse(response_headers=ep.HeadersResponse()),
    "request_body": ep.ProcessingResponse(request_body=ep.BodyResponse()),
    "response_body": ep.ProcessingResponse(response_body=ep.BodyResponse()),
    "request_trailers": ep.ProcessingResponse(request_trailers=ep.TrailersResponse()),
    "response_trailers": ep.ProcessingResponse(response_trailers=ep.TrailersResponse()),
}


def _has_header(headers: base_pb2.HeaderMap, name: str, prefix: bytes = b"") -> bool:
    """Whether a header (lower-case name) is present, and its value starts with `prefix`.

    Envoy puts values in `raw_value`; `value` is read too, as extproc's header_map does.
    """
    for h in headers.headers:
        if h.key.lower() == name:
            value = h.raw_value or h.value.encode()
            if value.startswith(prefix):
                return True
    return False


def is_last(kind: str, req: ep.ProcessingRequest, grpc_request: bool) -> bool:
    """Whether Envoy sends nothing after this message, by extproc's rule.

    The response headers end the stream unless the request was gRPC, the response goes on
    and carries no grpc-status yet (it comes in the trailers); the response trailers always do.
    """
    if kind == "response_trailers":
        return True
    if kind != "response_headers":
        return False
    rh = req.response_headers
    return not (grpc_request and not rh.end_of_stream and not _has_header(rh.headers, "grpc-status"))


class NoopProcessor(ep_grpc.ExternalProcessorServicer):
    async def Process(
        self, request_iterator: AsyncIterator[ep.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ep.ProcessingResponse]:
        grpc_request = False
        async for req in request_iterator:
            kind = req.WhichOneof("request")
            if kind == "request_headers":
                grpc_request = _has_header(req.request_headers.headers, "content-type", b"application/grpc")
            reply = _REPLIES.get(kind or "")
            # In observability mode Envoy ignores replies; extproc sends none, and neither does this.
            if reply is not None and not req.observability_mode:
                yield reply
            if is_last(kind or "", req, grpc_request):
                return


async def serve(listen: str) -> None:
    server = grpc.aio.server()
    ep_grpc.add_ExternalProcessorServicer_to_server(NoopProcessor(), server)
    if server.add_insecure_port(listen) == 0 and not listen.startswith("unix:"):
        raise SystemExit(f"noop_extproc: cannot listen on {listen}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"noop ext_proc serving on {listen}", flush=True)
    await stop.wait()
    await server.stop(grace=1.0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--listen", required=True, metavar="HOST:PORT")
    args = p.parse_args(argv)
    uvloop.run(serve(args.listen))


if __name__ == "__main__":
    main()
