"""Central mode through real Envoys: one `extproc serve --central` for two sidecars.

    client --> [Envoy A: shop/a-v1]  --ext_authz (context extensions: shop, app=a)--+
               [Envoy B: bar/b]      --ext_authz (context extensions: bar, app=b)---+--> one central extproc
               [Envoy B, no extensions on its second listener] -----------------+
               TCP: network ext_authz, the workload from node metadata ---------+
               each Envoy's access log service, its bootstrap node naming its workload --^

Istio 1.0-1.4's Mixer shape: every sidecar asks the same server, naming its workload. The
same request is allowed on one sidecar and denied on the other because different policies
select them, a listener that names no workload is denied, and the central /metrics
labels each sidecar's requests with its own workload, from its Envoy's node metadata.
"""

from __future__ import annotations

import json
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from tests.fixtures import envoy_config as ec
from tests.fixtures.exposition import samples, total
from tests.fixtures.procs import free_port, http_get, wait_until
from tests.fixtures.prometheus import promtool_check_metrics
from tests.fixtures.stack import ExtprocProcess, HttpClient, tcp_roundtrip

pytestmark = pytest.mark.e2e

# shop/a-private has only HTTP conditions, so it also closes every TCP connection of app=a
# (Istio's rule); bar/b-reads-only allows GET, and TCP on B's TCP port.
POLICIES = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: a-private, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: a}}}}
  action: DENY
  rules: [{{to: [{{operation: {{paths: ["/private*"]}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: b-reads-only, namespace: bar}}
spec:
  selector: {{matchLabels: {{app: b}}}}
  rules:
  - to: [{{operation: {{methods: ["GET"]}}}}]
  - to: [{{operation: {{ports: ["{b_tcp}"]}}}}]
"""
TCP_IDENTITY_KEY = "extproc.destination"  # the network filter's bootstrap_metadata_labels_key
TCP_PAYLOAD = b"GET /tcp HTTP/1.0\r\nHost: tcp\r\n\r\n"


@dataclass(frozen=True)
class Sidecar:
    namespace: str
    workload: str
    labels: dict[str, str]
    service_account: str
    cluster_id: str

    def context_extensions(self) -> dict[str, str]:
        return {
            "destination.namespace": self.namespace,
            "destination.labels": ",".join(f"{k}={v}" for k, v in self.labels.items()),
            "destination.workload.name": self.workload,
            "destination.service_account": self.service_account,
        }

    def node(self) -> dict[str, Any]:
        """The node Istio's injector gives a sidecar's bootstrap, plus the struct the network
        ext_authz filter copies into the CheckRequest's destination labels."""
        return {
            "id": f"sidecar~127.0.0.1~{self.workload}-0.{self.namespace}~{self.namespace}.svc.cluster.local",
            "cluster": f"{self.workload}.{self.namespace}",
            "metadata": {
                "NAMESPACE": self.namespace,
                "WORKLOAD_NAME": self.workload,
                "LABELS": self.labels,
                "SERVICE_ACCOUNT": self.service_account,
                "CLUSTER_ID": self.cluster_id,
                TCP_IDENTITY_KEY: self.context_extensions(),
            },
        }


A = Sidecar("shop", "a-v1", {"app": "a", "version": "v1"}, "a", "east")
B = Sidecar("bar", "b", {"app": "b"}, "b", "west")


def route_config(extensions: dict[str, str] | None) -> dict[str, Any]:
    vhost: dict[str, Any] = {
        "name": "all",
        "domains": ["*"],
        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}],
    }
    if extensions is not None:
        # Virtual-host level: every route of the sidecar names its workload.
        vhost["typed_per_filter_config"] = {
            "envoy.filters.http.ext_authz": {
                "@type": ec.T + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
                "check_settings": {"context_extensions": extensions},
            }
        }
    return {"virtual_hosts": [vhost]}


def http_als(name: str) -> dict[str, Any]:
    """An access log per entry, flushed at once: the test need not wait for batches."""
    return {
        "name": "envoy.access_loggers.http_grpc",
        "typed_config": {
            "@type": ec.T + "envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
            "common_config": {
                "log_name": name,
                "transport_api_version": "V3",
                "grpc_service": ec.grpc_service("extproc"),
                "buffer_size_bytes": 1,
                "buffer_flush_interval": "0.05s",
            },
        },
    }


@dataclass
class CentralMesh:
    central: ExtprocProcess
    envoys: dict[str, ec.EnvoyProcess]
    # HTTP and TCP of sidecars A and B; B's listeners that name no workload ("bare").
    ports: dict[str, int]
    access_log: Path


def _sidecar_config(
    side: Sidecar, ports: dict[str, int], tmp: Path, upstream: int, central: ExtprocProcess, *, bare: bool
) -> dict[str, Any]:
    listeners: list[ec.HttpListener | ec.TcpListener] = [
        ec.HttpListener(
            "inbound_http",
            ports["http"],
            [ec.ext_authz_http()],
            hcm={"route_config": route_config(side.context_extensions()), "access_log": [http_als("inbound")]},
        ),
        ec.TcpListener(
            "inbound_tcp", ports["tcp"], [ec.ext_authz_network(bootstrap_metadata_labels_key=TCP_IDENTITY_KEY)]
        ),
    ]
    if bare:
        listeners += [
            ec.HttpListener(
                "no_extensions",
                ports["bare_http"],
                [ec.ext_authz_http()],
                access_log_path=tmp / "bare-access.log",
                hcm={"route_config": route_config(None)},
            ),
            ec.TcpListener("tcp_no_identity", ports["bare_tcp"], [ec.ext_authz_network()]),
        ]
    clusters = [
        ec.cluster("upstream", "127.0.0.1", upstream),
        ec.cluster("extproc", "127.0.0.1", central.grpc_port, http2=True),
    ]
    cfg = ec.bootstrap(ports["admin"], listeners, clusters)
    cfg["node"] = side.node()
    return cfg


@pytest.fixture(scope="module")
def central_mesh(tmp_path_factory: pytest.TempPathFactory, upstream: int) -> Iterator[CentralMesh]:
    tmp = tmp_path_factory.mktemp("central")
    ports_a = {k: free_port() for k in ("http", "tcp", "admin")}
    ports_b = {k: free_port() for k in ("http", "tcp", "admin", "bare_http", "bare_tcp")}
    policies = tmp / "policies"
    policies.mkdir()
    (policies / "policies.yaml").write_text(textwrap.dedent(POLICIES.format(b_tcp=ports_b["tcp"])))
    started: list[Any] = []
    try:
        central = ExtprocProcess([policies], tmp, namespace="", labels="", extra_args=["--central"], name="central")
        started.append(central)
        central.wait_ready()
        envoy_a = ec.EnvoyProcess(
            _sidecar_config(A, ports_a, tmp, upstream, central, bare=False),
            tmp / "envoy-a",
            ports_a["admin"],
            "envoy-a",
        )
        started.append(envoy_a)
        envoy_b = ec.EnvoyProcess(
            _sidecar_config(B, ports_b, tmp, upstream, central, bare=True), tmp / "envoy-b", ports_b["admin"], "envoy-b"
        )
        started.append(envoy_b)
        envoy_a.wait_ready()
        envoy_b.wait_ready()
        yield CentralMesh(
            central,
            {"a": envoy_a, "b": envoy_b},
            {
                "a": ports_a["http"],
                "b": ports_b["http"],
                "a_tcp": ports_a["tcp"],
                "b_tcp": ports_b["tcp"],
                "bare": ports_b["bare_http"],
                "bare_tcp": ports_b["bare_tcp"],
            },
            tmp / "bare-access.log",
        )
    finally:
        for p in reversed(started):
            p.stop()


def test_the_same_request_is_allowed_or_denied_by_the_policies_of_each_sidecars_workload(
    central_mesh: CentralMesh,
) -> None:
    a, b = HttpClient(central_mesh.ports["a"]), HttpClient(central_mesh.ports["b"])
    denied = a.get("/private/x")
    assert (denied.status, denied.body) == (403, b"RBAC: access denied")
    assert b.get("/private/x").status == 200  # shop/a-private selects app=a only
    assert a.request("POST", "/post").status == 200
    denied = b.request("POST", "/post")  # bar/b-reads-only: only GET is allowed for app=b
    assert (denied.status, denied.body) == (403, b"RBAC: access denied")
    assert a.get("/public").status == 200 and b.get("/public").status == 200
    status, body = http_get(f"http://127.0.0.1:{central_mesh.central.admin_port}/debug/config")
    config = json.loads(body)
    assert status == 200 and config["mode"] == "central"
    served = {
        (w["namespace"], json.dumps(w["labels"], sort_keys=True)): w["applied"] for w in config["central"]["workloads"]
    }
    assert served == {
        ("shop", json.dumps(A.labels, sort_keys=True)): ["shop/a-private"],
        ("bar", json.dumps(B.labels, sort_keys=True)): ["bar/b-reads-only"],
    }


def test_tcp_checks_take_the_workload_from_node_metadata(central_mesh: CentralMesh) -> None:
    got = tcp_roundtrip(central_mesh.ports["b_tcp"], TCP_PAYLOAD)
    assert got is not None and got.startswith(b"HTTP/1.0 200"), got  # bar/b-reads-only allows B's TCP port
    assert tcp_roundtrip(central_mesh.ports["a_tcp"], TCP_PAYLOAD) is None  # shop/a-private closes A's TCP
    assert tcp_roundtrip(central_mesh.ports["bare_tcp"], TCP_PAYLOAD) is None  # no identity: denied


def test_a_sidecar_that_names_no_workload_is_denied(central_mesh: CentralMesh) -> None:
    r = HttpClient(central_mesh.ports["bare"]).get("/public/no-extensions")
    assert (r.status, r.body) == (403, b"RBAC: access denied")
    found: list[str] = []

    def logged() -> bool:
        text = central_mesh.access_log.read_text() if central_mesh.access_log.exists() else ""
        found[:] = [line for line in text.splitlines() if "/public/no-extensions" in line]
        return bool(found)

    wait_until(logged, 5, "the bare listener's access log line")
    assert "central mode: no workload identity" in found[0] and "destination.namespace is missing" in found[0]
    bare = HttpClient(central_mesh.ports["bare"])
    assert [bare.get(f"/again/{i}").status for i in range(3)] == [403, 403, 403]
    metrics = central_mesh.central.metrics()
    assert total(metrics, "extproc_malformed_requests_total", kind="workload_missing_namespace") >= 4
    # Logged once for the misconfigured sidecar, not once per request.
    assert (
        central_mesh.central.proc.log().count("name no usable workload: context extension destination.namespace") == 1
    )


def test_central_metrics_label_each_sidecars_requests_with_its_own_workload(central_mesh: CentralMesh) -> None:
    clients = {"a": HttpClient(central_mesh.ports["a"]), "b": HttpClient(central_mesh.ports["b"])}
    for client in clients.values():
        for i in range(3):
            assert client.get(f"/metrics-probe/{i}").status == 200

    def completed(name: str) -> int:
        return central_mesh.envoys[name].stats("http.inbound_http.").get("http.inbound_http.downstream_rq_completed", 0)

    def settled() -> bool:
        text = central_mesh.central.metrics()
        return all(
            total(text, "istio_requests_total", destination_workload=side.workload) == completed(name)
            for name, side in (("a", A), ("b", B))
        )

    wait_until(settled, 10, "the central extproc to record every request of both sidecars")
    text = central_mesh.central.metrics()
    for side in (A, B):
        rows = samples(text, "istio_requests_total", destination_workload=side.workload)
        assert rows, text
        for labels, _ in rows:
            assert labels["reporter"] == "destination"
            assert labels["destination_workload_namespace"] == side.namespace
            assert labels["destination_app"] == side.labels["app"]
            assert labels["destination_version"] == side.labels.get("version", "")
            assert labels["destination_canonical_service"] == side.labels["app"]
            assert labels["destination_cluster"] == side.cluster_id
            assert labels["destination_service_namespace"] == side.namespace
    ok_a = total(text, "istio_requests_total", destination_workload="a-v1", response_code="200")
    ok_b = total(text, "istio_requests_total", destination_workload="b", response_code="200")
    assert ok_a >= 3 and ok_b >= 3
    assert total(text, "extproc_access_log_unidentified_entries_total") == 0
    assert total(text, "extproc_cache_lookups_total", cache="node_workload", result="miss") == 2
    assert total(text, "extproc_workload_snapshots") == 2
    # The central families lint clean (Istio's duration metric keeps its non-base-unit name).
    rc, out = promtool_check_metrics(
        "\n".join(line for line in text.splitlines() if "istio_request_duration_milliseconds" not in line) + "\n"
    )
    assert rc == 0, out


def test_ext_proc_is_refused_in_central_mode(central_mesh: CentralMesh) -> None:
    with grpc.insecure_channel(central_mesh.central.listen) as ch:
        stream = ep_grpc.ExternalProcessorStub(ch).Process(iter([ep.ProcessingRequest()]), timeout=5)
        with pytest.raises(grpc.RpcError) as e:
            list(stream)
    assert e.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert "central mode (--central), which serves ext_authz and the access log service only" in e.value.details()


def test_debug_explain_needs_the_workload_in_central_mode(central_mesh: CentralMesh) -> None:
    url = f"http://127.0.0.1:{central_mesh.central.admin_port}/debug/explain"

    def explain(desc: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(url, data=json.dumps(desc).encode(), method="POST")
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    request = {"method": "GET", "path": "/private/x", "source_ip": "10.0.0.1"}
    status, out = explain(request)
    assert status == 400 and "central mode: describe the workload" in out["error"]
    status, out = explain({**request, "workload": {"namespace": "shop", "labels": A.labels}})
    assert status == 200 and (out["decision"], out["policy"]) == ("denied", "ns[shop]-policy[a-private]-rule[0]")
    status, out = explain({**request, "workload": {"namespace": "bar", "labels": B.labels}})
    assert status == 200 and (out["decision"], out["stage"]) == ("allowed", "allow")
