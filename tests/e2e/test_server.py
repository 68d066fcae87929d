"""The server as an operator runs it: start-up, flags and environment, hostile input,
hot reload under traffic, and graceful shutdown."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.e2e.conftest import Stack
from tests.fixtures import authz_provider
from tests.fixtures import envoy_config as ec
from tests.fixtures.procs import VENV_BIN, Proc, free_port, wait_until
from tests.fixtures.stack import ExtprocProcess, HttpClient

pytestmark = pytest.mark.e2e

ALLOW_A_B = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: paths, namespace: foo}
spec:
  rules:
  - to: [{operation: {paths: ["/a", "/b"]}}]
"""
ALLOW_A_C = ALLOW_A_B.replace('"/b"', '"/c"')


def http_check(port: int, **http: Any) -> external_auth_pb2.CheckRequest:
    req = external_auth_pb2.CheckRequest()
    a = req.attributes
    a.source.address.socket_address.address = "10.0.0.1"
    a.source.address.socket_address.port_value = 5555
    a.destination.address.socket_address.address = "10.0.0.2"
    a.destination.address.socket_address.port_value = port
    h = a.request.http
    h.method = http.get("method", "GET")
    h.path = http.get("path", "/a")
    h.host = "httpbin"
    for k, v in http.get("headers", {}).items():
        h.headers[k] = v
    return req


def check(target: str, req: external_auth_pb2.CheckRequest) -> external_auth_pb2.CheckResponse:
    with grpc.insecure_channel(target) as ch:
        return external_auth_pb2_grpc.AuthorizationStub(ch).Check(req, timeout=5)


def serving(target: str) -> bool:
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        r = stub.Check(health_pb2.HealthCheckRequest(service="envoy.service.auth.v3.Authorization"), timeout=5)
        return r.status == health_pb2.HealthCheckResponse.SERVING


def test_malformed_check_requests_are_denied_and_logged_once(stack: Stack) -> None:
    stack.set_policies(
        """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: allow-all, namespace: foo}
        spec: {rules: [{}]}
        """
    )
    target = stack.extproc.listen
    assert check(target, http_check(80)).status.code == code_pb2.OK

    bad: list[external_auth_pb2.CheckRequest] = [external_auth_pb2.CheckRequest()]  # no attributes at all
    no_method = http_check(80)
    no_method.attributes.request.http.method = ""
    bad.append(no_method)
    not_ip = http_check(80)
    not_ip.attributes.source.address.socket_address.address = "not-an-ip"
    bad.append(not_ip)
    bad.append(http_check(80, headers={"x-big": "v" * 200_000}))  # larger than --max-request-headers-kb
    bad.append(http_check(80, headers={f"x-h{i}": "1" for i in range(2000)}))
    raw = http_check(80)
    raw.attributes.request.http.header_map.headers.append(base_pb2.HeaderValue(key="x-bin", raw_value=b"\xff\xfe"))
    bad.append(raw)
    cert = http_check(80)
    cert.attributes.source.certificate = "-----BEGIN%20CERTIFICATE-----%0Agarbage%0A-----END%20CERTIFICATE-----"
    bad.append(cert)
    for req in bad + bad:
        resp = check(target, req)
        assert resp.status.code == code_pb2.PERMISSION_DENIED, req
        if req.attributes.HasField("request"):
            assert resp.denied_response.status.code == 403
            assert resp.denied_response.body == "RBAC: access denied"

    # Bigger than any header block Envoy can send: refused by gRPC itself, server unharmed.
    with pytest.raises(grpc.RpcError) as e:
        check(target, http_check(80, headers={"x-huge": "v" * 10_000_000}))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    assert serving(target)
    assert check(target, http_check(80)).status.code == code_pb2.OK
    assert stack.http().get("/still-serving").status == 200
    log = stack.extproc.proc.log()
    for kind in (
        "missing-address",
        "missing-method",
        "bad-address",
        "headers-too-large",
        "too-many-headers",
        "bad-header-encoding",
        "bad-peer-certificate",
    ):
        assert log.count(f"denied a malformed CheckRequest: {kind}") == 1, kind
    metrics = stack.extproc.metrics()
    assert 'extproc_malformed_requests_total{kind="headers-too-large"} 2.0' in metrics


