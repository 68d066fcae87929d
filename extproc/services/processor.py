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
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.protobuf import struct_pb2
from google.rpc import code_pb2

from extproc.services import processing_adapter as pa
from extproc.services.accesslog import grpc_status
from extproc.services.authz import AuthorizationService, LogOnce, direction_of
from extproc.services.protoconv import struct_to_dict
from extproc.telemetry import exchange as mx
from extproc.telemetry.peer import PeerCache
from extproc.telemetry.record import Direction, HttpRecord, Peer
from extproc.telemetry.recorder import Recorder
from extproc.tracing.context import Outgoing
from extproc.tracing.tracer import SpanIds, Tracing

log = logging.getLogger("extproc.processor")

EXT_PROC_ATTRIBUTES = pa.EXT_PROC_ATTRIBUTES
MAX_HEADERS = 512


def header_map(h: base_pb2.HeaderMap, limit: int | None = MAX_HEADERS) -> dict[str, str]:
    """Lower-case names; Envoy sends values in raw_value; repeated names joined with ","."""
    out: dict[str, str] = {}
    for hv in h.headers[:limit]:
        value = hv.raw_value.decode("utf-8", "replace") if hv.raw_value else hv.value
        key = hv.key.lower()
        out[key] = f"{out[key]},{value}" if key in out else value
    return out


def _size(headers: Mapping[str, str]) -> int:
    """Header bytes as HTTP/1.1 would carry them, plus the declared body length."""
    n = sum(len(k) + len(v) + 4 for k, v in headers.items() if not k.startswith(":"))
    length = headers.get("content-length", "")
    return n + (int(length) if length.isdigit() else 0)


def _number(attrs: ep.ProcessingRequest, name: str) -> float | None:
    s = attrs.attributes.get(EXT_PROC_ATTRIBUTES)
    if s is None:
        return None
    v = s.fields.get(name)
    if v is None or v.WhichOneof("kind") != "number_value":
        return None
    return v.number_value


def _mutation(set_headers: tuple[tuple[str, str], ...] = (), remove: tuple[str, ...] = ()) -> ep.HeadersResponse:
    resp = ep.HeadersResponse()
    mut = resp.response.header_mutation
    mut.set_headers.extend(pa.set_header(name, value) for name, value in set_headers)
    mut.remove_headers.extend(remove)
    return resp


class _Stream:
    """What one HTTP request's side stream has told us so far."""

    __slots__ = (
        "decision",
        "grpc",
        "outgoing",
        "peer",
        "record",
        "request_headers",
        "response_headers_to_add",
        "started",
        "started_ns",
    )

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.started_ns = time.time_ns()
        self.request_headers: dict[str, str] = {}
        self.peer: Peer | None = None
        self.grpc = False
        self.record: HttpRecord | None = None
        self.outgoing: Outgoing | None = None
        self.decision: dict[str, Any] | None = None
        self.response_headers_to_add: tuple[base_pb2.HeaderValueOption, ...] = ()


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


def _details(decision: Mapping[str, Any], status: str) -> str:
    """%RESPONSE_CODE_DETAILS% of a denial, as the native filter that would have denied names it."""
    stage = decision.get("extproc_stage", "")
    if stage in ("deny", "allow", "no-match"):
        return f"rbac_access_denied_matched_policy[{decision.get('enforced_effective_policy_id', 'none')}]"
    if stage == "jwt":
        return "jwt_authn_access_denied{" + status.replace(" ", "_") + "}"
    if stage == "custom":
        return "ext_authz_denied"
    return "extproc_denied"


