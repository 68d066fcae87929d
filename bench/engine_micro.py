"""Micro-benchmark of extproc's per-request work in-process (no Envoy, no gRPC hop):

  * compile:  load and compile the benchmark scenario's policies into a snapshot;
  * pipeline: one whole ext_authz Check as the server handles it (the request already parsed
              by gRPC): direction, decision key, decision cache, the JWT and policy stages on
              a miss, the peer metadata exchange, the trace context, the encoded response;
              the same over HTTP (authz-http: the check already parsed by the listener, the
              answer rendered as the HTTP response);
              an ext_proc stream (request headers, response headers, the request's metrics);
              an access log entry (the authz+als mode's metrics);
  * stages:   the engines on their own (adapter, 20 policies, JWT with its token cache);
  * pieces:   the trace headers encoded by protobuf and by the byte templates of
              extproc/services/wire.py.

The requests are shaped like what Envoy 1.40 sends for the benchmark's load (bench/harness):
20 AuthorizationPolicies and one RequestAuthentication (RS256), a bearer token, the client
sidecar's peer metadata, and a W3C trace context from the client (a mesh request) or none.
End-to-end costs against the baselines belong to `python -m bench`.

    .venv/bin/python -m bench.engine_micro [--policies 20] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2

from bench.harness import scenario as sc
from extproc.attributes import NO_LINES
from extproc.authn.cache import TokenCache
from extproc.authn.jwks_source import JwksRegistry
from extproc.authn.verifier import authenticate
from extproc.authz import engine
from extproc.services import authz_render
from extproc.services.accesslog import AccessLogService
from extproc.services.authz import AuthorizationService
from extproc.services.check_adapter import CheckAdapter
from extproc.services.enforcer import Enforcer
from extproc.services.http_authz import HttpAuthorizationService
from extproc.services.processor import ExternalProcessorService
from extproc.snapshot import loader
from extproc.snapshot.compiled import Options, Snapshot, WorkloadIdentity, build_snapshot
from extproc.telemetry.exchange import PeerExchange
from extproc.telemetry.peer import Workload, encode
from extproc.telemetry.record import Direction
from extproc.telemetry.recorder import Telemetry
from extproc.tracing.context import Format
from extproc.tracing.tracer import Tracing, TracingSettings

CLIENT = Workload.from_labels(
    {"app": "reviews", "version": "v2"}, workload_name="reviews-v2", namespace=sc.NAMESPACE, cluster="Kubernetes"
)
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class _Metadatum:
    def __init__(self, key: str, value: str) -> None:
        self.key, self.value = key, value


class _Context:
    """What a grpc.aio ServicerContext gives the servicer: the call's initial metadata."""

    md = (
        _Metadatum("x-forwarded-for", "192.0.2.2"),
        _Metadatum("x-extproc-direction", "inbound"),
        _Metadatum("x-envoy-internal", "true"),
        _Metadatum("x-envoy-expected-rq-timeout-ms", "1000"),
    )

    def invocation_metadata(self) -> tuple[_Metadatum, ...]:
        return self.md


def headers(token: str, path: str, traced: bool) -> dict[str, str]:
    out = {
        ":authority": "productpage.bench:9080",
        ":method": "GET",
        ":path": path,
        ":scheme": "http",
        "accept-encoding": "identity",
        "authorization": f"Bearer {token}",
        "x-forwarded-proto": "http",
        "x-request-id": "06872a09-d955-48ef-be91-dd60567670c8",
        "x-envoy-peer-metadata": encode(CLIENT),
        "x-envoy-peer-metadata-id": "sidecar~10.1.2.3~reviews-v2.bench~bench.svc.cluster.local",
    }
    if traced:
        out["traceparent"] = TRACEPARENT
    return out


def http_check_headers(token: str, traced: bool) -> dict[str, str]:
    """The headers of the HTTP check Envoy sends for the same request (envoy/authz-http.yaml)."""
    out = {k: v for k, v in headers(token, "", traced).items() if not k.startswith(":")}
    out.update(
        {
            "host": "productpage.bench:9080",
            "content-length": "0",
            "x-extproc-connection": "10.1.2.3:33956 10.1.2.4:9080    ",
            "x-extproc-direction": "inbound",
            "x-extproc-md-envoy.filters.http.jwt_authn": "=",
            "x-envoy-internal": "true",
            "x-envoy-expected-rq-timeout-ms": "1000",
        }
    )
    return out


def check_request(token: str, path: str, traced: bool) -> external_auth_pb2.CheckRequest:
    req = external_auth_pb2.CheckRequest()
    a = req.attributes
    a.source.address.socket_address.address = "10.1.2.3"
    a.source.address.socket_address.port_value = 33956
    a.destination.address.socket_address.address = "10.1.2.4"
    a.destination.address.socket_address.port_value = 9080
    a.request.time.GetCurrentTime()
    h = a.request.http
    h.id, h.method, h.path, h.host = "11420567191500262301", "GET", path, "productpage.bench:9080"
    h.scheme, h.protocol = "http", "HTTP/1.1"
    h.headers.update(headers(token, path, traced))
    a.metadata_context.SetInParent()
    a.tls_session.SetInParent()
    return req


