"""envoy.service.accesslog.v3.AccessLogService: Istio's metrics from Envoy's access logs.

Envoy streams batches of entries on one long-lived stream per worker; nothing is sent
back. HTTP entries are final (duration, wire bytes, response code and flags, gRPC
status from trailers). TCP entries come periodically (`access_log_flush_interval`) and
at connection end, with byte counts cumulative per connection: `TcpTracker` diffs them
by stream id.

Where the peer's identity comes from:
* inbound: the `x-envoy-peer-metadata` pair extproc's Check read from the request and put
  in the ext_authz dynamic metadata (or the request header itself, if the Envoy config logs
  it and nothing removed it);
* outbound: the server's pair from the response, which the Envoy config moves into
  dynamic metadata with header_to_metadata (namespace `extproc.peer`) before the
  application sees the response, or the logged response header;
* principals: the URI SANs of the downstream TLS session.

The Envoy config names the direction in the gRPC initial metadata `x-extproc-direction`
(or the log name `inbound`/`outbound`); otherwise the server's `--direction` applies.

In central mode (`--central`) the local workload is not the server's: each stream's first
message names its Envoy node, whose metadata (NAMESPACE, WORKLOAD_NAME, LABELS, ...) selects
the recorder of that workload for every entry of the stream (see services/central.py).
Entries of a stream whose node names no usable workload are dropped and counted.

`http_entry` runs once per request in the `authz+als` mode, so it reads each field it needs
once, straight from the message (a upb field read costs ~0.1 µs, a nested one more), copies
no header map, and hands the recorder the request's shape and values (`Recorder.http_shape`),
whose cache turns a repeat shape into a few integer updates. An `HttpRecord` is built only
when something reads it: a tag override that projects labels from the request, or a span.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc
from envoy.config.core.v3 import address_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.extensions.filters.http.grpc_stats.v3 import config_pb2 as grpc_stats_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from google.protobuf import struct_pb2

from extproc.services.authz import LogOnce, direction_of
from extproc.services.central import IdentityError, NodeWorkloads
from extproc.telemetry.directory import PeerDirectory
from extproc.telemetry.labels import RESPONSE_FLAG_CODES
from extproc.telemetry.peer import METADATA_HEADER, PeerCache, Workload
from extproc.telemetry.record import (
    Direction,
    HttpRecord,
    Peer,
    ServiceInfo,
    service_of_cluster,
    service_of_metadata,
)
from extproc.telemetry.recorder import Recorder, TcpTracker
from extproc.tracing.tracer import DECISION_KEYS, TRACE_KEY, TRACESTATE_KEY, SpanIds, Tracing
from extproc.verdict import PEER_METADATA, STAGE, Stage

log = logging.getLogger("extproc.accesslog")

AUTHZ_NAMESPACE = "envoy.filters.http.ext_authz"
PEER_NAMESPACE = "extproc.peer"  # where header_to_metadata puts the server's response pair
GRPC_STATS_STATE = "envoy.filters.http.grpc_stats"
# Field name -> (Envoy's position, short code): ListFields() gives only the flags that are
# set, so an entry with one flag costs one lookup instead of a test of all 28 fields.
_FLAGS = {name: (i, code) for i, (name, code) in enumerate(RESPONSE_FLAG_CODES)}
_METHODS = {
    v.number: v.name
    for v in accesslog_pb2.HTTPRequestProperties.DESCRIPTOR.fields_by_name["request_method"].enum_type.values
    if v.number
}
_TCP_END = accesslog_pb2.TcpConnectionEnd
_TCP_LOG_TYPES = frozenset({accesslog_pb2.TcpPeriodic, accesslog_pb2.TcpConnectionEnd})
_HTTP_FINAL = frozenset({accesslog_pb2.NotSet, accesslog_pb2.DownstreamEnd})
_INBOUND = Direction.INBOUND

# Bound of the memos of principals and response flags by their submessage's bytes.
MEMO_SIZE = 1024

# What the shipped outbound Envoy configs log as `common_config.custom_tags`: the upstream
# connection's identities (no AccessLogCommon field carries upstream TLS), the cluster's
# `istio.services` metadata, and the route's cluster, also logged for a local reply.
UPSTREAM_PEER_SAN_TAG = "upstream_peer_uri_san"  # %UPSTREAM_PEER_URI_SAN%
UPSTREAM_LOCAL_SAN_TAG = "upstream_local_uri_san"  # %UPSTREAM_LOCAL_URI_SAN%
SERVICES_TAG = "istio_services"  # %CLUSTER_METADATA(istio:services)%
CLUSTER_TAG = "upstream_cluster"  # %UPSTREAM_CLUSTER%

# Decision stages Istio enforces with Envoy's own RBAC and jwt_authn filters, which set no
# response flag on their local replies; extproc's ext_authz denial carries UAEX instead.
# A CUSTOM denial is ext_authz in Istio too, so it keeps UAEX, as do extproc's own refusals.
_NATIVE_STAGES = frozenset({Stage.JWT, Stage.DENY, Stage.NO_MATCH})
NETWORK_AUTHZ_NAMESPACE = "envoy.filters.network.ext_authz"

# Envoy's Grpc::Utility::httpToGrpcStatus, for gRPC requests answered without grpc-status.
_HTTP_TO_GRPC = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}


def response_flags(flags: accesslog_pb2.ResponseFlags) -> str:
    """Envoy's short form (`UF,URX`), or `-` when no flag is set.

    ListFields() lists the bools that are true and the messages that are present
    (`unauthorized_details`), which is what makes a flag set."""
    found = sorted(f for fd, _ in flags.ListFields() if (f := _FLAGS.get(fd.name)) is not None)
    return ",".join(code for _, code in found) if found else "-"


def _uri_san(cert: accesslog_pb2.TLSProperties.CertificateProperties) -> str:
    for san in cert.subject_alt_name:
        uri: str = san.uri
        if uri:
            return uri
    return ""


def _no_directory() -> PeerDirectory | None:
    return None


def _from_directory(
    d: PeerDirectory, c: accesslog_pb2.AccessLogCommon, inbound: bool, peer_san: str, cluster: str, lookup: bool
) -> tuple[Workload | None, ServiceInfo | None]:
    """(the peer at the entry's remote address, the ServiceEntry service of its cluster): the
    downstream peer inbound, the upstream host outbound. `lookup` is False when the peer is
    already known from its exchanged metadata."""
    workload = None
    if lookup and d.by_address:
        remote = c.downstream_remote_address if inbound else c.upstream_remote_address
        workload = d.peer(remote.socket_address.address, peer_san)
    service = None
    if d.services and cluster:
        named = service_of_cluster(cluster)
        if named is not None:
            service = d.service(named.host)
    return workload, service


def _client_side(tags: Mapping[str, str], cluster: str) -> tuple[str, str, ServiceInfo | None, str]:
    """(upstream peer SAN, our SAN, the cluster's istio.services[0], the cluster) from the custom
    tags of an outbound entry; the route's cluster stands in when no upstream host was picked."""
    service = service_of_metadata(tags[SERVICES_TAG]) if SERVICES_TAG in tags else None
    return (
        _first_san(_tag(tags, UPSTREAM_PEER_SAN_TAG)),
        _first_san(_tag(tags, UPSTREAM_LOCAL_SAN_TAG)),
        service,
        cluster or _tag(tags, CLUSTER_TAG),
    )


def _tag(tags: Mapping[str, str], key: str) -> str:
    """A custom tag's value; "" when absent or `-` (a formatter with nothing to print)."""
    value = tags.get(key, "")
    return "" if value == "-" else value


def _first_san(value: str) -> str:
    """The first of a formatter's comma-joined SANs: istio_stats.cc reads uriSan...()[0]."""
    return value.split(",", 1)[0] if "," in value else value


def istio_flags(flags: str, decision: struct_pb2.Struct | None, *, tcp: bool = False) -> str:
    """The response flags Istio's sidecar would report for the same request.

    An ext_authz denial sets UAEX. When extproc's decision was one Istio makes with Envoy's
    RBAC or jwt_authn filters (a DENY or ALLOW policy, a rejected token), those filters set no
    flag, so UAEX is dropped; a CUSTOM denial, an error, or an ext_authz failure with no
    decision of extproc's keeps it. On TCP a denial whose stage was not logged is taken as
    the network RBAC filter's (Istio's TCP policies), which sets none either.
    """
    if "UAEX" not in flags:
        return flags
    stage = _string(decision, STAGE) if decision is not None else ""
    if stage in _NATIVE_STAGES or (tcp and not stage):
        rest = [f for f in flags.split(",") if f != "UAEX"]
        return ",".join(rest) if rest else "-"
    return flags


def _principals(tls: accesslog_pb2.TLSProperties) -> tuple[str, str]:
    """(peer URI SAN, local URI SAN) of a TLS session."""
    return _uri_san(tls.peer_certificate_properties), _uri_san(tls.local_certificate_properties)


class _Memo(dict[bytes, Any]):
    """A pure function of a small submessage, memoized by the message's serialized bytes.

    Each field read of a nested upb message creates a wrapper object: reading the two URI
    SANs costs about 2 µs, testing the 28 response flags about 2 µs, while serializing the
    message and looking its bytes up costs about 0.5 µs. The submessages repeat: the TLS
    properties of one connection (its session id is in them) are the same in each of its
    requests, and there are few distinct sets of response flags. A hit is a plain
    `dict.get`; bounded: cleared when full.
    """

    __slots__ = ("fn", "misses", "size")

    def __init__(self, fn: Callable[[Any], Any], size: int = MEMO_SIZE) -> None:
        super().__init__()
        self.fn = fn
        self.size = size
        self.misses = 0

    def miss(self, raw: bytes, message: Any) -> Any:
        self.misses += 1
        found = self.fn(message)
        if len(self) >= self.size:
            self.clear()
        self[raw] = found
        return found


def _address(a: address_pb2.Address) -> str:
    """`ip:port` (`[v6]:port`), as Envoy's source.address attribute prints it; "" when absent."""
    sa = a.socket_address
    if not sa.address:
        return ""
    host = f"[{sa.address}]" if ":" in sa.address else sa.address
    return f"{host}:{sa.port_value}"


def _string(md: struct_pb2.Struct, key: str) -> str:
    fields = md.fields
    return fields[key].string_value if key in fields else ""  # `in` and [] cost less than .get


def grpc_status(grpc: bool, code: int, trailers: Mapping[str, str], headers: Mapping[str, str]) -> str:
    """Envoy's Grpc::Common::getGrpcStatus: trailers, then headers, then from the HTTP code."""
    if not grpc:
        return ""
    raw = trailers.get("grpc-status") or headers.get("grpc-status")
    if raw is not None and raw.isdigit():
        return raw
    if code == 0:
        return ""
    return str(_HTTP_TO_GRPC.get(code, 2))  # 2 = UNKNOWN, also for a 200 without grpc-status


class AccessLogService(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]  # generated, untyped
    def __init__(
        self,
        recorder: Recorder,
        tcp: TcpTracker,
        peers: PeerCache,
        direction: Direction = Direction.INBOUND,
        tracing: Tracing | None = None,
        central: NodeWorkloads | None = None,
        directory: Callable[[], PeerDirectory | None] | None = None,
    ) -> None:
        self.tracing = tracing if tracing is not None and tracing.exports else None
        self.recorder = recorder
        self.tcp = tcp
        self.peers = peers
        self.direction = direction
        self.central = central
        self.streams = 0
        self.entries = {"http": 0, "tcp": 0}
        self.bad_entries = 0
        self.unidentified_entries = 0  # central mode: dropped, their stream named no workload
        self._log_bad = LogOnce(log)
        # The config's WorkloadEntry/ServiceEntry resources, for peers with no exchanged
        # metadata (every TCP peer) and ServiceEntry hosts; swapped on reload; None when the
        # config lists none (a test per entry, not a call).
        self.directory = directory if directory is not None else _no_directory
        self._principals = _Memo(_principals)
        self._flags = _Memo(response_flags)

    async def StreamAccessLogs(
        self,
        request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> als_pb2.StreamAccessLogsResponse:
        self.streams += 1
        direction = direction_of(context, self.direction)
        http_entry, tcp_entry = self.http_entry, self.tcp_entry
        central = self.central
        # Central mode: nothing is recorded until the stream names a usable node.
        problem: IdentityError | None = (
            IdentityError("workload_no_node", "the stream's first message carried no identifier.node")
            if central is not None
            else None
        )
        logged = False
        async for msg in request_iterator:
            if msg.HasField("identifier"):
                ident = msg.identifier
                name = ident.log_name
                if name in ("inbound", "outbound"):
                    direction = Direction(name)
                if central is not None:
                    found = central.for_node(ident.node)
                    if isinstance(found, IdentityError):
                        problem = found
                    else:
                        recorder, tcp = found
                        http_entry = functools.partial(self.http_entry, recorder=recorder)
                        tcp_entry = functools.partial(self.tcp_entry, tcp=tcp)
                        problem = None
            if problem is not None:
                self.unidentified_entries += len(msg.http_logs.log_entry) + len(msg.tcp_logs.log_entry)
                if not logged:
                    logged = True
                    log.warning(
                        "central mode: dropping the entries of an access log stream that names no workload: %s "
                        "(Envoy's bootstrap node.metadata needs NAMESPACE, and should have WORKLOAD_NAME, LABELS, "
                        "SERVICE_ACCOUNT; counted in extproc_access_log_unidentified_entries_total)",
                        problem.message,
                    )
                continue
            kind = msg.WhichOneof("log_entries")
            if kind == "http_logs":
                for e in msg.http_logs.log_entry:
                    try:  # as _guard does, without a call per entry
                        http_entry(e, direction)
                    except Exception as exc:
                        self._bad(exc)
            elif kind == "tcp_logs":
                for t in msg.tcp_logs.log_entry:
                    self._guard(tcp_entry, t, direction)
        return als_pb2.StreamAccessLogsResponse()

    def _guard(self, fn, entry, direction: Direction) -> None:  # type: ignore[no-untyped-def]
        """One bad entry must not end the stream (Envoy would drop the rest of the batch)."""
        try:
            fn(entry, direction)
        except Exception as e:
            self._bad(e)

    def _bad(self, e: Exception) -> None:
        """Counted, and logged once per kind."""
        self.bad_entries += 1
        self._log_bad("bad-access-log-entry", f"skipped an access log entry: {type(e).__name__}: {e}")

    def _peer(self, c: accesslog_pb2.AccessLogCommon, direction: Direction, host: str, logged: dict[str, str]) -> Peer:
        fm = c.metadata.filter_metadata
        value = ""
        for ns in (AUTHZ_NAMESPACE, PEER_NAMESPACE) if direction is Direction.INBOUND else (PEER_NAMESPACE,):
            if ns in fm and (value := _string(fm[ns], METADATA_HEADER) or _string(fm[ns], PEER_METADATA)):
                break
        if not value:
            value = logged.get(METADATA_HEADER, "")
        tls = c.tls_properties
        peer_san = local_san = ""
        service: ServiceInfo | None = None
        cluster = c.upstream_cluster
        if direction is Direction.INBOUND:
            if c.HasField("tls_properties"):
                peer_san = _uri_san(tls.peer_certificate_properties)
                local_san = _uri_san(tls.local_certificate_properties)
        elif tags := c.custom_tags:
            peer_san, local_san, service, cluster = _client_side(tags, cluster)
        workload, service = self._listed(c, direction is _INBOUND, value, peer_san, cluster, service)
        return Peer(
            direction=direction,
            workload=workload,
            peer_key=value,
            peer_principal=peer_san,
            local_principal=local_san,
            host=host,
            upstream_cluster=cluster,
            route_name=c.route_name,
            service=service,
        )

    def _listed(
        self,
        c: accesslog_pb2.AccessLogCommon,
        inbound: bool,
        value: str,
        peer_san: str,
        cluster: str,
        service: ServiceInfo | None,
    ) -> tuple[Workload | None, ServiceInfo | None]:
        """(the peer: from its exchanged metadata, else the config's directory; the service,
        else a listed ServiceEntry's)."""
        workload = self.peers.get(value) if value else None
        d = self.directory()
        if d is not None:
            found, listed = _from_directory(d, c, inbound, peer_san, cluster, not value)
            if found is not None:
                workload = found
            if service is None:
                service = listed
        return workload, service

    def http_entry(
        self, e: accesslog_pb2.HTTPAccessLogEntry, direction: Direction, recorder: Recorder | None = None
    ) -> None:
        """One HTTP entry, read field by field straight from the message.

        The common case (standard metric plans, no span to report) hands the recorder the
        request's shape and values only: no header dicts, no `HttpRecord`. An entry that
        needs its record (tag overrides read it; a span is built from it) takes the full
        path, with the same metrics.
        """
        c = e.common_properties
        if c.access_log_type not in _HTTP_FINAL or c.intermediate_log_entry:
            return  # periodic entries of long streams; the final entry carries the totals
        self.entries["http"] += 1
        if recorder is None:
            recorder = self.recorder
        req = e.request
        resp = e.response
        req_headers = req.request_headers  # only what the Envoy config logs: usually empty or content-type
        fso = c.filter_state_objects
        stats_state = GRPC_STATS_STATE in fso if fso else False
        is_grpc = stats_state or (
            bool(req_headers) and req_headers.get("content-type", "").startswith("application/grpc")
        )
        code = resp.response_code.value  # an absent UInt32Value reads as 0, Istio's "no response"
        status = grpc_status(True, code, resp.response_trailers, resp.response_headers) if is_grpc else ""
        inbound = direction is _INBOUND
        fm = c.metadata.filter_metadata
        if c.HasField("response_flags"):
            msg = c.response_flags
            raw = msg.SerializeToString()
            flags = self._flags.get(raw) or self._flags.miss(raw, msg)
            if "UAEX" in flags:
                flags = istio_flags(flags, fm.get(AUTHZ_NAMESPACE))
        else:
            flags = "-"
        value = ""
        if fm:
            if inbound and AUTHZ_NAMESPACE in fm:
                fields = fm[AUTHZ_NAMESPACE].fields
                if METADATA_HEADER in fields:
                    value = fields[METADATA_HEADER].string_value
                elif PEER_METADATA in fields:  # from an HTTP check (authz-http)
                    value = fields[PEER_METADATA].string_value
            if not value and PEER_NAMESPACE in fm:
                value = _string(fm[PEER_NAMESPACE], METADATA_HEADER)
        if not value:
            logged = req_headers if inbound else resp.response_headers
            if logged:
                value = logged.get(METADATA_HEADER, "")
        service = None
        cluster = c.upstream_cluster
        if inbound:
            # The custom tags are the client side's (the upstream connection and cluster); the
            # server side's service is `--service-host`, its principals the downstream TLS.
            if c.HasField("tls_properties"):
                msg = c.tls_properties
                raw = msg.SerializeToString()
                peer_san, local_san = self._principals.get(raw) or self._principals.miss(raw, msg)
            else:
                peer_san = local_san = ""
        elif tags := c.custom_tags:
            peer_san, local_san, service, cluster = _client_side(tags, cluster)
        else:
            peer_san = local_san = ""
        workload, service = self._listed(c, inbound, value, peer_san, cluster, service)
        d = c.duration  # an absent Duration reads as zero: HasField only tells 0 from absent
        nanos = d.seconds * 1_000_000_000 + d.nanos
        duration_ms = nanos / 1e6 if nanos or c.HasField("duration") else None
        request_messages = response_messages = None
        if stats_state and is_grpc:
            counts = grpc_stats_pb2.FilterObject()
            if fso[GRPC_STATS_STATE].Unpack(counts):
                request_messages = counts.request_message_count
                response_messages = counts.response_message_count
        md = ids = None
        if self.tracing is not None and AUTHZ_NAMESPACE in fm:
            md = fm[AUTHZ_NAMESPACE]
            ids = SpanIds.decode(_string(md, TRACE_KEY), _string(md, TRACESTATE_KEY))
        host = req.authority
        route = c.route_name
        request_bytes = c.downstream_wire_bytes_received
        response_bytes = c.downstream_wire_bytes_sent
        request_id = req.request_id if recorder.claims else ""  # only ext_proc's claims need it
        if ids is None and recorder.http_shape(
            (
                not inbound,
                value or workload,
                peer_san,
                local_san,
                host,
                cluster,
                route,
                is_grpc,
                code,
                status,
                flags,
                service,
            ),
            workload,
            duration_ms,
            request_bytes,
            response_bytes,
            request_messages,
            response_messages,
            request_id,
        ):
            return
        rec = HttpRecord(
            peer=Peer(direction, workload, value, peer_san, local_san, host, cluster, route, service),
            grpc=is_grpc,
            response_code=code,
            grpc_status=status,
            response_flags=flags,
            duration_ms=duration_ms,
            request_bytes=request_bytes,
            response_bytes=response_bytes,
            request_messages=request_messages,
            response_messages=response_messages,
            method=_METHODS.get(req.request_method, ""),
            path=req.path,
            scheme=req.scheme,
            user_agent=req.user_agent,
            request_id=req.request_id,
            source_address=_address(c.downstream_remote_address),
            destination_address=_address(c.downstream_local_address),
            request_headers=dict(req_headers),
        )
        recorder.http(rec, "access_log")
        if ids is not None and md is not None:
            self._span(c, rec, md, ids)

    def _span(self, c: accesslog_pb2.AccessLogCommon, rec: HttpRecord, md: struct_pb2.Struct, ids: SpanIds) -> None:
        """The request's span, when its Check chose ids and sampled it (ext_authz dynamic metadata).

        Start and duration are Envoy's: the stream's start time and the time to the last
        byte sent downstream.
        """
        if self.tracing is None:
            return
        start_ns = c.start_time.ToNanoseconds()
        if c.HasField("duration"):
            elapsed = c.duration.ToNanoseconds()
        elif c.HasField("time_to_last_downstream_tx_byte"):
            elapsed = c.time_to_last_downstream_tx_byte.ToNanoseconds()
        else:
            elapsed = 0
        decision = {k: _string(md, k) for k in DECISION_KEYS}
        self.tracing.finish(ids, rec, start_ns, start_ns + elapsed, decision)

    def tcp_entry(
        self, e: accesslog_pb2.TCPAccessLogEntry, direction: Direction, tcp: TcpTracker | None = None
    ) -> None:
        c = e.common_properties
        t = c.access_log_type
        if t == accesslog_pb2.TcpUpstreamConnected:
            # tcp_proxy connects upstream as the connection is accepted, before the TLS
            # handshake: this entry has no peer identity yet, and no bytes worth counting.
            return
        if t != accesslog_pb2.NotSet and t not in _TCP_LOG_TYPES:
            return
        self.entries["tcp"] += 1
        end = t == _TCP_END or (t == accesslog_pb2.NotSet and not c.intermediate_log_entry)
        (tcp if tcp is not None else self.tcp).report(
            c.stream_id,
            self._peer(c, direction, "", {}),
            e.connection_properties.sent_bytes,
            e.connection_properties.received_bytes,
            end,
            istio_flags(
                response_flags(c.response_flags), c.metadata.filter_metadata.get(NETWORK_AUTHZ_NAMESPACE), tcp=True
            )
            if c.HasField("response_flags")
            else "-",
            (_address(c.downstream_remote_address), _address(c.downstream_local_address)),
        )
