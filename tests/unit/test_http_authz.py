"""The HTTP check service (authz-http): the same decisions as the gRPC Check for the same
request, responses Envoy's http_service client reads as intended, and no input that crashes
it or gets a covered request past a DENY."""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path
from typing import Any

import pytest
from envoy.service.auth.v3 import external_auth_pb2
from hypothesis import given
from hypothesis import strategies as st

from extproc.attributes import NO_LINES
from extproc.services import http_check_render as render
from extproc.services.authz import AuthorizationService
from extproc.services.check_adapter import CheckAdapter
from extproc.services.enforcer import Enforcer
from extproc.services.headers import MalformedRequest
from extproc.services.http_authz import HttpAuthorizationService
from extproc.services.http_check_adapter import CONNECTION_HEADER, parse_connection
from extproc.snapshot import loader
from extproc.snapshot.compiled import Options, Snapshot, WorkloadIdentity, build_snapshot
from extproc.telemetry.exchange import PeerExchange
from extproc.telemetry.peer import Workload
from extproc.telemetry.record import Direction
from extproc.verdict import HeaderOp, Stage, Verdict
from tests.unit.test_fuzz_adapters import DENIES, FUZZ, covered, header_names, paths, text

POLICIES = (
    DENIES
    + """---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-some, namespace: foo}
spec:
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/foo/sa/sleep"]}}]
  - to: [{operation: {methods: ["GET"], paths: ["/public*"], hosts: ["svc.example*"]}}]
  - when: [{key: "request.headers[x-team]", values: ["blue"]}, {key: connection.sni, values: ["sni.example"]}]
  - to: [{operation: {ports: ["8443"]}}]
  - when: [{key: "request.headers[:authority]", values: ["authority.example"]}]
"""
)


