"""Micro-benchmark of Istio's standard metrics in-process (no Envoy, no gRPC):

  * record: one finished HTTP request through `Recorder.http` (a counter and three
            histograms, through the shape cache or without it), in steady state over a
            realistic mix of peers x hosts x response codes; the same for TCP reports through
            `TcpTracker`;
  * access log: one HTTP entry through `AccessLogService.http_entry` (what the `authz+als`
            mode runs per request): an entry Envoy 1.40 sent in the benchmark (no peer, no
            TLS), and the mix above as a sidecar in a mesh logs it (peer metadata from the
            ext_authz dynamic metadata, mTLS URI SANs, content-type on some), with the
            cost of a shape the cache has not seen and of the path without the cache;
  * render: one `MetricStore.render()` (a scrape) at 10,000 series, either all in
            istio_requests_total or spread over the 4 HTTP metrics (2,500 requests' label
            sets; the 3 histograms render 22 lines per series);
  * prometheus_client: `Counter.labels(*25 values).inc()` over the same mix, and
            `generate_latest` of the same 10,000-series counter, for comparison.

The reporter is an inbound sidecar without `ServiceInfo`, so destination_service is the Host
header and every (peer, host, response code) is a series of its own.

    .venv/bin/python -m bench.telemetry_micro [--repeat 5] [--peers 50 --hosts 5 --codes 4]
"""

from __future__ import annotations

import argparse
import base64
import gc
import os
import platform
import time
import timeit
import tracemalloc
from collections.abc import Callable
from importlib.metadata import version

import prometheus_client
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf import wrappers_pb2
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from extproc.services.accesslog import AUTHZ_NAMESPACE, AccessLogService
from extproc.telemetry import labels as L
from extproc.telemetry.peer import PeerCache, Workload, decode, encode
from extproc.telemetry.record import Direction, HttpRecord, Labeler, Peer
from extproc.telemetry.recorder import SHAPE_CACHE_SIZE, Recorder, TcpTracker
from extproc.telemetry.store import MetricPlan, MetricStore

CODES = (200, 201, 404, 503)
LOCAL = Workload.from_labels(
    {"app": "reviews", "version": "v2"},
    workload_name="reviews-v2",
    namespace="bookinfo",
    cluster="Kubernetes",
    identity="spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews",
)


def client(i: int) -> Workload:
    return Workload.from_labels(
        {"app": f"client-{i}", "version": f"v{i % 3 + 1}"},
        workload_name=f"client-{i}-v{i % 3 + 1}",
        namespace=f"team-{i % 7}",
        cluster="Kubernetes",
        identity=f"spiffe://cluster.local/ns/team-{i % 7}/sa/client-{i}",
    )


def peers(n: int) -> list[Peer]:
    """Inbound peers over mTLS, the way the access log adapter builds them (decoded via PeerCache)."""
    cache = PeerCache()
    out = []
    for i in range(n):
        value = encode(client(i))
        w = cache.get(value)
        out.append(
            Peer(
                Direction.INBOUND,
                workload=w,
                peer_key=value,
                peer_principal=w.identity if w else "",
                local_principal=LOCAL.identity,
                upstream_cluster="inbound|9080||",
            )
        )
    return out


def http_mix(n_peers: int, n_hosts: int, codes: tuple[int, ...]) -> list[HttpRecord]:
    recs = []
    for i, p in enumerate(peers(n_peers)):
        for h in range(n_hosts):
            host = f"reviews-{h}.bookinfo.svc.cluster.local:9080"
            pp = Peer(
                p.direction, p.workload, p.peer_key, p.peer_principal, p.local_principal, host, p.upstream_cluster
            )
            for c in codes:
                recs.append(
                    HttpRecord(
                        peer=pp,
                        response_code=c,
                        response_flags="-" if c < 500 else "UF",
                        duration_ms=0.7 + (i * 37 + h * 11 + c) % 900,
                        request_bytes=200 + i,
                        response_bytes=1000 + 13 * h,
                        method="GET",
                        path="/reviews/0",
                    )
                )
    return recs


