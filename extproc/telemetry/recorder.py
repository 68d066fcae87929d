"""Turns records into metric updates, once per request, whichever source reports it.

Sources: the access log service (HTTP entries at stream end; TCP entries periodically
and at connection end) and ext_proc (the response phase of each HTTP request). When one
Envoy enables both for the same requests, ext_proc's report wins: it claims the request
by its `x-request-id`, and the access log entry with that id is then skipped. A request
ext_proc never saw the response of (a reply Envoy sent before the ext_proc filter, a
failed side stream) is still counted from the access log.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from extproc.lru import CacheCounters, LruCache
from extproc.telemetry import labels as L
from extproc.telemetry.directory import PeerDirectory
from extproc.telemetry.overrides import TelemetryPlans
from extproc.telemetry.peer import PeerCache, Workload
from extproc.telemetry.record import Direction, HttpRecord, Labeler, Peer, ServiceInfo, TcpRecord
from extproc.telemetry.store import HistogramSeries, MetricPlan, MetricStore, Series, Table

MAX_CLAIMS = 100_000
# An access log entry reaches extproc within Envoy's flush interval (1 s in the shipped
# configs) of the request's end; a claim older than two windows can no longer be matched.
CLAIM_WINDOW_S = 5.0
SHAPE_CACHE_SIZE = 8192
WORKLOAD_SHAPE_CACHE_SIZE = 1024  # per workload in central mode, where there may be a thousand

# What an HTTP request's labels depend on, and nothing else: (outbound, peer key (the raw
# x-envoy-peer-metadata value, or the Workload when there is none), peer principal, local
# principal, host, upstream cluster, route name, grpc, response code, grpc status ("" unless
# grpc), response flags ("-" when none), the upstream cluster's logged service or None).
# Requests of one shape land in the same series.
HttpShape = tuple[bool, object, str, str, str, str, str, bool, int, str, str, ServiceInfo | None]


def _enabled(tables: dict[str, Table], name: str) -> Table | None:
    t = tables.get(name)
    return None if t is None or t.plan.disabled else t


class _HttpTables:
    """The enabled tables an HTTP record feeds in one direction, looked up once per store
    generation instead of by name on every record."""

    __slots__ = (
        "cacheable",
        "duration",
        "request_bytes",
        "request_messages",
        "requests",
        "response_bytes",
        "response_messages",
    )

    def __init__(self, tables: dict[str, Table], cache: bool) -> None:
        self.requests = _enabled(tables, L.REQUESTS.name)
        self.duration = _enabled(tables, L.REQUEST_DURATION.name)
        self.request_bytes = _enabled(tables, L.REQUEST_BYTES.name)
        self.response_bytes = _enabled(tables, L.RESPONSE_BYTES.name)
        self.request_messages = _enabled(tables, L.REQUEST_MESSAGES.name)
        self.response_messages = _enabled(tables, L.RESPONSE_MESSAGES.name)
        used = (
            self.requests,
            self.duration,
            self.request_bytes,
            self.response_bytes,
            self.request_messages,
            self.response_messages,
        )
        # A plan that projects labels may read the record (a tag override expression), so
        # its series is not a function of the shape: no shape cache for this direction.
        self.cacheable = cache and all(t.plan.project is None for t in used if t is not None)


class _Shape:
    """One request shape's label tuple and series cells.

    A cell stays None until a record of the shape first needs it (so no empty series
    appears for a value a record did not carry), and while its series would overflow (each
    overflowing record must be counted, so those go through `Table.add`/`observe`)."""

    __slots__ = (
        "base",
        "duration",
        "request_bytes",
        "request_messages",
        "requests",
        "response_bytes",
        "response_messages",
    )

    def __init__(self, base: tuple[str, ...]) -> None:
        self.base = base
        self.requests: Series | None = None
        self.duration: HistogramSeries | None = None
        self.request_bytes: HistogramSeries | None = None
        self.response_bytes: HistogramSeries | None = None
        self.request_messages: Series | None = None
        self.response_messages: Series | None = None


class Claims:
    """Request ids ext_proc has recorded, kept only as long as their access log entries can come.

    Two generations of at most CLAIM_WINDOW_S each: when the current one is that old it becomes
    the previous one and the previous one is dropped, so a claim lives between one and two
    windows. Without this an ext_proc-only deployment (no HTTP access log to consume them)
    would hold MAX_CLAIMS ids, about 15 MB, for nothing.
    """

    __slots__ = ("_clock", "_current", "_previous", "_started")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._current: dict[str, int] = {}
        self._previous: dict[str, int] = {}
        self._started = clock()

    def __bool__(self) -> bool:
        return bool(self._current) or bool(self._previous)

    def __len__(self) -> int:
        return len(self._current) + len(self._previous)

    def claim(self, rid: str) -> None:
        now = self._clock()
        if now - self._started >= CLAIM_WINDOW_S or len(self._current) >= MAX_CLAIMS // 2:
            self._previous, self._current, self._started = self._current, {}, now
        current = self._current
        current[rid] = current.get(rid, 0) + 1

    def consume(self, rid: str) -> bool:
        """Whether `rid` was claimed (the claim is used up)."""
        for claims in (self._current, self._previous):
            n = claims.get(rid)
            if n is not None:
                if n > 1:
                    claims[rid] = n - 1
                else:
                    del claims[rid]
                return True
        return False


@dataclass
class RecorderStats:
    http: dict[str, int]  # source -> requests recorded
    http_duplicates: int = 0  # access log entries skipped because ext_proc counted them
    tcp_reports: int = 0


class Recorder:
    """Records HTTP requests and TCP reports into the store.

    HTTP requests go through a cache keyed by their shape (`HttpShape`): the label tuple and
    the series cells of a shape are resolved once, so a repeat costs a dict lookup and a few
    integer and bisect updates. The cache is bounded (oldest shape out first), dropped
    whenever the store's generation changes (a plan swap, idle series expired), bypassed in
    a direction whose plans project labels from the record (tag overrides), and off with
    `shape_cache_size=0`, which records exactly as the cached path does, only slower. It
    never holds an overflow series, so each overflowing record is still counted, and each
    hit stamps the series it updates, so idle expiry sees them in use.
    """

    def __init__(
        self,
        labeler: Labeler,
        store: MetricStore,
        stats: RecorderStats | None = None,
        shape_cache_size: int = SHAPE_CACHE_SIZE,
    ) -> None:
        self.labeler = labeler
        self.store = store
        self.stats = stats if stats is not None else RecorderStats(http={"access_log": 0, "ext_proc": 0})
        self.shape_cache_size = shape_cache_size
        # ext_proc's requests by id, until their access log entries come (then skipped as
        # duplicates). Empty unless ext_proc reports too: the access log reads no request id then.
        self.claims = Claims()
        self._shapes: OrderedDict[HttpShape, _Shape] = OrderedDict()
        self.shape_hits = 0
        self.shape_misses = 0
        self.shape_evictions = 0  # bound reached: the oldest shape made room
        self.shape_resets = 0  # the whole cache dropped: the store's tables or series changed
        self._generation = -1
        self._inbound = self._outbound = _HttpTables({}, False)

    def _refresh(self) -> None:
        store = self.store
        self._generation = store.generation
        if self._shapes:
            self._shapes.clear()
            self.shape_resets += 1
        cache = self.shape_cache_size > 0
        self._inbound = _HttpTables(store.inbound, cache)
        self._outbound = _HttpTables(store.outbound, cache)

    def _duplicate(self, rid: str, source: str) -> bool:
        """ext_proc claims its requests by id; the access log entry of a claimed one is skipped."""
        if source == "ext_proc":
            self.claims.claim(rid)
            return False
        if not self.claims.consume(rid):
            return False
        self.stats.http_duplicates += 1
        return True

    def http(self, r: HttpRecord, source: str) -> None:
        """Record one finished request (ext_proc, or an access log entry that needs its record)."""
        if self.store.generation != self._generation:
            self._refresh()
        p = r.peer
        outbound = p.direction is Direction.OUTBOUND
        tables = self._outbound if outbound else self._inbound
        grpc = r.grpc
        if tables.cacheable:
            self.http_shape(
                (
                    outbound,
                    p.peer_key or p.workload,
                    p.peer_principal,
                    p.local_principal,
                    p.host,
                    p.upstream_cluster,
                    p.route_name,
                    grpc,
                    r.response_code,
                    r.grpc_status if grpc else "",
                    r.response_flags or "-",
                    p.service,
                ),
                p.workload,
                r.duration_ms,
                r.request_bytes,
                r.response_bytes,
                r.request_messages if grpc else None,
                r.response_messages if grpc else None,
                r.request_id,
                source,
                p,
            )
            return
        rid = r.request_id
        if rid and (source == "ext_proc" or self.claims) and self._duplicate(rid, source):
            return
        stats = self.stats.http
        stats[source] = stats.get(source, 0) + 1
        base = self.labeler.http(r)
        if (t := tables.requests) is not None:
            t.add(base, r, 1)
        if r.duration_ms is not None and (t := tables.duration) is not None:
            t.observe(base, r, r.duration_ms)
        if r.request_bytes is not None and (t := tables.request_bytes) is not None:
            t.observe(base, r, r.request_bytes)
        if r.response_bytes is not None and (t := tables.response_bytes) is not None:
            t.observe(base, r, r.response_bytes)
        if grpc:
            if r.request_messages and (t := tables.request_messages) is not None:
                t.add(base, r, r.request_messages)
            if r.response_messages and (t := tables.response_messages) is not None:
                t.add(base, r, r.response_messages)

    def http_shape(
        self,
        shape: HttpShape,
        workload: Workload | None,
        duration_ms: float | None,
        request_bytes: int | None,
        response_bytes: int | None,
        request_messages: int | None = None,
        response_messages: int | None = None,
        request_id: str = "",
        source: str = "access_log",
        peer: Peer | None = None,
    ) -> bool:
        """Record one finished request from its shape and values, without an `HttpRecord`.

        `shape[1]` is the raw peer metadata value ("" when none) and `workload` what it
        decodes to (`peer`, when the caller has one, is used as it is). Returns False, having
        recorded nothing, when this direction needs the record (tag overrides) or the cache
        is off: the caller then builds an `HttpRecord` and calls `http`.

        The updates are `Table.add`/`observe`'s, written out: this runs once per request.
        """
        store = self.store
        if store.generation != self._generation:
            self._refresh()
        tables = self._outbound if shape[0] else self._inbound
        if not tables.cacheable:
            return False
        if request_id and (source == "ext_proc" or self.claims) and self._duplicate(request_id, source):
            return True
        try:
            self.stats.http[source] += 1
        except KeyError:
            self.stats.http[source] = 1
        found = self._shapes.get(shape)
        if found is None:
            found = self._new_shape(shape, workload, peer)
        else:
            self.shape_hits += 1
        epoch = store.epoch
        s = found.requests
        if s is not None:
            s.value += 1
            s.touched = epoch
        elif tables.requests is not None:
            self._late(found, "requests", tables.requests, 1)
        buckets = store.buckets
        if duration_ms is not None:
            h = found.duration
            if h is not None:
                h.counts[bisect_left(buckets, duration_ms)] += 1
                h.sum += duration_ms
                h.touched = epoch
            elif tables.duration is not None:
                self._late(found, "duration", tables.duration, duration_ms)
        if request_bytes is not None:
            h = found.request_bytes
            if h is not None:
                h.counts[bisect_left(buckets, request_bytes)] += 1
                h.sum += request_bytes
                h.touched = epoch
            elif tables.request_bytes is not None:
                self._late(found, "request_bytes", tables.request_bytes, request_bytes)
        if response_bytes is not None:
            h = found.response_bytes
            if h is not None:
                h.counts[bisect_left(buckets, response_bytes)] += 1
                h.sum += response_bytes
                h.touched = epoch
            elif tables.response_bytes is not None:
                self._late(found, "response_bytes", tables.response_bytes, response_bytes)
        if request_messages and shape[7]:
            s = found.request_messages
            if s is not None:
                s.value += request_messages
                s.touched = epoch
            elif tables.request_messages is not None:
                self._late(found, "request_messages", tables.request_messages, request_messages)
        if response_messages and shape[7]:
            s = found.response_messages
            if s is not None:
                s.value += response_messages
                s.touched = epoch
            elif tables.response_messages is not None:
                self._late(found, "response_messages", tables.response_messages, response_messages)
        return True

    def _new_shape(self, shape: HttpShape, workload: Workload | None, peer: Peer | None) -> _Shape:
        self.shape_misses += 1
        if peer is None:
            outbound, key, peer_san, local_san, host, cluster, route = shape[:7]
            peer = Peer(
                Direction.OUTBOUND if outbound else Direction.INBOUND,
                workload,
                key if isinstance(key, str) else "",
                peer_san,
                local_san,
                host,
                cluster,
                route,
                shape[11],
            )
        found = _Shape(self.labeler.http_labels(peer, shape[7], shape[8], shape[9], shape[10]))
        shapes = self._shapes
        if len(shapes) >= self.shape_cache_size:
            shapes.popitem(last=False)
            self.shape_evictions += 1
        shapes[shape] = found
        return found

    def _late(self, shape: _Shape, slot: str, table: Table, value: float) -> None:
        """A record into a table whose cell the shape does not hold yet: resolve the cell and
        keep it, or, while the store is full, record into the overflow series exactly as the
        uncached path does (and try again with the shape's next record)."""
        cell = table.resolve(shape.base)
        if cell is None:
            if table.metric.kind is L.Kind.COUNTER:
                table.add(shape.base, None, int(value))
            else:
                table.observe(shape.base, None, value)
            return
        setattr(shape, slot, cell)
        cell.touched = self.store.epoch
        if isinstance(cell, HistogramSeries):
            cell.counts[bisect_left(self.store.buckets, value)] += 1
            cell.sum += value
        else:
            cell.value += int(value)

    def tcp(self, r: TcpRecord) -> None:
        self.stats.tcp_reports += 1
        base = self.labeler.tcp(r)
        tables = self.store.tables_for(r.peer.direction is Direction.OUTBOUND)
        if r.opened and (t := _enabled(tables, L.TCP_OPENED.name)) is not None:
            t.add(base, r, 1)
        if r.sent_bytes and (t := _enabled(tables, L.TCP_SENT.name)) is not None:
            t.add(base, r, r.sent_bytes)
        if r.received_bytes and (t := _enabled(tables, L.TCP_RECEIVED.name)) is not None:
            t.add(base, r, r.received_bytes)
        if r.closed and (t := _enabled(tables, L.TCP_CLOSED.name)) is not None:
            t.add(base, r, 1)


@dataclass(slots=True)
class _Connection:
    peer: Peer
    response_flags: str  # fixed at the first report, as Istio fixes a connection's labels once
    addresses: tuple[str, str]
    sent: int = 0
    received: int = 0
    last_seen: int = 0  # tracker generation


class TcpTracker:
    """Turns cumulative per-connection byte counts into deltas.

    Envoy's TCP access log entries carry bytes since the connection began (periodic
    entries and the final one alike), so each connection's last totals are kept by
    stream id until its end entry. A connection keeps the labels of its first report, so its
    opened, bytes and closed counts always land in one series. Connections whose end entry never arrives (a dropped
    log batch) are forgotten after `max_idle_generations` calls of `sweep()`.
    """

    def __init__(self, recorder: Recorder, max_idle_generations: int = 60) -> None:
        self.recorder = recorder
        self.max_idle = max_idle_generations
        self.generation = 0
        self.connections: dict[str, _Connection] = {}

    def report(
        self,
        stream_id: str,
        peer: Peer,
        sent_total: int,
        received_total: int,
        end: bool,
        response_flags: str = "-",
        addresses: tuple[str, str] = ("", ""),
    ) -> None:
        """`addresses`: the downstream (source) and local (destination) `ip:port`."""
        conn = self.connections.get(stream_id) if stream_id else None
        opened = conn is None
        if conn is None:
            conn = _Connection(peer, response_flags, addresses)
            if stream_id and not end:
                self.connections[stream_id] = conn
        elif end:
            del self.connections[stream_id]
        conn.last_seen = self.generation
        rec = TcpRecord(
            peer=conn.peer,
            sent_bytes=max(0, sent_total - conn.sent),
            received_bytes=max(0, received_total - conn.received),
            opened=opened,
            closed=end,
            response_flags=conn.response_flags,
            source_address=conn.addresses[0],
            destination_address=conn.addresses[1],
        )
        conn.sent = max(conn.sent, sent_total)
        conn.received = max(conn.received, received_total)
        self.recorder.tcp(rec)

    def sweep(self) -> int:
        self.generation += 1
        horizon = self.generation - self.max_idle
        stale = [k for k, c in self.connections.items() if c.last_seen < horizon]
        for k in stale:
            del self.connections[k]
        return len(stale)


class WorkloadSinks:
    """Central mode: a Recorder and a TcpTracker per local workload, all into one MetricStore.

    A central server records for many sidecars, each access log stream for the workload its
    Envoy node names. The local half of the labels is fixed per workload, so each workload
    gets its own Labeler (with its own peer-label cache); they share the series store, the
    recorder counters and the Telemetry plans. Bounded (LRU): a workload evicted while its
    TCP connections are open loses their running totals, nothing else. Each workload's
    shape cache is smaller than a sidecar's (`WORKLOAD_SHAPE_CACHE_SIZE`), so that many
    workloads at once stay within a bounded memory.
    """

    def __init__(self, store: MetricStore, service: ServiceInfo | None, stats: RecorderStats, size: int = 1024) -> None:
        self.store = store
        self.service = service
        self.stats = stats
        self.size = size
        self.counters = CacheCounters("node_workload")
        self._entries: LruCache[Workload, tuple[Recorder, TcpTracker]] = LruCache(size, self.counters)

    def get(self, local: Workload) -> tuple[Recorder, TcpTracker]:
        return self._entries.get_or_make(local, self._sinks)

    def _sinks(self, local: Workload) -> tuple[Recorder, TcpTracker]:
        recorder = Recorder(Labeler(local, self.service), self.store, self.stats, WORKLOAD_SHAPE_CACHE_SIZE)
        return recorder, TcpTracker(recorder)

    def sweep(self) -> int:
        return sum(tcp.sweep() for _, tcp in self._entries.values())

    @property
    def connections(self) -> int:
        return sum(len(tcp.connections) for _, tcp in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class Telemetry:
    """Everything one workload's metrics need, built once at start-up."""

    local: Workload
    labeler: Labeler
    store: MetricStore
    recorder: Recorder
    tcp: TcpTracker
    peers: PeerCache
    # Central mode: the recorders of the workloads that access log streams name.
    workloads: WorkloadSinks | None = None
    # Peers and services the config lists (WorkloadEntry, ServiceEntry), in our cluster;
    # None when it lists none.
    directory: PeerDirectory | None = None

    @staticmethod
    def create(
        local: Workload,
        service: ServiceInfo | None = None,
        *,
        max_series: int = 50_000,
        idle_expiry_s: float = 3600.0,
    ) -> Telemetry:
        labeler = Labeler(local, service)
        store = MetricStore(
            [MetricPlan.standard(m) for m in L.METRICS], max_series=max_series, idle_expiry_s=idle_expiry_s
        )
        recorder = Recorder(labeler, store)
        return Telemetry(local, labeler, store, recorder, TcpTracker(recorder), PeerCache())

    def per_workload(self, service: ServiceInfo | None = None, size: int = 1024) -> WorkloadSinks:
        """Switch to central mode: recorders per local workload, sharing this store and counters."""
        self.workloads = WorkloadSinks(self.store, service, self.recorder.stats, size)
        return self.workloads

    def apply(self, plans: TelemetryPlans, directory: PeerDirectory | None = None) -> None:
        """Install the label plans of the applicable Telemetry resources and the listed peers
        (a reload). Entries that name no cluster are in ours."""
        self.store.set_plans(plans.inbound, plans.outbound)
        if directory is not None:
            self.directory = directory.in_cluster(self.local.cluster) if directory else None

    def tick(self) -> None:
        """Periodic upkeep: idle series and forgotten TCP connections."""
        self.store.tick()
        self.tcp.sweep()
        if self.workloads is not None:
            self.workloads.sweep()
