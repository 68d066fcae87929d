"""The Recorder's per-shape cache: label tuples and series cells resolved once per request
shape, with exactly the metrics of the uncached path (`shape_cache_size=0`)."""

from __future__ import annotations

import random

from extproc.telemetry import labels as L
from extproc.telemetry.overrides import build_plan
from extproc.telemetry.peer import Workload, encode
from extproc.telemetry.record import Direction, HttpRecord, Labeler, Peer
from extproc.telemetry.recorder import Recorder, Telemetry, WorkloadSinks
from extproc.telemetry.resource import TagOverride
from extproc.telemetry.store import MetricPlan, MetricStore

LOCAL = Workload.from_labels(
    {"app": "reviews", "version": "v2"},
    workload_name="reviews-v2",
    namespace="bookinfo",
    identity="spiffe://cluster.local/ns/bookinfo/sa/reviews",
)
CLIENTS = [
    Workload.from_labels(
        {"app": f"c{i}"}, workload_name=f"c{i}-v1", namespace=f"ns{i % 3}", identity=f"spiffe://td/ns/ns{i % 3}/sa/c{i}"
    )
    for i in range(6)
]
STANDARD = [MetricPlan.standard(m) for m in L.METRICS]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def stores(**kw: object) -> tuple[MetricStore, MetricStore]:
    return MetricStore(STANDARD, **kw), MetricStore(STANDARD, **kw)  # type: ignore[arg-type]


def pair(cached: MetricStore, uncached: MetricStore, size: int = 8192) -> tuple[Recorder, Recorder]:
    return Recorder(Labeler(LOCAL), cached, shape_cache_size=size), Recorder(
        Labeler(LOCAL), uncached, shape_cache_size=0
    )


def random_record(rnd: random.Random, i: int) -> HttpRecord:
    """A request of a small random shape space (so shapes repeat), with every optional value
    sometimes missing, gRPC with message counts, flags and both directions."""
    w = rnd.choice([*CLIENTS, None])
    direction = rnd.choice([Direction.INBOUND, Direction.OUTBOUND])
    by_value = rnd.random() < 0.7  # adapters key peers by header value; some give only the Workload
    peer = Peer(
        direction,
        workload=w,
        peer_key=encode(w) if w is not None and by_value else "",
        peer_principal=w.identity if w is not None and rnd.random() < 0.8 else "",
        local_principal=LOCAL.identity if rnd.random() < 0.8 else "",
        host=rnd.choice(["reviews:9080", "reviews.bookinfo:9080", ""]),
        upstream_cluster=rnd.choice(["inbound|9080||", "PassthroughCluster", ""]),
        route_name=rnd.choice(["", "allow_any"]),
    )
    grpc = rnd.random() < 0.3
    return HttpRecord(
        peer=peer,
        grpc=grpc,
        response_code=rnd.choice([200, 200, 200, 404, 503, 0]),
        grpc_status=rnd.choice(["0", "14", ""]) if grpc else rnd.choice(["", "5"]),
        response_flags=rnd.choice(["-", "-", "UF", "UF,URX", ""]),
        duration_ms=None if rnd.random() < 0.1 else rnd.random() * 3000,
        request_bytes=None if rnd.random() < 0.1 else rnd.randrange(0, 100_000),
        response_bytes=None if rnd.random() < 0.1 else rnd.randrange(0, 100_000),
        request_messages=rnd.choice([None, 0, 1, 7]) if grpc or rnd.random() < 0.1 else None,
        response_messages=rnd.choice([None, 0, 2]) if grpc or rnd.random() < 0.1 else None,
        request_id=f"r{i}",
    )


def record_both(cached: Recorder, uncached: Recorder, records: list[HttpRecord], source: str = "access_log") -> None:
    for r in records:
        cached.http(r, source)
        uncached.http(r, source)


def assert_same(a: MetricStore, b: MetricStore) -> None:
    assert a.render() == b.render()
    assert a.series_counts() == b.series_counts()
    assert a.overflow_counts() == b.overflow_counts()
    assert a.count == b.count