# One HTTPAccessLogEntry as Envoy 1.40 sent it in the benchmark's `authz+als` mode
# (envoy/authz.yaml, GET /api/v1/products/3 over HTTP/1.1 without mTLS or peer metadata).
CAPTURED_ENTRY = base64.b64decode(
    "CucBEhEKDxIJMTI3LjAuMC4xGKSJAhoRCg8SCTEyNy4wLjAuMRjXigIqCwje1cvYBhDoqa5cMgQQsJoDOgUQx8b7AkIFELXH+wJK"
    "BRDA/ZsDUgUQhMmfA1oFENr3ngNiBRDdw6EDahEKDxIJMTI3LjAuMC4xGKeCAnIRCg8SCTEyNy4wLjAuMRjS4gJ6A2FwcKIBEQoP"
    "EgkxMjcuMC4wLjEYpIkCugEFEPiWogPAAQHSASQwNjg3MmEwOS1kOTU1LTQ4ZWYtYmU5MS1kZDYwNTY3NjcwYzjoAZkJ8AGFBvgB"
    "+QaAAvcIiAIGEAIaXAgBEgRodHRwGg8xMjcuMC4wLjE6MzQxMzUqEi9hcGkvdjEvcHJvZHVjdHMvM0okMDY4NzJhMDktZDk1NS00"
    "OGVmLWJlOTEtZGQ2MDU2NzY3MGM4WPAGcNYGeN8FIh0KAwjIARB8GIAIMgx2aWFfdXBzdHJlYW04YECGAQ=="
)


def captured_entry() -> accesslog_pb2.HTTPAccessLogEntry:
    return accesslog_pb2.HTTPAccessLogEntry.FromString(CAPTURED_ENTRY)


def mesh_entry(peer_value: str, peer_san: str, host: str, code: int, n: int) -> accesslog_pb2.HTTPAccessLogEntry:
    """The captured entry as an inbound sidecar in a mesh logs it: the peer's metadata in the
    ext_authz dynamic metadata (put there by extproc's Check), both URI SANs of the mTLS
    session, and the request's own host, code, flags, duration, sizes and id."""
    e = captured_entry()
    c = e.common_properties
    c.metadata.filter_metadata[AUTHZ_NAMESPACE].update({"x-envoy-peer-metadata": peer_value})
    c.tls_properties.tls_version = accesslog_pb2.TLSProperties.TLSv1_3
    c.tls_properties.peer_certificate_properties.subject_alt_name.add(uri=peer_san)
    c.tls_properties.local_certificate_properties.subject_alt_name.add(uri=LOCAL.identity)
    c.upstream_cluster = "inbound|9080||"
    c.duration.FromNanoseconds(700_000 + (n * 7919) % 90_000_000)
    c.downstream_wire_bytes_received = 200 + n % 300
    c.downstream_wire_bytes_sent = 1000 + (n * 13) % 5000
    if code >= 500:
        c.response_flags.upstream_connection_failure = True
    e.request.authority = host
    e.request.request_method = base_pb2.RequestMethod.Value("GET" if n % 3 else "POST")
    e.request.request_id = f"{n:08x}-d955-48ef-be91-dd60567670c8"
    if n % 3 == 0:
        e.request.request_headers["content-type"] = "application/json"
    e.response.response_code.CopyFrom(wrappers_pb2.UInt32Value(value=code))
    return e


def entry_mix(n_peers: int, n_hosts: int, codes: tuple[int, ...]) -> list[accesslog_pb2.HTTPAccessLogEntry]:
    """The record mix of `http_mix` as access log entries, one per (peer, host, code)."""
    out = []
    for i in range(n_peers):
        w = client(i)
        value = encode(w)
        for h in range(n_hosts):
            for c in codes:
                out.append(mesh_entry(value, w.identity, f"reviews-{h}.bookinfo.svc.cluster.local:9080", c, len(out)))
    return out


def standard_store(**kw: object) -> MetricStore:
    return MetricStore([MetricPlan.standard(m) for m in L.METRICS], **kw)  # type: ignore[arg-type]


def best(fn: Callable[[], object], repeat: int) -> float:
    """Best wall time of one call, in seconds."""
    return min(timeit.repeat(fn, number=1, repeat=repeat))


def per_item_us(fn: Callable[[], object], items: int, repeat: int) -> float:
    return best(fn, repeat) / items * 1e6


# --- (a) recording --------------------------------------------------------------------------


