"""`extproc envoy-config` output, as Envoy takes it: every mode, side and set of addresses
validates (`envoy --mode validate`), and a bootstrap generated for addresses other than the
defaults carries real traffic through a real extproc: a policy allows and denies, TCP passes,
and the access logs (or ext_proc) report the request as an istio_requests_total series."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.envoy_config import Mode, Side, build_options, generate
from tests.fixtures.envoy_config import EnvoyProcess, validate
from tests.fixtures.jwks_server import HeaderEcho
from tests.fixtures.procs import free_port, http_get, wait_until
from tests.fixtures.stack import ExtprocProcess
from tests.unit.test_envoy_config import VARIANTS

pytestmark = pytest.mark.e2e

# On TCP a DENY rule's HTTP-only fields are dropped and the rest still denies (Istio's
# semantics), so the rule names the HTTP listener's port: TCP on the other port passes.
POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: no-admin, namespace: foo}}
spec:
  action: DENY
  rules:
  - to:
    - operation: {{ports: ["{port}"], paths: ["/admin*"]}}
"""


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("side", list(Side), ids=lambda s: s.value)
@pytest.mark.parametrize("mode", list(Mode), ids=lambda m: m.value)
def test_envoy_accepts_the_generated_bootstrap(
    mode: Mode, side: Side, variant: str, tmp_path: Path, envoy_binary: Path
) -> None:
    path = tmp_path / "envoy.yaml"
    path.write_text(generate(build_options(mode.value, side.value, **VARIANTS[variant])))
    code, out = validate(path)
    assert code == 0, out


@pytest.fixture(scope="module")
def echo() -> Iterator[HeaderEcho]:
    server = HeaderEcho()
    server.start()
    yield server
    server.stop()


def _raw_http(port: int, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: tcp\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("mode", list(Mode), ids=lambda m: m.value)
def test_a_bootstrap_for_other_addresses_carries_traffic(
    mode: Mode, tmp_path: Path, echo: HeaderEcho, envoy_binary: Path
) -> None:
    http_port, tcp_port, admin_port = free_port(), free_port(), free_port()
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "deny.yaml").write_text(POLICY.format(port=http_port))
    extproc = ExtprocProcess([policies], tmp_path, namespace="foo", http=mode is Mode.AUTHZ_HTTP)
    given: dict[str, Any] = {
        "listen": f"127.0.0.1:{http_port}",
        "tcp_listen": f"127.0.0.1:{tcp_port}",
        "upstream": f"127.0.0.1:{echo.port}",
        "extproc": extproc.listen,
        "admin": f"127.0.0.1:{admin_port}",
    }
    if extproc.http_port is not None:
        given["extproc_http"] = f"127.0.0.1:{extproc.http_port}"
    text = generate(build_options(mode.value, "inbound", **given))
    envoy = EnvoyProcess(yaml.safe_load(text), tmp_path / "envoy", admin_port)
    try:
        extproc.wait_ready()
        envoy.wait_ready()
        status, body = http_get(f"http://127.0.0.1:{http_port}/hello")
        assert status == 200, body
        assert '"path": "/hello"' in body  # the echo upstream answered
        status, body = http_get(f"http://127.0.0.1:{http_port}/admin/users")
        assert (status, body) == (403, "RBAC: access denied")
        assert _raw_http(tcp_port, "/over-tcp").startswith(b"HTTP/1.1 200")

        def reported() -> bool:
            metrics = extproc.metrics()
            return (
                any(
                    line.startswith("istio_requests_total{") and 'response_code="403"' in line
                    for line in metrics.splitlines()
                )
                and "istio_tcp_connections_opened_total{" in metrics
            )

        wait_until(reported, 15, "the requests and the TCP connection in extproc's metrics")
    finally:
        envoy.stop()
        extproc.stop()