def test_the_cache_gives_the_series_and_values_of_the_uncached_path() -> None:
    rnd = random.Random(7)
    a, b = stores()
    cached, uncached = pair(a, b)
    fresh = [random_record(rnd, i) for i in range(2000)]  # mostly new shapes
    repeats = [rnd.choice(fresh[:200]) for _ in range(3000)]  # a working set of known shapes
    record_both(cached, uncached, fresh + repeats)
    assert_same(a, b)
    assert cached.stats == uncached.stats
    assert cached.shape_hits >= 3000 and cached.shape_misses == len(cached._shapes)
    assert cached.shape_hits + cached.shape_misses == 5000
    assert uncached.shape_hits == uncached.shape_misses == 0 and not uncached._shapes


def test_the_access_log_entry_point_records_what_http_records() -> None:
    """`http_shape` (no HttpRecord) and `http` (from the record) land in the same cells."""
    rnd = random.Random(3)
    a, b = stores()
    lean, uncached = pair(a, b)
    for i in range(2000):
        r = random_record(rnd, i)
        p = r.peer
        value = p.peer_key
        shape = (
            p.direction is Direction.OUTBOUND,
            value,
            p.peer_principal,
            p.local_principal,
            p.host,
            p.upstream_cluster,
            p.route_name,
            r.grpc,
            r.response_code,
            r.grpc_status if r.grpc else "",
            r.response_flags or "-",
            p.service,
        )
        # As the adapter builds it: the peer is known by its header value only.
        as_logged = HttpRecord(**{f: getattr(r, f) for f in HttpRecord.__slots__})  # type: ignore[arg-type]
        as_logged.peer = Peer(
            p.direction, p.workload if value else None, value, p.peer_principal, p.local_principal, p.host,
            p.upstream_cluster, p.route_name, p.service,
        )  # fmt: skip
        assert lean.http_shape(
            shape,
            as_logged.peer.workload,
            r.duration_ms,
            r.request_bytes,
            r.response_bytes,
            r.request_messages if r.grpc else None,
            r.response_messages if r.grpc else None,
        )
        uncached.http(as_logged, "access_log")
    assert_same(a, b)
    assert lean.stats == uncached.stats


def test_overflow_is_counted_per_record_exactly_as_without_the_cache() -> None:
    rnd = random.Random(11)
    a, b = stores(max_series=40)
    cached, uncached = pair(a, b)
    records = [random_record(rnd, i) for i in range(3000)]
    record_both(cached, uncached, records)
    assert_same(a, b)
    assert sum(a.overflow_counts().values()) > 1000
    assert a.count <= 40 + 2 * len(L.METRICS)  # the overflow series of each table, per direction


def test_a_plan_swap_drops_the_cache_and_new_records_land_in_the_new_tables() -> None:
    rnd = random.Random(5)
    a, b = stores()
    cached, uncached = pair(a, b)
    record_both(cached, uncached, [random_record(rnd, i) for i in range(500)])
    assert cached._shapes
    # A Telemetry reload removes response_code from the request count (a projection that
    # reads no record, so the cache is bypassed in both directions while it is in place).
    removed = [build_plan(m, {"response_code": TagOverride(operation="REMOVE")}) if m is L.REQUESTS else
               MetricPlan.standard(m) for m in L.METRICS]  # fmt: skip
    for s in (a, b):
        s.set_plans(removed, removed)
    record_both(cached, uncached, [random_record(rnd, i) for i in range(500)])
    assert not cached._shapes and cached.shape_resets == 1
    assert_same(a, b)
    # Back to the standard plans: every table is new, and the cache fills again.
    for s in (a, b):
        s.set_plans(STANDARD, STANDARD)
    record_both(cached, uncached, [random_record(rnd, i) for i in range(500)])
    assert cached._shapes
    assert_same(a, b)


