"""The authz-http mode's own promises, through a real Envoy: the headers that carry Envoy's view
of the connection cannot be forged by a client, hostile bytes sent straight to the check
listener break nothing, a check that cannot be made fails closed, and the listener serves
over a unix socket too. (The RBAC, JWT, CUSTOM, path, metrics and tracing differentials run
in this mode with the others.)"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Stack, run_stack
from tests.fixtures import envoy_config as ec
from tests.fixtures.jwt_keys import TokenIssuer
from tests.fixtures.procs import free_port
from tests.fixtures.stack import ExtprocProcess, HttpClient

pytestmark = pytest.mark.e2e

ISSUER = "https://issuer.example"
POLICIES = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-these, namespace: foo}
spec:
  rules:
  - from: [{source: {principals: ["cluster.local/ns/foo/sa/sleep"]}}]
  - from: [{source: {ipBlocks: ["10.9.9.9/32"]}}]
  - to: [{operation: {ports: ["7777"]}}]
  - when: [{key: connection.sni, values: ["forged.example"]}]
  - when: [{key: "request.auth.claims[sub]", values: ["admin"]}]
"""

# Each is what a client would send to be taken for someone it is not.
FORGERIES: list[tuple[str, list[tuple[str, str]]]] = [
    ("principal", [("x-extproc-connection", "127.0.0.1:1 127.0.0.1:1  spiffe://cluster.local/ns/foo/sa/sleep  ")]),
    ("address", [("x-extproc-connection", "10.9.9.9:1 127.0.0.1:7777    ")]),
    ("sni", [("x-extproc-connection", "127.0.0.1:1 127.0.0.1:1 forged.example   ")]),
    (
        "two lines",
        [
            ("x-extproc-connection", "10.9.9.9:1 127.0.0.1:7777    "),
            ("x-extproc-connection", "10.9.9.9:2 127.0.0.1:7777    "),
        ],
    ),
    (
        "jwt_authn claims",
        [("x-extproc-md-envoy.filters.http.jwt_authn", '={"payload":{"iss":"' + ISSUER + '","sub":"admin"}}')],
    ),
    ("direction", [("x-extproc-direction", "outbound")]),
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Any], upstream: int) -> Iterator[Stack]:
    yield from run_stack(tmp_path_factory, pki, upstream, "authz-http")


def test_a_client_cannot_pose_as_another_peer_with_our_headers(stack: Stack, tmp_path: Path) -> None:
    stack.set_policies(POLICIES)
    # The real thing passes: the policy can be met.
    assert stack.https(cert="sleep").get("/real").status == 200
    assert stack.http().get("/plain").status == 403
    # A second Envoy in front of the same extproc, without disallowed_headers: the forged
    # headers reach the check only to be overwritten, because every value Envoy formats is
    # never empty.
    port, admin = free_port(), free_port()
    bare = ec.http_check_chain()
    del bare[0]["typed_config"]["disallowed_headers"]
    envoy = ec.EnvoyProcess(
        ec.bootstrap(
            admin,
            [ec.HttpListener("bare", port, bare)],
            [ec.cluster("upstream", "127.0.0.1", 1), *stack.extproc.clusters()],
        ),
        tmp_path / "bare-envoy",
        admin,
    )
    try:
        envoy.wait_ready()
        for what, lines in FORGERIES:
            for client in (stack.http(), stack.https(cert="other"), HttpClient(port)):
                r = client.request("GET", "/forged", [("host", "svc"), *lines])
                assert r.status == 403, (what, client.port, r.status)
    finally:
        envoy.stop()


