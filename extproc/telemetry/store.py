"""Series tables for the standard metrics, and their Prometheus text rendering.

Recording a request is a handful of dict lookups and integer additions; nothing is
formatted until Prometheus scrapes. Each series keeps its label string pre-rendered, so a
scrape is string joins.

Bounds, which Istio's in-proxy telemetry lacked for years (istio/istio#21377):
* series idle for longer than `idle_expiry_s` are dropped (Prometheus sees them end);
* the number of series across all metrics is capped at `max_series`; once full, a record
  that would open a new series is added to its metric's overflow series instead, whose
  labels are all `overflow` except `reporter`, so totals stay exact
  (OpenTelemetry's cardinality-limit behaviour). `extproc_telemetry_series` and
  `extproc_telemetry_overflow_records_total` show both.

Recorders may keep references to series cells between records (the per-shape cache in
`recorder.py`). `MetricStore.generation` tells them when such references may have gone
stale: it changes whenever a table is replaced or a series is removed.
"""

from __future__ import annotations

import bisect
import operator
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.utils import floatToGoString as _float_to_go_string

from extproc.telemetry.labels import DEFAULT_BUCKETS, LABELS, Kind, MetricDef

# prometheus_client's rendering of a float as Prometheus writes it (untyped there).
floatToGoString: Callable[[float], str] = _float_to_go_string

OVERFLOW = "overflow"
Key = tuple[str, ...]
# Builds a metric's label values from the standard 25-value tuple and the record (for
# tag overrides). None means: the metric's standard subset.
Projector = Callable[[Key, object], Key]


