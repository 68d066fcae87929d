"""Metric series for the memory step: access-log entries streamed straight to extproc.

The issue's memory figures are the resident set of `extproc serve` idle, and holding
10 000 metric series. Series come from label sets, and the label that varies most in a
mesh is the peer, so each entry here comes from a different client workload: the peer's
`x-envoy-peer-metadata` value (extproc.telemetry.peer.encode of a Workload) sits in the
ext_authz filter metadata, where extproc's Check puts the value it read from the request
and where its access log service looks first (extproc/services/accesslog.py). Envoy is not
needed: the entries go over a real gRPC AccessLogService/StreamAccessLogs stream, batched
as Envoy batches them.

A series is what extproc counts and `--metrics-max-series` bounds: one label set of one
metric, a histogram included (Prometheus stores each histogram bucket as a series of its
own). extproc reports its count in the gauge `extproc_telemetry_series` on /metrics; the
standard `istio_*` families are counted too, as a check that does not rely on the gauge.
"""

from __future__ import annotations

import math
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from google.protobuf import struct_pb2

from bench.harness import scenario as sc
from extproc.telemetry.peer import METADATA_HEADER, Workload, encode

AUTHZ_NAMESPACE = "envoy.filters.http.ext_authz"
SERIES_GAUGE = "extproc_telemetry_series"
CLIENT_NAMESPACE = "clients"
BATCH = 100  # entries per message, about what Envoy's 16 KiB buffer holds
CALIBRATION_PEERS = 10  # the first, small step: how many series does one peer open?


class SeriesNotCreated(RuntimeError):
    pass


def client(i: int) -> Workload:
    """The i-th calling workload: its own name, app and service, so its own label set."""
    name = f"client-{i:05d}"
    return Workload(
        workload_name=name,
        namespace=CLIENT_NAMESPACE,
        canonical_service=name,
        canonical_revision="v1",
        app=name,
        version="v1",
        cluster="Kubernetes",
        identity=f"spiffe://cluster.local/ns/{CLIENT_NAMESPACE}/sa/{name}",
        instance=f"{name}-7d4b9c-x2x{i % 10}",
    )


def entry(i: int, now_ns: int) -> accesslog_pb2.HTTPAccessLogEntry:
    """One inbound request from client i: GET of a product page answered 200, as Envoy logs it."""
    e = accesslog_pb2.HTTPAccessLogEntry(protocol_version=accesslog_pb2.HTTPAccessLogEntry.HTTP11)
    c = e.common_properties
    c.downstream_remote_address.CopyFrom(_address(f"10.{(i >> 8) & 255}.{i & 255}.7", 40000 + i % 20000))
    c.downstream_local_address.CopyFrom(_address("127.0.0.1", 10000))
    c.start_time.FromNanoseconds(now_ns)
    c.duration.FromNanoseconds(1_500_000 + 1000 * (i % 500))
    c.downstream_wire_bytes_received = 180 + i % 40
    c.downstream_wire_bytes_sent = 1200
    c.upstream_cluster = "app"
    c.route_name = "default"
    md = struct_pb2.Struct()
    md.fields[METADATA_HEADER].string_value = encode(client(i))
    c.metadata.filter_metadata[AUTHZ_NAMESPACE].CopyFrom(md)
    r = e.request
    r.request_method = base_pb2.GET
    r.scheme = "http"
    r.authority = sc.AUDIENCE
    r.path = sc.PRODUCT_PATHS[i % len(sc.PRODUCT_PATHS)]
    r.user_agent = "bench-memory"
    r.request_headers_bytes = 180
    e.response.response_code.value = 200
    e.response.response_body_bytes = 1024
    return e


def _address(ip: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=ip, port_value=port))


def messages(first: int, count: int, batch: int = BATCH) -> Iterator[als_pb2.StreamAccessLogsMessage]:
    """Entries for clients first .. first+count-1, `batch` per message; the first message names the stream."""
    now = time.time_ns()
    for start in range(first, first + count, batch):
        msg = als_pb2.StreamAccessLogsMessage()
        if start == first:
            msg.identifier.node.id = f"sidecar~127.0.0.1~{sc.WORKLOAD}.{sc.NAMESPACE}~{sc.NAMESPACE}.svc.cluster.local"
            msg.identifier.log_name = "inbound"
        msg.http_logs.log_entry.extend(entry(i, now) for i in range(start, min(first + count, start + batch)))
        yield msg


