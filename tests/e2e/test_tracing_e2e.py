"""Trace propagation and spans through real Envoys, in both deployment modes.

    app --h1--> [client Envoy: outbound] --h1--> [server Envoy: inbound] --h1--> echo upstream
                 extproc (sleep, outbound)         extproc (httpbin, inbound)
                               \\________ spans over OTLP/gRPC ________/
                                              OtlpReceiver

`authz+als`: ext_authz writes the trace headers and hands the ids to the access log entry,
which reports the span. `extproc`: one ext_proc stream does both. The receiver is a real
OTLP gRPC server; the echo upstream shows which headers the application got.
"""

from __future__ import annotations

import http.client
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import MODES
from tests.fixtures import envoy_config as ec
from tests.fixtures import mesh
from tests.fixtures.otlp import OtlpReceiver, ReceivedSpan
from tests.fixtures.procs import free_port
from tests.fixtures.stack import ExtprocProcess, HttpClient

pytestmark = pytest.mark.e2e

# Flags: sampled (01) and random-trace-id (02) are the only bits we ever write.
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-(0[0-3])$")
POLICIES = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-path, namespace: foo}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: ["/deny*"]}}]
"""


@dataclass
class Traced:
    mode: str
    receiver: OtlpReceiver
    server: HttpClient  # straight to the server sidecar
    client: HttpClient  # through the client sidecar first
    server_port: int

    def span(self, span_id: str, timeout: float = 10.0) -> ReceivedSpan:
        spans = self.receiver.wait_for(lambda ss: any(s.span_id == span_id for s in ss), timeout)
        (s,) = [s for s in spans if s.span_id == span_id]
        return s

    def spans_of(self, trace_id: str, n: int) -> list[ReceivedSpan]:
        spans = self.receiver.wait_for(lambda ss: sum(s.trace_id == trace_id for s in ss) >= n)
        return [s for s in spans if s.trace_id == trace_id]


def _context(headers: dict[str, str]) -> tuple[str, str, str]:
    m = TRACEPARENT.match(headers["traceparent"])
    assert m, headers["traceparent"]
    return m.group(1), m.group(2), m.group(3)


def _filters(mode: str, direction: str) -> list[dict[str, Any]]:
    if mode == "extproc":
        return ec.ext_proc_chain(direction=direction, failure_mode_allow=direction == "outbound")
    if mode == "authz-http":
        authz = ec.http_check_chain(direction=direction, failure_mode_allow=direction == "outbound")
    else:
        authz = [mesh.ext_authz(direction)]
    return [*authz, mesh.peer_from_response()] if direction == "outbound" else authz


def _hcm(mode: str, direction: str) -> dict[str, Any]:
    # authz+als and authz-http: the spans come from the access log entries.
    return {"access_log": [mesh.http_als(direction)]} if mode in ("authz", "authz-http") else {}


@pytest.fixture(scope="module", params=MODES)
def traced(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, upstream: int) -> Iterator[Traced]:
    mode: str = request.param
    tmp: Path = tmp_path_factory.mktemp(f"tracing-{mode}")
    policies = tmp / "policies"
    policies.mkdir()
    (policies / "p.yaml").write_text(POLICIES)
    receiver = OtlpReceiver()
    common = ["--otlp-endpoint", receiver.endpoint, "--trace-sampling", "100", "--trace-formats", "w3c,b3,b3-single"]
    http = mode == "authz-http"
    server_x = ExtprocProcess(
        [policies], tmp, labels="app=httpbin,version=v1", extra_args=[*common, "--workload", "httpbin"], http=http
    )
    client_x = ExtprocProcess(
        [policies],
        tmp,
        labels="app=sleep,version=v2",
        name="extproc-client",
        http=http,
        extra_args=[*common, "--workload", "sleep", "--direction", "outbound"],
    )
    envoys: list[ec.EnvoyProcess] = []
    try:
        server_x.wait_ready()
        client_x.wait_ready()
        server_port, client_port = free_port(), free_port()
        for name, port, direction, target, x in (
            ("server", server_port, "inbound", upstream, server_x),
            ("client", client_port, "outbound", server_port, client_x),
        ):
            admin = free_port()
            listener = ec.HttpListener(name, port, _filters(mode, direction), hcm=_hcm(mode, direction))
            clusters = [ec.cluster("upstream", "127.0.0.1", target), *x.clusters()]
            envoy = ec.EnvoyProcess(ec.bootstrap(admin, [listener], clusters), tmp / name, admin, name)
            envoys.append(envoy)
            envoy.wait_ready()
        yield Traced(mode, receiver, HttpClient(server_port), HttpClient(client_port), server_port)
    finally:
        for e in envoys:
            e.stop()
        client_x.stop()
        server_x.stop()
        receiver.stop()


def test_a_new_trace_is_written_in_every_format_and_reported_as_a_server_span(traced: Traced) -> None:
    r = traced.server.get("/new-trace?x=1", {"x-echo-delay-ms": "150"})
    assert r.status == 200
    seen = r.json()["headers"]
    trace, span, flags = _context(seen)
    assert flags == "03"  # --trace-sampling 100, and our trace ids are random (W3C Level 2)
    assert (seen["x-b3-traceid"], seen["x-b3-spanid"], seen["x-b3-sampled"]) == (trace, span, "1")
    assert "x-b3-parentspanid" not in seen  # we started the trace
    assert seen["b3"] == f"{trace}-{span}-1"

    s = traced.span(span)
    assert (s.trace_id, s.parent_span_id, s.kind) == (trace, "", "SERVER")
    assert s.name == f"127.0.0.1:{traced.server_port}/*"
    a = s.attributes
    assert a["http.method"] == a["http.request.method"] == "GET"
    assert a["url.path"] == "/new-trace"
    assert a["http.url"] == f"http://127.0.0.1:{traced.server_port}/new-trace?x=1"
    assert a["http.status_code"] == a["http.response.status_code"] == 200
    assert a["guid:x-request-id"] == seen["x-request-id"]
    assert a["istio.authorization.decision"] == "allowed"
    assert a["istio.canonical_service"] == "httpbin" and a["istio.namespace"] == "foo"
    assert a["response_flags"] == "-"
    assert s.status_code == "UNSET"
    assert s.resource["service.name"] == "httpbin.foo"
    # The span covers the application's 150 ms: it starts before and ends after it.
    assert s.end_ns - s.start_ns >= 150_000_000


def test_an_incoming_w3c_context_is_continued_in_every_format(traced: Traced) -> None:
    trace, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    r = traced.server.get(
        "/w3c", {"traceparent": f"00-{trace}-{parent}-01", "tracestate": "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"}
    )
    seen = r.json()["headers"]
    got_trace, span, flags = _context(seen)
    assert (got_trace, flags) == (trace, "01")
    assert span != parent
    assert seen["tracestate"] == "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
    assert (seen["x-b3-traceid"], seen["x-b3-spanid"], seen["x-b3-parentspanid"]) == (trace, span, parent)
    assert seen["b3"] == f"{trace}-{span}-1-{parent}"
    s = traced.span(span)
    assert (s.trace_id, s.parent_span_id) == (trace, parent)
    assert s.trace_state == "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"


def test_an_incoming_b3_context_with_a_64_bit_trace_id_is_continued(traced: Traced) -> None:
    trace64, parent = "a3ce929d0e0e4736", "53ce929d0e0e4736"
    seen = traced.server.get("/b3", {"x-b3-traceid": trace64, "x-b3-spanid": parent, "x-b3-sampled": "1"}).json()[
        "headers"
    ]
    trace, span, _ = _context(seen)
    assert trace == trace64.rjust(32, "0")
    assert seen["x-b3-traceid"] == trace64  # B3 keeps the width it was given
    assert seen["x-b3-parentspanid"] == parent
    assert seen["b3"].startswith(f"{trace64}-{span}-1")
    assert traced.span(span).parent_span_id == parent


def test_an_unsampled_context_is_propagated_but_reports_no_span(traced: Traced) -> None:
    trace, parent = "11111111111111111111111111111111", "2222222222222222"
    seen = traced.server.get("/unsampled", {"traceparent": f"00-{trace}-{parent}-00"}).json()["headers"]
    got, _, flags = _context(seen)
    assert (got, flags, seen["x-b3-sampled"]) == (trace, "00", "0")
    # A sampled request after it: once its span is in, the earlier one would have been too.
    later = _context(traced.server.get("/sampled-after").json()["headers"])[1]
    traced.span(later)
    assert not [s for s in traced.receiver.spans() if s.trace_id == trace]


def test_malformed_trace_headers_are_replaced_by_a_new_consistent_trace(traced: Traced) -> None:
    seen = traced.server.get(
        "/garbage", {"traceparent": "00-xyz-zzz-01", "b3": "not-a-context", "x-b3-traceid": "0" * 32}
    ).json()["headers"]
    trace, span, _ = _context(seen)
    assert seen["b3"] == f"{trace}-{span}-1"
    assert seen["x-b3-traceid"] == trace and seen["x-b3-spanid"] == span
    assert traced.span(span).parent_span_id == ""


def test_the_request_id_is_kept(traced: Traced) -> None:
    seen = traced.server.get("/rid", {"x-request-id": "my-request-1"}).json()["headers"]
    assert seen["x-request-id"] == "my-request-1"
    assert traced.span(_context(seen)[1]).attributes["guid:x-request-id"] == "my-request-1"


def test_a_denied_request_reports_its_span_with_the_decision(traced: Traced) -> None:
    trace, parent = "33333333333333333333333333333333", "4444444444444444"
    r = traced.server.get("/deny-me", {"traceparent": f"00-{trace}-{parent}-01"})
    assert r.status == 403 and r.body == b"RBAC: access denied"
    (s,) = traced.spans_of(trace, 1)
    assert s.parent_span_id == parent and s.kind == "SERVER"
    assert s.attributes["http.status_code"] == 403
    assert s.attributes["istio.authorization.decision"] == "denied"
    assert s.attributes["istio.authorization.policy"] == "ns[foo]-policy[deny-path]-rule[0]"
    assert s.status_code == "UNSET"  # a 4xx is not a server error (OpenTelemetry's HTTP conventions)


def test_client_and_server_sidecars_report_one_trace(traced: Traced) -> None:
    """The app's span -> the client sidecar's CLIENT span -> the server sidecar's SERVER span."""
    trace, app_span = "55555555555555555555555555555555", "6666666666666666"
    seen = traced.client.get("/through-both", {"traceparent": f"00-{trace}-{app_span}-01"}).json()["headers"]
    got, server_span, _ = _context(seen)
    assert got == trace
    spans = {s.kind: s for s in traced.spans_of(trace, 2)}
    client, server = spans["CLIENT"], spans["SERVER"]
    assert client.parent_span_id == app_span
    assert server.parent_span_id == client.span_id
    assert server.span_id == server_span == seen["x-b3-spanid"]
    assert client.resource["service.name"] == "sleep.foo"
    assert server.resource["service.name"] == "httpbin.foo"
    # Each names the other's workload, learnt from the metadata exchange.
    assert client.attributes["istio.destination_workload"] == "httpbin"
    assert server.attributes["istio.source_workload"] == "sleep"
    # The client's span encloses the server's.
    assert client.start_ns <= server.start_ns and server.end_ns <= client.end_ns


