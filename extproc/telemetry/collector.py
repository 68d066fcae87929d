"""extproc's metrics about its own telemetry pipeline: sources, series, bounds."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from extproc.telemetry.recorder import Telemetry


class TelemetryCollector(Collector):
    """extproc's view of its own telemetry pipeline: sources, series, bounds."""

    def __init__(self, telemetry: Telemetry, sources: Callable[[], dict[str, int]]) -> None:
        self.t = telemetry
        self.sources = sources

    def collect(self) -> Iterator[Metric]:
        t = self.t
        rec = CounterMetricFamily(
            "extproc_telemetry_requests", "HTTP requests recorded in the standard metrics, by source", labels=["source"]
        )
        for source, n in sorted(t.recorder.stats.http.items()):
            rec.add_metric([source], n)
        yield rec
        yield CounterMetricFamily(
            "extproc_telemetry_duplicates",
            "Access log entries not counted because ext_proc already recorded the request",
            value=t.recorder.stats.http_duplicates,
        )
        yield CounterMetricFamily(
            "extproc_telemetry_tcp_reports", "TCP access log reports recorded", value=t.recorder.stats.tcp_reports
        )
        yield GaugeMetricFamily(
            "extproc_telemetry_tcp_connections",
            "TCP connections whose byte totals are being tracked",
            value=len(t.tcp.connections) + (t.workloads.connections if t.workloads is not None else 0),
        )
        series = GaugeMetricFamily(
            "extproc_telemetry_series", "Series held per standard metric (cardinality)", labels=["metric"]
        )
        for name, n in sorted(t.store.series_counts().items()):
            series.add_metric([name], n)
        yield series
        yield GaugeMetricFamily(
            "extproc_telemetry_series_limit", "Most series kept before overflow", value=t.store.max_series
        )
        over = CounterMetricFamily(
            "extproc_telemetry_overflow_records",
            "Records added to a metric's overflow series because the series limit was reached",
            labels=["metric"],
        )
        for name, n in sorted(t.store.overflow_counts().items()):
            over.add_metric([name], n)
        yield over
        yield CounterMetricFamily(
            "extproc_telemetry_evicted_series", "Series dropped after being idle", value=t.store.evicted
        )
        src = CounterMetricFamily(
            "extproc_telemetry_source_events",
            "Access log entries and ext_proc streams received, by kind",
            labels=["kind"],
        )
        for kind, n in sorted(self.sources().items()):
            src.add_metric([kind], n)
        yield src
