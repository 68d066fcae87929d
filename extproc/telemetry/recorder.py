"""Turns records into metric updates, once per request, whichever source reports it.

Sources: the access log service (HTTP entries at stream end; TCP entries periodically
and at connection end) and ext_proc (the response phase of each HTTP request). When one
Envoy enables both for the same requests, ext_proc's report wins: it claims the request
by its `x-request-id`, and the access log entry with that id is then skipped. A request
ext_proc never saw the response of (a reply Envoy sent before the ext_proc filter, a
failed side stream) is still counted from the access log.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from extproc.telemetry import labels as L
from extproc.telemetry.overrides import TelemetryPlans
from extproc.telemetry.peer import PeerCache, Workload
from extproc.telemetry.record import Direction, HttpRecord, Labeler, Peer, ServiceInfo, TcpRecord
from extproc.telemetry.store import MetricPlan, MetricStore, Table

MAX_CLAIMS = 100_000


def _enabled(tables: dict[str, Table], name: str) -> Table | None:
    t = tables.get(name)
    return None if t is None or t.plan.disabled else t


@dataclass
class RecorderStats:
    http: dict[str, int]  # source -> requests recorded
    http_duplicates: int = 0  # access log entries skipped because ext_proc counted them
    tcp_reports: int = 0


class Recorder:
    def __init__(self, labeler: Labeler, store: MetricStore, stats: RecorderStats | None = None) -> None:
        self.labeler = labeler
        self.store = store
        self.stats = stats if stats is not None else RecorderStats(http={"access_log": 0, "ext_proc": 0})
        self._claims: OrderedDict[str, int] = OrderedDict()

    def http(self, r: HttpRecord, source: str) -> None:
        rid = r.request_id
        if source == "ext_proc":
            if rid:
                claims = self._claims
                claims[rid] = claims.get(rid, 0) + 1
                if len(claims) > MAX_CLAIMS:
                    claims.popitem(last=False)
        elif rid and self._claims:
            n = self._claims.get(rid)
            if n is not None:
                if n > 1:
                    self._claims[rid] = n - 1
                else:
                    del self._claims[rid]
                self.stats.http_duplicates += 1
                return
        self.stats.http[source] = self.stats.http.get(source, 0) + 1
        base = self.labeler.http(r)
        tables = self.store.tables_for(r.peer.direction is Direction.OUTBOUND)
        if (t := _enabled(tables, L.REQUESTS.name)) is not None:
            t.add(base, r, 1)
        if r.duration_ms is not None and (t := _enabled(tables, L.REQUEST_DURATION.name)) is not None:
            t.observe(base, r, r.duration_ms)
        if r.request_bytes is not None and (t := _enabled(tables, L.REQUEST_BYTES.name)) is not None:
            t.observe(base, r, r.request_bytes)
        if r.response_bytes is not None and (t := _enabled(tables, L.RESPONSE_BYTES.name)) is not None:
            t.observe(base, r, r.response_bytes)
        if r.grpc:
            if r.request_messages and (t := _enabled(tables, L.REQUEST_MESSAGES.name)) is not None:
                t.add(base, r, r.request_messages)
            if r.response_messages and (t := _enabled(tables, L.RESPONSE_MESSAGES.name)) is not None:
                t.add(base, r, r.response_messages)

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
    TCP connections are open loses their running totals, nothing else.
    """

    def __init__(self, store: MetricStore, service: ServiceInfo | None, stats: RecorderStats, size: int = 1024) -> None:
        self.store = store
        self.service = service
        self.stats = stats
        self.size = size
        self._entries: OrderedDict[Workload, tuple[Recorder, TcpTracker]] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, local: Workload) -> tuple[Recorder, TcpTracker]:
        entries = self._entries
        found = entries.get(local)
        if found is not None:
            self.hits += 1
            entries.move_to_end(local)
            return found
        self.misses += 1
        recorder = Recorder(Labeler(local, self.service), self.store, self.stats)
        found = entries[local] = (recorder, TcpTracker(recorder))
        if len(entries) > self.size:
            entries.popitem(last=False)
            self.evictions += 1
        return found

    def sweep(self) -> int:
        return sum(tcp.sweep() for _, tcp in list(self._entries.values()))

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

    def apply(self, plans: TelemetryPlans) -> None:
        """Install the label plans of the applicable Telemetry resources (a reload)."""
        self.store.set_plans(plans.inbound, plans.outbound)

    def tick(self) -> None:
        """Periodic upkeep: idle series and forgotten TCP connections."""
        self.store.tick()
        self.tcp.sweep()
        if self.workloads is not None:
            self.workloads.sweep()