def test_a_plan_swap_that_keeps_the_tables_still_leaves_correct_counts() -> None:
    a, b = stores()
    cached, uncached = pair(a, b)
    r = HttpRecord(peer=Peer(Direction.INBOUND, CLIENTS[0], encode(CLIENTS[0])), response_code=200, duration_ms=3.0)
    record_both(cached, uncached, [r] * 3)
    for s in (a, b):
        s.set_plans(STANDARD, STANDARD)  # equal plans: the tables and their series are kept
    record_both(cached, uncached, [r] * 2)
    assert_same(a, b)
    assert "} 5\n" in a.render()


def test_an_expired_series_that_comes_back_counts_from_zero_in_a_live_series() -> None:
    clock = Clock()
    a, b = stores(idle_expiry_s=30.0, clock=clock)
    cached, uncached = pair(a, b)
    hot = HttpRecord(peer=Peer(Direction.INBOUND, CLIENTS[0], encode(CLIENTS[0])), response_code=200, request_bytes=9)
    cold = HttpRecord(peer=Peer(Direction.INBOUND, CLIENTS[1], encode(CLIENTS[1])), response_code=200, request_bytes=9)
    record_both(cached, uncached, [hot, cold, hot])
    for step in range(1, 5):  # the hot shape keeps being recorded (cache hits), the cold one not
        clock.now = 20.0 * step
        assert a.tick() == b.tick()
        record_both(cached, uncached, [hot])
    assert a.evicted == b.evicted == 2  # cold's counter and histogram; hot was stamped by its hits
    assert cached.shape_resets >= 1
    assert_same(a, b)
    record_both(cached, uncached, [cold, cold])  # back: a new series, not the dropped cell
    assert_same(a, b)
    text = a.render()
    assert f'source_workload="{CLIENTS[1].workload_name}"' in text
    assert text.count("istio_requests_total{") == 2


def test_hits_stamp_their_series_so_a_busy_series_never_expires() -> None:
    clock = Clock()
    store = MetricStore(STANDARD, idle_expiry_s=30.0, clock=clock)
    rec = Recorder(Labeler(LOCAL), store)
    r = HttpRecord(peer=Peer(Direction.INBOUND, CLIENTS[0], encode(CLIENTS[0])), response_code=200, duration_ms=1.0)
    rec.http(r, "access_log")
    for step in range(1, 20):
        clock.now = 10.0 * step
        store.tick()
        rec.http(r, "access_log")
        assert rec.shape_hits == step
    assert store.evicted == 0
    assert "istio_requests_total{" in store.render() and "} 20\n" in store.render()


def test_the_cache_is_bounded_and_evicts_its_oldest_shape() -> None:
    rnd = random.Random(13)
    a, b = stores()
    cached, uncached = pair(a, b, size=16)
    record_both(cached, uncached, [random_record(rnd, i) for i in range(3000)])
    assert len(cached._shapes) <= 16
    assert cached.shape_evictions > 0
    assert cached.shape_misses == cached.shape_evictions + len(cached._shapes)
    assert_same(a, b)


def test_tag_overrides_that_read_the_record_bypass_the_cache() -> None:
    path_tag = [
        build_plan(m, {"request_path": TagOverride(value="request.path")}) if m is L.REQUEST_DURATION else
        MetricPlan.standard(m) for m in L.METRICS
    ]  # fmt: skip
    a = MetricStore(path_tag, STANDARD)  # SERVER (inbound) overridden, CLIENT standard
    b = MetricStore(path_tag, STANDARD)
    cached, uncached = pair(a, b)
    p = Peer(Direction.INBOUND, CLIENTS[0], encode(CLIENTS[0]))
    shape = (False, p.peer_key, "", "", "", "", "", False, 200, "", "-", None)
    assert not cached.http_shape(shape, p.workload, 1.0, 1, 1)  # the adapter must build a record
    assert cached.stats.http["access_log"] == 0
    for path in ("/a", "/b", "/a"):
        r = HttpRecord(peer=p, response_code=200, duration_ms=2.0, path=path)
        record_both(cached, uncached, [r])
    assert not cached._shapes  # inbound bypassed it
    text = a.render()
    assert 'request_path="/a"' in text and 'request_path="/b"' in text
    outbound = HttpRecord(peer=Peer(Direction.OUTBOUND, CLIENTS[1], encode(CLIENTS[1])), response_code=200)
    record_both(cached, uncached, [outbound, outbound])
    assert len(cached._shapes) == 1 and cached.shape_hits == 1  # outbound plans are standard
    assert_same(a, b)


