"""The files users start from: every Envoy config under envoy/ validates with Envoy itself,
the sample policies load, and the one-command demo serves the answers it promises."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from extproc.config import loader
from extproc.config.snapshot import Options, WorkloadIdentity, build_snapshot
from tests.fixtures.envoy_config import validate
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
