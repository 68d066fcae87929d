"""Micro-benchmarks of the tracing path: one request's trace context, and handing its span
to the OpenTelemetry SDK.

    .venv/bin/python -m bench.tracing_micro

Prints the best of several timeit repeats, in µs per operation. The span figure uses the
real OTLP exporter pointed at a closed port with a queue large enough that nothing is
dropped during the measurement; the dropped figure fills a small queue first.
"""

from __future__ import annotations

import timeit

from opentelemetry.propagators.b3 import B3MultiFormat
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from extproc.tracing.context import Format, Propagator, Sampler
from extproc.tracing.spans import ExportSettings, SpanRecord, SpanSink
from tests.fixtures.procs import free_port

HEADERS = {
    ":method": "GET",
    ":path": "/items/7",
    ":authority": "httpbin.foo:8000",
    "user-agent": "curl/8",
    "x-request-id": "6f1a2b3c-0000-4000-8000-000000000001",
    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
}


def best(fn, number: int, repeat: int = 7) -> float:  # type: ignore[no-untyped-def]
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def record(i: int) -> SpanRecord:
    attrs: dict[str, str | int | float | bool] = {f"attr.{k}": f"value-{k}" for k in range(13)}
    attrs.update({"http.status_code": 200, "request_size": 120})
    return SpanRecord(
        trace_id=0x4BF92F3577B34DA6A3CE929D0E0E4736,
        span_id=i + 1,
        parent_span_id=0x00F067AA0BA902B7,
        kind=SpanKind.SERVER,
        name="httpbin.foo:8000/*",
        start_ns=1_000_000,
        end_ns=2_000_000,
        attributes=attrs,
    )


def main() -> None:
    prop = Propagator((Format.W3C, Format.B3), Sampler(1.0))
    print(f"Propagator.begin, W3C context in, W3C+B3 out: {best(lambda: prop.begin(HEADERS), 20_000):.1f} µs")
    new = {k: v for k, v in HEADERS.items() if k != "traceparent"}
    print(f"Propagator.begin, new trace:                   {best(lambda: prop.begin(new), 20_000):.1f} µs")

    w3c, b3 = TraceContextTextMapPropagator(), B3MultiFormat()

    def otel() -> None:
        ctx = w3c.extract(HEADERS)
        out: dict[str, str] = {}
        w3c.inject(out, ctx)
        b3.inject(out, ctx)

    print(f"OpenTelemetry extract + inject, W3C+B3:        {best(otel, 20_000):.1f} µs")

    endpoint = f"127.0.0.1:{free_port()}"  # nothing listens: exports fail, the queue holds
    n = 2_000
    sink = SpanSink(ExportSettings(endpoint, max_queue_size=10 * 7 * n, timeout_s=0.5), {"service.name": "bench"})
    counter = iter(range(10**9))
    print(
        f"SpanSink.submit, accepted (15 attributes):     {best(lambda: sink.submit(record(next(counter))), n):.1f} µs"
    )
    sink.shutdown(2.0)
    small = SpanSink(ExportSettings(endpoint, max_queue_size=1, max_export_batch_size=1, timeout_s=0.5), {})
    for i in range(10):
        small.submit(record(i))
    rec = record(0)
    print(f"SpanSink.submit, dropped (queue full):         {best(lambda: small.submit(rec), 20_000):.2f} µs")
    print(f"  (dropped so far: {small.stats.dropped})")
    small.shutdown(2.0)


if __name__ == "__main__":
    main()