def bench_http(recs: list[HttpRecord], repeat: int, rounds: int) -> list[tuple[str, float]]:
    labeler = Labeler(LOCAL)
    store = standard_store()
    rec = Recorder(labeler, store)
    http = rec.http
    for r in recs:  # warm: peer labels cached, every series exists
        http(r, "access_log")

    def record_all() -> None:
        for _ in range(rounds):
            for r in recs:
                http(r, "access_log")

    n = len(recs) * rounds
    rows = [("Recorder.http (counter + 3 histograms)", per_item_us(record_all, n, repeat))]

    # Counter only (no duration or sizes): the floor of one request.
    bare = [HttpRecord(peer=r.peer, response_code=r.response_code, response_flags=r.response_flags) for r in recs]

    def record_bare() -> None:
        for _ in range(rounds):
            for r in bare:
                http(r, "access_log")

    rows.append(("Recorder.http (counter only)", per_item_us(record_bare, n, repeat)))

    uncached = Recorder(Labeler(LOCAL), standard_store(), shape_cache_size=0).http
    for r in recs:
        uncached(r, "access_log")

    def record_uncached() -> None:
        for _ in range(rounds):
            for r in recs:
                uncached(r, "access_log")

    rows.append(("Recorder.http, shape cache off", per_item_us(record_uncached, n, repeat)))

    # Both sources on, as with ext_proc and the access log: ext_proc claims, the log entry is skipped.
    pairs = []
    for i, r in enumerate(recs):
        a = HttpRecord(**{f: getattr(r, f) for f in HttpRecord.__slots__})
        a.request_id = f"{i:08x}-1b2c-4b8e-9a71-1c2d3e4f5a6b"
        pairs.append(a)

    def record_pairs() -> None:
        for _ in range(rounds):
            for r in pairs:
                http(r, "ext_proc")
                http(r, "access_log")

    rows.append(("ext_proc record + deduped access-log entry", per_item_us(record_pairs, n, repeat)))

    label = labeler.http

    def labels_only() -> None:
        for _ in range(rounds):
            for r in recs:
                label(r)

    rows.append(("  of which Labeler.http (peer part cached)", per_item_us(labels_only, n, repeat)))

    distinct = {r.peer.peer_key + r.peer.host: r.peer for r in recs}.values()

    def compute_peer() -> None:
        for p in distinct:
            labeler._compute(p)

    rows.append(("  peer labels computed (a cache miss)", per_item_us(compute_peer, len(distinct), repeat)))

    cache = PeerCache()
    values = [p.peer_key for p in distinct]
    for v in values:
        cache.get(v)

    def peer_hits() -> None:
        for _ in range(rounds):
            for v in values:
                cache.get(v)

    rows.append(("  PeerCache.get (hit)", per_item_us(peer_hits, len(values) * rounds, repeat)))
    value = values[0]

    def decode_many() -> None:
        for _ in range(200):
            decode(value)

    rows.append((f"  peer.decode, {len(value)} chars (a PeerCache miss)", per_item_us(decode_many, 200, repeat)))
    return rows


def access_log_service(shape_cache_size: int = SHAPE_CACHE_SIZE) -> AccessLogService:
    recorder = Recorder(Labeler(LOCAL), standard_store(), shape_cache_size=shape_cache_size)
    return AccessLogService(recorder, TcpTracker(recorder), PeerCache())


