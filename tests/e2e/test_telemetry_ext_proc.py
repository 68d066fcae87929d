"""Metrics from Envoy's ext_proc filter, alone or beside the access log service.

The same Envoy also streams its access log to the same extproc, so every request is
reported twice; extproc must count it once (the ext_proc report claims it). In
observability mode Envoy ignores the processor's replies and would hold each side stream
for `deferred_close_timeout`; extproc ends the stream itself after the response headers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.fixtures import envoy_config as ec
from tests.fixtures import mesh
from tests.fixtures.exposition import samples, total
from tests.fixtures.procs import free_port, wait_until
from tests.fixtures.stack import ExtprocProcess, HttpClient

pytestmark = pytest.mark.e2e

REQUESTS = 7
GRPC_CALLS = 2


def ext_proc(observability: bool) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "@type": ec.T + "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {
            "envoy_grpc": {"cluster_name": "extproc"},
            "timeout": "5s",
            "initial_metadata": [{"key": mesh.DIRECTION_HEADER, "value": "inbound"}],
        },
        "failure_mode_allow": False,
        "processing_mode": {
            "request_header_mode": "SEND",
            "response_header_mode": "SEND",
            "response_trailer_mode": "SEND",
        },
        "message_timeout": "1s",
        # The peer's address and certificate, which policies (enforced in this mode) read.
        "request_attributes": ec.EXT_PROC_ATTRIBUTES,
        # The exchange headers are x-envoy-*, which ext_proc may not change by default.
        "mutation_rules": {"allow_envoy": True},
        "observability_mode": observability,
    }
    return {"name": "envoy.filters.http.ext_proc", "typed_config": cfg}


@pytest.fixture(scope="module", params=[False, True], ids=["ext_proc", "observability_mode"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, upstream: int, grpc_app: int
) -> Iterator[tuple[ExtprocProcess, ec.EnvoyProcess, int, bool]]:
    observability: bool = request.param
    tmp: Path = tmp_path_factory.mktemp("extproc-mode")
    (tmp / "policies").mkdir()
    # Telemetry API overrides, applied to istio_requests_total only.
    (tmp / "policies" / "telemetry.yaml").write_text(
        "apiVersion: telemetry.istio.io/v1\n"
        "kind: Telemetry\n"
        "metadata: {name: mesh-default, namespace: istio-system}\n"
        "spec:\n"
        "  metrics:\n"
        "  - providers: [{name: prometheus}]\n"
        "    overrides:\n"
        "    - match: {metric: REQUEST_COUNT}\n"
        "      tagOverrides:\n"
        "        request_method: {value: request.method}\n"
        "        destination_principal: {operation: REMOVE}\n"
    )
    x = ExtprocProcess(
        [tmp / "policies"], tmp, namespace="foo", labels="app=httpbin,version=v1", extra_args=["--workload", "httpbin"]
    )
    envoy: ec.EnvoyProcess | None = None
    try:
        x.wait_ready()
        port, admin = free_port(), free_port()
        cfg = mesh.bootstrap(
            admin,
            [
                mesh.listener(
                    "inbound_http",
                    port,
                    [
                        mesh.hcm(
                            "inbound_http",
                            [ext_proc(observability)],
                            mesh.routes("app", "grpc_app"),
                            [mesh.http_als("inbound")],
                        )
                    ],
                )
            ],
            [
                ec.cluster("app", "127.0.0.1", upstream),
                ec.cluster("grpc_app", "127.0.0.1", grpc_app, http2=True),
                ec.cluster("extproc", "127.0.0.1", x.grpc_port, http2=True),
            ],
        )
        envoy = ec.EnvoyProcess(cfg, tmp / "envoy", admin)
        envoy.wait_ready()
        yield x, envoy, port, observability
    finally:
        if envoy is not None:
            envoy.stop()
        x.stop()


def _drive(port: int) -> None:
    http = HttpClient(port)
    peer = mesh_peer_header()
    for i in range(REQUESTS):
        r = http.get(f"/anything/{i}", headers={"x-envoy-peer-metadata": peer, "x-envoy-peer-metadata-id": "client"})
        assert r.status == 200
    http.close()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for _ in range(GRPC_CALLS):
            assert stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == 1


def mesh_peer_header() -> str:
    from extproc.telemetry.peer import Workload, encode

    return encode(Workload.from_labels({"app": "sleep", "version": "v9"}, workload_name="sleep", namespace="bar"))


def test_each_request_is_counted_once_from_ext_proc(stack: tuple[ExtprocProcess, ec.EnvoyProcess, int, bool]) -> None:
    x, envoy, port, observability = stack
    _drive(port)
    expected = REQUESTS + GRPC_CALLS

    def settled() -> bool:
        text = x.metrics()
        als = total(text, "extproc_telemetry_source_events_total", kind="access_log_http_entries")
        return als == expected and total(text, "istio_requests_total") == expected

    wait_until(settled, 20, "both sources to report every request")
    text = x.metrics()
    assert (
        envoy.stats("http.inbound_http.downstream_rq_completed")["http.inbound_http.downstream_rq_completed"]
        == expected
    )
    assert total(text, "istio_requests_total") == expected
    assert total(text, "extproc_telemetry_requests_total", source="ext_proc") == expected
    assert total(text, "extproc_telemetry_duplicates_total") == expected  # every access log entry was skipped
    assert total(text, "extproc_telemetry_source_events_total", kind="ext_proc_streams_ended_by_server") == expected
    http_rows = samples(text, "istio_requests_total", request_protocol="http")
    assert [(r["source_workload"], r["source_version"], r["response_code"], v) for r, v in http_rows] == [
        ("sleep", "v9", "200", REQUESTS)
    ]
    # The Telemetry resource added a label and removed one, on that metric alone.
    assert {r["request_method"] for r, _ in http_rows} == {"GET"}
    assert all("destination_principal" not in r for r, _ in samples(text, "istio_requests_total"))
    assert all("destination_principal" in r for r, _ in samples(text, "istio_request_duration_milliseconds_count"))
    grpc_rows = samples(text, "istio_requests_total", request_protocol="grpc")
    assert [(r["grpc_response_status"], v) for r, v in grpc_rows] == [("0", GRPC_CALLS)]
    assert total(text, "istio_request_duration_milliseconds_count") == expected
    if not observability:
        # Envoy applied the removal: the upstream never saw the exchange headers.
        r = HttpClient(port).get("/headers", headers={"x-envoy-peer-metadata": mesh_peer_header()})
        assert not set(mesh.PEER_HEADERS) & set(r.json()["headers"])
