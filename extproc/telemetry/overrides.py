"""Istio's Telemetry API (`telemetry.istio.io` `Telemetry`, `spec.metrics`) compiled to metric plans.

What a workload gets, as istio/istio `pilot/pkg/model/telemetry.go` computes it:

* **Which resources apply.** At most one per level: the root namespace's namespace-wide
  resource (no `selector.matchLabels`), the workload namespace's namespace-wide resource,
  and the first resource in the workload's namespace whose `selector.matchLabels` are a
  subset of the workload's labels. Within a level Istio takes the oldest resource
  (`metadata.creationTimestamp`), ties and resources without a timestamp ordered by
  `name.namespace`; every other resource is listed in `TelemetryPlans.ignored` with why.
  A resource with `targetRef`/`targetRefs` is validated as Istio does and then applies to
  no workload: it selects Gateways and waypoints, never a sidecar (listed in `ignored`).
* **How levels combine.** Not by replacement: the `metrics` entries of root, namespace
  and workload are concatenated in that order and every override is applied on top of the
  ones before it ("They will be applied on top of inherited overrides from other resources
  in the hierarchy", Telemetry API reference; `mergeMetrics`). So a mesh-wide REMOVE of
  `response_code` survives a namespace resource that only adds `request_host`, and a
  workload can undo it with an UPSERT or re-enable a metric with `disabled: false`.
  Per (mode, metric) the tag overrides form a map: a later entry for the same tag replaces
  the earlier one; `disabled` is changed only where it is set.
* **Providers.** An entry without `providers` inherits the previous entry's (the first
  inherits the mesh default, `prometheus`). Entries not naming `prometheus` do not apply
  here. As in Istio, the last non-empty `providers` list decides which providers are
  configured at all: if it omits `prometheus`, this workload gets no Prometheus metrics.
* **ALL_METRICS disabled.** `disabled: true` matching all metrics (ALL_METRICS or no
  metric) switches the mode off entirely and ignores that override's `tagOverrides`; any
  later override for the same mode switches it back on (Istio's "root disables all,
  namespace enables them").
* **Tags** (istio/proxy `istio_stats.cc` `MetricOverrides`): REMOVE drops a standard
  label the metric carries; UPSERT of a standard label the metric carries replaces its
  value; UPSERT of a standard label the metric does not carry (`response_code` on a TCP
  metric) does nothing; UPSERT of any other name adds a label, after the standard ones,
  sorted by name. The metric name never changes (istio/istio#45775).

Modes: CLIENT is the outbound sidecar (reporter="source"), SERVER the inbound one
(reporter="destination"), so plans come per direction: `TelemetryPlans.inbound` and
`.outbound`, equal when no override names a mode.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from extproc.telemetry.cel import HTTP, TCP, compile_value, expression_headers
from extproc.telemetry.labels import INDEX, LABELS, METRICS, Family, MetricDef
from extproc.telemetry.record import Direction
from extproc.telemetry.resource import (
    ALL_METRICS,
    CLIENT,
    DEFAULT_METRICS_PROVIDERS,
    METRIC_BY_TELEMETRY_NAME,
    PROMETHEUS,
    REMOVE,
    SERVER,
    UPSERT,
    LoadedTelemetry,
    Metrics,
    TagOverride,
    is_all,
    prometheus_label,
    targets_workloads,
)
from extproc.telemetry.store import Key, MetricPlan

MODE_OF_DIRECTION = {Direction.INBOUND: SERVER, Direction.OUTBOUND: CLIENT}


# --- plans ----------------------------------------------------------------------------


def _runs(idx: Sequence[int]) -> list[tuple[int, int]]:
    """[0, 1, 2, 5, 6] -> [(0, 3), (5, 7)]: contiguous runs as slice bounds."""
    runs: list[tuple[int, int]] = []
    for i in idx:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _slicer(idx: Sequence[int]) -> Callable[[Key], Key]:
    """The standard labels at `idx`, as slices of the standard tuple (cheaper than picking)."""
    runs = _runs(idx)
    if not runs:
        return lambda _base: ()
    if len(runs) == 1:
        a, b = runs[0]
        return (lambda base: base) if (a, b) == (0, len(LABELS)) else (lambda base: base[a:b])
    if len(runs) == 2:
        (a, b), (c, d) = runs
        return lambda base: base[a:b] + base[c:d]
    if len(runs) == 3:
        (a, b), (c, d), (e, f) = runs
        return lambda base: base[a:b] + base[c:d] + base[e:f]
    return operator.itemgetter(*idx)  # >= 4 indexes: returns a tuple


def _constant(value: str) -> Callable[[object], str]:
    return lambda _r: value


@functools.lru_cache(maxsize=4096)
def projection(kind: str, spec: tuple[int | str, ...]) -> Callable[[Key, Any], Key]:
    """A metric's label values from the standard 25-value tuple and the record.

    `spec` has, per output label, an index into the standard tuple or a tag value
    expression. Plain closures (an object with `__call__` costs ~200ns more per record),
    cached by spec: the same overrides give the same function, so plans compare equal
    across reloads and MetricStore.set_plans keeps their tables.
    """

    def value(text: str) -> Callable[[object], str]:
        v = compile_value(text, kind)
        return v.fn if v.fn is not None else _constant(v.const or "")

    exprs = [i for i, s in enumerate(spec) if isinstance(s, str)]
    if not exprs:
        get = _slicer(spec)  # type: ignore[arg-type]
        runs = _runs(spec)  # type: ignore[arg-type]
        if len(runs) == 2:
            (a, b), (c, d) = runs
            return lambda base, _r: base[a:b] + base[c:d]
        return lambda base, _r: get(base)
    if exprs == [len(spec) - 1]:
        f = value(spec[-1])  # type: ignore[arg-type]
        runs = _runs(spec[:-1])  # type: ignore[arg-type]
        if runs == [(0, len(LABELS))]:
            return lambda base, r: (*base, f(r))
        if len(runs) == 1:
            a, b = runs[0]
            return lambda base, r: (*base[a:b], f(r))
        get = _slicer(spec[:-1])  # type: ignore[arg-type]
        return lambda base, r: (*get(base), f(r))
    segments: list[tuple[int, int, Callable[[object], str] | None]] = []
    run: list[int] = []
    for s in (*spec, None):
        if isinstance(s, int):
            if run and run[-1] + 1 != s:
                segments.append((run[0], run[-1] + 1, None))
                run = []
            run.append(s)
            continue
        if run:
            segments.append((run[0], run[-1] + 1, None))
            run = []
        if s is not None:
            segments.append((0, 0, value(s)))
    parts = tuple(segments)

    def compose(base: Key, r: object) -> Key:
        out: Key = ()
        for start, stop, f in parts:
            out += base[start:stop] if f is None else (f(r),)
        return out

    return compose


@dataclass
class _MetricOverride:
    disabled: bool | None = None
    tags: dict[str, TagOverride] = field(default_factory=dict)


def build_plan(metric: MetricDef, tags: Mapping[str, TagOverride], disabled: bool = False) -> MetricPlan:
    """One metric's plan after its merged tag overrides (istio_stats.cc MetricOverrides)."""
    standard = MetricPlan.standard(metric)
    if disabled:
        return MetricPlan(metric, standard.label_names, None, True)
    carried = set(standard.label_names)
    removed: set[str] = set()
    replaced: dict[str, str] = {}
    added: dict[str, str] = {}
    for name in sorted(tags):
        to = tags[name]
        if (to.operation or UPSERT) == REMOVE:
            if name in carried:
                removed.add(name)
        elif name in INDEX:
            if name in carried:
                replaced[name] = to.value or ""
        else:
            added[name] = to.value or ""
    if not (removed or replaced or added):
        return standard
    names: list[str] = []
    spec: list[int | str] = []
    for i in metric.labels:
        name = LABELS[i]
        if name in removed:
            continue
        names.append(name)
        spec.append(replaced.get(name, i))
    for name in sorted(added):
        names.append(name)
        spec.append(added[name])
    return MetricPlan(metric, tuple(names), projection(TCP if metric.family is Family.TCP else HTTP, tuple(spec)))


