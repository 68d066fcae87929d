"""What users see through a real Envoy: status codes, bodies, TCP connections allowed or
closed, and the decision recorded in Envoy's access log."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import Stack

pytestmark = pytest.mark.e2e

ALLOW_SLEEP = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-sleep, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/foo/sa/sleep"]}}]
"""


def test_no_policy_allows_http_and_tcp(stack: Stack) -> None:
    stack.set_policies("")
    r = stack.http().get("/anything")
    assert r.status == 200
    assert r.json()["path"] == "/anything"
    assert stack.tcp(cert="sleep") is not None
    assert stack.tcp(tls=False) is not None


def test_allow_by_principal_over_mtls(stack: Stack) -> None:
    stack.set_policies(ALLOW_SLEEP)
    assert stack.https(cert="sleep").get("/ip").status == 200
    denied = stack.https(cert="other").get("/ip")
    assert denied.status == 403
    assert denied.body == b"RBAC: access denied"
    assert stack.https().get("/ip").status == 403  # TLS without a client certificate
    assert stack.http().get("/ip").status == 403  # plaintext
    # The same policy on TCP: the connection passes for sleep and is closed for others.
    assert stack.tcp(cert="sleep") is not None
    assert stack.tcp(cert="other") is None
    assert stack.tcp(tls=False) is None


def test_allow_response_adds_only_the_trace_context(stack: Stack) -> None:
    stack.set_policies(ALLOW_SLEEP)
    seen = stack.https(cert="sleep").get("/headers", {"x-probe": "1"}).json()["headers"]
    trace = {"traceparent", "x-b3-traceid", "x-b3-spanid", "x-b3-sampled"}  # the default --trace-formats w3c,b3
    assert trace <= seen.keys(), seen
    assert seen["traceparent"][3:35] == seen["x-b3-traceid"].rjust(32, "0")
    baseline = trace | {
        "host",
        "accept-encoding",
        "x-probe",
        "x-forwarded-proto",
        "x-request-id",
        "x-envoy-expected-rq-timeout-ms",
        "content-length",
    }
    assert set(seen) - baseline - {"x-forwarded-client-cert"} == set(), seen


def test_deny_policy_returns_403_and_records_the_rule(stack: Stack) -> None:
    stack.set_policies(
        """
        apiVersion: security.istio.io/v1beta1
        kind: AuthorizationPolicy
        metadata: {name: deny-admin, namespace: istio-system}
        spec:
          action: DENY
          rules:
          - to: [{operation: {paths: ["/admin*"], methods: ["GET", "POST"]}}]
        """
    )
    assert stack.http().get("/public").status == 200
    r = stack.http().get("/admin/users?id=1")
    assert r.status == 403 and r.body == b"RBAC: access denied"
    log = stack.access_log_line("/admin/users?id=1")
    # %RESPONSE_CODE_DETAILS%: ext_authz's own, or the one Envoy's RBAC filter would give.
    details = (
        "ext_authz_denied"
        if stack.mode in ("authz", "authz-http")
        else "rbac_access_denied_matched_policy[ns[istio-system]-policy[deny-admin]-rule[0]]"
    )
    assert details in log
    assert "ns[istio-system]-policy[deny-admin]-rule[0]" in log
    assert stack.http().request("PUT", "/admin").status == 200
    # A DENY rule with only HTTP attributes denies every TCP connection (Istio's widening).
    assert stack.tcp(cert="sleep") is None


def test_http_only_allow_rule_denies_all_tcp(stack: Stack) -> None:
    stack.set_policies(
        """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: allow-get, namespace: foo}
        spec:
          rules:
          - to: [{operation: {methods: ["GET"]}}]
        """
    )
    assert stack.http().get("/x").status == 200
    assert stack.http().request("POST", "/x").status == 403
    assert stack.tcp(cert="sleep") is None
    assert stack.tcp(tls=False) is None


def test_tcp_allow_by_port_and_namespace(stack: Stack) -> None:
    stack.set_policies(
        f"""
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {{name: tcp, namespace: foo}}
        spec:
          rules:
          - from: [{{source: {{namespaces: ["foo"]}}}}]
            to: [{{operation: {{ports: ["{stack.tcp_tls_port}"]}}}}]
        """
    )
    assert stack.tcp(cert="sleep") is not None
    assert stack.tcp(cert="other") is None
    assert stack.tcp(tls=False) is None  # another port