def processing_messages(token: str, path: str, traced: bool) -> tuple[ep.ProcessingRequest, ep.ProcessingRequest]:
    first = ep.ProcessingRequest()
    for k, v in headers(token, path, traced).items():
        first.request_headers.headers.headers.append(base_pb2.HeaderValue(key=k, raw_value=v.encode()))
    first.request_headers.end_of_stream = True
    attrs = struct_pb2.Struct()
    attrs.update(
        {
            "source.address": "10.1.2.3:33956",
            'filter_state["extproc.peer_address"]': "10.1.2.3:33956",
            "destination.address": "10.1.2.4:9080",
            "request.protocol": "HTTP/1.1",
            "connection.requested_server_name": "",
        }
    )
    first.attributes["envoy.filters.http.ext_proc"].CopyFrom(attrs)
    second = ep.ProcessingRequest()
    for k, v in {":status": "200", "content-length": "1024", "content-type": "text/plain", "server": "envoy"}.items():
        second.response_headers.headers.headers.append(base_pb2.HeaderValue(key=k, raw_value=v.encode()))
    return first, second


def access_log_entry(path: str) -> accesslog_pb2.HTTPAccessLogEntry:
    e = accesslog_pb2.HTTPAccessLogEntry()
    c = e.common_properties
    c.downstream_remote_address.socket_address.address = "10.1.2.3"
    c.downstream_remote_address.socket_address.port_value = 33956
    c.downstream_local_address.socket_address.address = "10.1.2.4"
    c.downstream_local_address.socket_address.port_value = 9080
    c.start_time.GetCurrentTime()
    c.duration.FromNanoseconds(6_851_448)
    c.upstream_cluster = "app"
    c.access_log_type = accesslog_pb2.DownstreamEnd
    c.downstream_wire_bytes_sent, c.downstream_wire_bytes_received = 1177, 773
    c.metadata.filter_metadata["envoy.filters.http.ext_authz"].update(
        {"x-envoy-peer-metadata": encode(CLIENT), "x-envoy-peer-metadata-id": "sidecar~10.1.2.3~reviews-v2.bench"}
    )
    e.protocol_version = accesslog_pb2.HTTPAccessLogEntry.HTTP11
    r = e.request
    r.request_method, r.scheme, r.authority, r.path = base_pb2.GET, "http", "productpage.bench:9080", path
    r.request_id = "06872a09-d955-48ef-be91-dd60567670c8"
    e.response.response_code.value = 200
    return e