class ExternalProcessorService(ep_grpc.ExternalProcessorServicer):
    def __init__(
        self,
        recorder: Recorder,
        peers: PeerCache,
        exchange: mx.PeerExchange | None,
        direction: Direction = Direction.INBOUND,
        authz: AuthorizationService | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.recorder = recorder
        self.peers = peers
        self.exchange = exchange
        self.direction = direction
        self.authz = authz
        self.tracing = tracing
        self.streams = 0
        self.ended_early = 0  # streams the server ended after the last expected message
        self.bad_streams = 0
        self.denied = 0
        self._log_bad = LogOnce(log)

    async def Process(
        self, request_iterator: AsyncIterator[ep.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ep.ProcessingResponse]:
        self.streams += 1
        direction = direction_of(context, self.direction)
        st = _Stream()
        try:
            async for req in request_iterator:
                kind = req.WhichOneof("request")
                reply: ep.ProcessingResponse | None
                done = False
                if kind == "request_headers":
                    reply, done = await self._request_headers(st, req, direction)
                elif kind == "response_headers":
                    hr, done = self._response_headers(st, req, direction)
                    reply = ep.ProcessingResponse(response_headers=hr)
                elif kind == "response_trailers":
                    self._finish(st, trailers=header_map(req.response_trailers.trailers))
                    reply, done = ep.ProcessingResponse(response_trailers=ep.TrailersResponse()), True
                elif kind == "request_trailers":
                    reply = ep.ProcessingResponse(request_trailers=ep.TrailersResponse())
                elif kind == "request_body":
                    reply = ep.ProcessingResponse(request_body=ep.BodyResponse())
                elif kind == "response_body":
                    reply = ep.ProcessingResponse(response_body=ep.BodyResponse())
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
    ) -> tuple[ep.ProcessingResponse, bool]:
        headers = header_map(req.request_headers.headers)
        st.request_headers = headers
        st.grpc = headers.get("content-type", "").startswith("application/grpc")
        got = mx.received(headers) if direction is Direction.INBOUND else None
        value = got[0] if got else ""
        st.peer = Peer(
            direction=direction,
            workload=self.peers.get(value) if value else None,
            peer_key=value,
            host=headers.get(":authority", ""),
        )
        attrs = pa.attribute_strings(req)
        if attrs and direction is Direction.INBOUND:
            st.peer.peer_principal = attrs.get("connection.uri_san_peer_certificate", "")
            st.peer.local_principal = attrs.get("connection.uri_san_local_certificate", "")
        # In observability mode Envoy applies no reply: nothing can be enforced or propagated.
        acting = not req.observability_mode
        tracing = self.tracing
        st.outgoing = tracing.begin(headers) if tracing is not None else None

        ok: external_auth_pb2.OkHttpResponse | None = None
        metadata: struct_pb2.Struct | None = None
        if direction is Direction.INBOUND and self.authz is not None and acting:
            if "source.address" not in attrs:
                self._log_bad(
                    "ext-proc-without-addresses",
                    "ext_proc sent no source.address/destination.address: add them to the filter's "
                    "request_attributes (see envoy/extproc.yaml); such requests are denied as malformed",
                )
            hv = req.request_headers.headers
            # Enforcement sees every header: too many is a malformed request, denied as with ext_authz.
            checked = headers if len(hv.headers) <= MAX_HEADERS else header_map(hv, limit=None)
            resp = await self.authz.decide(pa.check_request(checked, attrs, req))
            metadata = resp.dynamic_metadata
            st.decision = struct_to_dict(metadata)
            if resp.status.code != code_pb2.OK:
                return self._denied(st, resp, got is not None), True
            ok = resp.ok_response
            st.response_headers_to_add = pa.response_headers_to_add(ok)

        out = ep.ProcessingResponse()
        if not acting:
            return out, False
        extra: list[tuple[str, str]] = []
        remove: list[str] = []
        if self.exchange is not None:
            if direction is Direction.OUTBOUND:
                extra.extend(self.exchange.headers)
            elif got is not None:
                remove.extend((mx.METADATA_HEADER, mx.METADATA_ID_HEADER))
        if st.outgoing is not None:
            extra.extend(st.outgoing.headers)
            remove.extend(st.outgoing.remove)
        out.request_headers.CopyFrom(
            pa.request_mutation(ok or _NO_CHANGE, headers.get(":path", ""), extra=tuple(extra), remove=tuple(remove))
        )
        if metadata is not None and metadata.fields:
            out.dynamic_metadata.CopyFrom(pa.namespaced(metadata))
        return out, False

    def _denied(
        self, st: _Stream, resp: external_auth_pb2.CheckResponse, peer_sent_metadata: bool
    ) -> ep.ProcessingResponse:
        """The local reply for a denial; the request is over, so its metrics and span are too."""
        self.denied += 1
        decision = st.decision or {}
        imm = pa.immediate_response(resp, _details(decision, resp.status.message))
        if self.exchange is not None and peer_sent_metadata:
            # Our pair on the denial too, so the client labels its 403s with our workload.
            imm.headers.set_headers.extend(pa.set_header(name, value) for name, value in self.exchange.headers)
        peer = st.peer
        assert peer is not None
        st.record = _record(st, peer, imm.status.code, _size(st.request_headers), len(imm.body))
        st.record.grpc_status = grpc_status(st.grpc, imm.status.code, {}, {})
        self._finish(st, trailers=None)
        out = ep.ProcessingResponse(immediate_response=imm)
        if resp.dynamic_metadata.fields:
            out.dynamic_metadata.CopyFrom(pa.namespaced(resp.dynamic_metadata))
        return out

    def _response_headers(
        self, st: _Stream, req: ep.ProcessingRequest, direction: Direction
    ) -> tuple[ep.HeadersResponse, bool]:
        headers = header_map(req.response_headers.headers)
        peer = st.peer or Peer(direction=direction)
        set_headers: list[tuple[str, str]] = []
        remove: list[str] = []
        if direction is Direction.OUTBOUND:
            got = mx.received(headers)
            if got is not None:
                peer.workload = self.peers.get(got[0])
                peer.peer_key = got[0]
                remove.extend((mx.METADATA_HEADER, mx.METADATA_ID_HEADER))
        elif self.exchange is not None and peer.peer_key:
            set_headers.extend(self.exchange.headers)
        reply = _mutation(set_headers=tuple(set_headers), remove=tuple(remove))
        if st.response_headers_to_add:
            reply.response.header_mutation.set_headers.extend(st.response_headers_to_add)
        status = headers.get(":status", "")
        total = _number(req, "request.total_size")
        st.record = _record(
            st,
            peer,
            int(status) if status.isdigit() else 0,
            int(total) if total is not None else _size(st.request_headers),
            _size(headers),
        )
        st.record.grpc_status = grpc_status(st.grpc, st.record.response_code, {}, headers)
        if st.grpc and not req.response_headers.end_of_stream and "grpc-status" not in headers:
            return reply, False  # the status comes in the trailers
        self._finish(st, trailers=None)
        return reply, True

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
            self.tracing.finish(SpanIds.of(out), rec, st.started_ns, st.started_ns + int(elapsed_s * 1e9), st.decision)


_NO_CHANGE = external_auth_pb2.OkHttpResponse()


CENTRAL_MODE_MESSAGE = (
    "extproc runs in central mode (--central), which serves ext_authz and the access log service only; "
    "point the ext_proc filter at a per-sidecar extproc"
)


class CentralModeProcessor(ep_grpc.ExternalProcessorServicer):
    """ext_proc in central mode: every stream is refused with UNIMPLEMENTED.

    A central server knows a workload only from ext_authz context extensions and access log
    node metadata; ext_proc streams carry neither, so they cannot be enforced for the right
    workload. Refusing them says so at once, where a silent fallback would not.
    """

    def __init__(self) -> None:
        self.refused = 0

    async def Process(
        self, request_iterator: AsyncIterator[ep.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ep.ProcessingResponse]:
        self.refused += 1
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, CENTRAL_MODE_MESSAGE)
        yield ep.ProcessingResponse()  # pragma: no cover - abort raises; this makes Process a generator
