"""SpanSink against a real OTLP/gRPC receiver: preset ids survive the SDK, batches are
batched, and a slow or absent collector costs drops, never a blocked caller."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

from extproc.tracing.spans import ExportSettings, SpanRecord, SpanSink
from tests.fixtures.otlp import OtlpReceiver
from tests.fixtures.procs import free_port, wait_until

RESOURCE = {"service.name": "reviews.default", "service.namespace": "default", "k8s.pod.name": "reviews-v1-abc"}

# High bits set and leading zero nibbles, so that signedness or hex padding mistakes show.
TRACE_ID = 0xF0F7651916CD43DD8448EB211C80319C
PARENT_ID = 0x00F067AA0BA902B7
SERVER_ID = 0xB7AD6B7169203331
CLIENT_ID = 0x0000000000000A0B
ROOT_TRACE_ID = 0x000000000000000000000000000000FF
ROOT_ID = 0x8000000000000001
T0 = 1_700_000_000_123_456_789


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


@pytest.fixture
def make_sink() -> Iterator[Callable[..., SpanSink]]:
    """Builds sinks and shuts down whatever a test left running."""
    made: list[SpanSink] = []

    def make(endpoint: str, exporter: SpanExporter | None = None, **settings: object) -> SpanSink:
        sink = SpanSink(ExportSettings(endpoint, **settings), RESOURCE, exporter=exporter)  # type: ignore[arg-type]
        made.append(sink)
        return sink

    yield make
    for sink in made:
        sink.shutdown(2.0)


def record(i: int, **kw: object) -> SpanRecord:
    base: dict[str, object] = dict(
        trace_id=TRACE_ID,
        span_id=0x1000 + i,
        parent_span_id=PARENT_ID,
        kind=SpanKind.SERVER,
        name=f"span-{i}",
        start_ns=T0 + i,
        end_ns=T0 + i + 1000,
        attributes={"i": i},
    )
    base.update(kw)
    return SpanRecord(**base)  # type: ignore[arg-type]


def test_spans_arrive_with_the_preset_ids_kind_times_attributes_status_and_resource(
    receiver: OtlpReceiver, make_sink: Callable[..., SpanSink]
) -> None:
    sink = make_sink(receiver.endpoint, schedule_delay_ms=20)
    server = SpanRecord(
        trace_id=TRACE_ID,
        span_id=SERVER_ID,
        parent_span_id=PARENT_ID,
        kind=SpanKind.SERVER,
        name="reviews.default.svc.cluster.local:9080/*",
        start_ns=T0,
        end_ns=T0 + 2_500_001,
        attributes={"http.method": "GET", "http.status_code": 503, "ratio": 0.25, "istio.canonical": True},
        error=True,
        tracestate="congo=t61rcWkgMzE,rojo=00f067aa0ba902b7",
    )
    client = SpanRecord(
        trace_id=TRACE_ID,
        span_id=CLIENT_ID,
        parent_span_id=SERVER_ID,
        kind=SpanKind.CLIENT,
        name="ratings.default.svc.cluster.local:9080/*",
        start_ns=T0 + 100,
        end_ns=T0 + 2_000_000,
        attributes={"upstream_cluster": "outbound|9080||ratings.default.svc.cluster.local"},
    )
    root = SpanRecord(
        trace_id=ROOT_TRACE_ID,
        span_id=ROOT_ID,
        parent_span_id=0,
        kind=SpanKind.SERVER,
        name="productpage.default.svc.cluster.local:9080/*",
        start_ns=T0 + 7,
        end_ns=T0 + 9,
        attributes={},
    )
    assert [sink.submit(r) for r in (server, client, root)] == [True, True, True]

    got = {s.span_id: s for s in receiver.wait_for(lambda spans: len(spans) >= 3)}
    assert set(got) == {f"{SERVER_ID:016x}", f"{CLIENT_ID:016x}", f"{ROOT_ID:016x}"}

    s = got[f"{SERVER_ID:016x}"]
    assert (s.trace_id, s.parent_span_id) == ("f0f7651916cd43dd8448eb211c80319c", "00f067aa0ba902b7")
    assert (s.kind, s.name, s.start_ns, s.end_ns) == ("SERVER", server.name, T0, T0 + 2_500_001)
    assert s.attributes == {"http.method": "GET", "http.status_code": 503, "ratio": 0.25, "istio.canonical": True}
    assert s.status_code == "ERROR"
    assert s.trace_state == "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"

    c = got[f"{CLIENT_ID:016x}"]
    assert (c.trace_id, c.span_id, c.parent_span_id) == (s.trace_id, "0000000000000a0b", s.span_id)
    assert (c.kind, c.name, c.start_ns, c.end_ns) == ("CLIENT", client.name, T0 + 100, T0 + 2_000_000)
    assert c.attributes == client.attributes
    assert (c.status_code, c.trace_state) == ("UNSET", "")

    r = got[f"{ROOT_ID:016x}"]
    assert (r.trace_id, r.parent_span_id) == (f"{ROOT_TRACE_ID:032x}", "")
    assert (r.kind, r.start_ns, r.end_ns, r.attributes, r.status_code) == ("SERVER", T0 + 7, T0 + 9, {}, "UNSET")

    for span in got.values():
        assert span.resource["service.name"] == "reviews.default"
        assert span.resource["k8s.pod.name"] == "reviews-v1-abc"


def test_a_root_span_ignores_the_callers_ambient_context(
    receiver: OtlpReceiver, make_sink: Callable[..., SpanSink]
) -> None:
    # Under asyncio the current context may hold some other span; a root record must stay a root.
    sink = make_sink(receiver.endpoint, schedule_delay_ms=20)
    ambient = SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(ambient)))
    try:
        assert sink.submit(record(1, trace_id=ROOT_TRACE_ID, parent_span_id=0))
    finally:
        otel_context.detach(token)
    [span] = receiver.wait_for(lambda spans: len(spans) >= 1)
    assert (span.trace_id, span.span_id, span.parent_span_id) == (f"{ROOT_TRACE_ID:032x}", f"{0x1001:016x}", "")


def test_many_spans_go_in_few_export_calls_and_shutdown_flushes_them_all(
    receiver: OtlpReceiver, make_sink: Callable[..., SpanSink]
) -> None:
    # A long schedule delay: only a full batch or shutdown sends anything.
    sink = make_sink(receiver.endpoint, max_queue_size=500, max_export_batch_size=50, schedule_delay_ms=60_000)
    n = 120
    assert all(sink.submit(record(i)) for i in range(n))
    sink.shutdown(10.0)

    spans = receiver.wait_for(lambda spans: len(spans) >= n, timeout=5.0)
    assert [s.name for s in spans] == [f"span-{i}" for i in range(n)]
    assert 3 <= receiver.export_calls < n  # batches of at most 50
    st = sink.stats
    assert (st.submitted, st.accepted, st.dropped) == (n, n, 0)
    assert (st.exported, st.failed, st.queued) == (len(spans), 0, 0)


def test_collector_down_drops_and_counts_without_blocking_and_shutdown_returns(
    make_sink: Callable[..., SpanSink], caplog: pytest.LogCaptureFixture
) -> None:
    # Nothing listens. With a 1.5 s budget the exporter retries once after its ~1 s
    # back-off, so the first batch holds the worker long enough for the queue to fill.
    caplog.set_level(logging.WARNING, logger="extproc.tracing")
    sink = make_sink(
        f"127.0.0.1:{free_port()}", timeout_s=1.5, max_queue_size=100, max_export_batch_size=50, schedule_delay_ms=20
    )
    results = [sink.submit(record(i)) for i in range(5000)]
    accepted = sum(results)
    st = sink.stats
    assert st.submitted == 5000
    assert st.accepted == accepted
    assert st.dropped == 5000 - accepted > 0
    drop_logs = [r for r in caplog.records if r.name == "extproc.tracing" and "dropping" in r.getMessage()]
    assert len(drop_logs) == 1, "the first drop is logged once, later ones only counted"

    wait_until(lambda: st.failed > 0, 10.0, "an export to fail")

    sink.shutdown(2.0)
    assert not sink.submit(record(9999)), "a shut-down sink refuses spans"
    assert st.dropped == 5001 - accepted
    # Whatever was queued was abandoned as failed; nothing was lost without a count.
    wait_until(lambda: st.failed == accepted, 5.0, f"all accepted spans to count as failed: {st}")
    assert (st.exported, st.queued) == (0, 0)


def test_slow_collector_drops_new_spans_and_delivers_the_accepted_ones_in_order(
    make_sink: Callable[..., SpanSink],
) -> None:
    with OtlpReceiver(delay_s=0.3) as slow:
        sink = make_sink(slow.endpoint, max_queue_size=20, max_export_batch_size=10, schedule_delay_ms=10)
        accepted = [f"span-{i}" for i in range(200) if sink.submit(record(i))]
        st = sink.stats
        assert st.dropped > 0
        assert st.submitted == len(accepted) + st.dropped == 200

        sink.shutdown(10.0)
        spans = slow.wait_for(lambda spans: len(spans) >= len(accepted), timeout=5.0)
        assert [s.name for s in spans] == accepted
        assert (st.exported, st.failed, st.queued) == (len(spans), 0, 0)


class _BlockingExporter(SpanExporter):
    """An exporter stuck in export until released: shutdown must not wait for it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.entered.set()
        self.release.wait(30)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def test_shutdown_is_bounded_even_if_the_exporter_never_returns(make_sink: Callable[..., SpanSink]) -> None:
    exporter = _BlockingExporter()
    sink = make_sink("unused:1", exporter=exporter, max_queue_size=10, max_export_batch_size=5, schedule_delay_ms=10)
    try:
        for i in range(10):
            sink.submit(record(i))
        assert exporter.entered.wait(5)
        done = threading.Thread(target=sink.shutdown, args=(0.3,), daemon=True)
        done.start()
        done.join(10)  # a liveness check with ample headroom, not a speed limit
        assert not done.is_alive(), "shutdown hung on a stuck exporter"
        assert sink.stats.exported == 0
    finally:
        exporter.release.set()


