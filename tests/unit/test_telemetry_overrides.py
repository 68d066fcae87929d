"""Telemetry API `spec.metrics`: validation with located errors, the CEL subset, precedence
across root/namespace/workload, and the compiled plans as a MetricStore renders them."""

from __future__ import annotations

import re
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest

from extproc.config.yamlsource import load_documents
from extproc.snapshot.compiled import WorkloadIdentity
from extproc.snapshot.loader import LoadedConfig
from extproc.telemetry import labels as L
from extproc.telemetry.cel import MISSING, ExprError, evaluate, parse_expression, response_flag_bits
from extproc.telemetry.overrides import TelemetryPlans, build_plan, compile_telemetry
from extproc.telemetry.peer import Workload
from extproc.telemetry.record import Direction, HttpRecord, Labeler, Peer, TcpRecord
from extproc.telemetry.recorder import Recorder
from extproc.telemetry.resource import LoadedTelemetry, TagOverride, parse_telemetry
from extproc.telemetry.store import MetricPlan, MetricStore

FILE = "cfg/telemetry.yaml"
WORKLOAD = WorkloadIdentity("foo", {"app": "httpbin", "version": "v1"})
LOCAL = Workload(
    workload_name="httpbin",
    namespace="foo",
    canonical_service="httpbin",
    canonical_revision="v1",
    app="httpbin",
    version="v1",
    cluster="Kubernetes",
)
PEER = Workload(workload_name="sleep", namespace="bar", canonical_service="sleep", canonical_revision="latest")


def docs_issues(text: str) -> tuple[list[LoadedTelemetry], list[str]]:
    """Parse every document; (valid resources, rendered issues)."""
    loaded: list[LoadedTelemetry] = []
    rendered: list[str] = []
    for doc in load_documents(textwrap.dedent(text)):
        if doc.data.get("kind") == "List":
            continue
        t, issues = parse_telemetry(doc, FILE)
        rendered.extend(i.render() for i in issues)
        if t is not None:
            loaded.append(t)
    return loaded, rendered


def telemetry(
    metrics: str, *, name: str = "t", namespace: str = "istio-system", selector: str = "", extra: str = ""
) -> LoadedTelemetry:
    """One valid Telemetry whose spec.metrics is `metrics` (YAML, indented as under spec)."""
    sel = f"  selector: {{matchLabels: {selector}}}\n" if selector else ""
    text = (
        f"apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: {name}, namespace: {namespace}{extra}}}\n"
        f"spec:\n{sel}  metrics:\n" + textwrap.indent(textwrap.dedent(metrics).strip("\n"), "  ") + "\n"
    )
    loaded, issues = docs_issues(text)
    assert [i for i in issues if ": error: " in i] == []
    return loaded[0]


def plan(plans: TelemetryPlans, metric: L.MetricDef, direction: Direction = Direction.INBOUND) -> MetricPlan:
    return next(p for p in plans.plans_for(direction) if p.metric is metric)


def http(direction: Direction = Direction.INBOUND, **kw: object) -> HttpRecord:
    peer = Peer(
        direction=direction,
        workload=PEER,
        peer_key="sleep",
        peer_principal=kw.pop("peer_principal", "spiffe://cluster.local/ns/bar/sa/sleep"),  # type: ignore[arg-type]
        local_principal=kw.pop("local_principal", "spiffe://cluster.local/ns/foo/sa/httpbin"),  # type: ignore[arg-type]
        host=kw.pop("host", "httpbin.foo:8000"),  # type: ignore[arg-type]
        upstream_cluster=kw.pop("cluster", "inbound|8000||"),  # type: ignore[arg-type]
        route_name=kw.pop("route", "default"),  # type: ignore[arg-type]
    )
    fields: dict[str, object] = {
        "response_code": 200,
        "duration_ms": 3.0,
        "request_bytes": 100,
        "response_bytes": 200,
        "method": "GET",
        "path": "/status/200?x=1",
        "scheme": "http",
        "user_agent": "curl/8",
        "request_id": "rid-1",
        "source_address": "10.0.0.7:43210",
        "destination_address": "10.0.0.9:8000",
        "request_headers": {"x-tenant": "acme", "referer": "https://ref/", "user-agent": "curl/8"},
    }
    fields.update(kw)
    return HttpRecord(peer=peer, **fields)  # type: ignore[arg-type]


def series(text: str, family: str) -> list[dict[str, str]]:
    """The label sets of one family's samples in a Prometheus text exposition."""
    out = []
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(family)}\{{(.*)\}} \S+$", line)
        if m:
            out.append(dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(1))))
    return out