def test_a_collector_that_is_down_costs_spans_not_requests(
    tmp_path_factory: pytest.TempPathFactory, upstream: int
) -> None:
    """Every request is served and propagated; spans beyond the bounded queue are dropped and counted."""
    tmp: Path = tmp_path_factory.mktemp("collector-down")
    (tmp / "p").mkdir()
    nowhere = f"127.0.0.1:{free_port()}"  # nothing listens there
    x = ExtprocProcess(
        [tmp / "p"],
        tmp,
        extra_args=["--otlp-endpoint", nowhere, "--trace-sampling", "100", "--trace-queue-size", "4"],
    )
    envoy: ec.EnvoyProcess | None = None
    try:
        x.wait_ready()
        port, admin = free_port(), free_port()
        listener = ec.HttpListener("http", port, ec.ext_proc_chain())
        clusters = [
            ec.cluster("upstream", "127.0.0.1", upstream),
            ec.cluster("extproc", "127.0.0.1", x.grpc_port, http2=True),
        ]
        envoy = ec.EnvoyProcess(ec.bootstrap(admin, [listener], clusters), tmp / "envoy", admin)
        envoy.wait_ready()
        client = HttpClient(port)
        requests = 40
        for i in range(requests):
            r = client.get(f"/down/{i}")
            assert r.status == 200
            _context(r.json()["headers"])  # still propagated
        metrics = x.metrics()
        outcomes = {
            line.split('"')[1]: float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("extproc_spans_total{")
        }
        assert outcomes, [m for m in metrics.splitlines() if "span" in m or "trace" in m]
        assert outcomes["submitted"] == requests
        assert outcomes["dropped"] > 0
        assert outcomes["exported"] == 0
    finally:
        if envoy is not None:
            envoy.stop()
        x.stop()


