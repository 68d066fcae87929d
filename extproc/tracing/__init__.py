"""Distributed tracing in the data plane: trace-context propagation (W3C, B3), sampling, and one
span per request exported over OTLP. Layer: engines.

* `tracer.py`: continue or start each request's trace, and report its span
* `context.py`: trace context on the wire (traceparent/tracestate, B3 multi and single)
* `spans.py`: the span records
* `export.py`: the sink the request path hands finished spans to
* `otlp.py`: the OTLP/gRPC exporter, with message classes of its own
* `collector.py`: extproc's metrics about the tracing pipeline
"""