def test_allow_nothing_and_allow_all(stack: Stack) -> None:
    stack.set_policies(
        """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: allow-nothing, namespace: foo}
        spec: {}
        """
    )
    assert stack.http().get("/").status == 403
    assert stack.tcp(tls=False) is None
    stack.set_policies(
        """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: allow-nothing, namespace: foo}
        spec: {}
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: allow-all, namespace: foo}
        spec:
          rules: [{}]
        """
    )
    assert stack.http().get("/").status == 200
    assert stack.tcp(tls=False) is not None


def test_selector_and_namespace_scoping(stack: Stack) -> None:
    stack.set_policies(
        """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: other-app, namespace: foo}
        spec:
          action: DENY
          selector: {matchLabels: {app: reviews}}
          rules: [{}]
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: other-namespace, namespace: bar}
        spec:
          action: DENY
          rules: [{}]
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: gateway-only, namespace: foo}
        spec:
          action: DENY
          targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}]
          rules: [{}]
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: mesh-wide-for-v1, namespace: istio-system}
        spec:
          action: DENY
          selector: {matchLabels: {version: v1}}
          rules:
          - to: [{operation: {paths: ["/v1-blocked"]}}]
        """
    )
    assert stack.http().get("/ok").status == 200
    assert stack.http().get("/v1-blocked").status == 403


def test_dry_run_and_audit_never_change_the_decision(stack: Stack) -> None:
    stack.set_policies(
        """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata:
          name: would-deny
          namespace: foo
          annotations: {istio.io/dry-run: "true"}
        spec:
          action: DENY
          rules:
          - to: [{operation: {paths: ["/secret"]}}]
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: audit-secret, namespace: foo}
        spec:
          action: AUDIT
          rules:
          - to: [{operation: {paths: ["/secret"]}}]
        """
    )
    assert stack.http().get("/secret?dry-run-1").status == 200
    log = stack.access_log_line("/secret?dry-run-1")
    assert '"istio_dry_run_deny_shadow_engine_result":"denied"' in log
    assert '"istio_dry_run_deny_shadow_effective_policy_id":"ns[foo]-policy[would-deny]-rule[0]"' in log
    # Over http_service, dynamic metadata from headers is always a string.
    assert ('"access_log_hint":"true"' if stack.mode == "authz-http" else '"access_log_hint":true') in log
    assert stack.http().get("/public?dry-run-2").status == 200
    assert '"istio_dry_run_deny_shadow_engine_result":"allowed"' in stack.access_log_line("/public?dry-run-2")


def test_remote_ip_from_x_forwarded_for(stack: Stack) -> None:
    stack.set_policies(
        """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: block-client, namespace: foo}
        spec:
          action: DENY
          rules:
          - from: [{source: {remoteIpBlocks: ["203.0.113.0/24"]}}]
        """
    )
    assert stack.http().get("/", {"x-forwarded-for": "203.0.113.9"}).status == 403
    assert stack.http().get("/", {"x-forwarded-for": "203.0.113.9, 198.51.100.1"}).status == 200
    assert stack.http().get("/").status == 200


def test_grpc_clients_get_permission_denied(stack: Stack) -> None:
    """A real gRPC client over HTTP/2: Envoy turns the 403 into status PERMISSION_DENIED, as with RBAC."""
    import grpc

    stack.set_policies(
        """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: deny-method, namespace: foo}
        spec:
          action: DENY
          rules:
          - to: [{operation: {paths: ["/pkg.Service/Forbidden"], methods: ["POST"]}}]
        """
    )
    with grpc.insecure_channel(f"127.0.0.1:{stack.http_port}") as channel:
        call = channel.unary_unary("/pkg.Service/Forbidden", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as e:
            call(b"", timeout=5)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert e.value.details() == "RBAC: access denied"
        # an allowed method reaches the (HTTP/1.1 echo) upstream: not a permission error
        allowed = channel.unary_unary("/pkg.Service/Allowed", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as e:
            allowed(b"", timeout=5)
        assert e.value.code() != grpc.StatusCode.PERMISSION_DENIED
