"""Istio's standard metrics across two extproc-equipped sidecars, checked against Envoy's
own counters and through a real Prometheus.

The client sidecar (reporter=source) and the server sidecar (reporter=destination) label
each other's traffic with real workload names learned from the metadata exchange; the
applications never see the exchange headers. HTTP/1.1 from the client, HTTP/2 with mTLS
between the sidecars, gRPC (unary, OK and an error status) and TCP.

Both deployment modes: `authz` (ext_authz for the exchange and policy, the access log for
metrics) and `extproc` (one ext_proc filter for all of HTTP; TCP as before).
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.e2e.conftest import MODES
from tests.fixtures import envoy_config as ec
from tests.fixtures import istio_dashboards as dash
from tests.fixtures import mesh
from tests.fixtures.exposition import samples, total
from tests.fixtures.procs import free_port, http_get, wait_until
from tests.fixtures.prometheus import PrometheusServer, promtool_check_metrics
from tests.fixtures.stack import ExtprocProcess, HttpClient, tcp_roundtrip

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]

HTTP_OK = 6
HTTP_DENIED = 2
GRPC_OK = 3
GRPC_NOT_FOUND = 1
TCP_CONNECTIONS = 2
# Plain text between the sidecars too (Istio's PERMISSIVE mode): the panels' non-mTLS halves.
PLAIN_HTTP_OK = 2
PLAIN_TCP = 1
CLIENT_SAN = "spiffe://cluster.local/ns/bar/sa/other"
WORKLOAD_ENTRIES = textwrap.dedent(
    """\
    apiVersion: networking.istio.io/v1
    kind: WorkloadEntry
    metadata: {name: other, namespace: bar}
    spec:
      address: 127.0.0.1
      serviceAccount: other
      labels: {app: other, version: v2, topology.istio.io/cluster: Kubernetes}
    ---
    apiVersion: networking.istio.io/v1
    kind: WorkloadEntry
    metadata: {name: httpbin-vm, namespace: foo, labels: {service.istio.io/workload-name: httpbin}}
    spec:
      address: 127.0.0.1
      serviceAccount: httpbin
      labels: {app: httpbin, version: v1, service.istio.io/workload-name: httpbin, topology.istio.io/cluster: east}
    """
)
# The client sidecar's upstream clusters, named as istiod names them.
HTTP_CLUSTER = "outbound|8000||httpbin.foo.svc.cluster.local"
TCP_CLUSTER = "outbound|9000||httpbin.foo.svc.cluster.local"  # the service's TCP port
PLAIN_HTTP_CLUSTER = "outbound|8000|plain|httpbin.foo.svc.cluster.local"  # a subset, without TLS
PLAIN_TCP_CLUSTER = "outbound|9000|plain|httpbin.foo.svc.cluster.local"


@dataclass
class Mesh:
    client_x: ExtprocProcess
    server_x: ExtprocProcess
    client_envoy: ec.EnvoyProcess
    server_envoy: ec.EnvoyProcess
    http_port: int
    tcp_port: int
    plain_http_port: int
    plain_tcp_port: int
    prometheus: PrometheusServer
    echoed: list[dict[str, Any]]
    responses: list[dict[str, str]]
    mode: str


def _sidecar(mode: str, direction: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(HTTP filters, HTTP access logs) of one sidecar in a deployment mode."""
    if mode == "extproc":
        return [*ec.ext_proc_chain(direction=direction), mesh.grpc_stats()], []
    check = ec.http_check_chain(direction=direction) if mode == "authz-http" else [mesh.ext_authz(direction)]
    authz = check + ([mesh.peer_from_response()] if direction == "outbound" else [])
    return [*authz, mesh.grpc_stats()], [mesh.http_als(direction)]


