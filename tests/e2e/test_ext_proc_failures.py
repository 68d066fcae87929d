"""What Envoy does when extproc cannot answer in the `extproc` mode, as envoy/extproc.yaml
documents it: extproc down -> `failure_mode_allow` decides (false: 500, true: the request
goes through unchecked); extproc slower than `message_timeout` -> 504, or through with
`failure_mode_allow: true`. The slow extproc is a real one, waiting on a slow CUSTOM
provider (the sample ext-authz server with `x-ext-authz-delay`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures import authz_provider
from tests.fixtures import envoy_config as ec
from tests.fixtures.procs import free_port
from tests.fixtures.stack import ExtprocProcess, HttpClient

pytestmark = pytest.mark.e2e

SLOW = {"x-ext-authz": "allow", "x-ext-authz-delay": "1.5"}  # the provider answers after 1.5 s
FAST = {"x-ext-authz": "allow"}


@dataclass
class Listeners:
    down_closed: int  # extproc unreachable, failure_mode_allow: false
    down_open: int  # extproc unreachable, failure_mode_allow: true
    slow_closed: int  # extproc reachable, message_timeout 0.5s, failure_mode_allow: false
    slow_open: int  # the same with failure_mode_allow: true


@pytest.fixture(scope="module")
def listeners(tmp_path_factory: pytest.TempPathFactory, upstream: int) -> Iterator[Listeners]:
    tmp: Path = tmp_path_factory.mktemp("ext-proc-failures")
    provider, grpc_port = authz_provider.start(tmp)
    policies = tmp / "policies"
    policies.mkdir()
    (policies / "p.yaml").write_text(authz_provider.custom_on_every_request(grpc_port))
    x = ExtprocProcess([policies], tmp)
    envoy: ec.EnvoyProcess | None = None
    try:
        x.wait_ready()
        ports = Listeners(*(free_port() for _ in range(4)))
        built = [
            ec.HttpListener("down_closed", ports.down_closed, [ec.ext_proc_http("nowhere")]),
            ec.HttpListener("down_open", ports.down_open, [ec.ext_proc_http("nowhere", failure_mode_allow=True)]),
            ec.HttpListener("slow_closed", ports.slow_closed, [ec.ext_proc_http(message_timeout="0.5s")]),
            ec.HttpListener(
                "slow_open", ports.slow_open, [ec.ext_proc_http(message_timeout="0.5s", failure_mode_allow=True)]
            ),
        ]
        clusters = [
            ec.cluster("upstream", "127.0.0.1", upstream),
            ec.cluster("extproc", "127.0.0.1", x.grpc_port, http2=True),
            ec.cluster("nowhere", "127.0.0.1", free_port(), http2=True),  # nothing listens there
        ]
        admin = free_port()
        envoy = ec.EnvoyProcess(ec.bootstrap(admin, built, clusters), tmp / "envoy", admin)
        envoy.wait_ready()
        yield ports
    finally:
        if envoy is not None:
            envoy.stop()
        x.stop()
        provider.terminate()


def test_extproc_down_fails_closed_by_default(listeners: Listeners) -> None:
    r = HttpClient(listeners.down_closed).get("/anything", FAST)
    assert r.status == 500


def test_extproc_down_with_failure_mode_allow_lets_requests_through(listeners: Listeners) -> None:
    r = HttpClient(listeners.down_open).get("/anything", FAST)
    assert r.status == 200
    assert r.json()["path"] == "/anything"


def test_a_fast_answer_is_enforced(listeners: Listeners) -> None:
    assert HttpClient(listeners.slow_closed).get("/anything", FAST).status == 200
    denied = HttpClient(listeners.slow_closed).get("/anything", {"x-ext-authz": "deny"})
    assert denied.status == 403


def test_an_answer_slower_than_message_timeout_is_a_504(listeners: Listeners) -> None:
    assert HttpClient(listeners.slow_closed).get("/anything", SLOW).status == 504


def test_an_answer_slower_than_message_timeout_passes_with_failure_mode_allow(listeners: Listeners) -> None:
    r = HttpClient(listeners.slow_open).get("/anything", {**SLOW, "x-ext-authz": "deny"})
    assert r.status == 200  # the provider would deny, but Envoy stopped waiting and went on