def test_hot_reload_under_traffic_sees_no_failures(stack: Stack) -> None:
    stack.set_policies(ALLOW_A_B)
    stop = threading.Event()
    results: Counter[tuple[str, int]] = Counter()
    errors: list[BaseException] = []

    def load(path: str) -> None:
        client = HttpClient(stack.http_port)
        try:
            while not stop.is_set():
                results[(path, client.get(path).status)] += 1
        except BaseException as e:
            errors.append(e)
        finally:
            client.close()

    threads = [threading.Thread(target=load, args=(p,)) for p in ("/a", "/a", "/b", "/c")]
    for t in threads:
        t.start()
    try:
        for i in range(8):
            stack.set_policies(ALLOW_A_C if i % 2 == 0 else ALLOW_A_B)
            time.sleep(0.2)
        # an invalid change in the middle is rejected and traffic goes on under the last good one
        before = stack.extproc.snapshot_version()
        (stack.config_dir / "broken.yaml").write_text("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n")
        status = stack.extproc.wait_reload(before, expect_ok=False)
        assert status["snapshot_version"] == before and status["_status"] == 200
        assert any(
            "broken.yaml: document 1" in e and "metadata: required field is missing" in e
            for e in status["last_reload"]["errors"]
        )
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not errors, errors
    assert all(code in (200, 403) for (_, code) in results), results
    assert results[("/a", 200)] > 50 and ("/a", 403) not in results, results
    assert results[("/b", 200)] > 0 and results[("/b", 403)] > 0, results
    (stack.config_dir / "broken.yaml").unlink()


