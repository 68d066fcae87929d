"""docker-compose.yml, checked without a Docker engine: Debian's `docker-compose config` accepts
it, every file it mounts exists and passes its own tool's validation (Envoy, promtool), the
Grafana provisioning fits together, and the README describes the same stack. That the
dashboard's queries return data is checked against the two-sidecar topology's Prometheus in
tests/e2e/test_telemetry_mesh.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.envoy_config import validate

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
DASHBOARDS = REPO / "deploy" / "grafana" / "dashboards"


def _compose(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("docker-compose")
    assert exe is not None, "scripts/setup installs Debian's docker-compose"
    return subprocess.run(
        [exe, "-f", str(COMPOSE), *args], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )


def _services() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def _mounts() -> list[tuple[str, Path, str]]:
    """(service, host path, container path) of every bind mount."""
    out = []
    for name, svc in _services().items():
        for v in svc.get("volumes", []):
            host, container = v.split(":")[:2]
            out.append((name, (REPO / host).resolve(), container))
    return out


def test_docker_compose_accepts_the_file() -> None:
    r = _compose("config", "-q")
    assert r.returncode == 0, r.stderr
    resolved = _compose("config")
    assert resolved.returncode == 0, resolved.stderr
    services = yaml.safe_load(resolved.stdout)["services"]
    assert set(services) == {
        "upstream",
        "extproc",
        "envoy",
        "prometheus",
        "grafana",
        "jaeger",
        "fortio",
        "fortio-jwt",
    }
    # The load generators run only with `--profile load`.
    assert {n for n, svc in services.items() if svc.get("profiles")} == {"fortio", "fortio-jwt"}
    assert services["fortio"]["profiles"] == services["fortio-jwt"]["profiles"] == ["load"]


def test_every_mounted_file_exists() -> None:
    mounts = _mounts()
    assert mounts
    for service, host, _ in mounts:
        assert host.exists(), f"{service} mounts {host}, which is not in the repository"
        assert REPO in host.parents, f"{service} mounts {host} from outside the repository"


def test_images_are_pinned_and_envoy_is_the_tested_release(envoy_binary: Path) -> None:
    for name, svc in _services().items():
        if "image" in svc:
            image, _, tag = svc["image"].rpartition(":")
            assert image and tag and tag != "latest", f"{name}: pin the image ({svc['image']})"
        else:
            assert svc.get("build") == ".", f"{name}: builds the repository's Dockerfile"
    version = subprocess.run([str(envoy_binary), "--version"], capture_output=True, text=True, check=True).stdout
    tag = _services()["envoy"]["image"].rpartition(":v")[2]
    assert f"/{tag}/" in version, (tag, version)


def test_the_mounted_envoy_config_validates() -> None:
    configs = [host for service, host, _ in _mounts() if service == "envoy"]
    assert configs
    for path in configs:
        code, out = validate(path)
        assert code == 0, out


def test_promtool_accepts_the_prometheus_config() -> None:
    [(_, config, container)] = [m for m in _mounts() if m[0] == "prometheus"]
    assert f"--config.file={container}" in _services()["prometheus"]["command"]
    r = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    scraped = yaml.safe_load(config.read_text())["scrape_configs"]
    targets = {t for job in scraped for sc in job["static_configs"] for t in sc["targets"]}
    # What extproc's --admin and Envoy's admin listen on in the stack.
    admin = next(a for a in _services()["extproc"]["command"] if a.startswith("--admin="))
    assert admin.removeprefix("--admin=") in targets
    envoy_cfg = yaml.safe_load((REPO / "envoy" / "authz-http.yaml").read_text())
    envoy_admin = envoy_cfg["admin"]["address"]["socket_address"]
    assert f"{envoy_admin['address']}:{envoy_admin['port_value']}" in targets


def test_grafana_provisioning_fits_together() -> None:
    mounts = {container: host for service, host, container in _mounts() if service == "grafana"}
    provisioning = mounts["/etc/grafana/provisioning"]
    [datasource] = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://127.0.0.1:9090"
    [provider] = yaml.safe_load((provisioning / "dashboards" / "dashboards.yaml").read_text())["providers"]
    assert mounts[provider["options"]["path"]] == DASHBOARDS
    files = sorted(DASHBOARDS.rglob("*.json"))
    assert files
    for f in files:
        dash = json.loads(f.read_text())
        assert dash["uid"] and dash["title"] and dash["panels"]
        for panel in dash["panels"]:
            assert panel["datasource"]["uid"] == datasource["uid"], (f.name, panel["title"])
            assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]


def test_the_readme_describes_the_stack() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## The observable stack with Docker Compose", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([a-z-]+)` \|", section, re.M))
    assert listed == set(_services()), listed
    for profile in re.findall(r"--profile (\w+)", section):
        assert any(profile in svc.get("profiles", []) for svc in _services().values()), profile
    for _, host, _ in _mounts():
        rel = host.relative_to(REPO)
        assert str(rel) in section or str(rel.parent) + "/" in section or rel.parts[0] in ("examples",), rel


def _stages() -> list[list[str]]:
    """The Dockerfile's instructions, split into stages (comments and continuations joined)."""
    text = (REPO / "Dockerfile").read_text()
    lines = [
        line for line in text.replace("\\\n", " ").splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    stages: list[list[str]] = []
    for line in lines:
        if line.startswith("FROM "):
            stages.append([])
        stages[-1].append(line)
    return stages


def test_the_image_is_small_and_unprivileged() -> None:
    stages = _stages()
    assert len(stages) >= 2, "multi-stage: the build tools and caches stay out of the image"
    final = stages[-1]
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the server runs as an unprivileged user"
    text = "\n".join(final)
    for tool in ("gcc", "build-essential", "g++", "make ", "pip install"):
        assert tool not in text, f"the final stage installs nothing ({tool!r})"
    assert any(line.startswith("COPY --from=") for line in final)
    build = "\n".join(stages[0])
    assert "-c constraints.txt" in build, "the image installs the tested versions"
    assert re.search(r"FROM python:3\.\d+-slim", build)


def test_the_load_generators_token_verifies_against_the_served_key_set() -> None:
    """fortio-jwt sends deploy/jwt/demo.jwt; the upstream serves deploy/jwt/jwks.json where the
    sample RequestAuthentication's jwksUri points; the token verifies against the key set fetched
    from a real sample upstream, with the issuer and audience that RequestAuthentication names,
    and stays valid for years."""
    import time

    import jwt

    from extproc.snapshot import loader
    from tests.fixtures.procs import VENV_BIN, Proc, free_port, http_get, wait_until

    services = _services()
    token = (REPO / "deploy" / "jwt" / "demo.jwt").read_text().strip()
    assert f"-H=Authorization: Bearer {token}" in services["fortio-jwt"]["command"]
    upstream = services["upstream"]
    served = upstream["entrypoint"][upstream["entrypoint"].index("--jwks") + 1]
    assert f"./deploy/jwt/jwks.json:{served}:ro" in upstream["volumes"]

    (ra,) = loader.load([REPO / "examples" / "policies"]).request_authentications
    (rule,) = ra.policy.spec.jwt_rules
    assert rule.jwks_uri == "http://127.0.0.1:8080/.well-known/jwks.json"
    port = free_port()
    log = Path(f"/tmp/compose-upstream-{port}.log")
    argv = [str(VENV_BIN / "python"), "-m", "extproc.sample_upstream", "--port", str(port)]
    proc = Proc("upstream", [*argv, "--jwks", str(REPO / "deploy" / "jwt" / "jwks.json")], log)
    try:
        url = f"http://127.0.0.1:{port}/.well-known/jwks.json"
        wait_until(lambda: http_get(url)[0] == 200, 20, "the sample upstream's key set")
        key = jwt.PyJWKClient(url).get_signing_key_from_jwt(token)
        claims = jwt.decode(token, key.key, algorithms=["ES256"], audience=rule.audiences, issuer=rule.issuer)
    finally:
        proc.terminate()
        log.unlink(missing_ok=True)
    assert claims["sub"] == "fortio"
    assert claims["exp"] > time.time() + 5 * 365 * 86400