class _RaisingExporter(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        raise RuntimeError("boom")

    def shutdown(self) -> None:
        pass


def test_an_exporter_that_raises_counts_as_failed(make_sink: Callable[..., SpanSink]) -> None:
    sink = make_sink("unused:1", exporter=_RaisingExporter(), max_export_batch_size=4, schedule_delay_ms=10)
    for i in range(4):
        assert sink.submit(record(i))
    wait_until(lambda: sink.stats.failed == 4, 5.0, "the raising export to be counted")
    assert (sink.stats.exported, sink.stats.queued) == (0, 0)


def test_settings_shrink_the_batch_to_a_small_queue_and_reject_a_zero_timeout() -> None:
    # Only the queue size is an operator knob; the default batch (512) must not make a small queue an error.
    assert ExportSettings("127.0.0.1:4317", max_queue_size=100).max_export_batch_size == 100
    assert ExportSettings("127.0.0.1:4317").max_export_batch_size == 512
    with pytest.raises(ValueError, match="timeout_s"):
        ExportSettings("127.0.0.1:4317", timeout_s=0)


def test_receiver_wait_for_says_what_arrived(receiver: OtlpReceiver, make_sink: Callable[..., SpanSink]) -> None:
    sink = make_sink(receiver.endpoint, schedule_delay_ms=10)
    sink.submit(record(1))
    receiver.wait_for(lambda spans: len(spans) == 1)
    with pytest.raises(AssertionError, match=r"(?s)1 spans in 1 Export calls.*'span-1'"):
        receiver.wait_for(lambda spans: len(spans) > 1, timeout=0.2)


@pytest.mark.parametrize("rnd", [True, False])
@pytest.mark.parametrize("parent", [PARENT_ID, 0], ids=["continued", "root"])
def test_spans_carry_the_w3c_trace_flags_that_were_propagated(
    receiver: OtlpReceiver, make_sink: Callable[..., SpanSink], parent: int, rnd: bool
) -> None:
    """OTLP `Span.flags` bits 0-7 are the W3C trace flags: sampled always (only sampled spans
    are exported), random-trace-id as it was sent on with the trace id."""
    sink = make_sink(receiver.endpoint, schedule_delay_ms=20)
    assert sink.submit(record(1, parent_span_id=parent, random_trace_id=rnd))
    [span] = receiver.wait_for(lambda spans: len(spans) >= 1)
    assert span.flags & 0xFF == (0x03 if rnd else 0x01)
    assert span.flags >> 8 == (0b11 if parent else 0b01)  # the SDK's "parent is remote" bits, untouched


def test_spans_keep_a_tracestate_with_level_2_keys(receiver: OtlpReceiver, make_sink: Callable[..., SpanSink]) -> None:
    """OpenTelemetry 1.45 parses tracestate keys with Level 1's grammar and would drop this list."""
    tracestate = "1abc=1,foo@@bar=2,t@" + "v" * 15 + "=3," + "t" * 242 + "@v=4,rojo=00f067aa0ba902b7"
    sink = make_sink(receiver.endpoint, schedule_delay_ms=20)
    assert sink.submit(record(1, tracestate=tracestate))
    [span] = receiver.wait_for(lambda spans: len(spans) >= 1)
    assert span.trace_state == tracestate