def names_in(text: str) -> set[str]:
    return {line.split("{", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


# --- operations, modes, ALL_METRICS, disabled ------------------------------------------


HTTP_NAMES = tuple(L.LABELS)
TCP_NAMES = tuple(L.LABELS[i] for i in L.TCP_LABELS)


@pytest.mark.parametrize(
    ("overrides", "metric", "direction", "expected"),
    [
        pytest.param(
            "- match: {metric: REQUEST_COUNT}\n  tagOverrides: {response_code: {operation: REMOVE}}",
            L.REQUESTS,
            Direction.INBOUND,
            tuple(n for n in HTTP_NAMES if n != "response_code"),
            id="remove",
        ),
        pytest.param(
            "- match: {metric: REQUEST_COUNT}\n  tagOverrides: {request_host: {value: request.host}}",
            L.REQUESTS,
            Direction.INBOUND,
            (*HTTP_NAMES, "request_host"),
            id="upsert-new-default-operation",
        ),
        pytest.param(
            "- match: {metric: REQUEST_COUNT}\n  tagOverrides: {destination_service: {operation: UPSERT, value: request.host}}",
            L.REQUESTS,
            Direction.INBOUND,
            HTTP_NAMES,
            id="upsert-existing-keeps-position",
        ),
        pytest.param(
            "- tagOverrides: {z_tag: {value: \"'z'\"}, a_tag: {value: \"'a'\"}, response_flags: {operation: REMOVE}}",
            L.RESPONSE_BYTES,
            Direction.OUTBOUND,
            (*(n for n in HTTP_NAMES if n != "response_flags"), "a_tag", "z_tag"),
            id="no-match-is-all-metrics-new-tags-sorted",
        ),
        pytest.param(
            "- match: {metric: ALL_METRICS}\n  tagOverrides: {response_flags: {operation: REMOVE}}",
            L.TCP_SENT,
            Direction.INBOUND,
            tuple(n for n in TCP_NAMES if n != "response_flags"),
            id="all-metrics-reaches-tcp",
        ),
        pytest.param(
            "- match: {metric: ALL_METRICS}\n  tagOverrides: {response_flags: {operation: REMOVE}}",
            L.REQUEST_MESSAGES,
            Direction.INBOUND,
            tuple(L.LABELS[i] for i in L.GRPC_MESSAGE_LABELS),
            id="all-metrics-grpc-lacks-the-label",
        ),
        pytest.param(
            "- match: {metric: TCP_SENT_BYTES}\n  tagOverrides: {response_code: {value: \"'x'\"}}",
            L.TCP_SENT,
            Direction.INBOUND,
            TCP_NAMES,
            id="upsert-standard-label-the-metric-lacks-is-a-noop",
        ),
        pytest.param(
            "- match: {metric: REQUEST_COUNT, mode: CLIENT}\n  tagOverrides: {response_code: {operation: REMOVE}}",
            L.REQUESTS,
            Direction.OUTBOUND,
            tuple(n for n in HTTP_NAMES if n != "response_code"),
            id="client-applies-outbound",
        ),
        pytest.param(
            "- match: {metric: REQUEST_COUNT, mode: CLIENT}\n  tagOverrides: {response_code: {operation: REMOVE}}",
            L.REQUESTS,
            Direction.INBOUND,
            HTTP_NAMES,
            id="client-not-inbound",
        ),
        pytest.param(
            "- match: {metric: REQUEST_COUNT, mode: SERVER}\n  tagOverrides: {response_code: {operation: REMOVE}}",
            L.REQUESTS,
            Direction.OUTBOUND,
            HTTP_NAMES,
            id="server-not-outbound",
        ),
        pytest.param(
            "- tagOverrides: {request_host: {value: request.host}}\n- tagOverrides: {request_host: {operation: REMOVE}}",
            L.REQUESTS,
            Direction.INBOUND,
            HTTP_NAMES,
            id="later-remove-cancels-upsert",
        ),
        pytest.param(
            "- tagOverrides: {response_code: {operation: REMOVE}}\n- match: {metric: REQUEST_COUNT}\n  tagOverrides: {response_code: {value: \"'x'\"}}",
            L.REQUESTS,
            Direction.INBOUND,
            HTTP_NAMES,
            id="later-upsert-restores",
        ),
    ],
)
def test_label_names(overrides: str, metric: L.MetricDef, direction: Direction, expected: tuple[str, ...]) -> None:
    plans = compile_telemetry([telemetry(f"- overrides:\n{textwrap.indent(overrides, '  ')}")], WORKLOAD)
    p = plan(plans, metric, direction)
    assert p.label_names == expected
    assert not p.disabled
    if p.project is None:
        assert p == MetricPlan.standard(metric)


def test_untouched_metrics_keep_the_fast_path() -> None:
    plans = compile_telemetry(
        [
            telemetry(
                "- overrides:\n  - match: {metric: REQUEST_COUNT}\n    tagOverrides: {request_host: {value: request.host}}"
            )
        ],
        WORKLOAD,
    )
    for direction in Direction:
        for p in plans.plans_for(direction):
            if p.metric is L.REQUESTS:
                assert p.project is not None
            else:
                assert p == MetricPlan.standard(p.metric) and p.project is None
    assert plans.symmetric
    assert compile_telemetry([], WORKLOAD) == TelemetryPlans.standard()
    # A no-op override (a label the metric does not carry) is the standard plan too.
    assert build_plan(L.TCP_SENT, {"response_code": TagOverride(operation="REMOVE")}) == MetricPlan.standard(L.TCP_SENT)


def test_replaced_and_added_values() -> None:
    tags = {
        "destination_service": TagOverride(value="request.headers['x-tenant']"),
        "response_code": TagOverride(operation="REMOVE"),
        "request_host": TagOverride(value="request.host"),
        "static": TagOverride(value="'v1'"),
    }
    p = build_plan(L.REQUESTS, tags)
    r = http()
    base = Labeler(LOCAL).http(r)
    values = dict(zip(p.label_names, p.project(base, r), strict=True))  # type: ignore[misc]
    assert values["destination_service"] == "acme"
    assert "response_code" not in values
    assert values["request_host"] == "httpbin.foo:8000"
    assert values["static"] == "v1"
    assert values["source_workload"] == "sleep" and values["reporter"] == "destination"
    assert list(p.label_names[-2:]) == ["request_host", "static"]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ([0, 1, 2], ("v0", "v1", "v2")),
        ([0, 1, 3, 4, 7], ("v0", "v1", "v3", "v4", "v7")),
        ([2], ("v2",)),
        ([], ()),
        ([0, 2, 4, 6, 8], ("v0", "v2", "v4", "v6", "v8")),
        ([0, "'a'", 2, 3, "'b'", 5], ("v0", "a", "v2", "v3", "b", "v5")),
        (["'a'", "'b'"], ("a", "b")),
        ([*range(25), "'x'"], (*(f"v{i}" for i in range(25)), "x")),
        ([3, 4, "'x'"], ("v3", "v4", "x")),
        ([0, 5, "'x'"], ("v0", "v5", "x")),
    ],
)
def test_projection_shapes(spec: list[int | str], expected: tuple[str, ...]) -> None:
    from extproc.telemetry.overrides import projection

    base = tuple(f"v{i}" for i in range(25))
    assert projection("http", tuple(spec))(base, http()) == expected


