"""extproc's metrics about its tracing pipeline: contexts handled, spans exported."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from extproc.tracing.tracer import Tracing


class TracingCollector(Collector):
    """Trace contexts handled and spans exported: is the tracing pipeline keeping up?"""

    def __init__(self, tracing: Tracing) -> None:
        self.tracing = tracing

    def collect(self) -> Iterator[Metric]:
        t = self.tracing
        ctx = CounterMetricFamily(
            "extproc_trace_contexts",
            "Requests whose trace context extproc continued or started, and whether it sampled them",
            labels=["trace", "sampled"],
        )
        for (trace, sampled), n in sorted(t.contexts.items()):
            ctx.add_metric([trace, sampled], n)
        yield ctx
        sink = t.sink
        if sink is None:
            return
        st = sink.stats
        spans = CounterMetricFamily(
            "extproc_spans",
            "Spans by fate: submitted to the export queue, dropped because it was full, "
            "exported, or lost in a failed export",
            labels=["outcome"],
        )
        for outcome, n in (
            ("submitted", st.submitted),
            ("dropped", st.dropped),
            ("exported", st.exported),
            ("failed", st.failed),
        ):
            spans.add_metric([outcome], n)
        yield spans
        yield GaugeMetricFamily("extproc_spans_queued", "Spans waiting for export", value=st.queued)
