"""A module-scoped stack for end-to-end tests: Envoy (plaintext HTTP, mTLS HTTP, TLS TCP and
plaintext TCP listeners, all checked by extproc over ext_authz), extproc, and the sample
upstream. Tests change policies by writing files and waiting for the reload, which keeps
the processes alive across tests and the suite fast."""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.fixtures import envoy_config as ec
from tests.fixtures.procs import free_port, wait_until
from tests.fixtures.stack import ClientCert, ExtprocProcess, HttpClient, tcp_roundtrip

pytestmark = pytest.mark.e2e


MODES = ("authz", "authz-http", "extproc")


def http_filters(mode: str, **kw: Any) -> list[dict[str, Any]]:
    """The HTTP filters of a deployment mode: ext_authz over gRPC (`authz+als`), over HTTP
    (`authz-http`) or ext_proc (`extproc`)."""
    if mode == "authz":
        return [ec.ext_authz_http(**kw)]
    if mode == "authz-http":
        return ec.http_check_chain(**kw)
    return ec.ext_proc_chain(**kw)


@dataclass
class Stack:
    workdir: Path
    config_dir: Path
    extproc: ExtprocProcess
    envoy: ec.EnvoyProcess
    http_port: int
    https_port: int
    tcp_tls_port: int
    tcp_port: int
    access_log: Path
    pki: dict[str, Any]
    mode: str = "authz"

    def set_policies(self, yaml_text: str, name: str = "policies.yaml") -> None:
        """Replace every policy file with `yaml_text` and wait until extproc serves it."""
        before = self.extproc.snapshot_version()
        for f in self.config_dir.iterdir():
            if f.is_file():
                f.unlink()
            else:
                shutil.rmtree(f)
        tmp = self.config_dir / f".{name}.tmp"
        tmp.write_text(textwrap.dedent(yaml_text))
        tmp.rename(self.config_dir / name)  # atomic, like a ConfigMap update
        self.extproc.wait_reload(before)

    def http(self, **kw: Any) -> HttpClient:
        return HttpClient(self.http_port, **kw)

    def https(self, cert: str | None = None, **kw: Any) -> HttpClient:
        cc = None
        if cert is not None:
            issued = self.pki[cert]
            cc = ClientCert(issued.cert_path, issued.key_path)
        return HttpClient(self.https_port, ca=self.pki["ca"].cert_path, client_cert=cc, **kw)

    def tcp(self, cert: str | None = None, tls: bool = True, **kw: Any) -> bytes | None:
        payload = b"GET /tcp HTTP/1.1\r\nHost: tcp.example\r\nConnection: close\r\n\r\n"
        if not tls:
            return tcp_roundtrip(self.tcp_port, payload, **kw)
        cc = None
        if cert is not None:
            issued = self.pki[cert]
            cc = ClientCert(issued.cert_path, issued.key_path)
        return tcp_roundtrip(self.tcp_tls_port, payload, ca=self.pki["ca"].cert_path, client_cert=cc, **kw)

    def access_log_line(self, marker: str, timeout: float = 5.0) -> str:
        """The access log line of the request whose path contains `marker` (Envoy flushes it shortly)."""
        found: list[str] = []

        def present() -> bool:
            if not self.access_log.exists():
                return False
            found[:] = [line for line in self.access_log.read_text().splitlines() if marker in line]
            return bool(found)

        wait_until(present, timeout, f"an access log line containing {marker!r}")
        return found[-1]


def build_stack(
    tmp: Path, pki: dict[str, Any], upstream_port: int, extproc: ExtprocProcess, config_dir: Path, mode: str = "authz"
) -> Stack:
    server = pki["server"]
    tls = ec.Tls(server.cert_path, server.key_path, pki["ca"].cert_path, require_client_certificate=False)
    http_port, https_port, tcp_tls_port, tcp_port, admin = (free_port() for _ in range(5))
    access_log = tmp / "access.log"
    listeners: list[ec.HttpListener | ec.TcpListener] = [
        ec.HttpListener("http", http_port, http_filters(mode), access_log_path=access_log),
        ec.HttpListener("https", https_port, http_filters(mode), tls=tls, access_log_path=access_log),
        ec.TcpListener("tcp_tls", tcp_tls_port, [ec.ext_authz_network()], tls=tls),
        ec.TcpListener("tcp", tcp_port, [ec.ext_authz_network()]),
    ]
    clusters = [ec.cluster("upstream", "127.0.0.1", upstream_port), *extproc.clusters()]
    envoy = ec.EnvoyProcess(ec.bootstrap(admin, listeners, clusters), tmp / "envoy", admin)
    envoy.wait_ready()
    return Stack(tmp, config_dir, extproc, envoy, http_port, https_port, tcp_tls_port, tcp_port, access_log, pki, mode)


def run_stack(
    tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Any], upstream: int, mode: str
) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp(f"stack-{mode}")
    config_dir = tmp / "policies"
    config_dir.mkdir()
    extproc = ExtprocProcess(
        [config_dir], tmp, namespace="foo", labels="app=httpbin,version=v1", http=mode == "authz-http"
    )
    envoy: ec.EnvoyProcess | None = None
    try:
        extproc.wait_ready()
        s = build_stack(tmp, pki, upstream, extproc, config_dir, mode)
        envoy = s.envoy
        yield s
    finally:
        if envoy is not None:
            envoy.stop()
        extproc.stop()


@pytest.fixture(scope="module", params=MODES)
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Any], upstream: int
) -> Iterator[Stack]:
    """The stack in each deployment mode: the same tests hold for ext_authz and for ext_proc."""
    yield from run_stack(tmp_path_factory, pki, upstream, request.param)


@pytest.fixture(scope="module")
def grpc_app() -> Iterator[int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    svc = health.HealthServicer()
    svc.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(svc, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(0)
