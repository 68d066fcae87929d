"""The tracing facade: ids handed from the Check to the access log, and the span of a request
named and tagged as Istio's sidecars do it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.trace import SpanKind

from extproc.telemetry.peer import Workload
from extproc.telemetry.record import Direction, HttpRecord, Peer
from extproc.tracing.context import Format
from extproc.tracing.tracer import TRACE_KEY, SpanIds, Tracing, TracingSettings, resource_attributes

LOCAL = Workload(workload_name="httpbin-v1", namespace="foo", canonical_service="httpbin", canonical_revision="v1")
PEER = Workload(workload_name="sleep", namespace="bar", canonical_service="sleep", canonical_revision="latest")


def _record(direction: Direction, code: int, **kw: object) -> HttpRecord:
    peer = Peer(direction=direction, workload=PEER, peer_principal="spiffe://cluster.local/ns/bar/sa/sleep")
    peer.host = "httpbin.foo:8000"
    return HttpRecord(
        peer=peer,
        response_code=code,
        method="GET",
        path="/items/7?full=1",
        scheme="http",
        request_id="rid-9",
        user_agent="curl/8",
        source_address="10.0.0.9:5555",
        request_bytes=120,
        response_bytes=900,
        **kw,  # type: ignore[arg-type]
    )


@given(st.integers(1, 2**128 - 1), st.integers(1, 2**64 - 1), st.integers(0, 2**64 - 1), st.booleans())
def test_span_ids_survive_the_trip_through_dynamic_metadata(trace: int, span: int, parent: int, rnd: bool) -> None:
    ids = SpanIds(trace, span, parent, "k=v", rnd)
    assert SpanIds.decode(ids.encode(), "k=v") == ids


def test_span_ids_without_flags_from_an_older_extproc_still_give_a_span() -> None:
    ids = SpanIds(1, 2, 3, "k=v", random_trace_id=True)
    assert SpanIds.decode(ids.encode()[:66], "k=v") == SpanIds(1, 2, 3, "k=v", random_trace_id=False)


def test_damaged_span_ids_give_no_span() -> None:
    good = SpanIds(1, 2, 3, random_trace_id=True).encode()
    for bad in (
        "",
        good[:-1],
        good[:-2],
        good[:66] + "_02",
        good[:-2] + "zz",
        good.replace("-", "_"),
        "z" * 66,
        "0" * 32 + "-" + "0" * 16 + "-" + "0" * 16,
    ):
        assert SpanIds.decode(bad) is None


@pytest.mark.parametrize("rnd", [True, False])
def test_the_span_carries_the_random_flag_that_was_propagated(rnd: bool) -> None:
    t = Tracing(TracingSettings(formats=(Format.W3C,), sampling_percent=100), LOCAL)
    out = t.begin({"traceparent": f"00-{'ab' * 16}-{'cd' * 8}-0{3 if rnd else 1}"})
    assert out is not None and out.random_trace_id is rnd
    ids = SpanIds.decode(t.metadata(out)[TRACE_KEY])  # the authz+als route: through Envoy's metadata
    assert ids == SpanIds.of(out)
    assert t.span(ids, _record(Direction.INBOUND, 200), 0, 1).random_trace_id is rnd


def test_a_server_span_carries_istio_and_otel_attributes() -> None:
    t = Tracing(TracingSettings((Format.W3C,)), LOCAL)
    decision = {
        "enforced_engine_result": "allowed",
        "extproc_stage": "allow",
        "enforced_effective_policy_id": "ns[foo]-policy[p]-rule[0]",
    }
    s = t.span(SpanIds(5, 6, 7, "a=b"), _record(Direction.INBOUND, 200), 1_000, 3_000, decision)
    assert (s.trace_id, s.span_id, s.parent_span_id, s.tracestate) == (5, 6, 7, "a=b")
    assert s.kind is SpanKind.SERVER and s.name == "httpbin.foo:8000/*"
    assert (s.start_ns, s.end_ns, s.error) == (1_000, 3_000, False)
    a = s.attributes
    assert a["http.method"] == a["http.request.method"] == "GET"
    assert a["url.path"] == "/items/7"
    assert a["http.url"] == "http://httpbin.foo:8000/items/7?full=1"
    assert a["http.status_code"] == a["http.response.status_code"] == 200
    assert a["guid:x-request-id"] == "rid-9"
    assert (a["request_size"], a["response_size"], a["peer.address"]) == (120, 900, "10.0.0.9:5555")
    assert a["istio.source_workload"] == "sleep" and a["istio.source_namespace"] == "bar"
    assert a["istio.source_principal"] == "spiffe://cluster.local/ns/bar/sa/sleep"
    assert a["istio.canonical_service"] == "httpbin" and a["istio.namespace"] == "foo"
    assert a["istio.authorization.decision"] == "allowed"
    assert a["istio.authorization.policy"] == "ns[foo]-policy[p]-rule[0]"


def test_a_client_span_names_the_destination_and_fails_on_4xx() -> None:
    t = Tracing(TracingSettings((Format.W3C,)), LOCAL)
    s = t.span(SpanIds(5, 6, 0), _record(Direction.OUTBOUND, 404), 10, 5)
    assert s.kind is SpanKind.CLIENT
    assert s.attributes["istio.destination_workload"] == "sleep"
    assert "istio.source_workload" not in s.attributes
    assert s.error  # OpenTelemetry: a 4xx fails a client span
    assert s.end_ns == s.start_ns  # a clock step backwards never gives a negative duration


def test_server_spans_fail_only_on_5xx_or_no_response() -> None:
    t = Tracing(TracingSettings((Format.W3C,)), LOCAL)
    ids = SpanIds(1, 2, 0)
    assert not t.span(ids, _record(Direction.INBOUND, 403), 0, 1).error
    assert t.span(ids, _record(Direction.INBOUND, 503), 0, 1).error
    assert t.span(ids, _record(Direction.INBOUND, 0), 0, 1).error


def test_grpc_status_is_a_span_attribute() -> None:
    t = Tracing(TracingSettings((Format.W3C,)), LOCAL)
    s = t.span(SpanIds(1, 2, 0), _record(Direction.INBOUND, 200, grpc=True, grpc_status="5"), 0, 1)
    assert s.attributes["rpc.grpc.status_code"] == 5


def test_contexts_are_counted_by_outcome_and_sampling() -> None:
    t = Tracing(TracingSettings((Format.W3C, Format.B3), sampling_percent=100.0), LOCAL)
    t.begin({})
    t.begin({"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-00"})
    t.begin({"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"})
    assert t.contexts == {("started", "true"): 1, ("continued", "false"): 1, ("continued", "true"): 1}
    assert not t.exports and not t.wants_span(t.begin({}))  # no exporter, no span


def test_propagation_off_means_no_context() -> None:
    t = Tracing(TracingSettings(()), LOCAL)
    assert not t.propagates and t.begin({"traceparent": "x"}) is None


def test_the_resource_names_the_service_as_istio_does() -> None:
    attrs = resource_attributes(LOCAL)
    assert attrs["service.name"] == "httpbin.foo"
    assert attrs["service.version"] == "v1" and attrs["k8s.workload.name"] == "httpbin-v1"