@pytest.mark.parametrize("mode", ["CLIENT", "SERVER", "CLIENT_AND_SERVER"])
def test_disabled_metric_per_mode(mode: str) -> None:
    plans = compile_telemetry(
        [telemetry(f"- overrides:\n  - match: {{metric: REQUEST_DURATION, mode: {mode}}}\n    disabled: true")],
        WORKLOAD,
    )
    for direction, m in ((Direction.OUTBOUND, "CLIENT"), (Direction.INBOUND, "SERVER")):
        assert plan(plans, L.REQUEST_DURATION, direction).disabled is (mode in (m, "CLIENT_AND_SERVER"))
        assert plan(plans, L.REQUESTS, direction) == MetricPlan.standard(L.REQUESTS)
    assert plans.symmetric is (mode == "CLIENT_AND_SERVER")


def test_all_metrics_disabled_then_enabled_by_a_later_override() -> None:
    root = telemetry("- overrides:\n  - match: {metric: ALL_METRICS}\n    disabled: true")
    plans = compile_telemetry([root], WORKLOAD)
    assert all(p.disabled for d in Direction for p in plans.plans_for(d))
    assert any("all metrics are disabled" in n for n in plans.notes)
    # Istio: "root namespace disables all, but then enables them by namespace scoped"
    ns = telemetry(
        "- overrides:\n  - match: {metric: REQUEST_COUNT, mode: SERVER}\n    tagOverrides: {x: {value: \"'1'\"}}",
        name="ns",
        namespace="foo",
    )
    plans = compile_telemetry([root, ns], WORKLOAD)
    assert not any(p.disabled for p in plans.inbound)
    assert plan(plans, L.REQUESTS).label_names[-1] == "x"
    assert all(p.disabled for p in plans.outbound)


def test_disabled_false_below_re_enables() -> None:
    root = telemetry("- overrides:\n  - match: {metric: REQUEST_SIZE}\n    disabled: true")
    workload = telemetry(
        "- overrides:\n  - match: {metric: REQUEST_SIZE}\n    disabled: false",
        name="w",
        namespace="foo",
        selector="{app: httpbin}",
    )
    assert plan(compile_telemetry([root], WORKLOAD), L.REQUEST_BYTES).disabled
    assert plan(compile_telemetry([root, workload], WORKLOAD), L.REQUEST_BYTES) == MetricPlan.standard(L.REQUEST_BYTES)


def test_all_metrics_disabled_ignores_its_tag_overrides_with_a_warning() -> None:
    _, issues = docs_issues(
        """\
        apiVersion: telemetry.istio.io/v1
        kind: Telemetry
        metadata: {name: t, namespace: istio-system}
        spec:
          metrics:
          - overrides:
            - disabled: true
              tagOverrides: {x: {value: "'1'"}}
        """
    )
    assert issues == [
        f"{FILE}: document 1 (Telemetry istio-system/t), line 8: warning: "
        "spec.metrics[0].overrides[0].tagOverrides: ignored: an override disabling all metrics applies no tag overrides"
    ]


# --- expressions ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("'literal'", "literal"),
        ('"double"', "double"),
        (r"'esc\'aped\n'", "esc'aped\n"),
        ("r'raw\\n'", "raw\\n"),
        ("request.host", "httpbin.foo:8000"),
        ("request.method", "GET"),
        ("request.path", "/status/200?x=1"),
        ("request.url_path", "/status/200"),
        ("request.query", "x=1"),
        ("request.scheme", "http"),
        ("request.useragent", "curl/8"),
        ("request.id", "rid-1"),
        ("request.referer", "https://ref/"),
        ("request.headers['x-tenant']", "acme"),
        ("request.headers['X-Tenant']", "acme"),
        ('request.headers["x-missing"]', "unknown"),
        ("response.code", "503"),
        ("response.grpc_status", "14"),
        ("response.flags", str(0x2 | 0x20)),
        ("source.address", "10.0.0.7:43210"),
        ("source.port", "43210"),
        ("destination.address", "10.0.0.9:8000"),
        ("destination.port", "8000"),
        ("source.principal", "spiffe://cluster.local/ns/bar/sa/sleep"),
        ("destination.principal", "spiffe://cluster.local/ns/foo/sa/httpbin"),
        ("connection.mtls", "true"),
        ("connection.uri_san_peer_certificate", "spiffe://cluster.local/ns/bar/sa/sleep"),
        ("upstream.cluster", "inbound|8000||"),
        ("xds.cluster_name", "inbound|8000||"),
        ("xds.route_name", "default"),
        ("response.code >= 500 ? 'error' : 'ok'", "error"),
        ("response.code == 200 ? 'ok' : 'not-ok'", "not-ok"),
        ("request.method != 'GET' ? 'write' : 'read'", "read"),
        ("has(request.headers['x-tenant']) ? request.headers['x-tenant'] : 'none'", "acme"),
        ("has(request.headers['x-other']) ? request.headers['x-other'] : 'none'", "none"),
        ("'x-tenant' in request.headers", "true"),
        ("'X-OTHER' in request.headers", "false"),
        ("request.method in ['POST', 'PUT']", "false"),
        ("request.host + '/' + request.method", "httpbin.foo:8000/GET"),
        ("'code-' + string(response.code)", "code-503"),
        ("response.code + 1", "504"),
        ("request.url_path.startsWith('/status') && !connection.mtls", "false"),
        ("request.path.contains('200') || request.headers['nope'] == 'x'", "true"),
        ("request.headers['nope'] == 'x' || request.path.endsWith('1')", "true"),
        ("request.headers['nope'] == 'x' && false", "false"),
        ("request.headers['nope'] == 'x' && true", "unknown"),
        ("request.headers['nope'] + 'suffix'", "unknown"),
        ("has(request.scheme)", "true"),
        ("request.headers['nope'] == 'x' ? 'a' : 'b'", "unknown"),
        ("(1 + 2) == 3", "true"),
        ("-response.code", "-503"),
        ("0x10", "16"),
        ("true ? 1 : 'mixed'", "1"),
    ],
)
def test_http_expressions(expr: str, expected: str) -> None:
    r = http(response_code=503, grpc=True, grpc_status="14", response_flags="UH,UF")
    assert evaluate(expr, r) == expected