def escape(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


@dataclass(frozen=True)
class MetricPlan:
    """How one metric's label values are built; `disabled` metrics are not kept at all."""

    metric: MetricDef
    label_names: tuple[str, ...]
    project: Projector | None = None  # None: take `metric.labels` from the standard tuple
    disabled: bool = False

    @staticmethod
    def standard(metric: MetricDef) -> MetricPlan:
        return MetricPlan(metric, tuple(LABELS[i] for i in metric.labels))


class Series:
    __slots__ = ("labels", "touched", "value")

    def __init__(self, labels: str) -> None:
        self.labels = labels
        self.value = 0
        self.touched = 0


class HistogramSeries:
    __slots__ = ("counts", "labels", "sum", "touched")

    def __init__(self, labels: str, nbuckets: int) -> None:
        self.labels = labels
        self.counts = [0] * (nbuckets + 1)  # per bucket, not cumulative; last = above every bound
        self.sum = 0.0
        self.touched = 0


class Table:
    """All series of one metric."""

    def __init__(self, plan: MetricPlan, store: MetricStore) -> None:
        self.plan = plan
        self.metric = plan.metric
        self.store = store
        self.series: dict[Key, Series | HistogramSeries] = {}
        self.overflow_records = 0
        m = plan.metric
        if plan.project is None:
            n = len(m.labels)
            if m.labels == tuple(range(n)):
                self.key: Callable[[Key, object], Key] = (
                    (lambda base, _r: base) if n == len(LABELS) else (lambda base, _r: base[:n])
                )
            else:
                pick = operator.itemgetter(*m.labels)
                self.key = lambda base, _r: pick(base)
        else:
            self.key = plan.project
        self._overflow_key: Key = tuple(
            OVERFLOW if name != "reporter" else "" for name in plan.label_names
        )  # reporter filled per record

    def _label_string(self, key: Key) -> str:
        # Interned: the four HTTP metrics of one request shape carry the same labels, so they share
        # one copy (about 1 KB with Istio's 25 labels); CPython drops it with the last series using it.
        return sys.intern(",".join(f'{n}="{escape(v)}"' for n, v in zip(self.plan.label_names, key, strict=True)))

    def _new(self, key: Key) -> Series | HistogramSeries:
        if self.metric.kind is Kind.HISTOGRAM:
            return HistogramSeries(self._label_string(key), len(self.store.buckets))
        return Series(self._label_string(key))

    def resolve(self, base: Key) -> Series | HistogramSeries | None:
        """The series of `base` (a plan without projection), created if there is room; None when
        it would overflow.

        For callers that keep the cell: an overflow cell must not be kept, since each record
        into it is counted in `overflow_records`; they record through `add`/`observe` instead.
        Not stamped as touched: the caller stamps it with each record it adds."""
        key = self.key(base, None)
        s = self.series.get(key)
        if s is None:
            store = self.store
            if store.count >= store.max_series:
                return None
            s = self._new(key)
            self.series[key] = s
            store.count += 1
        return s

    def cell(self, base: Key, record: object) -> Series | HistogramSeries:
        key = self.key(base, record)
        s = self.series.get(key)
        if s is None:
            store = self.store
            if store.count >= store.max_series:
                self.overflow_records += 1
                key = self._overflow(key)
                s = self.series.get(key)
                if s is not None:
                    s.touched = store.epoch
                    return s
            s = self._new(key)
            self.series[key] = s
            store.count += 1
        s.touched = self.store.epoch
        return s

    def _overflow(self, key: Key) -> Key:
        names = self.plan.label_names
        if "reporter" in names:
            i = names.index("reporter")
            return (*self._overflow_key[:i], key[i], *self._overflow_key[i + 1 :])
        return self._overflow_key

    def add(self, base: Key, record: object, n: int) -> None:
        self.cell(base, record).value += n  # type: ignore[union-attr]

    def observe(self, base: Key, record: object, value: float) -> None:
        s = self.cell(base, record)
        s.counts[bisect.bisect_left(self.store.buckets, value)] += 1  # type: ignore[union-attr]
        s.sum += value  # type: ignore[union-attr]


class MetricStore:
    """Tables per (direction, metric). Directions may have different plans: the Telemetry
    API can override a metric for CLIENT (reporter=source) or SERVER (reporter=destination)
    only. Both render under one metric family."""

    def __init__(
        self,
        plans: Iterable[MetricPlan],
        outbound_plans: Iterable[MetricPlan] | None = None,
        *,
        max_series: int = 50_000,
        idle_expiry_s: float = 3600.0,
        buckets: tuple[float, ...] = DEFAULT_BUCKETS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_series = max_series
        self.idle_expiry_s = idle_expiry_s
        self.buckets = buckets
        self.clock = clock
        self.count = 0
        self.evicted = 0
        # Changes whenever a table is replaced or a series removed: cells held outside the
        # store (a recorder's shape cache) are valid only while it stays the same.
        self.generation = 0
        # `epoch` is a coarse clock: records stamp series with it, `tick()` advances it.
        self.epoch = 0
        self._epoch_started: dict[int, float] = {0: clock()}
        self.inbound: dict[str, Table] = {}
        self.outbound: dict[str, Table] = {}
        plans = list(plans)
        self.set_plans(plans, plans if outbound_plans is None else outbound_plans)

    def set_plans(self, inbound: Iterable[MetricPlan], outbound: Iterable[MetricPlan]) -> None:
        """Install new label plans (a Telemetry change). Tables whose plan changed restart empty."""
        self.inbound = self._tables(inbound, self.inbound)
        self.outbound = self._tables(outbound, self.outbound)
        self.count = sum(len(t.series) for t in self.all_tables())
        self.generation += 1

    def _tables(self, plans: Iterable[MetricPlan], old: dict[str, Table]) -> dict[str, Table]:
        tables: dict[str, Table] = {}
        for plan in plans:
            prev = old.get(plan.metric.name)
            tables[plan.metric.name] = prev if prev is not None and prev.plan == plan else Table(plan, self)
        return tables

    def all_tables(self) -> list[Table]:
        return [*self.inbound.values(), *self.outbound.values()]

    def tables_for(self, outbound: bool) -> dict[str, Table]:
        return self.outbound if outbound else self.inbound

    def tick(self) -> int:
        """Advance the coarse clock and drop series idle longer than `idle_expiry_s`."""
        now = self.clock()
        self.epoch += 1
        self._epoch_started[self.epoch] = now
        if self.idle_expiry_s <= 0:
            return 0
        # The newest epoch that started more than idle_expiry_s ago: series last touched
        # before it have been idle at least that long.
        horizon = None
        for epoch, started in self._epoch_started.items():
            if now - started >= self.idle_expiry_s:
                horizon = epoch
        if horizon is None:
            return 0
        for epoch in [e for e in self._epoch_started if e < horizon]:
            del self._epoch_started[epoch]
        dropped = 0
        for t in self.all_tables():
            stale = [k for k, s in t.series.items() if s.touched < horizon]
            for k in stale:
                del t.series[k]
            dropped += len(stale)
        self.count -= dropped
        self.evicted += dropped
        if dropped:
            self.generation += 1
        return dropped

    def series_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.all_tables():
            counts[t.metric.name] = counts.get(t.metric.name, 0) + len(t.series)
        return counts

    def overflow_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.all_tables():
            counts[t.metric.name] = counts.get(t.metric.name, 0) + t.overflow_records
        return counts

    def render(self) -> str:
        """The standard metrics in Prometheus text format 0.0.4, as one string (tests, small stores)."""
        return "".join(self.render_chunks())

    def render_chunks(self, chunk_chars: int = 256 * 1024) -> Iterator[str]:
        """The same text in pieces of about `chunk_chars`, so a scrape of many series never holds
        the whole body (10 000 Istio series render to about 145 MB: each histogram line repeats
        the 25 labels).

        Safe to run in another thread than the one recording: each table's series list is copied
        in one C-level step when its family is reached, and cells are only ever added to.
        """
        out: list[str] = []
        size = 0
        les = [floatToGoString(b) for b in self.buckets]
        by_name: dict[str, list[Table]] = {}
        for t in self.all_tables():
            if not t.plan.disabled:
                by_name.setdefault(t.metric.name, []).append(t)
        for tables in by_name.values():
            m = tables[0].metric
            items = [s for t in tables for s in list(t.series.values())]
            if not items:
                continue
            if len(tables) > 1 and any("reporter" not in t.plan.label_names for t in tables):
                items = _merged(items)
            if m.kind is Kind.COUNTER:
                name = m.name + "_total"
                out.append(f"# HELP {name} {m.help}\n# TYPE {name} counter\n")
                for s in items:
                    line = f"{name}{{{s.labels}}} {s.value}\n"  # type: ignore[union-attr]
                    out.append(line)
                    size += len(line)
                    if size >= chunk_chars:
                        yield "".join(out)
                        out.clear()
                        size = 0
                continue
            name = m.name
            out.append(f"# HELP {name} {m.help}\n# TYPE {name} histogram\n")
            for s in items:
                lbl = s.labels
                sep = "," if lbl else ""  # every label may have been removed by an override
                cum = 0
                counts = list(s.counts)  # type: ignore[union-attr]
                for le, c in zip(les, counts, strict=False):
                    cum += c
                    out.append(f'{name}_bucket{{{lbl}{sep}le="{le}"}} {cum}\n')
                cum += counts[-1]
                out.append(
                    f'{name}_bucket{{{lbl}{sep}le="+Inf"}} {cum}\n'
                    f"{name}_sum{{{lbl}}} {floatToGoString(s.sum)}\n"  # type: ignore[union-attr]
                    f"{name}_count{{{lbl}}} {cum}\n"
                )
                size += (len(les) + 4) * (len(lbl) + len(name) + 24)
                if size >= chunk_chars:
                    yield "".join(out)
                    out.clear()
                    size = 0
        if out:
            yield "".join(out)


def _merged(items: list[Series | HistogramSeries]) -> list[Series | HistogramSeries]:
    """Series of both directions that render with the same labels, summed into one.

    Only needed when an override removed `reporter`: Prometheus rejects a family that
    repeats a label set."""
    out: dict[str, Series | HistogramSeries] = {}
    for s in items:
        acc = out.get(s.labels)
        if acc is None:
            acc = HistogramSeries(s.labels, len(s.counts) - 1) if isinstance(s, HistogramSeries) else Series(s.labels)
            out[s.labels] = acc
        if isinstance(s, HistogramSeries) and isinstance(acc, HistogramSeries):
            acc.counts = [a + b for a, b in zip(acc.counts, list(s.counts), strict=True)]
            acc.sum += s.sum
        elif isinstance(s, Series) and isinstance(acc, Series):
            acc.value += s.value
    return list(out.values())
