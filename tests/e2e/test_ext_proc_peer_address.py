"""The `extproc` mode through a real Envoy whose ext_proc filter lacks set_filter_state.

Envoy's HCM trusts x-forwarded-for by default, so ext_proc's `source.address` is the
address the client writes there. Without the physical peer in filter state, an `ipBlocks`
policy would be decided on that claim; extproc denies instead (as Envoy's RBAC would deny the
real peer), counts the request, and says once what to add. With the setting, the same
request is decided on the real peer.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.fixtures import envoy_config as ec
from tests.fixtures.procs import free_port
from tests.fixtures.stack import ExtprocProcess, HttpClient

pytestmark = pytest.mark.e2e

POLICIES = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: office, namespace: foo}
spec:
  rules:
  - from: [{source: {ipBlocks: ["203.0.113.0/24"]}}]
  - to: [{operation: {paths: ["/public"]}}]
"""


def counter(metrics: str, name: str, kind: str) -> float:
    m = re.search(rf'^{name}_total{{kind="{kind}"}} (\S+)$', metrics, re.M)
    return float(m.group(1)) if m else 0.0


def test_a_request_without_the_peer_address_is_not_decided_on_x_forwarded_for(tmp_path: Path, upstream: int) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "p.yaml").write_text(POLICIES)
    x = ExtprocProcess([policies], tmp_path)
    envoy = None
    try:
        x.wait_ready()
        without, with_peer, admin = free_port(), free_port(), free_port()
        listeners = [
            ec.HttpListener("without", without, [ec.ext_proc_http()]),  # no set_filter_state
            ec.HttpListener("with", with_peer, ec.ext_proc_chain()),  # as envoy/extproc.yaml
        ]
        clusters = [
            ec.cluster("upstream", "127.0.0.1", upstream),
            ec.cluster("extproc", "127.0.0.1", x.grpc_port, http2=True),
        ]
        envoy = ec.EnvoyProcess(ec.bootstrap(admin, listeners, clusters), tmp_path / "envoy", admin)
        envoy.wait_ready()
        spoof = {"x-forwarded-for": "203.0.113.7"}  # the client is 127.0.0.1

        # Configured: the real peer is outside the block; the public path is open to all.
        assert HttpClient(with_peer).get("/private", spoof).status == 403
        assert HttpClient(with_peer).get("/public", spoof).status == 200
        assert counter(x.metrics(), "extproc_misconfigured_requests", "missing-peer-address") == 0

        # Not configured: never allowed on the claim, even where a path rule would allow.
        client = HttpClient(without)
        assert client.get("/private", spoof).status == 403
        assert client.get("/public", spoof).status == 403
        metrics = x.metrics()
        assert counter(metrics, "extproc_misconfigured_requests", "missing-peer-address") == 2
        assert counter(metrics, "extproc_malformed_requests", "missing-peer-address") == 2
        log = (tmp_path / "extproc.log").read_text()
        assert log.count("set_filter_state") == 1, log
    finally:
        if envoy is not None:
            envoy.stop()
        x.stop()