class WorkloadLike(Protocol):
    @property
    def namespace(self) -> str: ...
    @property
    def labels(self) -> Mapping[str, str]: ...
    @property
    def root_namespace(self) -> str: ...


@dataclass(frozen=True, slots=True)
class AppliedTelemetry:
    level: str  # root, namespace, workload
    ident: str  # namespace/name
    origin: str  # file: document n

    def __str__(self) -> str:
        return f"{self.level}: {self.ident} ({self.origin})"


@dataclass(frozen=True)
class TelemetryPlans:
    """The metric plans of one workload, per direction, and what produced them."""

    inbound: tuple[MetricPlan, ...]  # SERVER mode, reporter="destination"
    outbound: tuple[MetricPlan, ...]  # CLIENT mode, reporter="source"
    sources: tuple[AppliedTelemetry, ...] = ()
    ignored: tuple[tuple[str, str], ...] = ()  # (namespace/name, why)
    notes: tuple[str, ...] = ()
    request_headers: frozenset[str] = frozenset()  # read by tag values: capture them in Envoy

    def plans_for(self, direction: Direction) -> tuple[MetricPlan, ...]:
        return self.inbound if direction is Direction.INBOUND else self.outbound

    @property
    def symmetric(self) -> bool:
        return self.inbound == self.outbound

    @staticmethod
    def standard() -> TelemetryPlans:
        plans = tuple(MetricPlan.standard(m) for m in METRICS)
        return TelemetryPlans(plans, plans)