def test_disabled_metrics_get_no_series_through_the_cache() -> None:
    plans = [build_plan(m, {}, disabled=True) if m is L.REQUEST_BYTES else MetricPlan.standard(m) for m in L.METRICS]
    a, b = MetricStore(plans), MetricStore(plans)
    cached, uncached = pair(a, b)
    r = HttpRecord(peer=Peer(Direction.INBOUND), response_code=200, request_bytes=5, response_bytes=6)
    record_both(cached, uncached, [r, r])
    assert_same(a, b)
    assert "istio_request_bytes" not in a.render() and "istio_response_bytes_sum" in a.render()


def test_ext_proc_claims_still_skip_the_access_log_entry_of_the_same_request() -> None:
    a, b = stores()
    cached, uncached = pair(a, b)
    p = Peer(Direction.INBOUND, CLIENTS[0], encode(CLIENTS[0]))
    shape = (False, p.peer_key, "", "", "", "", "", False, 200, "", "-", None)
    for rec in (cached, uncached):
        rec.http(HttpRecord(peer=p, response_code=200, request_id="r1"), "ext_proc")
    assert cached.claims
    assert cached.http_shape(shape, p.workload, None, None, None, request_id="r1")  # skipped, a duplicate
    uncached.http(HttpRecord(peer=p, response_code=200, request_id="r1"), "access_log")
    assert cached.stats == uncached.stats
    assert cached.stats.http_duplicates == 1 and cached.stats.http == {"access_log": 0, "ext_proc": 1}
    assert not cached.claims
    assert cached.http_shape(shape, p.workload, None, None, None, request_id="r1")  # no claim left: counted
    assert cached.stats.http["access_log"] == 1
    uncached.http(HttpRecord(peer=p, response_code=200, request_id="r1"), "access_log")
    assert_same(a, b)


def test_workloads_in_central_mode_keep_their_own_shapes() -> None:
    """One store, one recorder per local workload: the same request shape is a different series
    for each workload, so no workload may see another's cached cells."""
    t = Telemetry.create(LOCAL)
    sinks = WorkloadSinks(t.store, None, t.recorder.stats)
    other = Workload.from_labels({"app": "ratings"}, workload_name="ratings-v1", namespace="bookinfo")
    p = Peer(Direction.INBOUND, CLIENTS[0], encode(CLIENTS[0]), host="svc:80")
    for local in (LOCAL, other, LOCAL):
        sinks.get(local)[0].http(HttpRecord(peer=p, response_code=200), "access_log")
    text = t.store.render()
    assert 'destination_workload="reviews-v2"' in text and 'destination_workload="ratings-v1"' in text
    lines = [ln for ln in text.splitlines() if ln.startswith("istio_requests_total{")]
    assert sorted(ln.rsplit(" ", 1)[1] for ln in lines) == ["1", "2"]


def test_ext_proc_claims_last_only_as_long_as_an_access_log_entry_can_come() -> None:
    from extproc.telemetry.recorder import CLAIM_WINDOW_S, Claims

    now = [0.0]
    claims = Claims(clock=lambda: now[0])
    claims.claim("a")
    claims.claim("b")
    now[0] = CLAIM_WINDOW_S  # a new window: a and b are still matched from the previous one
    claims.claim("c")
    assert claims.consume("a") and not claims.consume("a")
    assert len(claims) == 2
    now[0] = 2 * CLAIM_WINDOW_S  # another: b's window is dropped, unmatched
    claims.claim("d")
    assert not claims.consume("b")
    assert claims.consume("c") and claims.consume("d")
    assert not claims