def stream(port: int, first: int, count: int, timeout_s: float = 60.0) -> None:
    """One StreamAccessLogs call; it returns once extproc has read (and recorded) every entry."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = als_pb2_grpc.AccessLogServiceStub(channel)
        stub.StreamAccessLogs(messages(first, count), timeout=timeout_s)


@dataclass(frozen=True)
class SeriesCount:
    gauge: int | None  # the sum of extproc_telemetry_series, None when /metrics has no such gauge
    counted: int  # label sets of the istio_* families (a histogram's once)
    scrape_bytes: int

    @property
    def series(self) -> int:
        return self.gauge if self.gauge is not None else self.counted


def count_series(text: str) -> SeriesCount:
    """Series in a /metrics body: extproc's own gauge, and a count of the standard families' label sets.

    A line scan, not prometheus_client's parser: 10 000 series render as ~150 MB of text
    (25 labels on each of ~20 lines per histogram), which that parser takes most of a minute on.
    """
    gauge: int | None = None
    counted = 0
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        brace, space = line.find("{"), line.find(" ")
        name = line[: brace if 0 <= brace < space or space < 0 else space]
        if name == SERIES_GAUGE:
            gauge = (gauge or 0) + int(float(line.rsplit(" ", 1)[1]))
        elif name.startswith("istio_") and name.endswith(("_total", "_count")):
            # One sample per series: a counter's _total, a histogram's _count (its _bucket lines carry `le`).
            counted += 1
    return SeriesCount(gauge, counted, len(text.encode()))


def scrape(admin_port: int, timeout_s: float = 60.0) -> SeriesCount:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=timeout_s) as r:
        return count_series(r.read().decode())


def peers_needed(target: int, current: int, per_peer: float) -> int:
    """How many more peers reach `target` series when each opens `per_peer` of them."""
    if per_peer <= 0:
        raise SeriesNotCreated("access-log entries from new peers opened no metric series")
    return max(0, math.ceil((target - current) / per_peer))


def _settled(admin_port: int, at_least: int, timeout_s: float) -> SeriesCount:
    """Scrape until the count reaches `at_least`, or stops moving for a second, or time is up."""
    deadline = time.monotonic() + timeout_s
    last = scrape(admin_port)
    still_since = time.monotonic()
    while last.series < at_least and time.monotonic() < deadline:
        time.sleep(0.2)
        now = scrape(admin_port)
        if now.series != last.series:
            still_since = time.monotonic()
        elif time.monotonic() - still_since >= 1.0:
            return now
        last = now
    return last


@dataclass
class Fill:
    """How the series were made, and the resident set read before the first full scrape."""

    target: int
    peers: int
    per_peer: float
    rss_mib: float  # read when the last stream was answered, before /metrics rendered the lot
    count: SeriesCount  # from the scrape after it


def fill(grpc_port: int, admin_port: int, target: int, rss: Callable[[], float]) -> Fill:
    """Open `target` series: a few peers first to learn how many series a peer opens, then the rest at once.

    The calibration scrape is small. The resident set is read right after the big stream is
    answered and before the confirming scrape, because rendering 10 000 series (about 30 lines
    each for histograms) allocates far more than holding them; the caller reads it again after.
    """
    before = scrape(admin_port).series
    stream(grpc_port, 0, CALIBRATION_PEERS)
    calibrated = _settled(admin_port, before + 1, 10.0).series
    per_peer = (calibrated - before) / CALIBRATION_PEERS
    rest = peers_needed(target, calibrated, per_peer)
    if rest:
        stream(grpc_port, CALIBRATION_PEERS, rest)
    held = rss()
    count = _settled(admin_port, target, 15.0)
    return Fill(target, CALIBRATION_PEERS + rest, per_peer, held, count)