def _age_key(t: LoadedTelemetry) -> tuple[datetime, str]:
    """Istio's sortConfigByCreationTime: oldest first, then by name.namespace."""
    ts = t.resource.metadata.creation_timestamp
    if ts is None:
        ts = datetime.min.replace(tzinfo=UTC)
    elif ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts, f"{t.name}.{t.namespace}"


def select_telemetries(
    resources: Iterable[LoadedTelemetry], workload: WorkloadLike
) -> tuple[list[tuple[str, LoadedTelemetry]], list[tuple[str, str]]]:
    """([(level, resource)] root first, [(namespace/name, why not)]) as Istio's applicableTelemetries."""
    ns, root = workload.namespace, workload.root_namespace
    chosen: list[tuple[str, LoadedTelemetry]] = []
    ignored: list[tuple[str, str]] = []
    by_ns: dict[str, list[LoadedTelemetry]] = {}
    for t in sorted(resources, key=_age_key):
        if not targets_workloads(t.resource.spec):
            ignored.append((t.ident, "uses targetRef(s), which select Gateways and waypoints, not a sidecar workload"))
        elif t.namespace in (ns, root):
            by_ns.setdefault(t.namespace, []).append(t)
        else:
            ignored.append((t.ident, f"namespace {t.namespace} is neither the workload's ({ns}) nor the root ({root})"))

    def namespace_wide(namespace: str, level: str) -> None:
        first = None
        for t in by_ns.get(namespace, ()):
            if t.selector:
                continue
            if first is None:
                first = t
                chosen.append((level, t))
            else:
                ignored.append(
                    (t.ident, f"{first.ident} is the namespace-wide Telemetry of {namespace} (older, or first by name)")
                )

    if root:
        namespace_wide(root, "root")
    if ns != root:
        namespace_wide(ns, "namespace")
    first = None
    for t in by_ns.get(ns, ()):
        sel = t.selector
        if not sel:
            continue
        misses = [f"{k}={v}" for k, v in sel.items() if workload.labels.get(k) != v]
        if misses:
            ignored.append((t.ident, f"selector {', '.join(misses)} does not match the workload labels"))
        elif first is None:
            first = t
            chosen.append(("workload", t))
        else:
            ignored.append(
                (t.ident, f"{first.ident} also selects this workload and comes first (older, or first by name)")
            )
    if ns != root:
        for t in by_ns.get(root, ()):
            if t.selector:
                ignored.append((t.ident, f"a selector in the root namespace selects only workloads in {root}"))
    order = {"root": 0, "namespace": 1, "workload": 2}
    chosen.sort(key=lambda lt: order[lt[0]])
    return chosen, ignored