def test_outbound_principals_and_missing_values() -> None:
    r = http(Direction.OUTBOUND, peer_principal="", local_principal="spiffe://td/ns/foo/sa/me", host="", path="")
    r.peer.workload = Workload(identity="spiffe://td/ns/bar/sa/peer")
    assert evaluate("source.principal", r) == "spiffe://td/ns/foo/sa/me"
    # A declared IDENTITY is not a certificate: the principal is unknown, as in the label.
    assert evaluate("destination.principal", r) == "unknown"
    r.peer.peer_principal = "spiffe://td/ns/bar/sa/peer"
    assert evaluate("destination.principal", r) == "spiffe://td/ns/bar/sa/peer"
    assert evaluate("connection.mtls", r) == "false"
    assert evaluate("connection.uri_san_peer_certificate", r) == "unknown"
    for missing in ("request.host", "request.path", "request.url_path", "request.query", "response.grpc_status"):
        assert evaluate(missing, r) == "unknown", missing
    r.response_code = 0  # no response
    assert evaluate("response.code", r) == "unknown"
    assert evaluate("has(response.code) ? 'y' : 'n'", r) == "n"


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("request.host", "unknown"),
        ("request.headers['x']", "unknown"),
        ("has(request.headers['x']) ? 'y' : 'n'", "n"),
        ("response.code", "unknown"),
        ("response.flags", str(1 << 5)),
        ("upstream.cluster", "outbound|9000||db.bar.svc.cluster.local"),
        ("source.address", "10.0.0.7:1234"),
        ("destination.port", "9000"),
        ("source.principal", "spiffe://cluster.local/ns/foo/sa/httpbin"),
        ("connection.mtls", "false"),
        ("'tcp-' + upstream.cluster", "tcp-outbound|9000||db.bar.svc.cluster.local"),
    ],
)
def test_tcp_expressions(expr: str, expected: str) -> None:
    r = TcpRecord(
        peer=Peer(
            Direction.OUTBOUND,
            local_principal="spiffe://cluster.local/ns/foo/sa/httpbin",
            upstream_cluster="outbound|9000||db.bar.svc.cluster.local",
        ),
        response_flags="UF",
        source_address="10.0.0.7:1234",
        destination_address="10.0.0.8:9000",
    )
    assert evaluate(expr, r) == expected


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("request.hots", "unknown or unsupported attribute request.hots (column 1)"),
        ("response.code == '200'", "'==' between int and string (compare with 200, not '200')"),
        ("request.headers", "must be a string, int or bool, not a map"),
        ("request.headers[1]", "needs a non-empty string literal"),
        ("filter_state['wasm.upstream_peer']", "indexing is only supported on request.headers"),
        ("node.metadata['X']", "indexing is only supported on request.headers"),
        ("'unterminated", "unterminated string literal (column 1)"),
        ("size(request.host)", "unsupported function size()"),
        ("request.host.size()", "unsupported function size()"),
        ("request.host ? 'a' : 'b'", "the condition of ?: needs bool, got string"),
        ("true ? 'a'", "expected ':', found end of expression"),
        ("'a' 'b'", "unexpected 'b'"),
        ("1.5", "floating-point literals are not supported"),
        ("null", "null is not supported"),
        ("'a' - 'b'", "'-' needs int, got string"),
        ("'a' + 1", "'+' between string and int"),
        ("has('x')", "has() needs an attribute"),
        ("request.method in request.host", "'in' needs a list literal or request.headers"),
        ("'\\q'", "invalid escape sequence \\q"),
        ("", "empty expression"),
        ("(" * 40 + "1" + ")" * 40, "nested deeper than 32"),
        ("!" * 100 + "true", "nested deeper than 32"),
        ("request.host $ 'x'", "unexpected character '$'"),
        ("b'bytes'", "bytes literals are not supported"),
        ("'''triple'''", "triple-quoted strings are not supported"),
    ],
)
def test_expression_errors(expr: str, message: str) -> None:
    with pytest.raises(ExprError) as e:
        parse_expression(expr)
    assert message in str(e.value)


def test_response_flag_bits_follow_envoys_enum() -> None:
    assert response_flag_bits("-") == 0
    assert response_flag_bits("LH") == 1
    assert response_flag_bits("UAEX") == 1 << 12
    assert response_flag_bits("DR") == 1 << 28  # after DF and DO, not at the access log proto's position
    assert response_flag_bits("UH,UF,NOPE") == 0x22
    assert MISSING is not None and repr(MISSING) == "MISSING"


# --- validation -----------------------------------------------------------------------

HEAD = "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: t, namespace: foo}\nspec:\n"


