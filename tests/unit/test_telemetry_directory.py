"""The peers and services the config lists (`telemetry/directory.py`): Istio's WorkloadEntry and
ServiceEntry, read from YAML as istiod reads them, and how the access log uses them."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2

from extproc.services.accesslog import AccessLogService
from extproc.snapshot import loader
from extproc.telemetry.directory import EMPTY_DIRECTORY, PeerDirectory
from extproc.telemetry.overrides import TelemetryPlans
from extproc.telemetry.peer import Workload
from extproc.telemetry.record import Direction, ServiceInfo
from extproc.telemetry.recorder import Telemetry
from tests.fixtures.exposition import samples

RESOURCES = """\
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-1, namespace: shop, annotations: {istio.io/autoRegistrationGroup: ratings-vms}}
spec:
  address: 10.0.0.5
  serviceAccount: ratings
  labels: {app: ratings, version: v3}
---
apiVersion: networking.istio.io/v1beta1
kind: WorkloadEntry
metadata: {name: legacy-db, namespace: data}
spec:
  address: 10.0.0.6
  labels: {service.istio.io/workload-name: postgres, service.istio.io/canonical-name: db, topology.istio.io/cluster: west}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: plain, namespace: data}
spec:
  address: 10.0.0.7
  serviceAccount: plain
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: shared-a, namespace: data}
spec: {address: 10.0.0.9, serviceAccount: a}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: shared-b, namespace: data}
spec: {address: 10.0.0.9, serviceAccount: b}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: by-name, namespace: data}
spec: {address: db.example.internal}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: payments, namespace: billing}
spec:
  hosts: [payments.example.com]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{number: 443, name: tls, protocol: TLS}]
  endpoints:
  - {address: 192.0.2.10, labels: {app: payments}}
  - {address: "2001:db8::10"}
"""


@pytest.fixture
def directory(tmp_path: Path) -> PeerDirectory:
    (tmp_path / "registry.yaml").write_text(textwrap.dedent(RESOURCES))
    loaded = loader.load([tmp_path])
    return PeerDirectory.build(
        (lp.policy for lp in loaded.workload_entries), (lp.policy for lp in loaded.service_entries), "cluster.local"
    )


def test_a_workload_entry_is_named_as_istiod_names_it(directory: PeerDirectory) -> None:
    vm = directory.peer("10.0.0.5", "spiffe://cluster.local/ns/shop/sa/ratings")
    assert vm == Workload(
        workload_name="ratings-vms",  # the auto-registration group
        namespace="shop",
        canonical_service="ratings",
        canonical_revision="v3",
        app="ratings",
        version="v3",
    )
    db = directory.peer("10.0.0.6", "")
    assert db is not None
    assert (db.workload_name, db.canonical_service, db.canonical_revision, db.cluster) == (
        "postgres",  # the workload-name label
        "db",
        "latest",
        "west",
    )
    plain = directory.peer("10.0.0.7", "")
    assert plain is not None and plain.workload_name == "plain"  # the resource's own name


def test_inline_endpoints_are_workloads_of_the_service_entry(directory: PeerDirectory) -> None:
    first = directory.peer("192.0.2.10", "")
    assert first is not None and (first.workload_name, first.namespace, first.app) == (
        "payments-0",
        "billing",
        "payments",
    )
    second = directory.peer("2001:db8::10", "")  # addresses compared as Envoy writes them
    assert second is not None and second.workload_name == "payments-1"


def test_a_certificate_must_agree_with_the_entry(directory: PeerDirectory) -> None:
    assert directory.peer("10.0.0.5", "spiffe://cluster.local/ns/shop/sa/someone-else") is None
    assert directory.peer("10.0.0.6", "spiffe://cluster.local/ns/data/sa/x") is None  # the entry names no account
    a = directory.peer("10.0.0.9", "spiffe://cluster.local/ns/data/sa/a")
    b = directory.peer("10.0.0.9", "spiffe://cluster.local/ns/data/sa/b")
    assert a is not None and b is not None and (a.workload_name, b.workload_name) == ("shared-a", "shared-b")
    assert directory.peer("10.0.0.9", "") is None  # two entries and no certificate: ambiguous
    assert directory.peer("10.0.0.99", "") is None


def test_only_ip_addresses_name_peers(directory: PeerDirectory) -> None:
    assert all(ip[0].isdigit() or ":" in ip for ip in directory.by_address)
    assert "db.example.internal" not in directory.by_address


def test_service_entry_hosts_are_services_named_after_the_host(directory: PeerDirectory) -> None:
    assert directory.service("payments.example.com") == ServiceInfo(
        "payments.example.com", "payments.example.com", "billing"
    )
    assert directory.service("other.example.com") is None


def test_entries_without_a_cluster_are_in_ours(directory: PeerDirectory) -> None:
    local = directory.in_cluster("east")
    vm = local.peer("10.0.0.5", "spiffe://cluster.local/ns/shop/sa/ratings")
    db = local.peer("10.0.0.6", "")
    assert vm is not None and db is not None and (vm.cluster, db.cluster) == ("east", "west")
    assert not EMPTY_DIRECTORY and directory


def _tcp_end(stream: str, remote: str, **tags: str) -> accesslog_pb2.TCPAccessLogEntry:
    e = accesslog_pb2.TCPAccessLogEntry()
    c = e.common_properties
    c.stream_id = stream
    c.access_log_type = accesslog_pb2.TcpConnectionEnd
    c.downstream_remote_address.socket_address.address = remote
    c.upstream_remote_address.socket_address.address = remote
    for k, v in tags.items():
        c.custom_tags[k] = v
    return e


def test_the_access_log_names_tcp_peers_from_the_directory(directory: PeerDirectory) -> None:
    server = Telemetry.create(Workload.from_labels({"app": "ratings"}, workload_name="ratings", namespace="shop"))
    server.apply(TelemetryPlans.standard(), directory)
    als = AccessLogService(server.recorder, server.tcp, server.peers, directory=lambda: server.directory)
    e = _tcp_end("s1", "10.0.0.6")
    als.tcp_entry(e, Direction.INBOUND)
    [(lbl, _)] = samples(server.store.render(), "istio_tcp_connections_closed_total")
    assert (lbl["source_workload"], lbl["source_workload_namespace"], lbl["source_canonical_service"]) == (
        "postgres",
        "data",
        "db",
    )

    client = Telemetry.create(Workload.from_labels({"app": "web"}, workload_name="web", namespace="shop"))
    client.apply(TelemetryPlans.standard(), directory)
    als = AccessLogService(
        client.recorder, client.tcp, client.peers, Direction.OUTBOUND, directory=lambda: client.directory
    )
    e = _tcp_end("c1", "192.0.2.10")
    e.common_properties.upstream_cluster = "outbound|443||payments.example.com"
    als.tcp_entry(e, Direction.OUTBOUND)
    [(lbl, _)] = samples(client.store.render(), "istio_tcp_connections_closed_total")
    assert (lbl["destination_workload"], lbl["destination_workload_namespace"]) == ("payments-0", "billing")
    assert (lbl["destination_service"], lbl["destination_service_name"], lbl["destination_service_namespace"]) == (
        "payments.example.com",
        "payments.example.com",
        "billing",
    )