def compile_telemetry(
    resources: Iterable[LoadedTelemetry],
    workload: WorkloadLike,
    *,
    default_providers: Sequence[str] = DEFAULT_METRICS_PROVIDERS,
) -> TelemetryPlans:
    """The inbound and outbound plans for the workload (mergeMetrics, for the prometheus provider)."""
    chosen, ignored = select_telemetries(resources, workload)
    entries: list[tuple[LoadedTelemetry, Metrics]] = [
        (t, m) for _, t in chosen for m in t.resource.spec.metrics or () if m is not None
    ]

    def names(m: Metrics) -> list[str]:
        return [p.name.lower() for p in m.providers or () if p is not None and p.name]

    in_scope = [p.lower() for p in default_providers]
    scope_from = "the mesh default providers"
    for t, m in entries:
        if n := names(m):
            in_scope, scope_from = n, f"{t.ident}"
    notes: list[str] = []
    state: dict[str, dict[str, _MetricOverride]] = {CLIENT: {}, SERVER: {}}
    all_off: set[str] = set()
    if PROMETHEUS in in_scope:
        parent = [p.lower() for p in default_providers]
        for _, m in entries:
            providers = names(m) or parent
            parent = providers
            if PROMETHEUS not in providers:
                continue
            for o in m.overrides or ():
                if o is None:
                    continue
                sel = o.match
                modes = [sel.mode] if sel is not None and sel.mode in (CLIENT, SERVER) else [CLIENT, SERVER]
                if is_all(sel) and o.disabled is True:
                    all_off.update(modes)
                    continue
                all_off.difference_update(modes)
                if sel is not None and sel.custom_metric is not None:
                    metrics = []  # a custom metric: none is served here, but the mode is back on (as in Istio)
                elif sel is not None and sel.metric not in (None, ALL_METRICS):
                    metrics = [sel.metric]
                else:
                    metrics = list(METRIC_BY_TELEMETRY_NAME)
                for mode in modes:
                    for metric in metrics:
                        st = state[mode].setdefault(metric, _MetricOverride())
                        if o.disabled is not None:
                            st.disabled = o.disabled
                        for tag, to in (o.tag_overrides or {}).items():
                            if to is not None and tag:
                                st.tags[prometheus_label(tag)] = to
    else:
        all_off = {CLIENT, SERVER}
        notes.append(
            f"no Prometheus metrics: the providers in effect (from {scope_from}) are {', '.join(in_scope) or 'none'}"
        )
    for mode in sorted(all_off):
        if PROMETHEUS in in_scope:
            notes.append(f"all metrics are disabled for {mode} ({'outbound' if mode == CLIENT else 'inbound'})")

    def plans(mode: str) -> tuple[MetricPlan, ...]:
        out = []
        for m in METRICS:
            st = state[mode].get(m.telemetry_name)
            if mode in all_off:
                out.append(MetricPlan(m, MetricPlan.standard(m).label_names, None, True))
            elif st is None:
                out.append(MetricPlan.standard(m))
            else:
                out.append(build_plan(m, st.tags, bool(st.disabled)))
        return tuple(out)

    headers: set[str] = set()
    for mode, per_metric in state.items():
        for st in per_metric.values() if mode not in all_off else ():
            for to in st.tags.values() if not st.disabled else ():
                if (to.operation or UPSERT) == UPSERT and to.value:
                    headers |= expression_headers(to.value)
    return TelemetryPlans(
        inbound=plans(SERVER),
        outbound=plans(CLIENT),
        sources=tuple(AppliedTelemetry(level, t.ident, t.origin) for level, t in chosen),
        ignored=tuple(ignored),
        notes=tuple(notes),
        request_headers=frozenset(headers),
    )
