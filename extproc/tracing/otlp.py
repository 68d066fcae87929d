"""OTLP/gRPC trace export for the OpenTelemetry SDK, with message classes of its own.

Why not opentelemetry-exporter-otlp-proto-grpc: it needs the `opentelemetry/proto` files of
opentelemetry-proto, and xds-protos (Envoy's API, which every extproc transport needs) ships
an older copy of the very same files. Whichever wheel pip installs last overwrites the other,
so a plain `pip install extproc` could leave the exporter unable to import (its encoder needs
`InstrumentationScope`, which the older copy lacks). Depending on neither copy removes the
clash at its root: the OTLP trace messages are declared here, in a descriptor pool private to
this module, so they can never collide with any other package's protos, and only xds-protos
owns `opentelemetry/proto` in an installed extproc. The SDK (spans, the batch processor) is
still OpenTelemetry's; this module replaces only the encoder and the gRPC call, with the
official exporter's behaviour: TLS by `https://` or `insecure`, headers as gRPC metadata, a
deadline per export that retries transient errors with exponential back-off, and a shutdown
that cancels whatever is in flight.

The field numbers are those of the OTLP specification (opentelemetry-proto,
`opentelemetry/proto/{common,resource,trace}/v1` and `collector/trace/v1`). Only numbers and
wire types reach the wire, so the messages live in one package of our own; the gRPC method is
the collector's `opentelemetry.proto.collector.trace.v1.TraceService/Export`.
tests/unit/test_tracing_otlp.py decodes what this writes with opentelemetry-proto's own
classes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

logger = logging.getLogger("extproc.tracing")

EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"

_F = descriptor_pb2.FieldDescriptorProto
_PACKAGE = "extproc.otlp.v1"
# (message, [(field, number, type, repeated, message type or "", oneof index or None)])
_SCHEMA: tuple[tuple[str, tuple[tuple[str, int, int, bool, str, int | None], ...]], ...] = (
    (
        "AnyValue",
        (
            ("string_value", 1, _F.TYPE_STRING, False, "", 0),
            ("bool_value", 2, _F.TYPE_BOOL, False, "", 0),
            ("int_value", 3, _F.TYPE_INT64, False, "", 0),
            ("double_value", 4, _F.TYPE_DOUBLE, False, "", 0),
            ("array_value", 5, _F.TYPE_MESSAGE, False, "ArrayValue", 0),
            ("kvlist_value", 6, _F.TYPE_MESSAGE, False, "KeyValueList", 0),
            ("bytes_value", 7, _F.TYPE_BYTES, False, "", 0),
        ),
    ),
    ("ArrayValue", (("values", 1, _F.TYPE_MESSAGE, True, "AnyValue", None),)),
    ("KeyValueList", (("values", 1, _F.TYPE_MESSAGE, True, "KeyValue", None),)),
    (
        "KeyValue",
        (("key", 1, _F.TYPE_STRING, False, "", None), ("value", 2, _F.TYPE_MESSAGE, False, "AnyValue", None)),
    ),
    (
        "InstrumentationScope",
        (
            ("name", 1, _F.TYPE_STRING, False, "", None),
            ("version", 2, _F.TYPE_STRING, False, "", None),
            ("attributes", 3, _F.TYPE_MESSAGE, True, "KeyValue", None),
            ("dropped_attributes_count", 4, _F.TYPE_UINT32, False, "", None),
        ),
    ),
    (
        "Resource",
        (
            ("attributes", 1, _F.TYPE_MESSAGE, True, "KeyValue", None),
            ("dropped_attributes_count", 2, _F.TYPE_UINT32, False, "", None),
        ),
    ),
    (
        "Status",
        (("message", 2, _F.TYPE_STRING, False, "", None), ("code", 3, _F.TYPE_INT32, False, "", None)),
    ),
    (
        "Event",
        (
            ("time_unix_nano", 1, _F.TYPE_FIXED64, False, "", None),
            ("name", 2, _F.TYPE_STRING, False, "", None),
            ("attributes", 3, _F.TYPE_MESSAGE, True, "KeyValue", None),
            ("dropped_attributes_count", 4, _F.TYPE_UINT32, False, "", None),
        ),
    ),
    (
        "Link",
        (
            ("trace_id", 1, _F.TYPE_BYTES, False, "", None),
            ("span_id", 2, _F.TYPE_BYTES, False, "", None),
            ("trace_state", 3, _F.TYPE_STRING, False, "", None),
            ("attributes", 4, _F.TYPE_MESSAGE, True, "KeyValue", None),
            ("dropped_attributes_count", 5, _F.TYPE_UINT32, False, "", None),
            ("flags", 6, _F.TYPE_FIXED32, False, "", None),
        ),
    ),
    (
        "Span",
        (
            ("trace_id", 1, _F.TYPE_BYTES, False, "", None),
            ("span_id", 2, _F.TYPE_BYTES, False, "", None),
            ("trace_state", 3, _F.TYPE_STRING, False, "", None),
            ("parent_span_id", 4, _F.TYPE_BYTES, False, "", None),
            ("name", 5, _F.TYPE_STRING, False, "", None),
            ("kind", 6, _F.TYPE_INT32, False, "", None),  # an enum on the wire: a varint
            ("start_time_unix_nano", 7, _F.TYPE_FIXED64, False, "", None),
            ("end_time_unix_nano", 8, _F.TYPE_FIXED64, False, "", None),
            ("attributes", 9, _F.TYPE_MESSAGE, True, "KeyValue", None),
            ("dropped_attributes_count", 10, _F.TYPE_UINT32, False, "", None),
            ("events", 11, _F.TYPE_MESSAGE, True, "Event", None),
            ("dropped_events_count", 12, _F.TYPE_UINT32, False, "", None),
            ("links", 13, _F.TYPE_MESSAGE, True, "Link", None),
            ("dropped_links_count", 14, _F.TYPE_UINT32, False, "", None),
            ("status", 15, _F.TYPE_MESSAGE, False, "Status", None),
            ("flags", 16, _F.TYPE_FIXED32, False, "", None),
        ),
    ),
    (
        "ScopeSpans",
        (
            ("scope", 1, _F.TYPE_MESSAGE, False, "InstrumentationScope", None),
            ("spans", 2, _F.TYPE_MESSAGE, True, "Span", None),
            ("schema_url", 3, _F.TYPE_STRING, False, "", None),
        ),
    ),
    (
        "ResourceSpans",
        (
            ("resource", 1, _F.TYPE_MESSAGE, False, "Resource", None),
            ("scope_spans", 2, _F.TYPE_MESSAGE, True, "ScopeSpans", None),
            ("schema_url", 3, _F.TYPE_STRING, False, "", None),
        ),
    ),
    ("ExportTraceServiceRequest", (("resource_spans", 1, _F.TYPE_MESSAGE, True, "ResourceSpans", None),)),
    (
        "ExportTracePartialSuccess",
        (("rejected_spans", 1, _F.TYPE_INT64, False, "", None), ("error_message", 2, _F.TYPE_STRING, False, "", None)),
    ),
    (
        "ExportTraceServiceResponse",
        (("partial_success", 1, _F.TYPE_MESSAGE, False, "ExportTracePartialSuccess", None),),
    ),
)


def _message_classes() -> dict[str, Any]:
    f = descriptor_pb2.FileDescriptorProto(name="extproc/otlp/v1/trace.proto", package=_PACKAGE, syntax="proto3")
    for name, fields in _SCHEMA:
        m = f.message_type.add(name=name)
        if any(oneof is not None for *_, oneof in fields):
            m.oneof_decl.add(name="value")
        for fname, number, ftype, repeated, type_name, oneof in fields:
            fd = m.field.add(
                name=fname,
                number=number,
                type=ftype,
                label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL,
            )
            if type_name:
                fd.type_name = f".{_PACKAGE}.{type_name}"
            if oneof is not None:
                fd.oneof_index = oneof
    pool = descriptor_pool.DescriptorPool()  # private: no other package's protos can collide
    pool.Add(f)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.{name}")) for name, _ in _SCHEMA
    }


_M = _message_classes()
ExportTraceServiceRequest = _M["ExportTraceServiceRequest"]
ExportTraceServiceResponse = _M["ExportTraceServiceResponse"]

# OTLP Span.flags bits 8 and 9: whether the parent's remoteness is known, and that it is remote.
CONTEXT_HAS_IS_REMOTE = 0x100
CONTEXT_IS_REMOTE = 0x200


def _set_value(v: Any, value: object) -> None:
    if isinstance(value, str):
        v.string_value = value
    elif isinstance(value, bool):  # before int: a bool is an int
        v.bool_value = value
    elif isinstance(value, int):
        v.int_value = value
    elif isinstance(value, float):
        v.double_value = value
    elif isinstance(value, bytes):
        v.bytes_value = value
    elif isinstance(value, Sequence):
        arr = v.array_value
        for item in value:
            _set_value(arr.values.add(), item)
    else:
        v.string_value = str(value)


def _attributes(target: Any, attributes: Mapping[str, object] | None) -> None:
    if not attributes:
        return
    for key, value in attributes.items():
        kv = target.add(key=key)
        _set_value(kv.value, value)


def _flags(trace_flags: int, parent: Any) -> int:
    flags = (int(trace_flags) & 0xFF) | CONTEXT_HAS_IS_REMOTE
    if parent is not None and parent.is_remote:
        flags |= CONTEXT_IS_REMOTE
    return flags


def encode(spans: Iterable[ReadableSpan]) -> Any:
    """The ExportTraceServiceRequest for a batch: spans grouped by resource, then by scope."""
    request = ExportTraceServiceRequest()
    by_resource: dict[int, tuple[Any, dict[tuple[str, str], Any]]] = {}
    for span in spans:
        resource = span.resource
        found = by_resource.get(id(resource))
        if found is None:
            rs = request.resource_spans.add()
            _attributes(rs.resource.attributes, resource.attributes)
            rs.schema_url = resource.schema_url or ""
            found = by_resource[id(resource)] = (rs, {})
        rs, scopes = found
        scope = span.instrumentation_scope
        key = (scope.name, scope.version or "") if scope is not None else ("", "")
        ss = scopes.get(key)
        if ss is None:
            ss = scopes[key] = rs.scope_spans.add()
            if scope is not None:
                ss.scope.name = scope.name
                ss.scope.version = scope.version or ""
                ss.schema_url = scope.schema_url or ""
                _attributes(ss.scope.attributes, scope.attributes)
        ctx = span.context
        assert ctx is not None, "a finished SDK span has a context"
        s = ss.spans.add()
        s.trace_id = ctx.trace_id.to_bytes(16, "big")
        s.span_id = ctx.span_id.to_bytes(8, "big")
        if ctx.trace_state:
            s.trace_state = ctx.trace_state.to_header()
        parent = span.parent
        if parent is not None:
            s.parent_span_id = parent.span_id.to_bytes(8, "big")
        s.flags = _flags(ctx.trace_flags, parent)
        s.name = span.name
        s.kind = span.kind.value + 1  # SDK INTERNAL=0 ... CONSUMER=4; OTLP has UNSPECIFIED=0 first
        s.start_time_unix_nano = span.start_time or 0
        s.end_time_unix_nano = span.end_time or 0
        _attributes(s.attributes, span.attributes)
        s.dropped_attributes_count = span.dropped_attributes
        for event in span.events:
            e = s.events.add(time_unix_nano=event.timestamp, name=event.name)
            _attributes(e.attributes, event.attributes)
        s.dropped_events_count = span.dropped_events
        for link in span.links:
            lc = link.context
            li = s.links.add(trace_id=lc.trace_id.to_bytes(16, "big"), span_id=lc.span_id.to_bytes(8, "big"))
            if lc.trace_state:
                li.trace_state = lc.trace_state.to_header()
            li.flags = _flags(lc.trace_flags, lc)
            _attributes(li.attributes, link.attributes)
        s.dropped_links_count = span.dropped_links
        status = span.status
        s.status.code = status.status_code.value  # UNSET 0, OK 1, ERROR 2 in both
        if status.description:
            s.status.message = status.description
    return request


# The codes the official exporter retries (OTLP's "retryable" gRPC statuses).
_RETRYABLE = frozenset(
    {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
_BACKOFF_S = 1.0


def target_of(endpoint: str, insecure: bool) -> tuple[str, bool]:
    """(gRPC target, whether to use TLS): `https://` turns TLS on and `http://` off whatever
    `insecure` says, as the official exporter decides; a bare `host:port` follows `insecure`."""
    if endpoint.startswith("https://"):
        return endpoint.removeprefix("https://").rstrip("/"), True
    if endpoint.startswith("http://"):
        return endpoint.removeprefix("http://").rstrip("/"), False
    return endpoint, not insecure


class OtlpSpanExporter(SpanExporter):
    """Sends each batch as one `TraceService/Export` call; see the module docstring."""

    def __init__(
        self,
        endpoint: str,
        *,
        insecure: bool = True,
        headers: Sequence[tuple[str, str]] | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        target, tls = target_of(endpoint, insecure)
        self._channel = (
            grpc.secure_channel(target, grpc.ssl_channel_credentials()) if tls else grpc.insecure_channel(target)
        )
        self._export: grpc.UnaryUnaryMultiCallable[Any, Any] = self._channel.unary_unary(
            EXPORT_METHOD,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=ExportTraceServiceResponse.FromString,
        )
        self._metadata = tuple((k.lower(), v) for k, v in headers or ())
        self._timeout_s = timeout_s
        self._stopping = threading.Event()
        self._closed = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._stopping.is_set():
            return SpanExportResult.FAILURE
        request = encode(spans)
        deadline = time.monotonic() + self._timeout_s
        backoff = _BACKOFF_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return SpanExportResult.FAILURE
            try:
                response = self._export(request, timeout=left, metadata=self._metadata)
            except grpc.RpcError as e:
                code = e.code() if isinstance(e, grpc.Call) else None
                if self._stopping.is_set() or code not in _RETRYABLE:
                    logger.warning("OTLP export of %d spans failed: %s", len(spans), code)
                    return SpanExportResult.FAILURE
                wait = min(backoff, deadline - time.monotonic())
                if wait <= 0 or self._stopping.wait(wait):
                    return SpanExportResult.FAILURE
                backoff *= 2
                continue
            rejected = response.partial_success.rejected_spans
            if rejected:
                logger.warning(
                    "the collector rejected %d of %d spans: %s",
                    rejected,
                    len(spans),
                    response.partial_success.error_message,
                )
            return SpanExportResult.SUCCESS

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # nothing is buffered here: the batch processor holds the spans

    def shutdown(self) -> None:
        """Cancel a back-off wait and every call in flight; later exports fail at once."""
        self._stopping.set()
        if not self._closed:
            self._closed = True
            self._channel.close()
