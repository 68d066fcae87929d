"""envoy.service.ext_proc.v3.ExternalProcessor: metrics and metadata exchange from ext_proc.

For users who run Envoy's ext_proc filter instead of ext_authz + the access log service.
One side stream per HTTP request:

* request headers: the metadata exchange (outbound: add ours; inbound: read the peer's,
  remove it); remember when the request started;
* response headers: the exchange on the way back (outbound: read and remove the server's
  pair; inbound: answer with ours if the peer sent its own), then record the request, unless
  it is a gRPC response whose trailers are still to come;
* response trailers (gRPC, with `response_trailer_mode: SEND`): record with the grpc-status.

The request is recorded once, from the last message the stream is expected to carry, and
the server then ends the stream itself. Envoy continues without the processor after an OK
close, and in `observability_mode` this frees the side stream at once instead of after
`deferred_close_timeout` (see DESIGN.md).

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

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from extproc.services.accesslog import grpc_status
from extproc.services.authz import LogOnce, direction_of
from extproc.telemetry import exchange as mx
from extproc.telemetry.peer import PeerCache
from extproc.telemetry.record import Direction, HttpRecord, Peer
from extproc.telemetry.recorder import Recorder

log = logging.getLogger("extproc.processor")

EXT_PROC_ATTRIBUTES = "envoy.filters.http.ext_proc"
MAX_HEADERS = 512


def header_map(h: base_pb2.HeaderMap) -> dict[str, str]:
    """Lower-case names; Envoy sends values in raw_value; repeated names joined with ","."""
    out: dict[str, str] = {}
    for hv in h.headers[:MAX_HEADERS]:
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
    for name, value in set_headers:
        mut.set_headers.append(
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=name, raw_value=value.encode()),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
            )
        )
    mut.remove_headers.extend(remove)
    return resp


class _Stream:
    """What one HTTP request's side stream has told us so far."""

    __slots__ = ("grpc", "peer", "record", "request_headers", "started")

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.request_headers: dict[str, str] = {}
        self.peer: Peer | None = None
        self.grpc = False
        self.record: HttpRecord | None = None


class ExternalProcessorService(ep_grpc.ExternalProcessorServicer):
    def __init__(
        self,
        recorder: Recorder,
        peers: PeerCache,
        exchange: mx.PeerExchange | None,
        direction: Direction = Direction.INBOUND,
    ) -> None:
        self.recorder = recorder
        self.peers = peers
        self.exchange = exchange
        self.direction = direction
        self.streams = 0
        self.ended_early = 0  # streams the server ended after the last expected message
        self.bad_streams = 0
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
                    reply = ep.ProcessingResponse(request_headers=self._request_headers(st, req, direction))
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

    def _request_headers(self, st: _Stream, req: ep.ProcessingRequest, direction: Direction) -> ep.HeadersResponse:
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
        if self.exchange is None:
            return ep.HeadersResponse()
        if direction is Direction.OUTBOUND:
            return _mutation(set_headers=self.exchange.headers)
        if got is not None:
            return _mutation(remove=(mx.METADATA_HEADER, mx.METADATA_ID_HEADER))
        return ep.HeadersResponse()

    def _response_headers(
        self, st: _Stream, req: ep.ProcessingRequest, direction: Direction
    ) -> tuple[ep.HeadersResponse, bool]:
        headers = header_map(req.response_headers.headers)
        peer = st.peer or Peer(direction=direction)
        reply = ep.HeadersResponse()
        if direction is Direction.OUTBOUND:
            got = mx.received(headers)
            if got is not None:
                peer.workload = self.peers.get(got[0])
                peer.peer_key = got[0]
                reply = _mutation(remove=(mx.METADATA_HEADER, mx.METADATA_ID_HEADER))
        elif self.exchange is not None and peer.peer_key:
            reply = _mutation(set_headers=self.exchange.headers)
        status = headers.get(":status", "")
        total = _number(req, "request.total_size")
        st.record = HttpRecord(
            peer=peer,
            grpc=st.grpc,
            response_code=int(status) if status.isdigit() else 0,
            request_bytes=int(total) if total is not None else _size(st.request_headers),
            response_bytes=_size(headers),
            method=st.request_headers.get(":method", ""),
            path=st.request_headers.get(":path", ""),
            scheme=st.request_headers.get(":scheme", ""),
            user_agent=st.request_headers.get("user-agent", ""),
            request_id=st.request_headers.get("x-request-id", ""),
            request_headers=st.request_headers,
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
        rec.duration_ms = (time.monotonic() - st.started) * 1000.0
        st.record = None
        st.peer = None
        self.recorder.http(rec, "ext_proc")
