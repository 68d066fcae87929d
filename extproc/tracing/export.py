"""The OpenTelemetry SDK side of span export: the sink the request path hands finished spans to.

Split from extproc/tracing/spans.py so that the SDK (1.7 MB resident) is imported only by a
server that exports spans (--otlp-endpoint). See spans.py for how the sink is built to never
slow or fail a request.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Mapping, Sequence

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState
from opentelemetry.trace.status import Status, StatusCode

from extproc.tracing.otlp import OtlpSpanExporter
from extproc.tracing.spans import ExportSettings, SinkStats, SpanRecord

logger = logging.getLogger("extproc.tracing")

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_SAMPLED_RANDOM = TraceFlags(TraceFlags.SAMPLED | TraceFlags.RANDOM_TRACE_ID)


class _Level2TraceState(TraceState):
    """A tracestate our codec already validated, kept as it is.

    OpenTelemetry's `TraceState` (1.45) still checks keys with Trace Context Level 1's grammar,
    so `TraceState.from_header` would discard a whole list holding a Level 2 key (`1abc`,
    `foo@@bar`, `t@` + 15 characters) and the constructor would drop those members one by one:
    the exported span would then lie about the tracestate that was propagated. The members are
    set as they are (in order), which is all that the SDK and the OTLP encoder read
    (`items()`). tests/unit/test_tracing_spans.py pins this against the installed SDK.
    """

    def __init__(self, header: str) -> None:
        super().__init__()
        self._dict = dict(m.split("=", 1) for m in header.split(","))


_ERROR = Status(StatusCode.ERROR)


class _PresetIdGenerator(IdGenerator):
    """Gives the SDK the ids the request path already chose.

    `preset` is called immediately before `Tracer.start_span` on the same thread, and
    start_span asks for at most one trace id (root spans only) and exactly one span id.
    Each value is consumed when read, so a stale preset can never leak into a later span;
    if none is set (which would be our bug) a random id keeps the span well formed.
    """

    __slots__ = ("_random", "_span_id", "_trace_id")

    def __init__(self) -> None:
        self._trace_id = 0
        self._span_id = 0
        self._random = False

    def preset(self, trace_id: int, span_id: int, random_trace_id: bool = False) -> None:
        self._trace_id = trace_id
        self._span_id = span_id
        self._random = random_trace_id

    def is_trace_id_random(self) -> bool:
        """Asked by the SDK right after `generate_trace_id` for a root span: whether the span's
        context gets the random-trace-id flag, which must match what we propagated."""
        random_trace_id, self._random = self._random, False
        return random_trace_id

    def generate_trace_id(self) -> int:
        trace_id, self._trace_id = self._trace_id, 0
        return trace_id or random.getrandbits(128) or 1

    def generate_span_id(self) -> int:
        span_id, self._span_id = self._span_id, 0
        return span_id or random.getrandbits(64) or 1


class _CountingExporter(SpanExporter):
    """Wraps the real exporter to count what the SDK hands it and how that went.

    The BatchSpanProcessor pops a batch off its queue and calls `export` straight away, so
    the spans seen here are exactly those that left the queue; that is what lets `submit`
    bound the queue without touching SDK internals. `abandon` makes the rest of a shutdown
    quick when the collector is not answering: the real exporter is shut down (which
    cancels its in-flight RPC and its retry back-off) and later batches fail at once.
    """

    def __init__(self, inner: SpanExporter, stats: SinkStats) -> None:
        self._inner = inner
        self._stats = stats
        self._abandoned = False
        self._inner_shut_down = False
        self._shutdown_lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        n = len(spans)
        stats = self._stats
        stats.taken += n
        if self._abandoned:
            stats.failed += n
            return SpanExportResult.FAILURE
        try:
            result = self._inner.export(spans)
        except Exception:
            # The SDK would log and carry on too, but our counts must see the failure.
            logger.exception("span exporter raised; %d spans lost", n)
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            stats.exported += n
        else:
            stats.failed += n
        return result

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000) -> None:
        # Reached twice when a shutdown was abandoned (once from abandon, once from the
        # processor); forward once.
        with self._shutdown_lock:
            if self._inner_shut_down:
                return
            self._inner_shut_down = True
        self._inner.shutdown()

    def abandon(self) -> None:
        self._abandoned = True
        self.shutdown()


class SpanSink:
    """Turns `SpanRecord`s into exported spans without ever blocking the caller.

    Call `submit` from one thread (the event loop); see `SinkStats` for why the counters
    need no lock under that rule. `exporter` replaces the OTLP exporter (tests use it to
    inject an in-memory or a deliberately slow one); `settings.endpoint`, `insecure`,
    `headers` and `timeout_s` only apply to the default OTLP exporter.
    """

    def __init__(
        self,
        settings: ExportSettings,
        resource_attributes: Mapping[str, str],
        exporter: SpanExporter | None = None,
    ) -> None:
        self.settings = settings
        self.stats = SinkStats()
        if exporter is None:
            exporter = OtlpSpanExporter(
                settings.endpoint,
                insecure=settings.insecure,
                headers=settings.headers or None,
                timeout_s=settings.timeout_s,
            )
        self._exporter = _CountingExporter(exporter, self.stats)
        self._ids = _PresetIdGenerator()
        # Our own provider, never the global one: the process may host other OpenTelemetry
        # users, and ours must stay configured exactly like this. Sampling was decided
        # before a record reaches us, hence ALWAYS_ON. No atexit hook: the SDK's would wait
        # 30 s or more on a dead collector; the server calls our bounded shutdown instead.
        self._provider = TracerProvider(
            sampler=ALWAYS_ON,
            resource=Resource.create(dict(resource_attributes)),
            shutdown_on_exit=False,
            id_generator=self._ids,
        )
        self._provider.add_span_processor(
            BatchSpanProcessor(
                self._exporter,
                max_queue_size=settings.max_queue_size,
                schedule_delay_millis=settings.schedule_delay_ms,
                max_export_batch_size=settings.max_export_batch_size,
            )
        )
        self._tracer = self._provider.get_tracer("extproc")
        self._max_queue = settings.max_queue_size
        self._closed = False
        self._warned_drop = False
        self._warned_error = False

    def submit(self, rec: SpanRecord) -> bool:
        """Queue one finished span for export; False if it was dropped instead.

        Never blocks and never raises: tracing must not fail a request that has already
        been served.
        """
        stats = self.stats
        stats.submitted += 1
        if self._closed or stats.accepted - stats.taken >= self._max_queue:
            stats.dropped += 1
            if not self._warned_drop:
                self._warned_drop = True
                logger.warning(
                    "dropping spans (%s); further drops are only counted",
                    "sink is shut down" if self._closed else f"export queue full at {self._max_queue}",
                )
            return False
        try:
            self._start_and_end(rec)
        except Exception:
            stats.dropped += 1
            if not self._warned_error:
                self._warned_error = True
                logger.exception("could not build span %r; further failures are only counted", rec.name)
            return False
        stats.accepted += 1
        return True

    def _start_and_end(self, rec: SpanRecord) -> None:
        if rec.parent_span_id:
            parent = SpanContext(
                rec.trace_id,
                rec.parent_span_id,
                is_remote=True,
                # The SDK copies the parent's random-trace-id flag into the span's context.
                trace_flags=_SAMPLED_RANDOM if rec.random_trace_id else _SAMPLED,
                trace_state=_Level2TraceState(rec.tracestate) if rec.tracestate else None,
            )
            # An explicit empty base context: the caller's ambient context (contextvars
            # under asyncio) must not leak into the span.
            ctx = trace.set_span_in_context(NonRecordingSpan(parent), Context())
            self._ids.preset(0, rec.span_id)
        else:
            ctx = Context()
            self._ids.preset(rec.trace_id, rec.span_id, rec.random_trace_id)
        span = self._tracer.start_span(
            rec.name, context=ctx, kind=rec.kind, attributes=rec.attributes, start_time=rec.start_ns
        )
        if rec.error:
            span.set_status(_ERROR)
        span.end(end_time=rec.end_ns)

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Export what is queued, then stop; returns within about `timeout_s`.

        This blocks the calling thread, so call it at exit (or from an executor). The SDK
        would wait up to 30 s for its worker and then some for an export in flight, so the
        flush runs on a helper thread that we stop waiting for: four fifths of the budget
        go to flushing; if that is not enough the exporter is abandoned (in-flight RPC
        cancelled, the remaining batches counted as failed) within the rest.
        """
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout_s
        flusher = threading.Thread(target=self._provider.shutdown, name="extproc-span-sink-shutdown", daemon=True)
        flusher.start()
        flusher.join(timeout_s * 0.8)
        if flusher.is_alive():
            logger.warning(
                "span export did not finish within %.1fs; abandoning %d queued spans",
                timeout_s * 0.8,
                self.stats.queued,
            )
            self._exporter.abandon()
            flusher.join(max(0.0, deadline - time.monotonic()))