def bench_access_log(
    entries: list[accesslog_pb2.HTTPAccessLogEntry], repeat: int, rounds: int
) -> list[tuple[str, float]]:
    """Per entry, steady state: every peer decoded and every series there after a warm pass.

    The mix holds a thousand parsed entries of a few KB each, more than the CPU's caches; in
    the server each entry was parsed just before it is handled. So the mix is also timed
    parsing each entry first, less the parse alone."""
    inbound = Direction.INBOUND
    rows = []

    def timed(title: str, mix: list[accesslog_pb2.HTTPAccessLogEntry], size: int = SHAPE_CACHE_SIZE) -> float:
        entry = access_log_service(size).http_entry
        for e in mix:
            entry(e, inbound)
        passes = rounds * max(1, len(entries) // len(mix))

        def run() -> None:
            for _ in range(passes):
                for e in mix:
                    entry(e, inbound)

        us = per_item_us(run, len(mix) * passes, repeat)
        rows.append((title, us))
        return us

    timed("http_entry: the captured Envoy entry (no peer, no TLS)", [captured_entry()])
    timed(f"http_entry: mTLS mix of {len(entries)} shapes, steady state", entries)

    raw = [e.SerializeToString() for e in entries]
    parse = accesslog_pb2.HTTPAccessLogEntry.FromString
    entry = access_log_service().http_entry
    for e in entries:
        entry(e, inbound)

    def parse_only() -> None:
        for _ in range(rounds):
            for b in raw:
                parse(b)

    def parse_and_handle() -> None:
        for _ in range(rounds):
            for b in raw:
                entry(parse(b), inbound)

    n = len(raw) * rounds
    both, alone = per_item_us(parse_and_handle, n, repeat), per_item_us(parse_only, n, repeat)
    rows.append(("  the same, each entry just parsed (parse time taken off)", both - alone))
    # A cache of one shape over a mix of a thousand: every entry misses (its peer labels are
    # cached in the Labeler, its series exist).
    timed("  shape-cache miss (a shape not seen lately)", entries, size=1)
    timed("  shape cache off (the HttpRecord path)", entries, size=0)
    return rows


def bench_tcp(n_peers: int, conns_per_peer: int, repeat: int, rounds: int) -> list[tuple[str, float]]:
    store = standard_store()
    rec = Recorder(Labeler(LOCAL), store)
    tracker = TcpTracker(rec)
    report = tracker.report
    conns = [(f"{i}-{j}", p) for i, p in enumerate(peers(n_peers)) for j in range(conns_per_peer)]
    for sid, p in conns:  # open them all: steady state is periodic reports of open connections
        report(sid, p, 100, 100, False)
    state = {"round": 1}

    def periodic() -> None:
        for _ in range(rounds):
            state["round"] += 1
            sent = state["round"] * 4096
            received = state["round"] * 512
            for sid, p in conns:
                report(sid, p, sent, received, False)

    rows = [("TcpTracker.report (periodic, open connection)", per_item_us(periodic, len(conns) * rounds, repeat))]
    seq = {"n": 0}

    def lifecycle() -> None:
        base = seq["n"]
        seq["n"] += len(conns)
        for k, (_, p) in enumerate(conns):
            sid = f"c{base + k}"
            report(sid, p, 1000, 100, False)
            report(sid, p, 5000, 300, False)
            report(sid, p, 9000, 700, True)

    rows.append(("TcpTracker.report (open, periodic, end: per report)", per_item_us(lifecycle, len(conns) * 3, repeat)))
    assert len(tracker.connections) == len(conns)
    return rows


# --- (b) rendering --------------------------------------------------------------------------


def label_sets(n: int) -> list[tuple[str, ...]]:
    """n distinct 25-label tuples: peers x hosts x response codes, all through the Labeler."""
    labeler = Labeler(LOCAL)
    n_hosts = 25
    n_peers = -(-n // (n_hosts * len(CODES)))
    out = []
    for p in peers(n_peers):
        for h in range(n_hosts):
            pp = Peer(p.direction, p.workload, p.peer_key, p.peer_principal, p.local_principal, f"svc-{h}:9080")
            for c in CODES:
                out.append(labeler.http(HttpRecord(peer=pp, response_code=c)))
                if len(out) == n:
                    return out
    return out


def counter_store(sets: list[tuple[str, ...]]) -> MetricStore:
    store = standard_store(max_series=len(sets) * 4 + 10)
    t = store.tables_for(False)[L.REQUESTS.name]
    for i, base in enumerate(sets):
        t.add(base, None, 1 + i % 17)
    return store


def http_store(sets: list[tuple[str, ...]]) -> MetricStore:
    store = standard_store(max_series=len(sets) * 4 + 10)
    rec = Recorder(Labeler(LOCAL), store)
    tables = store.tables_for(False)
    for i, base in enumerate(sets):
        tables[L.REQUESTS.name].add(base, None, 1)
        tables[L.REQUEST_DURATION.name].observe(base, None, 0.3 + (i * 7) % 2000)
        tables[L.REQUEST_BYTES.name].observe(base, None, 100 + i % 5000)
        tables[L.RESPONSE_BYTES.name].observe(base, None, 1000 + (i * 13) % 90000)
    del rec
    return store


def bench_render(series: int, repeat: int) -> tuple[list[tuple[str, float, int, int, int]], list[tuple[str, ...]]]:
    rows = []
    sets = label_sets(series)
    assert len(set(sets)) == series
    for title, build, sets_used in (
        (f"render: istio_requests_total, {series:,} series", counter_store, sets),
        (
            f"render: 4 HTTP metrics x {series // 4:,} label sets",
            http_store,
            sets[: series // 4],
        ),
    ):
        gc.collect()
        tracemalloc.start()
        store = build(sets_used)
        mem = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        n_series = sum(store.series_counts().values())
        assert n_series == series, store.series_counts()
        text = store.render()
        ms = best(store.render, repeat) * 1e3
        rows.append((title, ms, len(text.encode()), text.count("\n"), mem // n_series))
    return rows, sets


# --- (c) prometheus_client ------------------------------------------------------------------


def bench_prometheus_client(
    recs: list[HttpRecord], sets: list[tuple[str, ...]], repeat: int, micro_repeat: int, rounds: int
) -> list[tuple[str, str]]:
    labeler = Labeler(LOCAL)
    mix = [labeler.http(r) for r in recs]
    reg = CollectorRegistry()
    c = Counter("istio_requests", "Requests", list(L.LABELS), registry=reg)
    for v in mix:
        c.labels(*v).inc()

    def inc_all() -> None:
        for _ in range(rounds):
            for v in mix:
                c.labels(*v).inc()

    rows = [("Counter.labels(*25).inc()", f"{per_item_us(inc_all, len(mix) * rounds, micro_repeat):9.2f} µs")]
    h = Histogram("istio_request_duration_milliseconds", "d", list(L.LABELS), registry=reg, buckets=L.DEFAULT_BUCKETS)
    for v in mix:
        h.labels(*v).observe(3.0)

    def observe_all() -> None:
        for _ in range(rounds):
            for v in mix:
                h.labels(*v).observe(3.0)

    rows.append(
        ("Histogram.labels(*25).observe()", f"{per_item_us(observe_all, len(mix) * rounds, micro_repeat):9.2f} µs")
    )

    reg = CollectorRegistry()
    c = Counter("istio_requests", "Requests", list(L.LABELS), registry=reg)
    for i, v in enumerate(sets):
        c.labels(*v).inc(1 + i % 17)
    text = generate_latest(reg)
    lines = text.count(b"\n")
    ms = best(lambda: generate_latest(reg), repeat) * 1e3
    rows.append(
        (
            f"generate_latest: counter, {len(sets):,} series",
            f"{ms:9.1f} ms  ({len(text):,} bytes, {lines:,} lines)",
        )
    )
    # prometheus_client also writes a `_created` sample per counter series; without them:
    prometheus_client.disable_created_metrics()
    try:
        text = generate_latest(reg)
        lines = text.count(b"\n")
        ms = best(lambda: generate_latest(reg), repeat) * 1e3
    finally:
        prometheus_client.enable_created_metrics()
    rows.append(
        (
            "  the same with disable_created_metrics()",
            f"{ms:9.1f} ms  ({len(text):,} bytes, {lines:,} lines)",
        )
    )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=5, help="runs per scrape figure (per-record figures: 4x as many)")
    p.add_argument("--peers", type=int, default=50)
    p.add_argument("--hosts", type=int, default=5)
    p.add_argument("--codes", type=int, default=4, choices=range(1, len(CODES) + 1))
    p.add_argument("--rounds", type=int, default=3, help="passes over the mix per timed run")
    p.add_argument("--series", type=int, default=10_000)
    args = p.parse_args()
    started = time.perf_counter()
    micro_repeat = 4 * args.repeat  # many short runs: the best of them survives a noisy neighbour

    recs = http_mix(args.peers, args.hosts, CODES[: args.codes])
    print(
        f"python {platform.python_version()} ({platform.python_implementation()}) on {platform.machine()}, "
        f"{os.cpu_count()} CPUs, prometheus_client {version('prometheus-client')}; "
        f"best of {micro_repeat} (per record) / {args.repeat} (scrapes) runs"
    )
    print(
        f"HTTP mix: {args.peers} peers x {args.hosts} hosts x {args.codes} codes = {len(recs)} label sets, "
        f"steady state, {args.rounds} passes per run"
    )
    for label, us in bench_http(recs, micro_repeat, args.rounds):
        print(f"  {label:56} {us:9.2f} µs")
    entries = entry_mix(args.peers, args.hosts, CODES[: args.codes])
    print(f"Access log: AccessLogService.http_entry, inbound, {len(entries)} entries")
    for label, us in bench_access_log(entries, micro_repeat, args.rounds):
        print(f"  {label:56} {us:9.2f} µs")
    tcp_conns = 20
    print(f"TCP: {args.peers} peers x {tcp_conns} connections")
    for label, us in bench_tcp(args.peers, tcp_conns, micro_repeat, args.rounds):
        print(f"  {label:56} {us:9.2f} µs")
    print("Scrape (MetricStore.render)")
    render_rows, sets = bench_render(args.series, args.repeat)
    print(f"  {'':56} {'time':>9}    {'bytes':>11} {'lines':>9} {'B/series':>9}")
    for label, ms, size, lines, per_series in render_rows:
        print(f"  {label:56} {ms:9.1f} ms {size:11,} {lines:9,} {per_series:9,}")
    print("prometheus_client, same label sets")
    for label, value in bench_prometheus_client(recs, sets, args.repeat, micro_repeat, args.rounds):
        print(f"  {label:56} {value}")
    print(f"(total {time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