def test_bad_config_at_start_exits_non_zero_naming_the_field(tmp_path: Path) -> None:
    d = tmp_path / "cfg"
    d.mkdir()
    (d / "bad.yaml").write_text(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: foo}\n"
        "spec:\n  rules:\n  - to:\n    - operation: {ports: ['http']}\n"
    )
    r = subprocess.run(
        [
            str(VENV_BIN / "extproc"),
            "serve",
            "--config-dir",
            str(d),
            "--namespace",
            "foo",
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--admin",
            f"127.0.0.1:{free_port()}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2
    assert (
        f"{d}/bad.yaml: document 1 (AuthorizationPolicy foo/p), line 7: error: spec.rules[0].to[0].operation.ports[0]: bad port (http)"
        in r.stderr
    )


def test_missing_flags_are_reported(tmp_path: Path) -> None:
    r = subprocess.run(
        [str(VENV_BIN / "extproc"), "serve", "--config-dir", str(tmp_path)], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 2 and "--namespace is required" in r.stderr


def test_environment_variables_configure_serve_over_a_unix_socket(
    tmp_path: Path, start_envoy: Any, upstream: int
) -> None:
    d = tmp_path / "cfg"
    d.mkdir()
    (d / "p.yaml").write_text(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\n"
        "spec:\n  selector: {matchLabels: {app: cart}}\n  rules:\n"
        "  - from: [{source: {principals: ['new-td/ns/shop/sa/web']}}]\n"
        "  - to: [{operation: {paths: ['/open']}}]\n"
    )
    sock = tmp_path / "extproc.sock"
    admin = free_port()
    env = {
        "EXTPROC_CONFIG_DIR": str(d),
        "EXTPROC_LISTEN": f"unix:{sock}",
        "EXTPROC_ADMIN": f"127.0.0.1:{admin}",
        "EXTPROC_NAMESPACE": "shop",
        "EXTPROC_LABELS": "app=cart,version=v2",
        "EXTPROC_WORKLOAD": "cart-v2",
        "EXTPROC_ROOT_NAMESPACE": "mesh-root",
        "EXTPROC_TRUST_DOMAIN": "new-td",
        "EXTPROC_TRUST_DOMAIN_ALIAS": "old-td,older-td",
        "EXTPROC_LOG_FORMAT": "json",
    }
    proc = Proc("extproc-env", [str(VENV_BIN / "extproc"), "serve"], tmp_path / "extproc.log", env=env)
    try:
        wait_until(lambda: proc.check_alive() is None and sock.exists(), 20, "the unix socket")
        wait_until(
            lambda: json.loads(__import__("urllib.request").request.urlopen(f"http://127.0.0.1:{admin}/readyz").read())[
                "ready"
            ],
            20,
            "readyz",
        )
        config = json.loads(
            __import__("urllib.request").request.urlopen(f"http://127.0.0.1:{admin}/debug/config").read()
        )
        assert config["workload"] == {
            "namespace": "shop",
            "name": "cart-v2",
            "labels": {"app": "cart", "version": "v2"},
            "root_namespace": "mesh-root",
            "trust_domains": ["new-td", "old-td", "older-td"],
        }
        assert [p["policy"] for p in config["applied"]] == ["shop/p"]

        http_port, envoy_admin = free_port(), free_port()
        cluster = ec.cluster("extproc", "127.0.0.1", 1, http2=True)
        cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] = {
            "pipe": {"path": str(sock)}
        }
        cfg = ec.bootstrap(
            envoy_admin,
            [ec.HttpListener("http", http_port, [ec.ext_authz_http()])],
            [ec.cluster("upstream", "127.0.0.1", upstream), cluster],
        )
        start_envoy(cfg, envoy_admin)
        assert HttpClient(http_port).get("/open").status == 200
        assert HttpClient(http_port).get("/closed").status == 403
        line = next(json.loads(x) for x in proc.log().splitlines() if x.startswith("{") and "serving ext_authz" in x)
        assert line["level"] == "info" and "unix:" in line["msg"]
    finally:
        assert proc.terminate() == 0


def test_sigterm_drains_in_flight_calls_then_exits_zero(tmp_path: Path) -> None:
    """A Check that is still waiting on a slow CUSTOM provider completes after SIGTERM."""
    provider, grpc_port = authz_provider.start(tmp_path)
    try:
        d = tmp_path / "cfg"
        d.mkdir()
        (d / "p.yaml").write_text(authz_provider.custom_on_every_request(grpc_port, "slow"))
        x = ExtprocProcess([d], tmp_path, extra_args=["--drain-timeout", "10"])
        x.wait_ready()
        req = http_check(80, headers={"x-ext-authz": "allow", "x-ext-authz-delay": "1.5"})
        result: dict[str, Any] = {}

        def call() -> None:
            started = time.monotonic()
            result["resp"] = check(x.listen, req)
            result["took"] = time.monotonic() - started

        t = threading.Thread(target=call)
        t.start()
        wait_until(lambda: '"x-ext-authz-delay": "1.5"' in provider.log(), 10, "the provider to receive the call")
        code = x.stop()  # SIGTERM while the call waits on the provider
        t.join(10)
        assert code == 0
        assert result["resp"].status.code == code_pb2.OK and result["took"] >= 1.4
        assert "shutting down: draining in-flight calls" in x.proc.log()
    finally:
        provider.terminate()


def test_health_and_metrics_endpoints(stack: Stack) -> None:
    assert serving(stack.extproc.listen)
    from tests.fixtures.procs import http_get

    assert http_get(f"http://127.0.0.1:{stack.extproc.admin_port}/healthz")[0] == 200
    metrics = stack.extproc.metrics()
    assert "extproc_checks_total" in metrics and "extproc_config_reloads_total" in metrics
    status, body = http_get(f"http://127.0.0.1:{stack.extproc.admin_port}/debug/config")
    assert status == 200 and json.loads(body)["workload"]["namespace"] == "foo"


def test_debug_explain_endpoint(stack: Stack) -> None:
    import urllib.request

    stack.set_policies(ALLOW_A_B)
    body = json.dumps({"method": "GET", "path": "/zzz", "host": "h", "source_ip": "10.0.0.1"}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{stack.extproc.admin_port}/debug/explain", data=body, method="POST")
    out = json.loads(urllib.request.urlopen(req).read())
    assert out["decision"] == "denied" and out["stage"] == "no-match"
    assert out["rules"][0]["why_not"] == "to[0].operation.paths did not match"
