"""Tracing for one sidecar: continue or start the trace of each request, and report its span.

The two halves happen at different times and, in the `authz+als` mode, in different RPCs:

* `begin` runs when the request arrives (ext_authz Check or ext_proc request headers). It
  decides the trace, our span id and the sampling, and returns the headers the upstream must
  see. The span id is chosen here because the application's own spans are children of it.
* `finish` runs when the request is over (access log entry or ext_proc response) and reports
  one span with those ids: a server span inbound, a client span outbound, as Istio's
  sidecars do.

In `authz+als` the ids travel from the Check to the access log entry in Envoy's dynamic
metadata (`TRACE_KEY`, written by ext_authz), so nothing is kept in extproc between the two.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import SpanKind

from extproc import verdict
from extproc.telemetry.peer import Workload
from extproc.telemetry.record import Direction, HttpRecord
from extproc.tracing.context import FLAG_RANDOM_TRACE_ID, Format, Outgoing, Propagator, Sampler
from extproc.tracing.spans import ExportSettings, SpanRecord

if TYPE_CHECKING:
    from extproc.tracing.export import SpanSink

# Dynamic metadata keys (next to the decision metadata, all named in extproc/verdict.py)
# carrying the ids from Check to the log, and the decision metadata a span reports.
TRACE_KEY = verdict.TRACE
TRACESTATE_KEY = verdict.TRACESTATE
DECISION_KEYS = verdict.SPAN_DECISION_KEYS


# extproc_trace_contexts_total labels by (new trace, sampled), built once.
_CONTEXT_KEYS = {
    (new, sampled): ("started" if new else "continued", "true" if sampled else "false")
    for new in (False, True)
    for sampled in (False, True)
}


@dataclass(frozen=True, slots=True)
class SpanIds:
    trace_id: int
    span_id: int
    parent_span_id: int
    tracestate: str = ""
    random_trace_id: bool = False  # the W3C random-trace-id flag sent with trace_id

    def encode(self) -> str:
        """`trace-span-parent-flags`, the flags as traceparent writes them (only 02 is used)."""
        flags = "02" if self.random_trace_id else "00"
        return f"{self.trace_id:032x}-{self.span_id:016x}-{self.parent_span_id:016x}-{flags}"

    @classmethod
    def decode(cls, value: str, tracestate: str = "") -> SpanIds | None:
        """The ids from dynamic metadata, or None when absent or damaged (no span then).

        The 66-character form without flags is what an extproc before the random-trace-id flag
        wrote; a Check answered by one and logged by a newer one (a rolling update) still gets
        its span, without the flag."""
        n = len(value)
        if (n != 66 and (n != 69 or value[66] != "-")) or value[32] != "-" or value[49] != "-":
            return None
        try:
            trace_id, span_id, parent = int(value[:32], 16), int(value[33:49], 16), int(value[50:66], 16)
            flags = int(value[67:], 16) if n == 69 else 0
        except ValueError:
            return None
        if not trace_id or not span_id:
            return None
        return cls(trace_id, span_id, parent, tracestate, bool(flags & FLAG_RANDOM_TRACE_ID))

    @classmethod
    def of(cls, out: Outgoing) -> SpanIds:
        return cls(out.trace_id, out.span_id, out.parent_span_id, out.tracestate, out.random_trace_id)


@dataclass(frozen=True)
class TracingSettings:
    formats: tuple[Format, ...]  # () turns propagation off
    sampling_percent: float = 1.0
    export: ExportSettings | None = None  # None: no spans


def _error(direction: Direction, code: int) -> bool:
    """OpenTelemetry's HTTP semantic conventions: 5xx fails a server span; 4xx a client span too."""
    if code == 0:
        return True
    return code >= 500 or (direction is Direction.OUTBOUND and code >= 400)