def one_error(spec: str) -> str:
    loaded, issues = docs_issues(HEAD + textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ") + "\n")
    errors = [i for i in issues if ": error: " in i]
    assert loaded == [] and len(errors) == 1, issues
    return errors[0]


def test_expression_warning_names_file_document_line_and_field() -> None:
    # Istio does not validate tag values (the proxy reports what it cannot evaluate as
    # `unknown`), so a typo loads, with a warning that points at it.
    text = (
        HEAD
        + "  metrics: [{overrides: []}]\n---\n"
        + HEAD.replace("name: t", "name: u")
        + textwrap.indent(
            textwrap.dedent(
                """\
                metrics:
                - providers: [{name: prometheus}]
                  overrides:
                  - match: {metric: REQUEST_COUNT}
                    tagOverrides: {response_code: {operation: REMOVE}}
                  - match: {metric: REQUEST_COUNT}
                    tagOverrides:
                      request_host:
                        value: request.hots
                """
            ),
            "  ",
        )
    )
    loaded, issues = docs_issues(text)
    assert [t.ident for t in loaded] == ["foo/t", "foo/u"]
    assert issues == [
        f"{FILE}: document 2 (Telemetry foo/u), line 19: warning: "
        "spec.metrics[0].overrides[1].tagOverrides.request_host.value: "
        "extproc cannot evaluate 'request.hots' (unknown or unsupported attribute request.hots (column 1)); "
        "the label reads 'unknown', as the proxy reports an expression it cannot evaluate"
    ]


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        (
            "metrics: [{overrides: [{tagOverrides: {x: {operation: DELETE}}}]}]",
            "spec.metrics[0].overrides[0].tagOverrides.x.operation",
            "unknown operation 'DELETE'; one of UPSERT, REMOVE",
        ),
        (
            "metrics: [{overrides: [{tagOverrides: {x: {operation: UPSERT}}}]}]",
            "spec.metrics[0].overrides[0].tagOverrides.x",
            "value must be set when operation is UPSERT",
        ),
        (
            "metrics: [{overrides: [{tagOverrides: {x: {value: ''}}}]}]",
            "spec.metrics[0].overrides[0].tagOverrides.x.value",
            "value must be set when operation is UPSERT",
        ),
        (
            "metrics: [{overrides: [{tagOverrides: {response_code: {operation: REMOVE, value: x}}}]}]",
            "spec.metrics[0].overrides[0].tagOverrides.response_code.value",
            "value must not be set when operation is REMOVE",
        ),
        (
            "metrics: [{overrides: [{tagOverrides: {__name__: {value: request.host}}}]}]",
            "spec.metrics[0].overrides[0].tagOverrides.__name__",
            "names starting with __ are reserved",
        ),
        (
            "metrics: [{overrides: [{tagOverrides: {istio_requests_total: {value: request.host}}}]}]",
            "spec.metrics[0].overrides[0].tagOverrides.istio_requests_total",
            "is the name of a standard metric",
        ),
        (
            "metrics: [{overrides: [{tagOverrides: {istio_request_bytes_bucket: {value: request.host}}}]}]",
            "spec.metrics[0].overrides[0].tagOverrides.istio_request_bytes_bucket",
            "is the name of a standard metric",
        ),
        (
            "metrics: [{overrides: [{tagOverrides: {le: {value: request.host}}}]}]",
            "spec.metrics[0].overrides[0].tagOverrides.le",
            "reserved for histogram buckets",
        ),
        (
            "metrics: [{overrides: [{match: {customMetric: ''}}]}]",
            "spec.metrics[0].overrides[0].match.customMetric",
            "customMetric may not be empty",
        ),
        (
            "metrics: [{overrides: [{match: {metric: REQUEST_COUNTS}}]}]",
            "spec.metrics[0].overrides[0].match.metric",
            "unknown metric 'REQUEST_COUNTS'; one of ALL_METRICS, REQUEST_COUNT",
        ),
        (
            "metrics: [{overrides: [{match: {mode: BOTH}}]}]",
            "spec.metrics[0].overrides[0].match.mode",
            "unknown mode 'BOTH'",
        ),
        (
            "targetRefs: [{kind: Gateway, name: gw}]",
            "spec.targetRefs[0]",
            "targetRef must be to one of",
        ),
        (
            "targetRef: {kind: Service, name: svc, namespace: other}",
            "spec.targetRef.namespace",
            "cross namespace referencing is not supported",
        ),
        (
            "metrics: [{overrides: [{tagOverride: {x: {value: 'a'}}}]}]",
            "spec.metrics[0].overrides[0].tagOverride",
            "unknown field",
        ),
        (
            "metrics: [{overrides: [{tagOverrides: {x: {value: 200}}}]}]",
            "spec.metrics[0].overrides[0].tagOverrides.x.value",
            "must be a string, got int (quote the value in YAML)",
        ),
        (
            "metrics: [{overrides: [{disabled: 'yes'}]}]",
            "spec.metrics[0].overrides[0].disabled",
            "Input should be a valid boolean",
        ),
        (
            "metrics: [{providers: [{name: ''}]}]",
            "spec.metrics[0].providers[0].name",
            "providers.name may not be empty",
        ),
        ("metrics: [{reportingInterval: 10x}]", "spec.metrics[0].reportingInterval", "invalid duration"),
        ("metrics: [null]", "spec.metrics[0]", "may not be null"),
        ("metrics: [{overrides: [null]}]", "spec.metrics[0].overrides[0]", "may not be null"),
        ("metrics: [{overrides: [{tagOverrides: {x: null}}]}]", "spec.metrics[0].overrides[0].tagOverrides.x", "null"),
        ("selector: {matchLabels: {app: 'web*'}}", "spec.selector.matchLabels.app", "wildcard is not supported"),
    ],
)
def test_validation_errors(spec: str, field: str, message: str) -> None:
    err = one_error(spec)
    assert err.startswith(f"{FILE}: document 1 (Telemetry foo/t), line ")
    assert f": error: {field}: " in err, err
    assert message in err