def per_call_us(fn: Callable[[], Any], number: int, repeat: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def per_call_async_us(loop: asyncio.AbstractEventLoop, make: Callable[[], Any], number: int, repeat: int) -> float:
    async def many() -> None:
        for _ in range(number):
            await make()

    return min(timeit.repeat(lambda: loop.run_until_complete(many()), number=1, repeat=repeat)) / number * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", type=int, default=20)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    scenario = sc.build(args.policies)
    token = scenario.token
    workload = WorkloadIdentity(sc.NAMESPACE, dict(sc.LABELS), root_namespace=sc.ROOT_NAMESPACE)
    with tempfile.TemporaryDirectory() as d:
        scenario.write(Path(d))

        def compile_once() -> Snapshot:
            return build_snapshot(loader.load([d]), workload, Options(), 1)

        compile_ms = per_call_us(compile_once, 3, args.repeat) / 1000
        snap = compile_once()
    local = Workload.from_labels(sc.LABELS, workload_name=sc.WORKLOAD, namespace=sc.NAMESPACE)
    exchange = PeerExchange(local, f"sidecar~10.1.2.4~{sc.WORKLOAD}.{sc.NAMESPACE}")
    tracing = Tracing(TracingSettings((Format.W3C, Format.B3), 1.0, None), local)
    loop = asyncio.new_event_loop()
    ctx = _Context()
    path = sc.PRODUCT_PATHS[1]
    rows: list[tuple[str, float]] = []
    n = 5000

    def authz(cache_size: int) -> AuthorizationService:
        return AuthorizationService(
            lambda: snap, CheckAdapter(), Enforcer(cache_size=cache_size), exchange=exchange, tracing=tracing
        )

    hit, miss = authz(4096), authz(0)
    for traced in (True, False):
        req = check_request(token, path, traced)
        size = req.ByteSize()
        resp = external_auth_pb2.CheckResponse.FromString(loop.run_until_complete(hit._rpc((req, size), ctx)))
        assert resp.status.code == 0 and resp.ok_response.headers, "the load request must be allowed"
        label = "mesh request (trace context in)" if traced else "no trace context in"
        rows.append(
            (
                f"ext_authz Check, decision cached, {label}",
                per_call_async_us(loop, lambda req=req, size=size: hit._rpc((req, size), ctx), n, args.repeat),
            )
        )
    req = check_request(token, path, True)
    rows.append(
        (
            "ext_authz Check, not cached (adapter, JWT, policies)",
            per_call_async_us(loop, lambda: miss._rpc((req, req.ByteSize()), ctx), 2000, args.repeat),
        )
    )

    telemetry = Telemetry.create(local)
    proc = ExternalProcessorService(
        telemetry.recorder,
        telemetry.peers,
        exchange,
        enforcer=Enforcer(),
        snapshot=lambda: snap,
        adapter=CheckAdapter(),
        tracing=tracing,
    )
    first, second = processing_messages(token, path, True)

    class Messages:
        """The two messages Envoy sends on the stream (an iterator, as grpc.aio hands one over)."""

        def __init__(self) -> None:
            self.left = [second, first]

        def __aiter__(self) -> Messages:
            return self

        async def __anext__(self) -> ep.ProcessingRequest:
            if not self.left:
                raise StopAsyncIteration
            return self.left.pop()

    async def stream() -> None:
        async for _ in proc.Process(Messages(), ctx):  # type: ignore[arg-type]
            pass

    stream_us = per_call_async_us(loop, stream, n, args.repeat)
    rows.append(("ext_proc stream (request + response headers, metrics)", stream_us))

    als = AccessLogService(telemetry.recorder, telemetry.tcp, telemetry.peers, Direction.INBOUND)
    entry = access_log_entry(path)
    entry_us = per_call_us(lambda: als.http_entry(entry, Direction.INBOUND), 20000, args.repeat)
    rows.append(("access log entry (authz+als metrics)", entry_us))
    rows.append(("authz+als per request: cached mesh Check + its log entry", rows[0][1] + entry_us))

    checks = HttpAuthorizationService(lambda: snap, CheckAdapter(), Enforcer(), exchange=exchange, tracing=tracing)
    for traced in (True, False):
        check = http_check_headers(token, traced)
        first = checks("GET", path, dict(check), NO_LINES, b"", "", 900)  # decided, then cached
        if not isinstance(first, bytes):
            loop.run_until_complete(first)  # type: ignore[arg-type]
        answer = checks("GET", path, dict(check), NO_LINES, b"", "", 900)
        assert isinstance(answer, bytes), "the check must be decided from the cache"
        assert answer.startswith(b"HTTP/1.1 200 "), "the load request must be allowed"
        label = "mesh request (trace context in)" if traced else "no trace context in"
        rows.append(
            (
                f"HTTP check (authz-http), decision cached, {label}",
                per_call_us(lambda check=check: checks("GET", path, check, NO_LINES, b"", "", 900), n, args.repeat),
            )
        )
    rows.append(("authz-http per request: cached mesh check + its log entry", rows[-2][1] + entry_us))

    adapter = CheckAdapter()
    attrs = adapter.attributes(req)
    jwks, cache = JwksRegistry(), TokenCache()
    now = int(time.time())
    authenticate(snap.authn, "GET", attrs.http.headers, now, jwks.keys_for, cache)  # type: ignore[union-attr]
    stages = [
        ("adapt CheckRequest -> Attributes", lambda: adapter.attributes(req)),
        (
            "JWT, token cache hit",
            lambda: authenticate(snap.authn, "GET", attrs.http.headers, now, jwks.keys_for, cache),  # type: ignore[union-attr]
        ),
        ("policies: ALLOW after DENYs (the load's decision)", lambda: engine.evaluate(snap.http, attrs)),
    ]
    for label, fn in stages:
        rows.append((label, per_call_us(fn, 5000, args.repeat)))

    out = tracing.begin({})
    assert out is not None

    def protobuf_trace() -> bytes:
        resp = external_auth_pb2.CheckResponse()
        add = resp.ok_response.headers.add
        for name, value in out.headers:
            o = add()
            o.header.key, o.header.value, o.append_action = name, value, 2
        return resp.SerializeToString()

    assert external_auth_pb2.CheckResponse.FromString(protobuf_trace()) == external_auth_pb2.CheckResponse.FromString(
        authz_render.trace_part(out.headers, out.remove, True, None)
    )
    rows.append(("trace headers, protobuf", per_call_us(protobuf_trace, 50000, args.repeat)))
    rows.append(
        (
            "trace headers, byte templates (wire.py)",
            per_call_us(lambda: authz_render.trace_part(out.headers, out.remove, True, None), 50000, args.repeat),
        )
    )
    fresh = {"x-request-id": "06872a09-d955-48ef-be91-dd60567670c8"}
    incoming = {**fresh, "traceparent": TRACEPARENT}
    rows.append(("trace context: start a trace", per_call_us(lambda: tracing.begin(fresh), 50000, args.repeat)))
    rows.append(("trace context: continue one", per_call_us(lambda: tracing.begin(incoming), 50000, args.repeat)))

    rules = len(snap.http.allow.enforced) + len(snap.http.deny.enforced)
    print(
        f"python {platform.python_version()} on {platform.machine()}, {args.policies} policies ({rules} HTTP rules), "
        "1 RequestAuthentication (RS256); best of "
        f"{args.repeat} runs"
    )
    print(f"  {'compile (load + validate + compile)':58} {compile_ms:9.2f} ms")
    for label, us in rows:
        print(f"  {label:58} {us:9.2f} µs")
    loop.close()


if __name__ == "__main__":
    main()
