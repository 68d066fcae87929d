"""One span per finished request, exported over OTLP gRPC by the OpenTelemetry SDK.

The request path has already done the tracing work that matters for correctness: it
decided to sample, chose the span id (and, for a new trace, the trace id) and sent them
upstream in headers. What is left is bookkeeping, so this module is built to never slow
or fail a request:

* `SpanSink.submit` is synchronous and cheap: it builds the span with the SDK and hands it
  to a `BatchSpanProcessor`, whose worker thread does the network I/O;
* the queue is bounded and we do the bounding ourselves, so that a full queue drops the
  *new* span and counts it (the SDK's own queue would silently evict the oldest one and
  only log);
* `SpanSink.shutdown` flushes what is queued but gives up after a deadline, because a
  collector that is down must not hold the process hostage at exit.

The SDK only ever generates its own ids, so a custom `IdGenerator` hands it the preset
ones immediately before `Tracer.start_span`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import SpanKind

if TYPE_CHECKING:
    from extproc.tracing.export import SpanSink

logger = logging.getLogger("extproc.tracing")

__all__ = ["ExportSettings", "SinkStats", "SpanRecord", "SpanSink"]


def __getattr__(name: str) -> Any:
    """`SpanSink` lives with the OpenTelemetry SDK in extproc/tracing/export.py, imported only by a
    server that exports spans (--otlp-endpoint); this keeps `spans.SpanSink` working for callers."""
    if name == "SpanSink":
        from extproc.tracing.export import SpanSink

        return SpanSink
    raise AttributeError(name)


@dataclass(slots=True)
class SpanRecord:
    """A finished request's span, with the ids that were already propagated upstream."""

    trace_id: int
    span_id: int
    parent_span_id: int  # 0 = root: the trace started here
    kind: SpanKind  # SpanKind.SERVER (inbound) or SpanKind.CLIENT (outbound)
    name: str
    start_ns: int  # wall clock, ns since the epoch
    end_ns: int
    attributes: dict[str, str | int | float | bool]
    error: bool = False  # exported as Status(StatusCode.ERROR)
    tracestate: str = ""  # the W3C tracestate received with the parent
    random_trace_id: bool = False  # the W3C random-trace-id flag propagated with trace_id


@dataclass
class ExportSettings:
    """Where spans go and how much may wait for the collector.

    `endpoint` is "host:port" or "http(s)://host:port"; an https URL turns TLS on whatever
    `insecure` says (that is the OTLP exporter's rule). `timeout_s` bounds one export call,
    retries included. `max_queue_size` is the number of finished spans that may wait for
    the exporter; beyond it `SpanSink.submit` drops.
    """

    endpoint: str
    insecure: bool = True
    headers: tuple[tuple[str, str], ...] = ()
    timeout_s: float = 10.0
    max_queue_size: int = 2048
    max_export_batch_size: int = 512
    schedule_delay_ms: int = 1000

    def __post_init__(self) -> None:
        # Checked here rather than left to the SDK so that a bad config fails when it is
        # loaded, with the names our config uses.
        if self.max_queue_size <= 0 or self.max_export_batch_size <= 0:
            raise ValueError("max_queue_size and max_export_batch_size must be positive")
        # A batch is taken from the queue, so it can never be bigger; a small queue (the
        # knob operators set) implies small batches rather than a start-up error over a
        # batch size they never chose. The SDK itself would raise.
        self.max_export_batch_size = min(self.max_export_batch_size, self.max_queue_size)
        if self.schedule_delay_ms <= 0:
            raise ValueError("schedule_delay_ms must be positive")
        # The OTLP exporter treats a timeout of 0 as "unset" and falls back to 10 s.
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be positive")


class SinkStats:
    """Plain counters, readable from any thread.

    Thread safety without a lock: every counter has exactly one writer thread.
    `submitted`, `accepted` and `dropped` are written only by the thread that calls
    `SpanSink.submit` (the event loop); `taken`, `exported` and `failed` only by the
    thread that calls the exporter, which is the BatchSpanProcessor's worker (we never
    call the processor's `force_flush`, the one API that would export from another
    thread, and the SDK serialises exports under its own lock anyway). A `+=` from a
    single writer cannot lose updates, and under the GIL a reader sees some recent whole
    int. `queued` subtracts two counters read at slightly different moments, so it can be
    off by a batch in flight, always towards *more* queued: `taken` is bumped only after
    the SDK has popped the batch, which keeps our bound at or above the SDK's real queue
    length, so the SDK never reaches its own silent eviction.
    """

    __slots__ = ("accepted", "dropped", "exported", "failed", "submitted", "taken")

    def __init__(self) -> None:
        self.submitted = 0  # every call to submit
        self.accepted = 0  # handed to the SDK
        self.dropped = 0  # refused: queue full, sink shut down, or the span could not be built
        self.taken = 0  # handed by the SDK to the exporter
        self.exported = 0  # in batches the exporter reported SUCCESS
        self.failed = 0  # in batches the exporter reported FAILURE (or raised)

    @property
    def queued(self) -> int:
        """Spans accepted but not yet handed to the exporter."""
        return self.accepted - self.taken

    def __repr__(self) -> str:
        return (
            f"SinkStats(submitted={self.submitted}, accepted={self.accepted}, dropped={self.dropped}, "
            f"queued={self.queued}, exported={self.exported}, failed={self.failed})"
        )