def test_resource_level_errors() -> None:
    _, issues = docs_issues(
        "apiVersion: telemetry.istio.io/v1beta2\nkind: Telemetry\nmetadata: {name: t, namespace: foo}\n"
    )
    assert issues == [
        f"{FILE}: document 1 (Telemetry foo/t), line 1: error: apiVersion: unsupported version "
        "telemetry.istio.io/v1beta2; use one of telemetry.istio.io/v1, telemetry.istio.io/v1alpha1"
    ]
    _, issues = docs_issues("apiVersion: telemetry.istio.io/v1alpha1\nkind: Telemetry\nmetadata: {name: t}\n")
    assert issues == [
        f"{FILE}: document 1 (Telemetry t), line 3: error: metadata.namespace: "
        "required: extproc has no kubectl context to default the namespace from"
    ]


def test_warnings_do_not_reject() -> None:
    loaded, issues = docs_issues(
        HEAD
        + textwrap.indent(
            textwrap.dedent(
                """\
                tracing: [{randomSamplingPercentage: 10}]
                metrics:
                - providers: [{name: stackdriver}]
                  reportingInterval: 10s
                - overrides:
                  - match: {customMetric: my_metric}
                  - tagOverrides: {my-tag: {value: "'x'"}}
                """
            ),
            "  ",
        )
    )
    assert len(loaded) == 1
    assert [i.split(": warning: ", 1)[1] for i in issues] == [
        "spec.tracing: ignored: extproc applies only spec.metrics",
        "spec.metrics[0].providers[0].name: provider 'stackdriver' is not served by extproc; "
        "only entries for 'prometheus' apply",
        "spec.metrics[0].reportingInterval: ignored: extproc reports TCP metrics when Envoy's access log flushes",
        "spec.metrics[1].overrides[0].match.customMetric: ignored: extproc serves only Istio's standard metrics, "
        "so custom metric 'my_metric' matches nothing here",
        "spec.metrics[1].overrides[1].tagOverrides.my-tag: exported as label 'my_tag': Prometheus label names allow "
        "only [a-zA-Z0-9_] (Envoy's Prometheus output makes the same substitution)",
    ]


def test_list_items_are_prefixed() -> None:
    from extproc.snapshot.loader import _expand

    text = textwrap.dedent(
        """\
        apiVersion: v1
        kind: List
        items:
        - apiVersion: telemetry.istio.io/v1
          kind: Telemetry
          metadata: {name: t, namespace: foo}
          spec:
            metrics:
            - overrides:
              - tagOverrides: {x: {operation: REMOVE, value: "request.nope"}}
        """
    )
    [top] = load_documents(text)
    [(doc, prefix)] = list(_expand(top))
    loaded, issues = parse_telemetry(doc, FILE, prefix)
    assert loaded is None
    assert [i.render() for i in issues] == [
        f"{FILE}: document 1 (Telemetry foo/t), line 10: error: "
        "items[0].spec.metrics[0].overrides[0].tagOverrides.x.value: value must not be set when operation is REMOVE"
    ]


# --- precedence -----------------------------------------------------------------------


def test_levels_layer_root_then_namespace_then_workload() -> None:
    root = telemetry("- overrides:\n  - tagOverrides: {response_code: {operation: REMOVE}}", name="mesh-default")
    ns = telemetry("- overrides:\n  - tagOverrides: {request_host: {value: request.host}}", name="ns", namespace="foo")
    wl = telemetry(
        "- overrides:\n  - match: {metric: REQUEST_COUNT}\n    tagOverrides: {response_code: {value: string(response.code)}}",
        name="wl",
        namespace="foo",
        selector="{app: httpbin}",
    )
    plans = compile_telemetry([wl, ns, root], WORKLOAD)
    assert [str(s).split(" (")[0] for s in plans.sources] == [
        "root: istio-system/mesh-default",
        "namespace: foo/ns",
        "workload: foo/wl",
    ]
    # The root's REMOVE survives the namespace's addition (overrides layer; they do not replace).
    assert plan(plans, L.REQUEST_DURATION).label_names == (
        *(n for n in HTTP_NAMES if n != "response_code"),
        "request_host",
    )
    # The workload's UPSERT of response_code replaces the root's REMOVE for REQUEST_COUNT only.
    assert plan(plans, L.REQUESTS).label_names == (*HTTP_NAMES, "request_host")
    assert plans.ignored == ()


def test_one_resource_per_level_oldest_then_by_name() -> None:
    newer = telemetry(
        "- overrides:\n  - tagOverrides: {a: {value: \"'newer'\"}}",
        name="a-first-by-name",
        namespace="foo",
        extra=", creationTimestamp: '2024-06-01T00:00:00Z'",
    )
    older = telemetry(
        "- overrides:\n  - tagOverrides: {a: {value: \"'older'\"}}",
        name="z-last-by-name",
        namespace="foo",
        extra=", creationTimestamp: 2024-01-01T00:00:00Z",
    )
    plans = compile_telemetry([newer, older], WORKLOAD)
    assert [s.ident for s in plans.sources] == ["foo/z-last-by-name"]
    assert plans.ignored == (
        ("foo/a-first-by-name", "foo/z-last-by-name is the namespace-wide Telemetry of foo (older, or first by name)"),
    )
    assert older.resource.metadata.creation_timestamp == datetime(2024, 1, 1, tzinfo=UTC)
    # Without timestamps: by name.
    b = telemetry("- overrides: []", name="b", namespace="foo")
    a = telemetry("- overrides: []", name="a", namespace="foo")
    assert [s.ident for s in compile_telemetry([b, a], WORKLOAD).sources] == ["foo/a"]