@pytest.fixture(scope="module", params=MODES)
def mesh_stack(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    pki: dict[str, Any],
    upstream: int,
    grpc_app: int,
) -> Iterator[Mesh]:
    mode: str = request.param
    tmp = tmp_path_factory.mktemp(f"mesh-{mode}")
    policies = tmp / "policies"
    policies.mkdir()
    empty = tmp / "client-policies"
    empty.mkdir()
    # The mesh's registry, as istiod reads it for VMs: TCP peers exchange no metadata, so each
    # side names the other from these (both sidecars share 127.0.0.1: the certificate decides).
    for d in (policies, empty):
        (d / "workloads.yaml").write_text(WORKLOAD_ENTRIES)
    started: list[Any] = []
    try:
        server_x = ExtprocProcess(
            [policies],
            tmp,
            namespace="foo",
            labels="app=httpbin,version=v1",
            name="extproc-server",
            http=mode == "authz-http",
            extra_args=[
                "--workload",
                "httpbin",
                "--direction",
                "inbound",
                "--service-account",
                "httpbin",
                "--service-host",
                "httpbin.foo.svc.cluster.local",
                "--cluster",
                "east",
            ],
        )
        started.append(server_x)
        client_x = ExtprocProcess(
            [empty],
            tmp,
            namespace="bar",
            labels="app=other,version=v2",
            name="extproc-client",
            http=mode == "authz-http",
            extra_args=["--workload", "other", "--direction", "outbound", "--service-account", "other"],
        )
        started.append(client_x)
        server_x.wait_ready()
        client_x.wait_ready()

        ca, server_cert, client_cert = pki["ca"], pki["server"], pki["other"]
        s_http, s_tcp, s_admin = free_port(), free_port(), free_port()
        s_http_plain, s_tcp_plain = free_port(), free_port()
        before = server_x.snapshot_version()
        # Scoped to the HTTP port, or Istio's rule would deny every TCP connection too.
        (policies / "deny.yaml").write_text(
            textwrap.dedent(
                f"""\
                apiVersion: security.istio.io/v1
                kind: AuthorizationPolicy
                metadata: {{name: deny-private, namespace: foo}}
                spec:
                  action: DENY
                  rules: [{{to: [{{operation: {{paths: ["/private*"], ports: ["{s_http}"]}}}}]}}]
                """
            )
        )
        server_x.wait_reload(before)
        server_cfg = mesh.bootstrap(
            s_admin,
            [
                mesh.listener(
                    "inbound_http",
                    s_http,
                    [mesh.hcm("inbound_http", *_route(_sidecar(mode, "inbound"), mesh.routes("app", "grpc_app")))],
                    mesh.tls_context(server_cert, ca, downstream=True),
                ),
                mesh.listener(
                    "inbound_tcp",
                    s_tcp,
                    [
                        mesh.network_ext_authz("inbound"),
                        mesh.tcp_proxy("inbound_tcp", "app", [mesh.tcp_als("inbound")]),
                    ],
                    mesh.tls_context(server_cert, ca, downstream=True),
                ),
                # The same HTTP and TCP stacks without TLS (stats under the same prefixes).
                mesh.listener(
                    "inbound_http_plain",
                    s_http_plain,
                    [mesh.hcm("inbound_http", *_route(_sidecar(mode, "inbound"), mesh.routes("app", "grpc_app")))],
                ),
                mesh.listener(
                    "inbound_tcp_plain",
                    s_tcp_plain,
                    [
                        mesh.network_ext_authz("inbound"),
                        mesh.tcp_proxy("inbound_tcp", "app", [mesh.tcp_als("inbound")]),
                    ],
                ),
            ],
            [
                ec.cluster("app", "127.0.0.1", upstream),
                ec.cluster("grpc_app", "127.0.0.1", grpc_app, http2=True),
                *server_x.clusters(),
            ],
        )
        server_envoy = ec.EnvoyProcess(server_cfg, tmp / "server-envoy", s_admin, "server-envoy")
        started.append(server_envoy)
        c_http, c_tcp, c_admin = free_port(), free_port(), free_port()
        c_http_plain, c_tcp_plain = free_port(), free_port()
        client_cfg = mesh.bootstrap(
            c_admin,
            [
                mesh.listener(
                    "outbound_http",
                    c_http,
                    [mesh.hcm("outbound_http", *_route(_sidecar(mode, "outbound"), mesh.routes(HTTP_CLUSTER)))],
                ),
                mesh.listener(
                    "outbound_tcp", c_tcp, [mesh.tcp_proxy("outbound_tcp", TCP_CLUSTER, [mesh.tcp_als("outbound")])]
                ),
                mesh.listener(
                    "outbound_http_plain",
                    c_http_plain,
                    [mesh.hcm("outbound_http", *_route(_sidecar(mode, "outbound"), mesh.routes(PLAIN_HTTP_CLUSTER)))],
                ),
                mesh.listener(
                    "outbound_tcp_plain",
                    c_tcp_plain,
                    [mesh.tcp_proxy("outbound_tcp", PLAIN_TCP_CLUSTER, [mesh.tcp_als("outbound")])],
                ),
            ],
            [
                mesh.tls_cluster(HTTP_CLUSTER, s_http, client_cert, ca, http2=True),
                mesh.tls_cluster(TCP_CLUSTER, s_tcp, client_cert, ca, http2=False),
                ec.cluster(PLAIN_HTTP_CLUSTER, "127.0.0.1", s_http_plain, http2=True),
                ec.cluster(PLAIN_TCP_CLUSTER, "127.0.0.1", s_tcp_plain),
                *client_x.clusters(),
            ],
        )
        client_envoy = ec.EnvoyProcess(client_cfg, tmp / "client-envoy", c_admin, "client-envoy")
        started.append(client_envoy)
        server_envoy.wait_ready()
        client_envoy.wait_ready()
        prom = PrometheusServer(
            tmp / "prometheus",
            {
                "client": f"127.0.0.1:{client_x.admin_port}",
                "server": f"127.0.0.1:{server_x.admin_port}",
            },
        )
        started.append(prom)
        m = Mesh(
            client_x,
            server_x,
            client_envoy,
            server_envoy,
            c_http,
            c_tcp,
            c_http_plain,
            c_tcp_plain,
            prom,
            [],
            [],
            mode,
        )
        _drive(m, "localhost")
        yield m
    finally:
        for p in reversed(started):
            p.stop()


