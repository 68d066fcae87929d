"""envoy.service.ext_proc.v3.ExternalProcessor: the `extproc` mode, everything from one filter.

One side stream per HTTP request:

* request headers: enforcement (inbound: CUSTOM, JWT, DENY/ALLOW through the same pipeline
  as ext_authz; a denial is an ImmediateResponse with the status, body and headers Istio's
  filters send), the metadata exchange (outbound: add ours; inbound: read the peer's and
  remove it), and the trace context for the upstream, all in one header mutation;
* response headers: the exchange on the way back (outbound: read and remove the server's
  pair; inbound: answer with ours if the peer sent its own), the response headers an OK
  decision asked for, then the request's metrics and span, unless it is a gRPC response
  whose trailers are still to come;
* response trailers (gRPC, with `response_trailer_mode: SEND`): metrics and span with the
  grpc-status.

A denied request is recorded and its span ended at the denial: Envoy does not show its own
local replies to the processor. The request is recorded once, from the last message the
stream is expected to carry, and the server then ends the stream itself. Envoy continues
without the processor after an OK close, and in `observability_mode` this frees the side
stream at once instead of after `deferred_close_timeout` (see DESIGN.md). In that mode
Envoy ignores every reply, so nothing is enforced or propagated; metrics and spans remain.

Values ext_proc cannot know at response headers are documented, not guessed silently:
duration is measured from the request-headers message to the response-headers (or trailers)
message, and sizes are the header bytes plus the declared `content-length` (or
`request.total_size` when the filter sends that attribute). Wire-exact sizes and
durations come from the access log service.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from extproc.attributes import NO_LINES, HeaderLines, split_host_port
from extproc.decision.cache import reads_physical_peer
from extproc.decision.decide import error, malformed
from extproc.services import processing_adapter as pa
from extproc.services import processor_render as render
from extproc.services.accesslog import grpc_status
from extproc.services.authz import LogOnce, direction_of
from extproc.services.check_adapter import CheckAdapter
from extproc.services.enforcer import Enforcer
from extproc.services.headers import MAX_HEADERS, MalformedRequest, decode_header_map
from extproc.snapshot.compiled import Snapshot
from extproc.telemetry import exchange as mx
from extproc.telemetry.directory import PeerDirectory
from extproc.telemetry.peer import PeerCache, Workload
from extproc.telemetry.record import Direction, HttpRecord, Peer, ServiceInfo, service_of_cluster
from extproc.telemetry.recorder import Recorder
from extproc.tracing.context import Outgoing
from extproc.tracing.tracer import SpanIds, Tracing
from extproc.verdict import Stage, Verdict

log = logging.getLogger("extproc.processor")

SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
EXT_PROC_ATTRIBUTES = pa.EXT_PROC_ATTRIBUTES


def header_map(h: base_pb2.HeaderMap) -> dict[str, str]:
    """Headers for telemetry and tracing, never for a decision: the first MAX_HEADERS entries,
    decoded leniently (the decision uses `headers.decode_header_map`, which refuses bad bytes)."""
    out: dict[str, str] = {}
    for hv in h.headers[:MAX_HEADERS]:
        value = hv.raw_value.decode("utf-8", "replace") if hv.raw_value else hv.value
        key = hv.key.lower()
        out[key] = f"{out[key]},{value}" if key in out else value
    return out


def _size(headers: Mapping[str, str]) -> int:
    """Header bytes as HTTP/1.1 would carry them (`name: value` and CRLF), plus the declared body length."""
    n = 0
    for k, v in headers.items():
        if k[:1] != ":":
            n += len(k) + len(v) + 4
    length = headers.get("content-length", "")
    return n + (int(length) if length.isdigit() else 0)


# The response headers telemetry and the exchange read; the others only count towards the size.
_RESPONSE_READ = frozenset({":status", "content-length", "grpc-status", mx.METADATA_HEADER, mx.METADATA_ID_HEADER})


def response_headers(h: base_pb2.HeaderMap) -> tuple[dict[str, str], int]:
    """The response headers extproc reads, and the size of them all (as `_size` counts it), in one pass."""
    out: dict[str, str] = {}
    n = 0
    for hv in h.headers[:MAX_HEADERS]:
        key = hv.key.lower()
        raw = hv.raw_value
        value = raw.decode("utf-8", "replace") if raw else hv.value
        if key[:1] != ":":
            n += len(key) + len(value) + 4
        if key in _RESPONSE_READ:
            prev = out.get(key)
            out[key] = value if prev is None else f"{prev},{value}"
    length = out.get("content-length", "")
    return out, n + (int(length) if length.isdigit() else 0)


def _number(attrs: ep.ProcessingRequest, name: str) -> float | None:
    s = attrs.attributes.get(EXT_PROC_ATTRIBUTES)
    if s is None:
        return None
    v = s.fields.get(name)
    if v is None or v.WhichOneof("kind") != "number_value":
        return None
    number: float = v.number_value
    return number


def _first_san(value: str) -> str:
    """The first URI SAN (istio_stats.cc reads uriSan...()[0]); CEL joins several with commas."""
    return value.split(",", 1)[0] if "," in value else value


def _listed(d: PeerDirectory, address: str, principal: str) -> Workload | None:
    """The listed workload at `ip:port` (Envoy's CEL address form), checked against the principal."""
    if not d.by_address:
        return None
    hp = split_host_port(address)
    return d.peer(hp[0], principal) if hp is not None else None


class _Stream:
    """What one HTTP request's side stream has told us so far."""

    __slots__ = ("grpc", "outgoing", "peer", "record", "request_headers", "started", "started_ns", "verdict")

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.started_ns = time.time_ns()
        self.request_headers: dict[str, str] = {}
        self.peer: Peer | None = None
        self.grpc = False
        self.record: HttpRecord | None = None
        self.outgoing: Outgoing | None = None
        self.verdict: Verdict | None = None


def _record(st: _Stream, peer: Peer, code: int, request_bytes: int, response_bytes: int) -> HttpRecord:
    """The request's record from what its request headers said, with the response's facts."""
    h = st.request_headers
    return HttpRecord(
        peer=peer,
        grpc=st.grpc,
        response_code=code,
        request_bytes=request_bytes,
        response_bytes=response_bytes,
        method=h.get(":method", ""),
        path=h.get(":path", ""),
        scheme=h.get(":scheme", ""),
        user_agent=h.get("user-agent", ""),
        request_id=h.get("x-request-id", ""),
        request_headers=h,
    )


def _stream_of(raw: bytes) -> ep.ProcessingRequest:
    return ep.ProcessingRequest.FromString(raw)


class ExternalProcessorService:
    def __init__(
        self,
        recorder: Recorder,
        peers: PeerCache,
        exchange: mx.PeerExchange | None,
        direction: Direction = Direction.INBOUND,
        enforcer: Enforcer | None = None,
        snapshot: Callable[[], Snapshot] | None = None,
        adapter: CheckAdapter | None = None,
        tracing: Tracing | None = None,
        clock: Callable[[], float] = time.time,
        directory: Callable[[], PeerDirectory | None] | None = None,
    ) -> None:
        self._clock = clock  # wall clock, for exp/nbf
        # The config's WorkloadEntry/ServiceEntry resources, for peers that exchange nothing.
        self.directory = directory
        self.recorder = recorder
        self.peers = peers
        self.exchange = exchange
        self.direction = direction
        self.enforcer = enforcer
        self._snapshot = snapshot
        self.adapter = adapter if adapter is not None else CheckAdapter()
        self.tracing = tracing
        self._parts = render.ExchangeParts(exchange) if exchange is not None else None
        self._attributes = pa.AttributeCache()
        self.streams = 0
        self.ended_early = 0  # streams the server ended after the last expected message
        self.bad_streams = 0
        self.denied = 0
        self._log_bad = LogOnce(log)

    def handlers(self) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
        """The Process method, yielding replies it encoded itself (see processor_render)."""
        return {"Process": grpc.stream_stream_rpc_method_handler(self.Process, request_deserializer=_stream_of)}

    async def Process(
        self, request_iterator: AsyncIterator[ep.ProcessingRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        self.streams += 1
        direction = direction_of(context, self.direction) if context is not None else self.direction
        st = _Stream()
        try:
            async for req in request_iterator:
                kind = req.WhichOneof("request")
                reply: bytes | None
                done = False
                if kind == "request_headers":
                    reply, done = await self._request_headers(st, req, direction)
                elif kind == "response_headers":
                    reply, done = self._response_headers(st, req, direction)
                elif kind == "response_trailers":
                    self._finish(st, trailers=header_map(req.response_trailers.trailers))
                    reply, done = _CONTINUE_TRAILERS, True
                elif kind == "request_trailers":
                    reply = _CONTINUE_REQUEST_TRAILERS
                elif kind == "request_body":
                    reply = _CONTINUE_REQUEST_BODY
                elif kind == "response_body":
                    reply = _CONTINUE_RESPONSE_BODY
                else:
                    reply = None
                if done:
                    self.ended_early += 1
                if reply is not None and not req.observability_mode:
                    yield reply
                if done:
                    return
        except Exception as e:
            self.bad_streams += 1
            self._log_bad("bad-ext-proc-stream", f"ext_proc stream failed: {type(e).__name__}: {e}")
            raise
        finally:
            # The stream ended before the last expected message (Envoy reset it, or a gRPC
            # response without trailer processing): count what we know.
            if st.record is not None or st.peer is not None:
                self._finish(st, trailers=None)

    async def _request_headers(
        self, st: _Stream, req: ep.ProcessingRequest, direction: Direction
    ) -> tuple[bytes, bool]:
        hm = req.request_headers.headers
        try:
            decided, lines = decode_header_map(hm, self.adapter.max_headers, self.adapter.max_header_bytes)
            problem = None
        except MalformedRequest as e:
            decided, lines, problem = None, NO_LINES, e
        headers = decided if decided is not None else header_map(hm)
        st.request_headers = headers
        st.grpc = headers.get("content-type", "").startswith("application/grpc")
        got = mx.received(headers) if direction is Direction.INBOUND else None
        value = got[0] if got else ""
        st.peer = peer = Peer(
            direction=direction,
            workload=self.peers.get(value) if value else None,
            peer_key=value,
            host=headers.get(":authority", ""),
        )
        attrs = self._attributes.get(req)
        if attrs and direction is Direction.INBOUND:
            peer.peer_principal = attrs.get(pa.PEER_URI_SAN, "")
            peer.local_principal = attrs.get(pa.LOCAL_URI_SAN, "")
            if peer.workload is None and self.directory is not None:
                d = self.directory()
                if d is not None:
                    peer.workload = _listed(d, attrs.get(pa.SOURCE_ADDRESS, ""), peer.peer_principal)
        # In observability mode Envoy applies no reply: nothing can be enforced or propagated.
        acting = not req.observability_mode
        tracing = self.tracing
        st.outgoing = out = tracing.begin(headers) if tracing is not None else None
        if not acting:
            return render.CONTINUE_REQUEST, False

        parts = self._parts
        if direction is Direction.OUTBOUND:
            reply = [render.CONTINUE_REQUEST]
            if parts is not None:
                reply.append(parts.outbound_request)
        elif self.enforcer is None:  # metrics and tracing only: nothing is enforced
            reply = [render.CONTINUE_REQUEST]
            if parts is not None and got is not None:
                reply.append(parts.inbound_request)
        else:
            verdict = await self._decide(req, decided, problem, attrs, lines)
            st.verdict = verdict
            if not verdict.allowed:
                return self._denied(st, verdict, got is not None), True
            reply = [render.encoded_request_reply(verdict)]
            if parts is not None and got is not None:
                reply.append(parts.inbound_request)
        if out is not None:
            reply.append(render.trace_part(out.headers, out.remove))
        if st.verdict is not None and (st.verdict.remove_query or st.verdict.set_query):
            reply.append(render.path_part(st.verdict, headers.get(":path", "")))
        return b"".join(reply), False

    async def _decide(
        self,
        req: ep.ProcessingRequest,
        headers: dict[str, str] | None,
        problem: MalformedRequest | None,
        attrs: dict[str, str],
        lines: HeaderLines = NO_LINES,
    ) -> Verdict:
        """Inbound enforcement, through the decision cache and the same Enforcer as ext_authz."""
        enforcer = self.enforcer
        assert enforcer is not None and self._snapshot is not None, "enforcement needs the snapshot"
        started = time.perf_counter()
        try:
            snap = self._snapshot()
            if headers is None:
                assert problem is not None
                raise problem
            if pa.SOURCE_ADDRESS not in attrs:
                self._log_bad(
                    "ext-proc-without-addresses",
                    "ext_proc sent no source.address/destination.address: add them to the filter's "
                    "request_attributes (see envoy/extproc.yaml); such requests are denied as malformed",
                )
            elif not attrs.get(pa.PEER_ADDRESS_ATTRIBUTE):
                self._without_peer_address(snap)
            raw_path = headers.get(":path", "")
            path = self.adapter.policy_path(raw_path)
            if path != raw_path:
                headers = {**headers, ":path": path}
            cache = enforcer.cache(snap)
            now = int(self._clock())
            key = pa.decision_key(cache.plan, headers, attrs, req, lines) if cache is not None else None
            if key is not None and cache is not None:
                verdict = enforcer.cached(cache, key, now)
                if verdict is not None:
                    return verdict
            a = pa.attributes(self.adapter, headers, attrs, req, lines)
            return await enforcer.decide(
                snap,
                a,
                now=now,
                cache=cache,
                key=key,
                custom_request=lambda: pa.check_request(a.http.headers if a.http else headers, attrs, req),
            )
        except MalformedRequest as e:
            stats = enforcer.stats
            stats.checks["http"] += 1
            stats.count(stats.malformed, e.kind)
            stats.count(stats.decisions, ("http", "denied", Stage.MALFORMED.value))
            self._log_bad(e.kind, f"denied a malformed ext_proc request: {e}")
            return malformed(e.kind, http=True)
        except Exception:  # a bug must deny, not crash the stream
            enforcer.stats.internal_errors += 1
            log.exception("internal error while deciding an ext_proc request; denying it")
            return error("internal error", http=True)
        finally:
            enforcer.stats.observe(started)

    def _without_peer_address(self, snap: Snapshot) -> None:
        """An inbound request without the physical peer's address (filter state set by
        set_filter_state, asked for in request_attributes). ext_proc's `source.address` is
        then all there is, and it is the client x-forwarded-for names whenever the HCM trusts
        the header: any client could choose its `ipBlocks` / `source.ip`. So when the policies
        read them the request is denied as malformed (fail closed); otherwise it is decided with
        `source.address` standing in (remote.ip never needed the peer: it is x-forwarded-for's,
        or the peer's when the header is absent, and then `source.address` is the peer).
        Either way it is counted, and the log says once what to add."""
        enforcer = self.enforcer
        assert enforcer is not None
        enforcer.stats.count(enforcer.stats.misconfigured, pa.MISSING_PEER_ADDRESS)
        self._log_bad(
            "ext-proc-without-peer-address",
            f"ext_proc sent no {pa.PEER_ADDRESS_ATTRIBUTE}, so the physical peer is unknown and "
            "source.address may be a client-chosen x-forwarded-for entry: add the set_filter_state filter "
            f"before ext_proc (object_key: {pa.PEER_ADDRESS_STATE}, factory_key: envoy.string, format "
            f"%DOWNSTREAM_DIRECT_REMOTE_ADDRESS%) and '{pa.PEER_ADDRESS_ATTRIBUTE}' to the filter's "
            "request_attributes (see envoy/extproc.yaml); until then requests are denied as malformed "
            "while a policy uses ipBlocks or source.ip, and decided with source.address otherwise",
        )
        if reads_physical_peer(snap):
            raise MalformedRequest(
                pa.MISSING_PEER_ADDRESS, f"no {pa.PEER_ADDRESS_ATTRIBUTE}, and a policy reads ipBlocks or source.ip"
            )

    def _denied(self, st: _Stream, verdict: Verdict, peer_sent_metadata: bool) -> bytes:
        """The local reply for a denial; the request is over, so its metrics and span are too."""
        self.denied += 1
        reply = render.encoded_request_reply(verdict)
        if self._parts is not None and peer_sent_metadata:
            # Our pair on the denial too, so the client labels its 403s with our workload.
            reply += self._parts.denied
        peer = st.peer
        assert peer is not None
        code = verdict.status or 403
        st.record = _record(st, peer, code, _size(st.request_headers), len(verdict.body.encode()))
        st.record.grpc_status = grpc_status(st.grpc, code, {}, {})
        self._finish(st, trailers=None)
        return reply

    def _response_headers(self, st: _Stream, req: ep.ProcessingRequest, direction: Direction) -> tuple[bytes, bool]:
        headers, size = response_headers(req.response_headers.headers)
        peer = st.peer or Peer(direction=direction)
        parts = self._parts
        reply = [render.response_part(st.verdict) if st.verdict is not None else render.CONTINUE_RESPONSE]
        if direction is Direction.OUTBOUND:
            got = mx.received(headers)
            if got is not None:
                peer.workload = self.peers.get(got[0])
                peer.peer_key = got[0]
                if parts is not None:
                    reply.append(parts.outbound_response)
            self._upstream(peer, self._attributes.get(req))
        elif parts is not None and peer.peer_key:
            reply.append(parts.inbound_response)
        status = headers.get(":status", "")
        total = _number(req, "request.total_size")
        st.record = _record(
            st,
            peer,
            int(status) if status.isdigit() else 0,
            int(total) if total is not None else _size(st.request_headers),
            size,
        )
        st.record.grpc_status = grpc_status(st.grpc, st.record.response_code, {}, headers)
        data = b"".join(reply)
        if st.grpc and not req.response_headers.end_of_stream and "grpc-status" not in headers:
            return data, False  # the status comes in the trailers
        self._finish(st, trailers=None)
        return data, True

    def _upstream(self, peer: Peer, attrs: Mapping[str, str]) -> None:
        """The client side's view of the upstream, from the filter's response attributes
        (envoy/extproc-outbound.yaml): its certificate's and ours' URI SANs, its cluster and
        the cluster's istio.services[0], and, when it exchanged nothing, a listed peer."""
        if not attrs:
            return
        peer.peer_principal = _first_san(attrs.get(pa.UPSTREAM_PEER_URI_SAN, ""))
        peer.local_principal = _first_san(attrs.get(pa.UPSTREAM_LOCAL_URI_SAN, ""))
        peer.upstream_cluster = attrs.get(pa.CLUSTER_NAME, "")
        host = attrs.get(pa.SERVICE_HOST, "")
        if host:
            peer.service = ServiceInfo(host, attrs.get(pa.SERVICE_NAME, ""), attrs.get(pa.SERVICE_NAMESPACE, ""))
        d = self.directory() if self.directory is not None else None
        if d is not None:
            if peer.workload is None:
                peer.workload = _listed(d, attrs.get(pa.UPSTREAM_ADDRESS, ""), peer.peer_principal)
            if peer.service is None and peer.upstream_cluster:
                named = service_of_cluster(peer.upstream_cluster)
                if named is not None:
                    peer.service = d.service(named.host)

    def _finish(self, st: _Stream, trailers: Mapping[str, str] | None) -> None:
        rec = st.record
        if rec is None:
            if st.peer is None:
                return
            rec = HttpRecord(peer=st.peer, grpc=st.grpc, request_id=st.request_headers.get("x-request-id", ""))
        if trailers is not None and st.grpc:
            rec.grpc_status = grpc_status(True, rec.response_code, trailers, {}) or rec.grpc_status
        elapsed_s = time.monotonic() - st.started
        rec.duration_ms = elapsed_s * 1000.0
        st.record = None
        st.peer = None
        self.recorder.http(rec, "ext_proc")
        out = st.outgoing
        if self.tracing is not None and self.tracing.wants_span(out):
            assert out is not None
            v = st.verdict
            decision = v.metadata if v is not None else None
            self.tracing.finish(SpanIds.of(out), rec, st.started_ns, st.started_ns + int(elapsed_s * 1e9), decision)


_CONTINUE_TRAILERS = ep.ProcessingResponse(response_trailers=ep.TrailersResponse()).SerializeToString()
_CONTINUE_REQUEST_TRAILERS = ep.ProcessingResponse(request_trailers=ep.TrailersResponse()).SerializeToString()
_CONTINUE_REQUEST_BODY = ep.ProcessingResponse(request_body=ep.BodyResponse()).SerializeToString()
_CONTINUE_RESPONSE_BODY = ep.ProcessingResponse(response_body=ep.BodyResponse()).SerializeToString()


CENTRAL_MODE_MESSAGE = (
    "extproc runs in central mode (--central), which serves ext_authz and the access log service only; "
    "point the ext_proc filter at a per-sidecar extproc"
)


class CentralModeProcessor(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]  # generated, untyped
    """ext_proc in central mode: every stream is refused with UNIMPLEMENTED.

    A central server knows a workload only from ext_authz context extensions and access log
    node metadata; ext_proc streams carry neither, so they cannot be enforced for the right
    workload. Refusing them says so at once, where a silent fallback would not.
    """

    def __init__(self) -> None:
        self.refused = 0

    async def Process(
        self, request_iterator: AsyncIterator[ep.ProcessingRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[ep.ProcessingResponse]:
        self.refused += 1
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, CENTRAL_MODE_MESSAGE)
        yield ep.ProcessingResponse()  # pragma: no cover - abort raises; this makes Process a generator