# ---------------------------------------------------------------------------------------------
# W3C Trace Context Level 2's processing model, through both sidecars' Envoys
# ---------------------------------------------------------------------------------------------


def _send(port: int, path: str, headers: list[tuple[str, str]]) -> dict[str, str]:
    """GET with headers that may repeat (HttpClient takes a dict); the headers the app got."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", path)
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders()
        r = conn.getresponse()
        body = r.read()
        assert r.status == 200, (r.status, body)
        seen: dict[str, str] = json.loads(body)["headers"]
        return seen
    finally:
        conn.close()


TRACE_L2, PARENT_L2 = "7a3c1b2d4e5f60718293a4b5c6d7e8f9", "0f1e2d3c4b5a6978"
# (incoming flags, version) -> the flags the upstream must see: sampled and random copied,
# reserved bits zeroed, for our version and a higher one (whose extra fields are dropped).
FLAGS_CASES = [
    ("00", "00", "00"),
    ("00", "01", "01"),
    ("00", "02", "02"),
    ("00", "03", "03"),
    ("00", "fe", "02"),
    ("00", "ff", "03"),
    ("cc", "03", "03"),
    ("cc", "fd", "01"),
]


def test_l2_the_flags_of_an_incoming_traceparent_are_continued(traced: Traced) -> None:
    """Level 2: the random-trace-id flag of the incoming traceparent, set or unset, is on every
    outgoing traceparent with that trace id; reserved bits are written as 0. The reported span
    carries the same W3C flags (OTLP Span.flags bits 0-7)."""
    for i, (version, flags, expected) in enumerate(FLAGS_CASES):
        parent = f"{int(PARENT_L2, 16) + i:016x}"
        tp = f"{version}-{TRACE_L2}-{parent}-{flags}" + ("-future-field" if version != "00" else "")
        seen = _send(traced.server_port, f"/l2-flags/{i}", [("traceparent", tp), ("tracestate", "congo=t61rcWkgMzE")])
        got_trace, span, got_flags = _context(seen)
        assert (got_trace, got_flags) == (TRACE_L2, expected), tp
        assert span != parent
        assert seen["tracestate"] == "congo=t61rcWkgMzE"
        assert seen["x-b3-sampled"] == str(int(expected) & 1)
        if int(expected) & 1:
            s = traced.span(span)
            assert s.parent_span_id == parent
            assert s.flags & 0xFF == int(expected, 16), tp


@pytest.mark.parametrize(
    "incoming",
    [
        [],
        [("traceparent", f"00-{'0' * 32}-{PARENT_L2}-03"), ("tracestate", "congo=1")],  # invalid: restart
        [("traceparent", f"ff-{TRACE_L2}-{PARENT_L2}-03"), ("tracestate", "congo=1")],  # version ff: restart
        [("tracestate", "congo=1")],  # tracestate without traceparent
    ],
    ids=["none", "all-zero-trace-id", "version-ff", "tracestate-only"],
)
def test_l2_a_trace_we_start_has_the_random_flag(traced: Traced, incoming: list[tuple[str, str]]) -> None:
    seen = _send(traced.server_port, "/l2-new", incoming)
    trace, span, flags = _context(seen)
    assert trace not in (TRACE_L2, "0" * 32)
    assert flags == "03"  # sampled (--trace-sampling 100) and random
    assert "tracestate" not in seen  # a restarted trace does not keep the old tracestate
    s = traced.span(span)
    assert s.parent_span_id == "" and s.flags & 0xFF == 0x03


def test_l2_a_continued_b3_trace_does_not_claim_the_random_flag(traced: Traced) -> None:
    b3_trace, b3_span = "80f198ee56343ba864fe8b2a57d3eff7", "e457b5a2e4d86bd1"
    seen = _send(
        traced.server_port, "/l2-b3", [("x-b3-traceid", b3_trace), ("x-b3-spanid", b3_span), ("x-b3-sampled", "1")]
    )
    trace, span, flags = _context(seen)
    assert (trace, flags) == (b3_trace, "01")
    assert traced.span(span).flags & 0xFF == 0x01


def test_l2_the_random_flag_crosses_both_sidecars(traced: Traced) -> None:
    """app (03) -> client sidecar -> server sidecar -> app: one trace id, the flag on every hop."""
    trace, app_span = "8a8a8a8a8a8a8a8a8a8a8a8a8a8a8a8a", "9b9b9b9b9b9b9b9b"
    seen = _send(traced.client.port, "/l2-both", [("traceparent", f"00-{trace}-{app_span}-03")])
    assert _context(seen)[0::2] == (trace, "03")
    spans = {s.kind: s for s in traced.spans_of(trace, 2)}
    assert spans["CLIENT"].parent_span_id == app_span
    assert spans["SERVER"].parent_span_id == spans["CLIENT"].span_id
    assert spans["CLIENT"].flags & 0xFF == spans["SERVER"].flags & 0xFF == 0x03


KEY_256_AT = "t" * 241 + "@" + "v" * 14
MEMBERS_32 = [f"m{i:02d}={i}" for i in range(32)]
# (tracestate header values as sent, what the upstream must get; None: no tracestate at all)
TRACESTATE_CASES = [
    # Duplicates: the list is propagated, the left-most member of a key kept.
    (["foo=1,bar=2,foo=3"], "foo=1,bar=2"),
    (["foo=1", "foo=2"], "foo=1"),  # across two header fields, combined in order
    # Several fields are combined in order; empty fields and members are allowed.
    (["foo=1,bar=2", "rojo=1,congo=2", "baz=3"], "foo=1,bar=2,rojo=1,congo=2,baz=3"),
    (["", "foo=1"], "foo=1"),
    (["foo=1 \t , \t bar=2"], "foo=1,bar=2"),
    # Level 2 keys: "@" anywhere after the first character, 256 characters in all.
    (["foo=1", KEY_256_AT + "=1"], f"foo=1,{KEY_256_AT}=1"),
    (["foo@=1,foo@@bar=2,foo@bar@baz=3,1abc=4"], "foo@=1,foo@@bar=2,foo@bar@baz=3,1abc=4"),
    (["t" * 242 + "@v=1,t@" + "v" * 15 + "=2"], "t" * 242 + "@v=1,t@" + "v" * 15 + "=2"),
    (["foo=1", "z" * 256 + "=1"], "foo=1," + "z" * 256 + "=1"),
    # A list that cannot be parsed is discarded whole, its valid members too.
    (["foo=1", "z" * 257 + "=1"], None),
    (["foo=1", KEY_256_AT + "x=1"], None),
    (["foo=1,BAD=2,bar=3"], None),
    (["@foo=1,bar=2"], None),
    (["foo=,bar=3"], None),
    (["foo=bar=baz"], None),
    ([",".join(MEMBERS_32)], ",".join(MEMBERS_32)),
    ([",".join(MEMBERS_32), "m32=32"], None),  # 33 members
]


def test_l2_tracestate_is_processed_by_the_level_2_rules(traced: Traced) -> None:
    """Each case through the sidecar: what reaches the app, and the tracestate of the span."""
    for i, (values, expected) in enumerate(TRACESTATE_CASES):
        parent = f"{0x1000 + i:016x}"
        tp = f"00-{TRACE_L2}-{parent}-03"
        seen = _send(
            traced.server_port, f"/l2-tracestate/{i}", [("traceparent", tp), *(("tracestate", v) for v in values)]
        )
        trace, span, flags = _context(seen)
        assert (trace, flags) == (TRACE_L2, "03")  # a tracestate never affects the traceparent
        assert seen.get("tracestate") == expected, values
        assert traced.span(span).trace_state == (expected or ""), values