def test_selectors_and_namespaces() -> None:
    match = telemetry("- overrides: []", name="match", namespace="foo", selector="{app: httpbin}")
    match2 = telemetry("- overrides: []", name="match2", namespace="foo", selector="{version: v1}")
    miss = telemetry("- overrides: []", name="miss", namespace="foo", selector="{app: web, version: v1}")
    other_ns = telemetry("- overrides: []", name="other", namespace="bar")
    root_sel = telemetry("- overrides: []", name="root-sel", namespace="istio-system", selector="{app: httpbin}")
    plans = compile_telemetry([miss, match2, match, other_ns, root_sel], WORKLOAD)
    assert [str(s).split(" (")[0] for s in plans.sources] == ["workload: foo/match"]
    assert dict(plans.ignored) == {
        "bar/other": "namespace bar is neither the workload's (foo) nor the root (istio-system)",
        "foo/miss": "selector app=web does not match the workload labels",
        "foo/match2": "foo/match also selects this workload and comes first (older, or first by name)",
        "istio-system/root-sel": "a selector in the root namespace selects only workloads in istio-system",
    }
    # A workload in the root namespace: its namespace-wide resource is the root one.
    in_root = WorkloadIdentity("istio-system", {"app": "httpbin"})
    mesh = telemetry("- overrides: []", name="mesh")
    plans = compile_telemetry([mesh, root_sel], in_root)
    assert [str(s).split(" (")[0] for s in plans.sources] == [
        "root: istio-system/mesh",
        "workload: istio-system/root-sel",
    ]


def test_providers() -> None:
    # An entry for another provider does not apply; one without providers inherits the previous entry's.
    t = telemetry(
        """\
        - providers: [{name: stackdriver}]
          overrides: [{tagOverrides: {response_code: {operation: REMOVE}}}]
        - overrides: [{tagOverrides: {a: {value: "'inherits stackdriver'"}}}]
        - providers: [{name: Prometheus}]
          overrides: [{tagOverrides: {b: {value: "'prometheus'"}}}]
        """
    )
    plans = compile_telemetry([t], WORKLOAD)
    assert plan(plans, L.REQUESTS).label_names == (*HTTP_NAMES, "b")
    # The most specific providers list decides what is configured at all: no prometheus, no metrics.
    ns = telemetry("- providers: [{name: stackdriver}]", name="ns", namespace="foo")
    plans = compile_telemetry([t, ns], WORKLOAD)
    assert all(p.disabled for d in Direction for p in plans.plans_for(d))
    assert plans.notes == ("no Prometheus metrics: the providers in effect (from foo/ns) are stackdriver",)
    # A namespace resource without providers keeps the root's.
    ns = telemetry("- overrides: [{match: {metric: REQUEST_SIZE}, disabled: true}]", name="ns", namespace="foo")
    plans = compile_telemetry([t, ns], WORKLOAD)
    assert plan(plans, L.REQUEST_BYTES).disabled and not plan(plans, L.REQUESTS).disabled


# --- end to end through the store -----------------------------------------------------


def recorder_for(plans: TelemetryPlans) -> tuple[Recorder, MetricStore]:
    store = MetricStore(plans.inbound, plans.outbound)
    return Recorder(Labeler(LOCAL), store), store


def test_end_to_end_render() -> None:
    t = telemetry(
        """\
        - providers: [{name: prometheus}]
          overrides:
          - match: {metric: REQUEST_COUNT}
            tagOverrides:
              response_code: {operation: REMOVE}
              request_host: {value: request.host}
              destination_service: {value: "has(request.headers['x-tenant']) ? request.headers['x-tenant'] : 'none'"}
          - match: {metric: RESPONSE_SIZE}
            disabled: true
          - match: {metric: TCP_OPENED_CONNECTIONS, mode: SERVER}
            tagOverrides: {upstream: {value: upstream.cluster}}
        """
    )
    recorder, store = recorder_for(compile_telemetry([t], WORKLOAD))
    recorder.http(http(), "ext_proc")
    recorder.http(http(request_headers={}, request_id="rid-2", host="other:80"), "ext_proc")
    recorder.tcp(TcpRecord(peer=Peer(Direction.INBOUND, upstream_cluster="inbound|9000||"), opened=True))
    text = store.render()

    requests = series(text, "istio_requests_total")
    assert len(requests) == 2
    for s in requests:
        assert "response_code" not in s
        assert list(s)[-1] == "request_host"
        assert s["reporter"] == "destination" and s["source_workload"] == "sleep"
    assert {(s["request_host"], s["destination_service"]) for s in requests} == {
        ("httpbin.foo:8000", "acme"),
        ("other:80", "none"),
    }
    durations = series(text, "istio_request_duration_milliseconds_bucket")
    assert durations and all(s["response_code"] == "200" and "request_host" not in s for s in durations)
    assert {s["destination_service"] for s in durations} == {"httpbin.foo:8000", "other:80"}
    assert series(text, "istio_response_bytes_bucket") == []
    [opened] = series(text, "istio_tcp_connections_opened_total")
    assert opened["upstream"] == "inbound|9000||" and opened["request_protocol"] == "tcp"
    # The metric names never change (istio/istio#45775).
    assert names_in(text) <= {
        "istio_requests_total",
        *(f"istio_request_duration_milliseconds_{s}" for s in ("bucket", "sum", "count")),
        *(f"istio_request_bytes_{s}" for s in ("bucket", "sum", "count")),
        "istio_tcp_connections_opened_total",
    }


def test_end_to_end_modes_render_under_one_family() -> None:
    t = telemetry(
        "- overrides:\n  - match: {metric: REQUEST_COUNT, mode: CLIENT}\n    tagOverrides: {response_flags: {operation: REMOVE}}"
    )
    plans = compile_telemetry([t], WORKLOAD)
    assert not plans.symmetric
    recorder, store = recorder_for(plans)
    recorder.http(http(Direction.INBOUND), "ext_proc")
    recorder.http(http(Direction.OUTBOUND, request_id="rid-out"), "ext_proc")
    text = store.render()
    assert text.count("# TYPE istio_requests_total counter") == 1
    by_reporter = {s["reporter"]: s for s in series(text, "istio_requests_total")}
    assert "response_flags" in by_reporter["destination"]
    assert "response_flags" not in by_reporter["source"]