def _route(
    sidecar: tuple[list[dict[str, Any]], list[dict[str, Any]]], routes: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    filters, logs = sidecar
    return filters, routes, logs


def _drive(m: Mesh, host: str) -> None:
    http = HttpClient(m.http_port)
    for i in range(HTTP_OK):
        r = http.get(f"/get?i={i}", headers={"host": "httpbin.foo:8000"})
        assert r.status == 200, r.body
        m.echoed.append(json.loads(r.body))
        m.responses.append(r.headers)
    for _ in range(HTTP_DENIED):
        r = http.get("/private", headers={"host": "httpbin.foo:8000"})
        assert r.status == 403
        assert r.body == b"RBAC: access denied"
    http.close()
    with grpc.insecure_channel(f"127.0.0.1:{m.http_port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for _ in range(GRPC_OK):
            assert stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == 1
        for _ in range(GRPC_NOT_FOUND):
            with pytest.raises(grpc.RpcError) as e:
                stub.Check(health_pb2.HealthCheckRequest(service="missing"), timeout=5)
            assert e.value.code() is grpc.StatusCode.NOT_FOUND
    for _ in range(TCP_CONNECTIONS):
        got = tcp_roundtrip(m.tcp_port, b"GET /tcp HTTP/1.0\r\nHost: tcp\r\n\r\n")
        assert got is not None and got.startswith(b"HTTP/1.0 200"), got
    plain = HttpClient(m.plain_http_port)
    for i in range(PLAIN_HTTP_OK):
        r = plain.get(f"/get?plain={i}", headers={"host": "httpbin.foo:8000"})
        assert r.status == 200, r.body
    plain.close()
    for _ in range(PLAIN_TCP):
        got = tcp_roundtrip(m.plain_tcp_port, b"GET /tcp HTTP/1.0\r\nHost: tcp\r\n\r\n")
        assert got is not None and got.startswith(b"HTTP/1.0 200"), got

    # Both sides are done when each extproc has the counts its Envoy reports.
    def settled() -> bool:
        for envoy, x, prefix in (
            (m.server_envoy, m.server_x, "inbound"),
            (m.client_envoy, m.client_x, "outbound"),
        ):
            st = envoy.stats()
            text = x.metrics()
            if total(text, "istio_requests_total") != st.get(f"http.{prefix}_http.downstream_rq_completed"):
                return False
            if total(text, "istio_tcp_connections_closed_total") != TCP_CONNECTIONS + PLAIN_TCP:
                return False
        return True

    wait_until(settled, 20, "both extprocs to record every request and connection")


def test_server_side_labels_the_client_workload_from_the_metadata_exchange(mesh_stack: Mesh) -> None:
    text = mesh_stack.server_x.metrics()
    rows = samples(
        text,
        "istio_requests_total",
        request_protocol="http",
        response_code="200",
        connection_security_policy="mutual_tls",
    )
    assert len(rows) == 1, rows
    labels, value = rows[0]
    assert value == HTTP_OK
    assert labels == {
        "reporter": "destination",
        "source_workload": "other",
        "source_canonical_service": "other",
        "source_canonical_revision": "v2",
        "source_workload_namespace": "bar",
        "source_principal": "spiffe://cluster.local/ns/bar/sa/other",
        "source_app": "other",
        "source_version": "v2",
        "source_cluster": "Kubernetes",
        "destination_workload": "httpbin",
        "destination_workload_namespace": "foo",
        "destination_principal": "spiffe://cluster.local/ns/foo/sa/httpbin",
        "destination_app": "httpbin",
        "destination_version": "v1",
        "destination_service": "httpbin.foo.svc.cluster.local",
        "destination_canonical_service": "httpbin",
        "destination_canonical_revision": "v1",
        "destination_service_name": "httpbin",
        "destination_service_namespace": "foo",
        "destination_cluster": "east",
        "request_protocol": "http",
        "response_code": "200",
        "grpc_response_status": "",
        "response_flags": "-",
        "connection_security_policy": "mutual_tls",
    }
    assert list(labels) == [
        "reporter",
        *(k for k in labels if k.startswith("source_")),
        *(k for k in labels if k.startswith("destination_")),
        "request_protocol",
        "response_code",
        "grpc_response_status",
        "response_flags",
        "connection_security_policy",
    ], "labels are emitted in Istio's order"


def test_client_side_labels_the_server_workload_from_the_response(mesh_stack: Mesh) -> None:
    text = mesh_stack.client_x.metrics()
    rows = samples(
        text, "istio_requests_total", request_protocol="http", response_code="200", source_principal=CLIENT_SAN
    )
    assert len(rows) == 1, rows
    labels, value = rows[0]
    assert value == HTTP_OK
    assert labels["reporter"] == "source"
    assert (labels["source_workload"], labels["source_workload_namespace"], labels["source_version"]) == (
        "other",
        "bar",
        "v2",
    )
    assert (labels["destination_workload"], labels["destination_workload_namespace"]) == ("httpbin", "foo")
    # Both principals from the upstream mTLS connection's certificates, as Istio's client sidecar.
    assert labels["destination_principal"] == "spiffe://cluster.local/ns/foo/sa/httpbin"
    assert labels["source_principal"] == "spiffe://cluster.local/ns/bar/sa/other"
    assert (labels["destination_canonical_service"], labels["destination_canonical_revision"]) == ("httpbin", "v1")
    assert labels["destination_cluster"] == "east"
    # The service of the upstream cluster, not the Host header (httpbin.foo:8000).
    assert (
        labels["destination_service"],
        labels["destination_service_name"],
        labels["destination_service_namespace"],
    ) == ("httpbin.foo.svc.cluster.local", "httpbin", "foo")
    assert labels["connection_security_policy"] == "unknown"  # always, when the client reports


def test_applications_never_see_the_exchange_headers(mesh_stack: Mesh) -> None:
    for echoed in mesh_stack.echoed:
        assert not set(mesh.PEER_HEADERS) & set(echoed["headers"]), echoed["headers"]
    for headers in mesh_stack.responses:
        assert not set(mesh.PEER_HEADERS) & set(headers), headers


def test_denials_are_counted_with_their_flags_on_both_sides(mesh_stack: Mesh) -> None:
    server = samples(mesh_stack.server_x.metrics(), "istio_requests_total", response_code="403")
    # A DENY policy: Istio's RBAC filter sets no flag, so neither does extproc, though Envoy
    # flags the ext_authz denial UAEX in the entry (ext_proc's local reply has no flag at all).
    assert [(lbl["response_flags"], v) for lbl, v in server] == [("-", HTTP_DENIED)]
    # The denied request still came from a known peer: the metadata is read before the decision.
    assert server[0][0]["source_workload"] == "other"
    client = samples(mesh_stack.client_x.metrics(), "istio_requests_total", response_code="403")
    assert [(lbl["response_flags"], v) for lbl, v in client] == [("-", HTTP_DENIED)]


def test_grpc_requests_carry_protocol_status_and_message_counts(mesh_stack: Mesh) -> None:
    text = mesh_stack.server_x.metrics()
    by_status = {
        lbl["grpc_response_status"]: v for lbl, v in samples(text, "istio_requests_total", request_protocol="grpc")
    }
    assert by_status == {"0": GRPC_OK, "5": GRPC_NOT_FOUND}
    if mesh_stack.mode == "extproc":
        # Message counts come from grpc_stats through the access log, which this mode does not use.
        assert total(text, "istio_request_messages_total") == 0
        return
    for name in ("istio_request_messages_total", "istio_response_messages_total"):
        rows = samples(text, name, reporter="destination")
        assert len(rows) == 1 and len(rows[0][0]) == 20, rows  # reporter + the 19 peer labels
    assert total(text, "istio_request_messages_total") == GRPC_OK + GRPC_NOT_FOUND
    # grpcio's health service answers an unknown service with NOT_FOUND and a message too.
    assert total(text, "istio_response_messages_total") == GRPC_OK + GRPC_NOT_FOUND


def test_http_counts_equal_envoys_own_stats(mesh_stack: Mesh) -> None:
    for envoy, x, prefix in (
        (mesh_stack.server_envoy, mesh_stack.server_x, "inbound"),
        (mesh_stack.client_envoy, mesh_stack.client_x, "outbound"),
    ):
        st = envoy.stats(f"http.{prefix}_http.downstream_rq_")
        text = x.metrics()
        for code_class in ("2xx", "4xx", "5xx"):
            ours = sum(
                v for lbl, v in samples(text, "istio_requests_total") if lbl["response_code"].startswith(code_class[0])
            )
            assert ours == st.get(f"http.{prefix}_http.downstream_rq_{code_class}", 0), (prefix, code_class)
        completed = st[f"http.{prefix}_http.downstream_rq_completed"]
        assert completed == HTTP_OK + HTTP_DENIED + GRPC_OK + GRPC_NOT_FOUND + PLAIN_HTTP_OK
        for hist in ("istio_request_duration_milliseconds", "istio_request_bytes", "istio_response_bytes"):
            assert total(text, hist + "_count") == completed, hist


def test_tcp_counts_equal_envoys_own_stats(mesh_stack: Mesh) -> None:
    for envoy, x, prefix, reporter in (
        (mesh_stack.server_envoy, mesh_stack.server_x, "inbound_tcp", "destination"),
        (mesh_stack.client_envoy, mesh_stack.client_x, "outbound_tcp", "source"),
    ):
        st = envoy.stats(f"tcp.{prefix}.")
        text = x.metrics()
        rows = samples(text, "istio_tcp_connections_opened_total")
        diff = [{k: v for k, v in lbl.items() if v != rows[0][0][k]} for lbl, _ in rows]
        assert len(rows) == 2 and all(len(lbl) == 23 for lbl, _ in rows), diff  # mTLS and plain text
        assert rows[0][0]["reporter"] == reporter and rows[0][0]["request_protocol"] == "tcp"
        assert total(text, "istio_tcp_connections_opened_total") == st[f"tcp.{prefix}.downstream_cx_total"]
        assert total(text, "istio_tcp_connections_closed_total") == st[f"tcp.{prefix}.downstream_cx_total"]
        assert total(text, "istio_tcp_received_bytes_total") == st[f"tcp.{prefix}.downstream_cx_rx_bytes_total"]
        assert total(text, "istio_tcp_sent_bytes_total") == st[f"tcp.{prefix}.downstream_cx_tx_bytes_total"]
    server_rows = samples(
        mesh_stack.server_x.metrics(), "istio_tcp_connections_opened_total", connection_security_policy="mutual_tls"
    )
    assert server_rows[0][0]["source_principal"] == "spiffe://cluster.local/ns/bar/sa/other"
    assert server_rows[0][0]["source_workload_namespace"] == "bar"  # from the SPIFFE id
    assert server_rows[0][0]["connection_security_policy"] == "mutual_tls"


def test_promtool_accepts_both_expositions(mesh_stack: Mesh) -> None:
    """promtool parses every line and finds one lint problem: Istio's own metric name.

    `istio_request_duration_milliseconds` breaks Prometheus's base-unit guideline, and
    dashboards query that exact name, so it is kept. Anything else promtool reports fails.
    """
    unit_lint = 'istio_request_duration_milliseconds use base unit "seconds" instead of "milliseconds"'
    for x in (mesh_stack.server_x, mesh_stack.client_x):
        text = x.metrics()
        assert "istio_build{" in text and "extproc_telemetry_series{" in text
        checks = total(text, "extproc_checks_total")
        # The client's ext_proc makes no policy check (the server enforces); its ext_authz does.
        assert checks > 0 or (mesh_stack.mode == "extproc" and x is mesh_stack.client_x)
        assert total(text, "extproc_check_duration_seconds_count") == checks
        assert total(text, "extproc_check_duration_seconds_bucket", le="+Inf") == checks
        rc, out = promtool_check_metrics(text)
        assert out.strip().splitlines() == [unit_lint], out
        assert rc == 3  # lint findings, not a parse error (1)
        without = "\n".join(line for line in text.splitlines() if "istio_request_duration_milliseconds" not in line)
        rc, out = promtool_check_metrics(without + "\n")
        assert rc == 0, out


def test_prometheus_scrapes_the_expected_counts(mesh_stack: Mesh) -> None:
    prom = mesh_stack.prometheus
    expected_http = HTTP_OK + HTTP_DENIED + GRPC_OK + GRPC_NOT_FOUND + PLAIN_HTTP_OK
    prom.wait_for_value('sum(istio_requests_total{reporter="destination"})', expected_http)
    prom.wait_for_value('sum(istio_requests_total{reporter="source"})', expected_http)
    prom.wait_for_value(
        'sum(istio_requests_total{reporter="destination",source_workload="other",request_protocol="http",'
        'response_code="200"})',
        HTTP_OK + PLAIN_HTTP_OK,
    )
    prom.wait_for_value('sum(istio_tcp_connections_closed_total{job="server"})', TCP_CONNECTIONS + PLAIN_TCP)
    prom.wait_for_value(
        'sum(istio_request_duration_milliseconds_count{reporter="source",destination_workload="httpbin"})',
        expected_http,
    )
    quantile = prom.scalar(
        'histogram_quantile(0.5, sum by (le) (istio_request_duration_milliseconds_bucket{reporter="destination"}))'
    )
    assert quantile is not None and 0 < quantile < 60000


def test_tcp_peers_are_named_by_their_workload_entries(mesh_stack: Mesh) -> None:
    """Without Istio's ALPN exchange, each side names its TCP peer from the WorkloadEntry at the
    peer's address whose service account its certificate proves: every label as Istio's
    sidecars report it over the TCP metadata exchange."""
    [(server, _)] = samples(
        mesh_stack.server_x.metrics(), "istio_tcp_connections_opened_total", connection_security_policy="mutual_tls"
    )
    assert server == {
        "reporter": "destination",
        "source_workload": "other",
        "source_canonical_service": "other",
        "source_canonical_revision": "v2",
        "source_workload_namespace": "bar",
        "source_principal": "spiffe://cluster.local/ns/bar/sa/other",
        "source_app": "other",
        "source_version": "v2",
        "source_cluster": "Kubernetes",
        "destination_workload": "httpbin",
        "destination_workload_namespace": "foo",
        "destination_principal": "spiffe://cluster.local/ns/foo/sa/httpbin",
        "destination_app": "httpbin",
        "destination_version": "v1",
        "destination_service": "httpbin.foo.svc.cluster.local",
        "destination_canonical_service": "httpbin",
        "destination_canonical_revision": "v1",
        "destination_service_name": "httpbin",
        "destination_service_namespace": "foo",
        "destination_cluster": "east",
        "request_protocol": "tcp",
        "response_flags": "-",
        "connection_security_policy": "mutual_tls",
    }
    [(client, _)] = samples(
        mesh_stack.client_x.metrics(), "istio_tcp_connections_opened_total", source_principal=CLIENT_SAN
    )
    assert client == {
        "reporter": "source",
        "source_workload": "other",
        "source_canonical_service": "other",
        "source_canonical_revision": "v2",
        "source_workload_namespace": "bar",
        "source_principal": "spiffe://cluster.local/ns/bar/sa/other",
        "source_app": "other",
        "source_version": "v2",
        "source_cluster": "Kubernetes",
        "destination_workload": "httpbin",
        "destination_workload_namespace": "foo",
        "destination_principal": "spiffe://cluster.local/ns/foo/sa/httpbin",
        "destination_app": "httpbin",
        "destination_version": "v1",
        "destination_service": "httpbin.foo.svc.cluster.local",
        "destination_canonical_service": "httpbin",
        "destination_canonical_revision": "v1",
        "destination_service_name": "httpbin",
        "destination_service_namespace": "foo",
        "destination_cluster": "east",
        "request_protocol": "tcp",
        "response_flags": "-",
        "connection_security_policy": "unknown",
    }


# What Istio's dashboards are set to for this mesh: the server's service; on the workload
# dashboard each workload in turn (the server's inbound panels, the client's outbound ones);
# every multi-value variable at "All".
DASHBOARD_SELECTIONS: dict[str, list[dict[str, str]]] = {
    "mesh": [{}],
    "service": [{"service": "httpbin.foo.svc.cluster.local"}],
    "workload": [{"workload": "httpbin", "namespace": "foo"}, {"workload": "other", "namespace": "bar"}],
}
# The value each label takes in this mesh, which every drop-down must offer.
MESH_VALUES = {
    "destination_service": "httpbin.foo.svc.cluster.local",
    "destination_workload": "httpbin",
    "destination_workload_namespace": "foo",
    "destination_cluster": "east",
    "source_workload": "other",
    "source_workload_namespace": "bar",
    "source_cluster": "Kubernetes",
}


@pytest.mark.parametrize("dashboard", dash.DASHBOARDS)
def test_istios_dashboards_show_every_panel(mesh_stack: Mesh, dashboard: str) -> None:
    """Every panel query of Istio's mesh, service and workload dashboards (the table in
    tests/fixtures/istio_dashboards.py) has data from the two extprocs through a real
    Prometheus, for one of the selections a user would make, except the client-side mTLS
    halves that no sidecar fills (Istio's neither; checked empty)."""
    prom = mesh_stack.prometheus
    # increase() needs two scrapes of a series in its window.
    for metric in ("istio_requests_total", "istio_tcp_sent_bytes_total"):
        for reporter in dash.SIDECAR_REPORTERS:
            wait_until(
                lambda m=metric, r=reporter: bool(prom.query(f'increase({m}{{reporter="{r}"}}[1h])')),
                30,
                f"two scrapes of {metric} reported by {reporter}",
            )
    selections = [{**dash.example_values(dashboard), **sel} for sel in DASHBOARD_SELECTIONS[dashboard]]
    # A target read with `$qrep` is two views, one per reporter the user can pick.
    targets: dict[tuple[str, str, str, str | None], list[dash.PanelQuery]] = {}
    for q in dash.queries(dashboard):
        view = q.reporter if q.reporter_var is not None else None
        targets.setdefault((q.row, q.panel, q.ref, view), []).append(q)
    found = [
        {q: bool(prom.query(dash.render(q, values, window="1h"))) for q in dash.queries(dashboard)}
        for values in selections
    ]
    empty = []
    for (row, panel, ref, _), parts in targets.items():
        if all(dash.never_filled_by_sidecars(p) for p in parts):
            assert not any(f[p] for f in found for p in parts), (panel, ref)  # Istio's own rule, checked
            continue
        if not any(dash.target_has_data(parts, f.__getitem__) for f in found):
            empty.append(f"{row} / {panel} [{ref}]: " + "; ".join(dash.render(p, selections[0]) for p in parts))
    assert not empty, "panel queries with no data:\n" + "\n".join(empty)
    # The drop-downs offer the mesh's values (the service once, by its FQDN).
    for v in dash.variables(dashboard).values():
        offered: set[str] = set()
        for values in selections:
            for source, promql in zip(v.sources, dash.render_variable(v, values), strict=True):
                offered |= {r["metric"].get(source.label, "") for r in prom.query(promql)}
        if v.name == "service":
            assert offered == {"httpbin.foo.svc.cluster.local"}, offered
        elif v.sources:
            # `unknown` is offered too where Istio offers it: the plain-text TCP peer.
            assert MESH_VALUES[v.label or ""] in offered and "" not in offered, (v.name, offered)


# --- every label, as istio/proxy's stats filter reports it (istio_stats.cc, testdata/metric) ----

SERVER_SAN = "spiffe://cluster.local/ns/foo/sa/httpbin"
CLIENT = {
    "workload": "other",
    "canonical_service": "other",
    "canonical_revision": "v2",
    "workload_namespace": "bar",
    "app": "other",
    "version": "v2",
    "cluster": "Kubernetes",
}
SERVER = {
    "workload": "httpbin",
    "workload_namespace": "foo",
    "app": "httpbin",
    "version": "v1",
    "canonical_service": "httpbin",
    "canonical_revision": "v1",
    "cluster": "east",
}
UNKNOWN_PEER = {
    "workload": "unknown",
    "canonical_service": "unknown",
    "canonical_revision": "latest",
    "workload_namespace": "unknown",
    "app": "unknown",
    "version": "unknown",
    "cluster": "unknown",
}
SERVICE = {
    "destination_service": "httpbin.foo.svc.cluster.local",
    "destination_service_name": "httpbin",
    "destination_service_namespace": "foo",
}


def _expected(
    reporter: str,
    protocol: str,
    mtls: bool,
    *,
    source: dict[str, str] | None = None,
    destination: dict[str, str] | None = None,
    code: str = "200",
    grpc_status: str = "",
) -> dict[str, str]:
    src = CLIENT if source is None else source
    dst = SERVER if destination is None else destination
    labels = {"reporter": reporter}
    labels |= {
        f"source_{k}": src[k] for k in ("workload", "canonical_service", "canonical_revision", "workload_namespace")
    }
    labels["source_principal"] = CLIENT_SAN if mtls else "unknown"
    labels |= {f"source_{k}": src[k] for k in ("app", "version", "cluster")}
    labels |= {f"destination_{k}": dst[k] for k in ("workload", "workload_namespace")}
    labels["destination_principal"] = SERVER_SAN if mtls else "unknown"
    labels |= {f"destination_{k}": dst[k] for k in ("app", "version")}
    labels["destination_service"] = SERVICE["destination_service"]
    labels |= {f"destination_{k}": dst[k] for k in ("canonical_service", "canonical_revision")}
    labels["destination_service_name"] = SERVICE["destination_service_name"]
    labels["destination_service_namespace"] = SERVICE["destination_service_namespace"]
    labels["destination_cluster"] = dst["cluster"]
    labels["request_protocol"] = protocol
    if protocol != "tcp":
        labels["response_code"] = code
        labels["grpc_response_status"] = grpc_status
    labels["response_flags"] = "-"
    if reporter == "source":
        labels["connection_security_policy"] = "unknown"
    else:
        labels["connection_security_policy"] = "mutual_tls" if mtls else "none"
    return labels


@pytest.mark.parametrize(
    ("metric", "expected", "count"),
    [
        # HTTP over mTLS and plain text, both reporters.
        ("istio_requests_total", _expected("destination", "http", True), HTTP_OK),
        ("istio_requests_total", _expected("source", "http", True), HTTP_OK),
        ("istio_requests_total", _expected("destination", "http", False), PLAIN_HTTP_OK),
        ("istio_requests_total", _expected("source", "http", False), PLAIN_HTTP_OK),
        # Denied by a DENY policy: 403, and no flag, as Envoy's RBAC filter.
        ("istio_requests_total", _expected("destination", "http", True, code="403"), HTTP_DENIED),
        ("istio_requests_total", _expected("source", "http", True, code="403"), HTTP_DENIED),
        # gRPC, OK and NOT_FOUND.
        ("istio_requests_total", _expected("destination", "grpc", True, grpc_status="0"), GRPC_OK),
        ("istio_requests_total", _expected("source", "grpc", True, grpc_status="0"), GRPC_OK),
        ("istio_requests_total", _expected("destination", "grpc", True, grpc_status="5"), GRPC_NOT_FOUND),
        ("istio_requests_total", _expected("source", "grpc", True, grpc_status="5"), GRPC_NOT_FOUND),
        # TCP over mTLS: the peers from their WorkloadEntries.
        ("istio_tcp_connections_closed_total", _expected("destination", "tcp", True), TCP_CONNECTIONS),
        ("istio_tcp_connections_closed_total", _expected("source", "tcp", True), TCP_CONNECTIONS),
        # TCP in plain text: no certificate to tell the two entries at 127.0.0.1 apart, so the
        # peer is unknown, as Istio's without its ALPN exchange; the service still comes from
        # the cluster, and its namespace with it.
        (
            "istio_tcp_connections_closed_total",
            _expected("destination", "tcp", False, source=UNKNOWN_PEER),
            PLAIN_TCP,
        ),
        (
            "istio_tcp_connections_closed_total",
            _expected("source", "tcp", False, destination=UNKNOWN_PEER),
            PLAIN_TCP,
        ),
    ],
    ids=lambda v: (
        "-".join(
            str(x)
            for x in (
                v.get("reporter"),
                v.get("request_protocol"),
                v.get("response_code", ""),
                v.get("grpc_response_status", ""),
                v.get("connection_security_policy"),
            )
        )
        if isinstance(v, dict)
        else str(v)
    ),
)
def test_every_label_is_what_istios_stats_filter_reports(
    mesh_stack: Mesh, metric: str, expected: dict[str, str], count: int
) -> None:
    x = mesh_stack.server_x if expected["reporter"] == "destination" else mesh_stack.client_x
    found = samples(x.metrics(), metric, **expected)
    assert [(lbl, v) for lbl, v in found] == [(expected, count)], samples(
        x.metrics(),
        metric,
        reporter=expected["reporter"],
        request_protocol=expected["request_protocol"],
    )


def test_debug_config_lists_the_peers_the_config_names(mesh_stack: Mesh) -> None:
    status, body = http_get(f"http://127.0.0.1:{mesh_stack.server_x.admin_port}/debug/config")
    assert status == 200
    peers = json.loads(body)["peers"]
    assert peers == {
        "127.0.0.1": [
            {
                "workload": "bar/other",
                "principal": CLIENT_SAN,
                "origin": "WorkloadEntry bar/other",
            },
            {
                "workload": "foo/httpbin",
                "principal": SERVER_SAN,
                "origin": "WorkloadEntry foo/httpbin-vm",
            },
        ]
    }


def test_the_compose_stacks_dashboard_shows_every_panel(mesh_stack: Mesh) -> None:
    """Every query of the Grafana dashboard docker-compose.yml provisions returns data from a
    real Prometheus scraping the two extprocs (tests/e2e/test_compose_stack.py checks the rest
    of the stack)."""
    prom = mesh_stack.prometheus
    wait_until(
        lambda: bool(prom.query('rate(istio_requests_total{reporter="destination"}[1m])')),
        30,
        "two scrapes of the server's metrics",
    )
    dashboard = json.loads((REPO / "deploy" / "grafana" / "dashboards" / "extproc-overview.json").read_text())
    empty = [
        f"{panel['title']} [{t['refId']}]: {t['expr']}"
        for panel in dashboard["panels"]
        for t in panel["targets"]
        if not prom.query(t["expr"])
    ]
    assert not empty, "dashboard queries with no data:\n" + "\n".join(empty)