@pytest.fixture(scope="module")
def snap(tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    d: Path = tmp_path_factory.mktemp("http-authz-cfg")
    (d / "p.yaml").write_text(POLICIES)
    return build_snapshot(loader.load([d]), WorkloadIdentity("foo", {"app": "web"}), Options(), 1)


def connection(peer: str = "10.0.0.1:4242", local: str = "10.0.0.2:8080", sni: str = "", uri: str = "",
               dns: str = "", subject: str = "") -> str:  # fmt: skip
    return f"{peer} {local} {sni} {uri} {dns} {subject}"


def answer(
    svc: HttpAuthorizationService, method: str, target: str, headers: dict[str, str], body: bytes = b""
) -> bytes:
    got = svc(method, target, headers, NO_LINES, body, "", sum(len(k) + len(v) for k, v in headers.items()))
    if inspect.isawaitable(got):
        got = asyncio.run(_await(got))
    assert isinstance(got, bytes)
    return got


async def _await(x: Any) -> Any:
    return await x


def parse(raw: bytes) -> tuple[int, dict[str, list[str]], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        k, _, v = line.partition(": ")
        headers.setdefault(k, []).append(v)
    assert int(headers["content-length"][0]) == len(body) or body == b""
    return status, headers, body


def grpc_decision(snap: Snapshot, method: str, target: str, headers: dict[str, str], conn: str) -> tuple[bool, str]:
    """What the gRPC Check decides for the same request, as Envoy would send it."""
    c = parse_connection(conn)
    req = external_auth_pb2.CheckRequest()
    a = req.attributes
    a.source.address.socket_address.address, a.source.address.socket_address.port_value = c.peer, c.peer_port
    a.destination.address.socket_address.address, a.destination.address.socket_address.port_value = (
        c.local,
        c.local_port,
    )
    a.source.principal = c.uri_sans.split(",")[0] if c.uri_sans else ""
    a.tls_session.sni = c.sni
    h = a.request.http
    h.method, h.path, h.host = method, target, headers.get("host", "")
    h.headers.update({k: v for k, v in headers.items() if k != "host"})
    h.headers.update({":method": method, ":path": target, ":authority": headers.get("host", "")})
    svc = AuthorizationService(lambda: snap, CheckAdapter(), Enforcer())
    resp = external_auth_pb2.CheckResponse.FromString(asyncio.run(svc._rpc((req, None), None)))  # type: ignore[arg-type]
    md = dict(resp.dynamic_metadata)
    return resp.status.code == 0, str(md.get("extproc_stage", ""))


CASES = [
    ("GET", "/public/x", {"host": "svc.example:80"}, connection()),
    ("POST", "/public/x", {"host": "svc.example:80"}, connection()),
    ("GET", "/private", {"host": "svc.example"}, connection(uri="spiffe://cluster.local/ns/foo/sa/sleep")),
    ("GET", "/private", {"host": "svc.example"}, connection(uri="spiffe://cluster.local/ns/bar/sa/sleep")),
    ("GET", "/admin/x", {"host": "svc.example"}, connection(uri="spiffe://cluster.local/ns/foo/sa/sleep")),
    ("GET", "/p", {"host": "h", "x-team": "blue"}, connection(sni="sni.example")),
    ("GET", "/p", {"host": "h", "x-team": "blue"}, connection(sni="other")),
    ("GET", "/p", {"host": "h", "x-block": "yes"}, connection(local="10.0.0.2:8443")),
    ("GET", "/p", {"host": "h"}, connection(local="10.0.0.2:8443")),
    ("GET", "/p", {"host": "h"}, connection(peer="192.0.2.9:1")),
    ("GET", "/p", {"host": "authority.example"}, connection()),
    ("GET", "/public/../admin", {"host": "svc.example"}, connection()),
    ("GET", "/public?x=/admin", {"host": "svc.example"}, connection()),
    ("GET", "/p", {"host": "h", "x-forwarded-for": "192.0.2.1"}, connection()),
]


@pytest.mark.parametrize(("method", "target", "headers", "conn"), CASES)
def test_an_http_check_is_decided_as_the_grpc_check_of_the_same_request(
    snap: Snapshot, method: str, target: str, headers: dict[str, str], conn: str
) -> None:
    svc = HttpAuthorizationService(lambda: snap, CheckAdapter(), Enforcer())
    expected = grpc_decision(snap, method, target, headers, conn)
    for _ in range(2):  # decided, then from the cache
        status, got, _ = parse(answer(svc, method, target, {**headers, CONNECTION_HEADER: conn}))
        assert (status == 200, got["extproc_stage"][0]) == expected
    assert svc.stats.cache.hits >= 1


def test_every_uri_san_dns_san_and_the_subject_are_principals(snap: Snapshot) -> None:
    svc = HttpAuthorizationService(lambda: snap, CheckAdapter(), Enforcer())
    conn = connection(
        uri="spiffe://x/ns/a/sa/b,spiffe://cluster.local/ns/foo/sa/sleep", dns="a.example", subject="CN=a b"
    )
    assert parse_connection(conn).principals == (
        "spiffe://x/ns/a/sa/b",
        "spiffe://cluster.local/ns/foo/sa/sleep",
        "a.example",
        "CN=a b",
    )
    status, _, _ = parse(answer(svc, "GET", "/private", {"host": "h", CONNECTION_HEADER: conn}))
    assert status == 200  # the second URI SAN matches, as Envoy's `authenticated` matcher tries each


@pytest.mark.parametrize(
    ("headers", "kind"),
    [
        ({"host": "h"}, "missing-connection-header"),
        ({"host": "h", CONNECTION_HEADER: "10.0.0.1:1 10.0.0.2:2"}, "bad-connection-header"),
        ({"host": "h", CONNECTION_HEADER: "nohost nolocal    "}, "bad-connection-header"),
    ],
)
def test_a_check_without_usable_connection_facts_is_denied_as_malformed(
    snap: Snapshot, headers: dict[str, str], kind: str
) -> None:
    svc = HttpAuthorizationService(lambda: snap, CheckAdapter(), Enforcer())
    status, got, body = parse(answer(svc, "GET", "/public", headers))
    assert status == 403 and body == b"RBAC: access denied"
    assert got["extproc_reason"] == [f"malformed request: {kind}"]
    assert svc.stats.malformed == {kind: 1}


def test_undecodable_headers_too_many_headers_and_nul_paths_are_denied(snap: Snapshot) -> None:
    svc = HttpAuthorizationService(lambda: snap, CheckAdapter(max_headers=10), Enforcer())
    conn = {"host": "h", CONNECTION_HEADER: connection()}
    raw = svc("GET", "/public", conn, NO_LINES, b"", "x-bad", 10)
    assert isinstance(raw, bytes) and parse(raw)[0] == 403
    many = {**conn, **{f"x-{i}": "v" for i in range(20)}}
    assert parse(answer(svc, "GET", "/public", many))[0] == 403
    assert parse(answer(svc, "GET", "/public%00", conn))[0] == 403
    assert svc.stats.malformed == {"bad-header-encoding": 1, "too-many-headers": 1, "invalid-path": 1}
    assert svc.stats.internal_errors == 0


def test_an_oversized_head_is_measured_exactly(snap: Snapshot) -> None:
    svc = HttpAuthorizationService(lambda: snap, CheckAdapter(max_header_bytes=1000), Enforcer())
    headers = {"host": "h", CONNECTION_HEADER: connection(), "x-big": "v" * 2000}
    assert parse(answer(svc, "GET", "/public", headers))[0] == 403
    assert svc.stats.malformed == {"headers-too-large": 1}


def test_head_checks_get_no_body_and_outbound_checks_are_allowed(snap: Snapshot) -> None:
    local = Workload.from_labels({"app": "web"}, workload_name="web", namespace="foo")
    svc = HttpAuthorizationService(lambda: snap, CheckAdapter(), Enforcer(), exchange=PeerExchange(local, "node-1"))
    raw = answer(svc, "HEAD", "/admin", {"host": "h", CONNECTION_HEADER: connection()})
    assert raw.startswith(b"HTTP/1.1 403 ") and raw.endswith(b"content-length: 19\r\n\r\n")
    out = parse(answer(svc, "GET", "/admin", {"host": "h", "x-extproc-direction": "outbound"}))
    assert out[0] == 200 and "x-envoy-peer-metadata" in out[1] and "enforced_engine_result" not in out[1]


def test_the_peer_exchange_is_answered_removed_and_handed_to_the_access_log(snap: Snapshot) -> None:
    local = Workload.from_labels({"app": "web"}, workload_name="web", namespace="foo")
    svc = HttpAuthorizationService(lambda: snap, CheckAdapter(), Enforcer(), exchange=PeerExchange(local, "node-1"))
    peer = {"x-envoy-peer-metadata": "CgsKA2FwcBIEc2xlZXA=", "x-envoy-peer-metadata-id": "sidecar~peer"}
    status, got, _ = parse(
        answer(svc, "GET", "/public", {"host": "svc.example", CONNECTION_HEADER: connection(), **peer})
    )
    assert status == 200
    assert got["x-envoy-auth-headers-to-remove"] == ["x-envoy-peer-metadata, x-envoy-peer-metadata-id"]
    assert got["x-envoy-peer-metadata-id"] == ["node-1"]  # ours, for the client
    assert got["extproc_peer_metadata"] == ["CgsKA2FwcBIEc2xlZXA="]  # the peer's, for the log
    assert got["extproc_peer_metadata_id"] == ["sidecar~peer"]
    denied = parse(answer(svc, "GET", "/admin", {"host": "h", CONNECTION_HEADER: connection(), **peer}))
    assert denied[0] == 403 and denied[1]["x-envoy-peer-metadata-id"] == ["node-1"]
    assert "x-envoy-auth-headers-to-remove" not in denied[1]


def test_a_verdict_renders_as_envoy_reads_it() -> None:
    allowed = Verdict(
        allowed=True,
        stage=Stage.ALLOW,
        headers=(HeaderOp("x-jwt-sub", "alice\r\nx-admin: yes"), HeaderOp("bad name", "v")),
        remove_headers=("authorization", "bad name"),
        response_headers=(HeaderOp("x-on-success", "1"),),
        metadata={"enforced_engine_result": "allowed", "extproc_snapshot": 7, "n": {"a": [1]}, "flag": True},
    )
    status, got, body = parse(render.rendered(allowed).head + render.rendered(allowed).tail)
    assert status == 200 and body == b""
    assert got["x-jwt-sub"] == ["alice  x-admin: yes"]  # no header injection
    assert "x-admin" not in got and "bad name" not in got
    assert got["x-envoy-auth-headers-to-remove"] == ["authorization"]
    assert got["extproc_snapshot"] == ["7"] and got["n"] == ['{"a":[1]}'] and got["flag"] == ["true"]
    for st_in, st_out in ((401, 401), (302, 302), (200, 403), (503, 503), (100, 403), (0, 403)):
        denied = Verdict(allowed=False, stage=Stage.DENY, status=st_in, body="no")
        assert parse(render.rendered(denied).head + render.rendered(denied).tail)[0] == st_out


def test_trace_headers_go_upstream_only_when_allowed() -> None:
    headers = (("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01"),)
    md = {"extproc_trace": "t"}
    assert b"traceparent" in render.trace_lines(headers, ("b3",), True, md)
    denied = render.trace_lines(headers, ("b3",), False, md)
    assert b"traceparent" not in denied and b"x-envoy-auth-headers-to-remove" not in denied
    assert b"extproc_trace: t" in denied
    # A value that would end the line (a client's tracestate, say) is never written as it is.
    injected = render.trace_lines((("tracestate", "a=1\r\nx-admin: yes"),), (), True, None)
    assert injected == b"tracestate: a=1  x-admin: yes\r\n"


def test_a_direction_header_picks_the_side(snap: Snapshot) -> None:
    svc = HttpAuthorizationService(lambda: snap, CheckAdapter(), Enforcer(), direction=Direction.OUTBOUND)
    assert parse(answer(svc, "GET", "/admin", {"host": "h"}))[0] == 200
    inbound = {"host": "h", "x-extproc-direction": "inbound", CONNECTION_HEADER: connection()}
    assert parse(answer(svc, "GET", "/admin", inbound))[0] == 403


@st.composite
def http_checks(draw: st.DrawFn) -> tuple[str, str, dict[str, str], bool]:
    path = draw(paths)
    headers = draw(st.dictionaries(header_names.map(str.lower), text, max_size=8))
    if draw(st.booleans()):
        headers["x-block"] = draw(st.sampled_from(["yes", "no", "YES", "yes,no"]))
    peer = draw(st.one_of(st.builds(lambda n: f"192.0.2.{n}", st.integers(0, 255)), st.ip_addresses().map(str)))
    host_port = f"[{peer}]" if ":" in peer else peer
    if draw(st.integers(0, 4)):
        headers[CONNECTION_HEADER] = f"{host_port}:{draw(st.integers(0, 65535))} 10.0.0.2:80 {draw(text)}"
    method = draw(
        st.one_of(st.sampled_from(["GET", "POST", "HEAD", "CONNECT"]), st.from_regex(r"[A-Z]{1,8}", fullmatch=True))
    )
    return method, path, headers, covered(path, headers, peer)


@FUZZ
@given(http_checks())
def test_an_http_check_never_crashes_and_no_covered_request_is_allowed(
    snap: Snapshot, case: tuple[str, str, dict[str, str], bool]
) -> None:
    method, target, headers, is_covered = case
    svc = HttpAuthorizationService(lambda: snap, CheckAdapter(), Enforcer())
    for _ in range(2):
        try:
            raw = answer(svc, method, target, dict(headers))
        except MalformedRequest:  # pragma: no cover - the service never lets one out
            raise
        status = int(raw.split(b" ", 2)[1])
        assert status in (200, 401, 403)
        assert not (is_covered and status == 200), case
    assert svc.stats.internal_errors == 0
