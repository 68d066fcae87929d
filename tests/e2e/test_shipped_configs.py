"""The files users start from: every Envoy config under envoy/ validates with Envoy itself,
the sample policies load, and the one-command demo serves the answers it promises."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from extproc.services.accesslog import CLUSTER_TAG, SERVICES_TAG, UPSTREAM_LOCAL_SAN_TAG, UPSTREAM_PEER_SAN_TAG
from extproc.services.processing_adapter import OUTBOUND_RESPONSE_ATTRIBUTES
from extproc.snapshot import loader
from extproc.snapshot.compiled import Options, WorkloadIdentity, build_snapshot
from tests.fixtures.envoy_config import validate, walk_objects
from tests.fixtures.mesh import OUTBOUND_TAGS
from tests.fixtures.procs import VENV_BIN

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
ENVOY_CONFIGS = sorted((REPO / "envoy").glob("*.yaml"))


def test_there_are_envoy_configs() -> None:
    assert ENVOY_CONFIGS, "envoy/ must hold at least one bootstrap"
    assert not list((REPO / "envoy").glob("*.py")), "envoy/ holds YAML only: `envoy` is the wheel's package name"


@pytest.mark.parametrize("path", ENVOY_CONFIGS, ids=lambda p: p.name)
def test_envoy_config_validates(path: Path, envoy_binary: Path) -> None:
    code, out = validate(path)
    assert code == 0, out


@pytest.mark.parametrize("path", [p for p in ENVOY_CONFIGS if p.stem.endswith("-outbound")], ids=lambda p: p.name)
def test_outbound_configs_log_what_the_client_side_labels_need(path: Path) -> None:
    """Each outbound access log carries the upstream identities, cluster and istio.services as
    the custom tags extproc reads, and the outbound ext_proc filter asks for the same as
    response attributes: a misspelt name would silently leave labels `unknown`."""
    cfg = yaml.safe_load(path.read_text())
    logs = [
        n
        for n in walk_objects(cfg)
        if str(n.get("@type", "")).endswith(("HttpGrpcAccessLogConfig", "TcpGrpcAccessLogConfig"))
    ]
    assert logs, "an outbound config logs to extproc"
    for log in logs:
        assert log["common_config"]["custom_tags"] == OUTBOUND_TAGS, path.name
    tags = {t["tag"] for t in OUTBOUND_TAGS}
    assert tags == {UPSTREAM_PEER_SAN_TAG, UPSTREAM_LOCAL_SAN_TAG, SERVICES_TAG, CLUSTER_TAG}
    for f in walk_objects(cfg):
        if str(f.get("@type", "")).endswith("ExternalProcessor"):
            assert tuple(f["response_attributes"]) == OUTBOUND_RESPONSE_ATTRIBUTES, path.name


def test_sample_policies_load_without_warnings() -> None:
    loaded = loader.load([REPO / "examples" / "policies"])
    assert not loaded.warnings, [w.render() for w in loaded.warnings]
    snap = build_snapshot(loaded, WorkloadIdentity("demo", {"app": "httpbin"}), Options(), 1)
    assert len(snap.policies) == 5
    assert [(p.issuer, p.remote.jwks_uri if p.remote else None) for p in snap.authn.providers] == [
        ("https://demo.extproc.io", "http://127.0.0.1:8080/.well-known/jwks.json")
    ]


@pytest.mark.parametrize("mode", ["authz", "authz-http", "extproc"])
def test_demo_check_serves_the_promised_answers(envoy_binary: Path, mode: str) -> None:
    r = subprocess.run(
        [str(VENV_BIN / "extproc"), "demo", "--check", "--mode", mode], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("  ok   ") == 12  # 11 probes and the metrics check
    assert "istio_requests_total sums to 10 (expect 10)" in r.stdout
    assert "(expired JWT)       -> 401" in r.stdout
    assert "FAIL" not in r.stdout
    assert "why was bob denied? no ALLOW policy matched" in r.stdout
