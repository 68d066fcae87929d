"""extproc's OTLP encoder (extproc/tracing/otlp.py) against opentelemetry-proto's own classes:
what it writes decodes, field for field, as OTLP says, and its message classes live in a pool
of their own, so no installed copy of `opentelemetry/proto` can collide with them."""

from __future__ import annotations

import importlib.metadata as md

import grpc
import pytest
from google.protobuf import descriptor_pool
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    TraceFlags,
    TraceState,
    set_span_in_context,
)
from opentelemetry.trace.status import Status, StatusCode

from extproc.tracing import otlp
from tests.fixtures.otlp import OtlpReceiver


def _spans() -> list[object]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "reviews.bookinfo", "k8s.pod": "p-1"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("extproc", "9.9")
    remote = SpanContext(
        0x4BF92F3577B34DA6A3CE929D0E0E4736,
        0x00F067AA0BA902B7,
        is_remote=True,
        trace_flags=TraceFlags(0x03),
        trace_state=TraceState([("congo", "t61rcWkgMzE"), ("rojo", "00f067aa0ba902b7")]),
    )
    linked = SpanContext(0x1, 0x2, is_remote=False, trace_flags=TraceFlags(0x01))
    span = tracer.start_span(
        "reviews:9080/*",
        context=set_span_in_context(NonRecordingSpan(remote)),
        kind=SpanKind.SERVER,
        attributes={"http.status_code": 503, "component": "proxy", "sampled": True, "ratio": 0.5, "tags": ["a", "b"]},
        links=[Link(linked, {"why": "retry"})],
        start_time=1_000,
    )
    span.add_event("denied", {"policy": "ns[x]-policy[y]-rule[0]"}, timestamp=1_500)
    span.set_status(Status(StatusCode.ERROR, "upstream reset"))
    span.end(end_time=2_000)
    root = tracer.start_span("root", kind=SpanKind.CLIENT, start_time=3_000)
    root.end(end_time=4_000)
    return list(memory.get_finished_spans())


def test_the_encoding_decodes_as_otlp() -> None:
    spans = _spans()
    raw = otlp.encode(spans).SerializeToString()
    request = trace_service_pb2.ExportTraceServiceRequest.FromString(raw)
    [rs] = request.resource_spans
    resource = {kv.key: kv.value.string_value for kv in rs.resource.attributes}
    assert resource["service.name"] == "reviews.bookinfo" and resource["k8s.pod"] == "p-1"
    [ss] = rs.scope_spans
    assert (ss.scope.name, ss.scope.version) == ("extproc", "9.9")
    child, root = ss.spans
    assert child.trace_id.hex() == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert child.parent_span_id.hex() == "00f067aa0ba902b7"
    assert child.trace_state == "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
    assert child.flags == 0x03 | 0x100 | 0x200  # W3C flags inherited; the parent is remote
    assert child.kind == trace_pb2.Span.SPAN_KIND_SERVER
    assert (child.start_time_unix_nano, child.end_time_unix_nano) == (1_000, 2_000)
    attrs = {kv.key: kv.value for kv in child.attributes}
    assert attrs["http.status_code"].int_value == 503
    assert attrs["component"].string_value == "proxy"
    assert attrs["sampled"].bool_value is True
    assert attrs["ratio"].double_value == 0.5
    assert [v.string_value for v in attrs["tags"].array_value.values] == ["a", "b"]
    [event] = child.events
    assert (event.name, event.time_unix_nano, event.attributes[0].key) == ("denied", 1_500, "policy")
    [link] = child.links
    assert (link.trace_id.hex()[-2:], link.span_id.hex(), link.attributes[0].value.string_value) == (
        "01",
        "0000000000000002",
        "retry",
    )
    assert (child.status.code, child.status.message) == (trace_pb2.Status.STATUS_CODE_ERROR, "upstream reset")
    assert root.parent_span_id == b""
    assert root.flags & 0x300 == 0x100  # no parent: known, and not remote
    assert root.flags & 0xFF == int(spans[1].context.trace_flags)  # sampled, and the SDK's random-id bit
    assert root.kind == trace_pb2.Span.SPAN_KIND_CLIENT


def test_the_messages_are_private() -> None:
    assert otlp.ExportTraceServiceRequest.DESCRIPTOR.file.pool is not descriptor_pool.Default()
    assert otlp.ExportTraceServiceRequest.DESCRIPTOR.full_name.startswith("extproc.")


def test_the_installed_package_does_not_need_opentelemetry_proto() -> None:
    requires = md.requires("extproc") or []
    runtime = [r for r in requires if "extra ==" not in r]
    assert not any(r.startswith(("opentelemetry-proto", "opentelemetry-exporter-otlp")) for r in runtime), runtime


@pytest.mark.parametrize(
    ("endpoint", "insecure", "expected"),
    [
        ("collector:4317", True, ("collector:4317", False)),
        ("collector:4317", False, ("collector:4317", True)),
        ("https://collector:4317", True, ("collector:4317", True)),
        ("http://collector:4317/", False, ("collector:4317", False)),
    ],
)
def test_tls_follows_the_official_exporters_rule(endpoint: str, insecure: bool, expected: tuple[str, bool]) -> None:
    assert otlp.target_of(endpoint, insecure) == expected


def test_a_real_receiver_gets_the_batch_and_an_unreachable_one_fails_within_the_timeout() -> None:
    spans = _spans()
    receiver = OtlpReceiver()
    try:
        exporter = otlp.OtlpSpanExporter(receiver.endpoint, headers=[("X-Tenant", "a")], timeout_s=5)
        assert exporter.export(spans) is SpanExportResult.SUCCESS
        got = receiver.wait_for(lambda s: len(s) == 2)
        assert {s.name for s in got} == {"reviews:9080/*", "root"}
        assert receiver.export_calls == 1  # one batch, one call
        exporter.shutdown()
        assert exporter.export(spans) is SpanExportResult.FAILURE  # after shutdown, at once
    finally:
        receiver.stop()
    dead = otlp.OtlpSpanExporter("127.0.0.1:1", timeout_s=0.5)
    assert dead.export(spans) is SpanExportResult.FAILURE
    dead.shutdown()
    assert grpc.StatusCode.UNAVAILABLE in otlp._RETRYABLE