class Tracing:
    def __init__(self, settings: TracingSettings, local: Workload, sink: SpanSink | None = None) -> None:
        self.settings = settings
        self.propagator = Propagator(settings.formats, Sampler(settings.sampling_percent)) if settings.formats else None
        if sink is None and settings.export is not None:
            from extproc.tracing.export import SpanSink  # the SDK, only for a server that exports

            sink = SpanSink(settings.export, resource_attributes(local))
        self.sink = sink
        self.local = local
        # Our own tags on every span, as Istio's sidecars add them (istio.canonical_service, ...).
        self._local_tags: dict[str, str] = {
            "istio.canonical_service": local.canonical_service,
            "istio.canonical_revision": local.canonical_revision,
            "istio.namespace": local.namespace,
        }
        if local.workload_name:
            self._local_tags["istio.workload"] = local.workload_name
        # (continued|started, sampled true|false) -> requests; plain ints on the request path.
        self.contexts: dict[tuple[str, str], int] = {}

    @property
    def propagates(self) -> bool:
        return self.propagator is not None

    @property
    def exports(self) -> bool:
        return self.sink is not None

    def begin(self, headers: Mapping[str, str]) -> Outgoing | None:
        if self.propagator is None:
            return None
        out = self.propagator.begin(headers)
        key = _CONTEXT_KEYS[out.new_trace, out.sampled]
        self.contexts[key] = self.contexts.get(key, 0) + 1
        return out

    def wants_span(self, out: Outgoing | None) -> bool:
        return out is not None and out.sampled and self.sink is not None

    def metadata(self, out: Outgoing) -> dict[str, Any]:
        """What the Check hands to the access log entry, only for spans that will be reported."""
        md: dict[str, Any] = {TRACE_KEY: SpanIds.of(out).encode()}
        if out.tracestate:
            md[TRACESTATE_KEY] = out.tracestate
        return md

    def finish(
        self,
        ids: SpanIds,
        rec: HttpRecord,
        start_ns: int,
        end_ns: int,
        decision: Mapping[str, Any] | None = None,
    ) -> bool:
        """Report the request's span; False when there is no exporter or its queue is full."""
        if self.sink is None:
            return False
        return self.sink.submit(self.span(ids, rec, start_ns, end_ns, decision))

    def span(
        self,
        ids: SpanIds,
        rec: HttpRecord,
        start_ns: int,
        end_ns: int,
        decision: Mapping[str, Any] | None = None,
    ) -> SpanRecord:
        """The span of one HTTP request, named and tagged as Istio's sidecars name and tag theirs.

        Tags carry both Envoy's names (what Istio users search by in Jaeger/Zipkin) and the
        OpenTelemetry HTTP semantic-convention names.
        """
        direction = rec.peer.direction
        host = rec.peer.host
        url_path = rec.path.split("?", 1)[0]
        attrs: dict[str, str | int | float | bool] = dict(self._local_tags)
        attrs.update(
            {
                "component": "proxy",
                "upstream_cluster": rec.peer.upstream_cluster or ("inbound" if direction is Direction.INBOUND else ""),
                "http.method": rec.method,
                "http.request.method": rec.method,
                "http.url": f"{rec.scheme or 'http'}://{host}{rec.path}",
                "url.path": url_path,
                "http.status_code": rec.response_code,
                "http.response.status_code": rec.response_code,
                "response_flags": rec.response_flags,
                "guid:x-request-id": rec.request_id,
            }
        )
        if not attrs["upstream_cluster"]:
            del attrs["upstream_cluster"]
        if rec.user_agent:
            attrs["user_agent"] = rec.user_agent
            attrs["user_agent.original"] = rec.user_agent
        if rec.source_address:
            attrs["peer.address"] = rec.source_address
        if rec.request_bytes is not None:
            attrs["request_size"] = rec.request_bytes
        if rec.response_bytes is not None:
            attrs["response_size"] = rec.response_bytes
        if rec.grpc and rec.grpc_status:
            attrs["grpc.status_code"] = int(rec.grpc_status)
            attrs["rpc.grpc.status_code"] = int(rec.grpc_status)
        side = "source" if direction is Direction.INBOUND else "destination"
        peer = rec.peer.workload
        if peer is not None:
            attrs[f"istio.{side}_workload"] = peer.workload_name or "unknown"
            attrs[f"istio.{side}_namespace"] = peer.namespace or "unknown"
            attrs[f"istio.{side}_canonical_service"] = peer.canonical_service or "unknown"
        if rec.peer.peer_principal:
            attrs[f"istio.{side}_principal"] = rec.peer.peer_principal
        if decision:
            result = decision.get(verdict.ENGINE_RESULT)
            if result:
                attrs["istio.authorization.decision"] = str(result)
            stage = decision.get(verdict.STAGE)
            if stage:
                attrs["istio.authorization.stage"] = str(stage)
            policy = decision.get(verdict.EFFECTIVE_POLICY)
            if policy:
                attrs["istio.authorization.policy"] = str(policy)
        return SpanRecord(
            trace_id=ids.trace_id,
            span_id=ids.span_id,
            parent_span_id=ids.parent_span_id,
            kind=SpanKind.SERVER if direction is Direction.INBOUND else SpanKind.CLIENT,
            name=span_name(host),
            start_ns=start_ns,
            end_ns=max(end_ns, start_ns),
            attributes=attrs,
            error=_error(direction, rec.response_code),
            tracestate=ids.tracestate,
            random_trace_id=ids.random_trace_id,
        )

    def shutdown(self, timeout_s: float = 5.0) -> None:
        if self.sink is not None:
            self.sink.shutdown(timeout_s)


def span_name(host: str) -> str:
    """Istio names a sidecar's span by the route decorator it generates, `<service host>:<port>/*`.

    Without Istio's routes, the request's authority stands in: `httpbin.foo:8000/*`.
    """
    return f"{host or 'unknown'}/*"


def resource_attributes(local: Workload) -> dict[str, str]:
    """`service.name` as Istio names a sidecar's spans by default: `<canonical service>.<namespace>`."""
    attrs = {
        "service.name": f"{local.canonical_service}.{local.namespace}",
        "service.namespace": local.namespace,
        "k8s.namespace.name": local.namespace,
    }
    if local.workload_name:
        attrs["k8s.workload.name"] = local.workload_name
    if local.canonical_revision:
        attrs["service.version"] = local.canonical_revision
    if local.cluster:
        attrs["k8s.cluster.name"] = local.cluster
    return attrs