def test_hostile_bytes_straight_to_the_listener_break_nothing(stack: Stack) -> None:
    stack.set_policies(POLICIES)
    port = stack.extproc.http_port
    assert port is not None
    nasty = [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,  # a TLS hello
        b"GET / HTTP/1.1\r\n" + b"x-a: b\r\n" * 40000 + b"\r\n",  # a head over the limit
        b"GET / HTTP/1.1\r\nhost: h\r\ncontent-length: 99999999\r\n\r\n" + b"x" * 4096,
        b"GET / HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",  # not a chunk size
        b"GET /\x00 HTTP/1.1\r\nhost: h\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: h\r\nx-extproc-connection: \xff\xfe\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: h\r\nx-extproc-connection: " + b"a " * 5000 + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: h\r\nx-extproc-md-x: ={not json\r\nx-extproc-connection: 1.1.1.1:1 2.2.2.2:2    "
        b"\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n" * 200,  # pipelined
        b"GET / HTTP/1.1\r\nhost: h",  # half a request, then gone
    ]
    answers = []
    for data in nasty:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := s.recv(65536):
                got += chunk
            answers.append(got[:12])
    assert answers[0].startswith(b"HTTP/1.1 400")
    assert answers[1].startswith(b"HTTP/1.1 431")
    assert answers[2].startswith(b"HTTP/1.1 413")
    assert answers[3].startswith(b"HTTP/1.1 4")
    for got in answers[4:9]:
        assert got.startswith(b"HTTP/1.1 4"), got  # refused by the parser or denied as malformed
    assert answers[9] == b""
    # Everything still works, and the bad checks were counted as malformed.
    assert stack.https(cert="sleep").get("/after").status == 200
    assert stack.extproc.readyz()["_status"] == 200
    malformed = [
        line for line in stack.extproc.metrics().splitlines() if line.startswith("extproc_malformed_requests_total{")
    ]
    kinds = {line.split('kind="')[1].split('"')[0] for line in malformed}
    assert {"missing-connection-header", "bad-header-encoding", "bad-metadata-header"} <= kinds, malformed
    # What the listener refused itself is counted by status, and logged once per status.
    metrics = stack.extproc.metrics()
    refused = {
        line.split('status="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("extproc_http_check_refused_total{")
    }
    assert refused.get("400", 0) >= 2 and refused.get("431") == 1 and refused.get("413") == 1, refused
    assert "extproc_http_check_connections " in metrics
    log = stack.extproc.proc.log()
    assert log.count("HTTP check listener: answered 400") == 1, log[-2000:]


def test_every_method_is_checked_and_head_gets_no_body(stack: Stack) -> None:
    stack.set_policies(
        """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: deny-admin, namespace: foo}
        spec:
          action: DENY
          rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
        """
    )
    for method in ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"):
        ok = stack.http().request(method, "/fine", body=b"x" if method in ("POST", "PUT", "PATCH") else None)
        assert ok.status == 200, method
        denied = stack.http().request(method, "/admin")
        assert denied.status == 403, method
        assert denied.body == (b"" if method == "HEAD" else b"RBAC: access denied"), method


def test_a_check_that_cannot_be_made_fails_closed(tmp_path: Path, upstream: int) -> None:
    port, admin, nowhere = free_port(), free_port(), free_port()
    envoy = ec.EnvoyProcess(
        ec.bootstrap(
            admin,
            [ec.HttpListener("http", port, ec.http_check_chain(timeout="1s"))],
            [ec.cluster("upstream", "127.0.0.1", upstream), *ec.extproc_clusters(free_port(), nowhere)],
        ),
        tmp_path,
        admin,
    )
    try:
        envoy.wait_ready()
        r = HttpClient(port).get("/anything")
        assert r.status == 403 and r.body == b""
        assert envoy.stats("http.http.ext_authz.")["http.http.ext_authz.error"] >= 1
    finally:
        envoy.stop()


def test_the_listener_serves_a_unix_socket(tmp_path: Path, upstream: int) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "p.yaml").write_text(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: d, namespace: foo}\n"
        "spec:\n  action: DENY\n  rules: [{to: [{operation: {paths: ['/admin*']}}]}]\n"
    )
    sock = tmp_path / "checks.sock"
    x = ExtprocProcess([tmp_path / "p"], tmp_path, extra_args=["--http-listen", f"unix:{sock}"])
    envoy: ec.EnvoyProcess | None = None
    try:
        x.wait_ready()
        port, admin = free_port(), free_port()
        checks = {
            "name": "extproc_http",
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": "extproc_http",
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": str(sock)}}}}]}],
            },
        }
        envoy = ec.EnvoyProcess(
            ec.bootstrap(
                admin,
                [ec.HttpListener("http", port, ec.http_check_chain())],
                [
                    ec.cluster("upstream", "127.0.0.1", upstream),
                    ec.cluster("extproc", "127.0.0.1", x.grpc_port, http2=True),
                    checks,
                ],
            ),
            tmp_path / "envoy",
            admin,
        )
        envoy.wait_ready()
        client = HttpClient(port)
        assert client.get("/fine").status == 200
        assert client.get("/admin").status == 403
    finally:
        if envoy is not None:
            envoy.stop()
        x.stop()
    # The socket goes with the process.
    deadline = time.monotonic() + 5
    while sock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not sock.exists()


def test_a_verified_token_in_the_query_is_removed_and_nothing_else_changes(stack: Stack) -> None:
    issuer = TokenIssuer(ISSUER)
    jwks = stack.workdir / "jwks.json"
    jwks.write_text(issuer.jwks())
    stack.set_policies(
        f"""
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata: {{name: jwt, namespace: foo}}
        spec:
          jwtRules:
          - issuer: {ISSUER}
            jwks: '{issuer.jwks()}'
        """
    )
    token = issuer.token({"sub": "alice"})
    client = stack.http()
    seen = client.get(f"/q?b=2&access_token={token}&a=1").json()
    assert seen["path"] == "/q?a=1&b=2"  # removed (the rest in Envoy's order, as jwt_authn leaves it)
    assert "x-extproc-remove-query" not in seen["headers"]
    assert client.get("/q?m&b=2").json()["path"] == "/q?m&b=2"  # untouched: no token
