"""The access log's per-entry path: fields read straight from the entry, the request's shape
handed to the recorder's cache, and exactly the metrics, spans and counters of the plain
path (every header copied into dicts, a full HttpRecord, no cache)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.extensions.filters.http.grpc_stats.v3 import config_pb2 as grpc_stats_pb2
from envoy.service.accesslog.v3 import als_pb2
from google.protobuf import struct_pb2, wrappers_pb2

from bench.telemetry_micro import captured_entry, mesh_entry
from extproc.services.accesslog import (
    AUTHZ_NAMESPACE,
    GRPC_STATS_STATE,
    PEER_NAMESPACE,
    AccessLogService,
    _Memo,
    grpc_status,
    response_flags,
)
from extproc.telemetry import labels as L
from extproc.telemetry.overrides import build_plan
from extproc.telemetry.peer import METADATA_HEADER, PeerCache, Workload, encode
from extproc.telemetry.record import Direction, HttpRecord, Labeler, Peer
from extproc.telemetry.recorder import Recorder, TcpTracker
from extproc.telemetry.resource import TagOverride
from extproc.telemetry.store import MetricPlan, MetricStore
from extproc.tracing.context import Format
from extproc.tracing.spans import SpanRecord
from extproc.tracing.tracer import TRACE_KEY, SpanIds, Tracing, TracingSettings
from tests.fixtures.exposition import samples

LOCAL = Workload.from_labels(
    {"app": "reviews", "version": "v2"},
    workload_name="reviews-v2",
    namespace="bookinfo",
    identity="spiffe://cluster.local/ns/bookinfo/sa/reviews",
)
CLIENTS = [
    Workload.from_labels(
        {"app": f"c{i}"}, workload_name=f"c{i}", namespace="shop", identity=f"spiffe://td/ns/shop/sa/c{i}"
    )
    for i in range(4)
]
STANDARD = [MetricPlan.standard(m) for m in L.METRICS]


# --- the reference: the adapter as it was, one dict per header map and a full record ------------


def _flags_reference(flags: accesslog_pb2.ResponseFlags) -> str:
    codes = []
    for name, code in L.RESPONSE_FLAG_CODES:
        fd = accesslog_pb2.ResponseFlags.DESCRIPTOR.fields_by_name[name]
        if flags.HasField(name) if fd.message_type is not None else getattr(flags, name):
            codes.append(code)
    return ",".join(codes) or "-"


def _uri(cert: accesslog_pb2.TLSProperties.CertificateProperties) -> str:
    return next((san.uri for san in cert.subject_alt_name if san.uri), "")


def _text(md: struct_pb2.Struct, key: str) -> str:
    v = md.fields.get(key)
    return v.string_value if v is not None else ""


def reference_record(e: accesslog_pb2.HTTPAccessLogEntry, direction: Direction, peers: PeerCache) -> HttpRecord | None:
    c = e.common_properties
    if c.access_log_type not in (accesslog_pb2.NotSet, accesslog_pb2.DownstreamEnd) or c.intermediate_log_entry:
        return None
    req, resp = e.request, e.response
    req_headers, resp_headers = dict(req.request_headers), dict(resp.response_headers)
    logged = resp_headers if direction is Direction.OUTBOUND else req_headers
    fm = c.metadata.filter_metadata
    value = ""
    for ns in (AUTHZ_NAMESPACE, PEER_NAMESPACE) if direction is Direction.INBOUND else (PEER_NAMESPACE,):
        if ns in fm and (value := _text(fm[ns], METADATA_HEADER)):
            break
    value = value or logged.get(METADATA_HEADER, "")
    peer_san = local_san = ""
    if direction is Direction.INBOUND and c.HasField("tls_properties"):
        peer_san = _uri(c.tls_properties.peer_certificate_properties)
        local_san = _uri(c.tls_properties.local_certificate_properties)
    code = resp.response_code.value if resp.HasField("response_code") else 0
    is_grpc = req_headers.get("content-type", "").startswith("application/grpc") or (
        GRPC_STATS_STATE in c.filter_state_objects
    )
    rec = HttpRecord(
        peer=Peer(
            direction,
            peers.get(value) if value else None,
            value,
            peer_san,
            local_san,
            req.authority,
            c.upstream_cluster,
            c.route_name,
        ),
        grpc=is_grpc,
        response_code=code,
        grpc_status=grpc_status(is_grpc, code, dict(resp.response_trailers), resp_headers),
        response_flags=_flags_reference(c.response_flags) if c.HasField("response_flags") else "-",
        duration_ms=c.duration.ToNanoseconds() / 1e6 if c.HasField("duration") else None,
        request_bytes=c.downstream_wire_bytes_received,
        response_bytes=c.downstream_wire_bytes_sent,
        path=req.path,
        request_id=req.request_id,
        request_headers=req_headers,
    )
    if is_grpc and GRPC_STATS_STATE in c.filter_state_objects:
        counts = grpc_stats_pb2.FilterObject()
        if c.filter_state_objects[GRPC_STATS_STATE].Unpack(counts):
            rec.request_messages = counts.request_message_count
            rec.response_messages = counts.response_message_count
    return rec


# --- entries ----------------------------------------------------------------------------------------


def random_entry(rnd: random.Random, n: int) -> tuple[accesslog_pb2.HTTPAccessLogEntry, Direction]:
    """A mix of what sidecars log: peers in the ext_authz metadata, in extproc.peer (outbound) or
    in a logged header; mTLS or not; HTTP or gRPC (content-type or grpc_stats), grpc-status in
    headers or trailers; response flags; periodic entries; missing duration or response code."""
    direction = rnd.choice([Direction.INBOUND, Direction.INBOUND, Direction.OUTBOUND])
    w = rnd.choice([*CLIENTS, None])
    e = mesh_entry(encode(w) if w else "", w.identity if w else "", rnd.choice(["a:80", "b:80"]), 200, n)
    c = e.common_properties
    where = rnd.choice(["authz", "peer", "header", "none"])
    c.metadata.Clear()
    if w is not None and where == "authz":
        c.metadata.filter_metadata[AUTHZ_NAMESPACE].update({METADATA_HEADER: encode(w)})
    elif w is not None and where == "peer":
        c.metadata.filter_metadata[PEER_NAMESPACE].update({METADATA_HEADER: encode(w)})
    elif w is not None and where == "header":
        headers = e.request.request_headers if direction is Direction.INBOUND else e.response.response_headers
        headers[METADATA_HEADER] = encode(w)
    if rnd.random() < 0.3:
        c.ClearField("tls_properties")
    c.upstream_cluster = rnd.choice(["inbound|9080||", "outbound|80||a", "PassthroughCluster"])
    c.route_name = rnd.choice(["", "", "allow_any"])
    grpc = rnd.random() < 0.3
    if grpc:
        if rnd.random() < 0.5:
            e.request.request_headers["content-type"] = "application/grpc+proto"
        else:
            c.filter_state_objects[GRPC_STATS_STATE].Pack(
                grpc_stats_pb2.FilterObject(request_message_count=rnd.randrange(3), response_message_count=5)
            )
        status = rnd.choice(["0", "14", "", "x"])
        if status:
            where_status = rnd.choice([e.response.response_headers, e.response.response_trailers])
            where_status["grpc-status"] = status
    if rnd.random() < 0.1:
        e.response.ClearField("response_code")
    else:
        e.response.response_code.CopyFrom(wrappers_pb2.UInt32Value(value=rnd.choice([200, 404, 503])))
    c.ClearField("response_flags")
    flag = rnd.choice([None, None, "UF", "UF,URX", "UAEX", "empty"])
    if flag == "UF":
        c.response_flags.upstream_connection_failure = True
    elif flag == "UF,URX":
        c.response_flags.upstream_retry_limit_exceeded = True
        c.response_flags.upstream_connection_failure = True
    elif flag == "UAEX":
        c.response_flags.unauthorized_details.reason = accesslog_pb2.ResponseFlags.Unauthorized.EXTERNAL_SERVICE
    elif flag == "empty":
        c.response_flags.SetInParent()
    if rnd.random() < 0.05:
        c.ClearField("duration")
    elif rnd.random() < 0.3:
        c.duration.FromNanoseconds(rnd.randrange(10**11))  # seconds too, not only nanos
    if rnd.random() < 0.05:
        c.access_log_type = accesslog_pb2.DownstreamPeriodic
    return e, direction


def services(
    plans: list[MetricPlan] = STANDARD, tracing: Tracing | None = None
) -> tuple[AccessLogService, AccessLogService, Recorder]:
    """The service under test (shape cache on), the same service with the cache off, and the
    reference: `reference_record` into an uncached recorder."""

    def one(size: int) -> AccessLogService:
        recorder = Recorder(Labeler(LOCAL), MetricStore(plans), shape_cache_size=size)
        return AccessLogService(recorder, TcpTracker(recorder), PeerCache(), tracing=tracing)

    return one(8192), one(0), Recorder(Labeler(LOCAL), MetricStore(plans), shape_cache_size=0)


def run_all(
    entries: list[tuple[accesslog_pb2.HTTPAccessLogEntry, Direction]],
    fast: AccessLogService,
    plain: AccessLogService,
    reference: Recorder,
) -> None:
    peers = PeerCache()
    for e, d in entries:
        fast.http_entry(e, d)
        plain.http_entry(e, d)
        rec = reference_record(e, d, peers)
        if rec is not None:
            reference.http(rec, "access_log")
    text = reference.store.render()
    assert fast.recorder.store.render() == text
    assert plain.recorder.store.render() == text
    assert fast.recorder.stats == plain.recorder.stats == reference.stats
    assert fast.entries == plain.entries
    assert (
        (fast.peers.counters.hits, fast.peers.counters.misses)
        == (plain.peers.counters.hits, plain.peers.counters.misses)
        == (peers.counters.hits, peers.counters.misses)
    )


def test_entries_record_exactly_what_the_plain_path_records() -> None:
    rnd = random.Random(17)
    entries = [random_entry(rnd, i) for i in range(400)]
    fast, plain, reference = services()
    run_all(entries + [rnd.choice(entries) for _ in range(1200)], fast, plain, reference)
    assert fast.recorder.shape_hits > 1000
    assert plain.recorder.shape_hits == 0
    assert fast.bad_entries == plain.bad_entries == 0


def test_the_captured_envoy_entry_takes_the_shape_path() -> None:
    fast, plain, reference = services()
    run_all([(captured_entry(), Direction.INBOUND)] * 3, fast, plain, reference)
    assert (fast.recorder.shape_misses, fast.recorder.shape_hits) == (1, 2)
    [(lbl, n)] = samples(fast.recorder.store.render(), "istio_requests_total")
    assert n == 3
    assert (lbl["source_workload"], lbl["destination_service"], lbl["response_code"]) == (
        "unknown",
        "127.0.0.1:34135",
        "200",
    )
    assert (lbl["connection_security_policy"], lbl["request_protocol"], lbl["response_flags"]) == ("none", "http", "-")


def test_tag_overrides_that_read_the_request_take_the_record_path() -> None:
    plans = [
        build_plan(m, {"request_path": TagOverride(value="request.path"),
                       "ctype": TagOverride(value="request.headers['content-type']")})
        if m is L.REQUESTS else MetricPlan.standard(m)
        for m in L.METRICS
    ]  # fmt: skip
    rnd = random.Random(23)
    entries = [random_entry(rnd, i) for i in range(300)]
    for i, (e, _) in enumerate(entries):
        e.request.path = f"/p{i % 3}"
    fast, plain, reference = services(plans)
    run_all(entries, fast, plain, reference)
    text = fast.recorder.store.render()
    assert 'request_path="/p2"' in text and 'ctype="application/grpc+proto"' in text
    assert not fast.recorder._shapes or all(shape[0] for shape in fast.recorder._shapes)  # inbound: none


class Sink:
    def __init__(self) -> None:
        self.spans: list[SpanRecord] = []

    def submit(self, span: SpanRecord) -> bool:
        self.spans.append(span)
        return True


def test_an_entry_with_span_ids_builds_its_record_and_span_and_the_same_metrics() -> None:
    sink = Sink()
    tracing = Tracing(TracingSettings((Format.W3C,)), LOCAL, sink=sink)  # type: ignore[arg-type]
    rnd = random.Random(29)
    entries = []
    for i in range(60):
        e, _ = random_entry(rnd, i)
        e.common_properties.access_log_type = accesslog_pb2.DownstreamEnd
        e.request.path = f"/items/{i}"
        if i % 2:
            md = e.common_properties.metadata.filter_metadata[AUTHZ_NAMESPACE]
            md.update({TRACE_KEY: SpanIds(i + 1, i + 7, 0).encode(), "extproc_stage": "allow"})
        entries.append((e, Direction.INBOUND))
    fast, plain, reference = services(tracing=tracing)
    run_all(entries, fast, plain, reference)
    assert len(sink.spans) == 60  # 30 entries with ids, each through both services
    by_trace = {s.trace_id: s for s in sink.spans[::2]}
    assert sorted(by_trace) == list(range(2, 62, 2))
    span = by_trace[2]
    assert span.attributes["url.path"] == "/items/1" and span.attributes["istio.authorization.stage"] == "allow"
    assert span.attributes["request_size"] == entries[1][0].common_properties.downstream_wire_bytes_received
    # The traced entries took the record path, which goes through the shape cache as well.
    assert fast.recorder.shape_hits + fast.recorder.shape_misses == 60


def test_response_flags_read_only_the_set_fields_in_envoys_order() -> None:
    rnd = random.Random(31)
    names = [name for name, _ in L.RESPONSE_FLAG_CODES]
    for _ in range(300):
        f = accesslog_pb2.ResponseFlags()
        for name in rnd.sample(names, rnd.randrange(0, 5)):
            if name == "unauthorized_details":
                f.unauthorized_details.SetInParent()
            else:
                setattr(f, name, True)
        assert response_flags(f) == _flags_reference(f)
    assert response_flags(accesslog_pb2.ResponseFlags(downstream_remote_reset=True, failed_local_healthcheck=True)) == (
        "LH,DR"
    )


def test_the_memo_of_submessages_is_bounded() -> None:
    memo = _Memo(response_flags, size=4)
    for name, code in L.RESPONSE_FLAG_CODES[:10]:
        if name == "unauthorized_details":
            continue
        f = accesslog_pb2.ResponseFlags(**{name: True})
        raw = f.SerializeToString()
        assert (memo.get(raw) or memo.miss(raw, f)) == code
        assert memo.get(raw) == code
        assert len(memo) <= 4
    assert memo.misses == 10


class Context:
    def invocation_metadata(self) -> tuple[Any, ...]:
        return ()


async def _messages(*batches: list[accesslog_pb2.HTTPAccessLogEntry]) -> AsyncIterator[als_pb2.StreamAccessLogsMessage]:
    for batch in batches:
        msg = als_pb2.StreamAccessLogsMessage()
        msg.http_logs.log_entry.extend(batch)
        yield msg


def test_a_bad_entry_in_a_batch_is_counted_and_the_rest_recorded() -> None:
    fast, _, _ = services()

    def flaky(e: accesslog_pb2.HTTPAccessLogEntry, d: Direction) -> None:
        if e.request.path == "/bad":
            raise ValueError("bad")
        AccessLogService.http_entry(fast, e, d)

    fast.http_entry = flaky  # type: ignore[method-assign]
    good, bad = captured_entry(), captured_entry()
    bad.request.path = "/bad"
    asyncio.run(fast.StreamAccessLogs(_messages([good, bad, good], [good]), Context()))  # type: ignore[arg-type]
    assert fast.bad_entries == 1
    assert samples(fast.recorder.store.render(), "istio_requests_total")[0][1] == 3


def test_request_ids_are_read_only_while_ext_proc_claims_are_pending() -> None:
    fast, _, _ = services()
    e = captured_entry()
    rid = e.request.request_id
    fast.http_entry(e, Direction.INBOUND)
    fast.recorder.http(HttpRecord(peer=Peer(Direction.INBOUND), response_code=200, request_id=rid), "ext_proc")
    fast.http_entry(e, Direction.INBOUND)  # ext_proc counted this one
    fast.http_entry(e, Direction.INBOUND)
    assert fast.recorder.stats.http == {"access_log": 2, "ext_proc": 1}
    assert fast.recorder.stats.http_duplicates == 1


def test_outbound_entries_take_the_peer_from_the_response_and_no_principals() -> None:
    fast, plain, reference = services()
    e = mesh_entry("", "", "ratings:9080", 200, 1)
    e.common_properties.metadata.Clear()
    e.response.response_headers[METADATA_HEADER] = encode(CLIENTS[2])
    e.request.request_method = base_pb2.RequestMethod.Value("GET")
    run_all([(e, Direction.OUTBOUND)] * 2, fast, plain, reference)
    [(lbl, n)] = samples(fast.recorder.store.render(), "istio_requests_total")
    assert (lbl["reporter"], lbl["destination_workload"], lbl["connection_security_policy"], n) == (
        "source",
        "c2",
        "unknown",
        2,
    )


def test_durations_are_envoys_nanoseconds_over_a_million_to_the_last_bit() -> None:
    """(seconds * 1e9 + nanos) / 1e6, as Duration.ToNanoseconds() / 1e6 gives it: summing
    milliseconds and a fraction separately rounds differently for some values."""
    fast, _, _ = services()
    e = captured_entry()
    e.common_properties.duration.FromNanoseconds(2_325_348_894)
    fast.http_entry(e, Direction.INBOUND)
    [(_, total)] = samples(fast.recorder.store.render(), "istio_request_duration_milliseconds_sum")
    assert total == 2325.348894 == e.common_properties.duration.ToNanoseconds() / 1e6