def test_reload_with_same_overrides_keeps_series() -> None:
    metrics = (
        "- overrides:\n  - tagOverrides: {request_host: {value: request.host}, response_code: {operation: REMOVE}}"
    )
    plans = compile_telemetry([telemetry(metrics)], WORKLOAD)
    recorder, store = recorder_for(plans)
    recorder.http(http(), "ext_proc")
    again = compile_telemetry([telemetry(metrics)], WORKLOAD)
    assert again == plans
    store.set_plans(again.inbound, again.outbound)
    assert store.series_counts()["istio_requests"] == 1
    changed = compile_telemetry([telemetry(metrics.replace("request.host", "request.method"))], WORKLOAD)
    assert changed != plans
    store.set_plans(changed.inbound, changed.outbound)
    assert store.series_counts()["istio_requests"] == 0


def test_request_headers_read_by_applied_tag_values() -> None:
    t = telemetry(
        """\
        - overrides:
          - tagOverrides:
              tenant: {value: "has(request.headers['X-Tenant']) ? request.headers['x-tenant'] : request.referer"}
              flagged: {value: "'x-debug' in request.headers"}
          - match: {metric: REQUEST_SIZE}
            disabled: true
            tagOverrides: {other: {value: "request.headers['x-unused']"}}
        """
    )
    assert compile_telemetry([t], WORKLOAD).request_headers == {"x-tenant", "referer", "x-debug"}
    assert compile_telemetry([], WORKLOAD).request_headers == frozenset()


# --- through the loader and the snapshot, once /tmp/telemetry_wiring.patch is applied ---

_wired = pytest.mark.skipif(
    "telemetries" not in LoadedConfig.__dataclass_fields__, reason="the loader does not read Telemetry resources yet"
)


@_wired
def test_loader_and_snapshot(tmp_path: Path) -> None:
    from extproc.config.errors import ConfigError
    from extproc.snapshot import loader
    from extproc.snapshot.compiled import Options, build_snapshot

    cfg = tmp_path / "cfg"
    cfg.mkdir()
    good = textwrap.dedent(
        """\
        apiVersion: telemetry.istio.io/v1
        kind: Telemetry
        metadata: {name: mesh-default, namespace: istio-system}
        spec:
          metrics:
          - overrides:
            - match: {metric: REQUEST_COUNT}
              tagOverrides: {response_code: {operation: REMOVE}, request_host: {value: request.host}}
        """
    )
    (cfg / "t.yaml").write_text(good)
    snap = build_snapshot(loader.load([cfg]), WORKLOAD, Options(), 1)
    assert [s.ident for s in snap.telemetry.sources] == ["istio-system/mesh-default"]
    assert plan(snap.telemetry, L.REQUESTS).label_names[-1] == "request_host"

    (cfg / "dup.yaml").write_text(good + "---\n" + good.replace("request_host: {value: request.host}", "x: {}"))
    with pytest.raises(ConfigError) as e:
        loader.load([cfg])
    errors = [i.render() for i in e.value.issues if not i.warning]
    assert len(errors) == 2, errors
    assert any(f"{cfg}/t.yaml: document 1" in i and "duplicate Telemetry, first defined in" in i for i in errors)
    assert any(
        f"{cfg}/dup.yaml: document 2" in i
        and "spec.metrics[0].overrides[0].tagOverrides.x: value must be set when operation is UPSERT" in i
        for i in errors
    )


# --- what Istio accepts and extproc cannot act on ------------------------------------------------


def test_a_tag_name_outside_prometheus_syntax_is_exported_under_envoys_sanitised_name() -> None:
    t = telemetry("- overrides:\n  - tagOverrides: {my-tag: {value: \"'a'\"}, 2nd.tag: {value: \"'b'\"}}")
    recorder, store = recorder_for(compile_telemetry([t], WORKLOAD))
    recorder.http(http(), "ext_proc")
    [s] = series(store.render(), "istio_requests_total")
    assert (s["my_tag"], s["_2nd_tag"]) == ("a", "b")


def test_a_tag_value_extproc_cannot_evaluate_reads_unknown() -> None:
    t = telemetry("- overrides:\n  - tagOverrides: {a: {value: add}, b: {value: 'request.size()'}}")
    recorder, store = recorder_for(compile_telemetry([t], WORKLOAD))
    recorder.http(http(), "ext_proc")
    [s] = series(store.render(), "istio_requests_total")
    assert (s["a"], s["b"]) == ("unknown", "unknown")


def test_a_custom_metric_override_changes_no_standard_metric_but_switches_its_mode_back_on() -> None:
    # As Istio's mergeMetrics: any later override for a mode re-enables it after a disable-all.
    root = telemetry("- overrides:\n  - disabled: true", name="mesh-default")
    ns = telemetry(
        "- overrides:\n  - match: {customMetric: my_metric}\n    tagOverrides: {x: {value: \"'y'\"}}",
        name="ns",
        namespace="foo",
    )
    plans = compile_telemetry([root, ns], WORKLOAD)
    assert plan(plans, L.REQUESTS) == MetricPlan.standard(L.REQUESTS)
    assert not plan(plans, L.REQUESTS).disabled


def test_a_telemetry_with_target_refs_applies_to_no_sidecar() -> None:
    loaded, issues = docs_issues(
        HEAD.replace("namespace: foo", "namespace: istio-system")
        + "  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: gw}]\n"
        + "  metrics: [{overrides: [{disabled: true}]}]\n"
    )
    assert [i.split(": warning: ", 1)[1] for i in issues] == [
        "spec.targetRefs: ignored: targetRef(s) select Gateways and waypoints, never a sidecar workload, "
        "so extproc applies this resource to no workload"
    ]
    plans = compile_telemetry(loaded, WORKLOAD)
    assert plans.sources == () and [name for name, _ in plans.ignored] == ["istio-system/t"]
    assert plan(plans, L.REQUESTS) == MetricPlan.standard(L.REQUESTS)
