"""Path normalization, with a real Envoy 1.40 as the oracle.

1. The canonicalizer: every spelling (the advisories' list and seeded random ones) goes through
   an Envoy whose HTTP connection manager normalizes as each Istio mode configures it; the path
   Envoy hands its filters must be exactly extproc's `normalize(path, mode)`, and a path Envoy
   rejects (400) must be one extproc refuses (None).
2. The policies: for each mode, a DENY on /admin* and an ALLOW list, decided
     natively: Envoy normalizing as the mode says, with Envoy's RBAC built as istiod builds it;
     by extproc behind an Envoy that does no normalization at all, with --path-normalization;
   must agree on every spelling (an Envoy 400 counts as extproc's malformed denial), in both
   transports. So no spelling gets past a DENY, or into an ALLOW list, that Istio's own filters
   would have stopped, even when the operator forgot to configure Envoy. The unnormalized
   paths are counted, one per request that needed it.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import yaml

from extproc.config.models import AuthorizationPolicy
from extproc.path_normalization import Mode, normalize
from reference.envoy_rbac import rbac_filters
from tests.e2e.conftest import MODES
from tests.fixtures import envoy_config as ec
from tests.fixtures.path_spellings import ADMIN_SPELLINGS, generated
from tests.fixtures.procs import free_port
from tests.fixtures.stack import ExtprocProcess

pytestmark = pytest.mark.e2e

# The HttpConnectionManager fields Istio sets for each meshConfig.pathNormalization.
HCM = {
    Mode.NONE: {"normalize_path": False},
    Mode.BASE: {"normalize_path": True},
    Mode.MERGE_SLASHES: {"normalize_path": True, "merge_slashes": True},
    Mode.DECODE_AND_MERGE_SLASHES: {
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "UNESCAPE_AND_FORWARD",
    },
}
NORMALIZING = (Mode.BASE, Mode.MERGE_SLASHES, Mode.DECODE_AND_MERGE_SLASHES)
# Allowed requests are answered by Envoy itself, so no upstream's own path handling takes part.
ANSWER = {
    "route_config": {
        "virtual_hosts": [
            {
                "name": "all",
                "domains": ["*"],
                "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200}}],
            }
        ]
    }
}


def distinct_port(taken: set[int]) -> int:
    """A free port not yet handed out in this test (free_port alone may repeat one)."""
    while (port := free_port()) in taken:
        pass
    taken.add(port)
    return port


def raw_get(port: int, path: str, marker: str = "") -> int:
    """Send `path` byte for byte (HTTP clients would normalize it) and return the status."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: app\r\nx-marker: {marker}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1])


def test_extproc_normalizes_every_spelling_exactly_as_envoy_does(tmp_path: Path) -> None:
    paths = [*ADMIN_SPELLINGS, *generated(1500)]
    taken: set[int] = set()
    ports = {m: distinct_port(taken) for m in Mode}
    listeners = []
    for mode, fields in HCM.items():
        hcm = {**fields, **ANSWER}
        listeners.append(
            ec.HttpListener(
                mode.value,
                ports[mode],
                [],
                access_log_path=tmp_path / f"{mode.value}.log",
                access_log_format="%REQ(X-MARKER)%\t%REQ(:PATH)%",
                hcm=hcm,
            )
        )
    admin = distinct_port(taken)
    envoy = ec.EnvoyProcess(ec.bootstrap(admin, listeners, []), tmp_path, admin)
    try:
        envoy.wait_ready()
        statuses = {(m, i): raw_get(ports[m], p, str(i)) for m in Mode for i, p in enumerate(paths)}
        seen: dict[Mode, dict[int, str]] = {m: {} for m in Mode}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for m in Mode:
                for line in (tmp_path / f"{m.value}.log").read_text().splitlines():
                    marker, _, path = line.partition("\t")
                    if marker.isdigit():
                        seen[m][int(marker)] = path
            if all(len(seen[m]) == len(paths) for m in Mode):
                break
            time.sleep(0.1)
    finally:
        envoy.stop()
    wrong = []
    for m in Mode:
        for i, p in enumerate(paths):
            envoy_says = None if statuses[(m, i)] == 400 else seen[m].get(i)
            if statuses[(m, i)] not in (200, 400) or normalize(p, m) != envoy_says:
                wrong.append((m.value, p, statuses[(m, i)], envoy_says, normalize(p, m)))
    assert not wrong, wrong[:20]
    # The corpus exercises every kind of change, in every mode.
    for m in NORMALIZING:
        changed = [p for p in paths if normalize(p, m) not in (p, None)]
        assert len(changed) > len(paths) // 3
        assert any(normalize(p, m) is None for p in paths)


def policies(kind: str) -> str:
    """A DENY on /admin* (prefix, as Istio's docs advise), or an ALLOW list."""
    action, paths = ("DENY", "['/admin*']") if kind == "deny" else ("ALLOW", "['/public/*', '/ok', '/ok/*']")
    return (
        "apiVersion: security.istio.io/v1\n"
        "kind: AuthorizationPolicy\n"
        "metadata: {name: paths, namespace: foo}\n"
        f"spec:\n  action: {action}\n  rules:\n  - to:\n    - operation: {{paths: {paths}}}\n"
    )


@pytest.mark.parametrize("transport", MODES)
@pytest.mark.parametrize("kind", ["deny", "allow"])
def test_no_spelling_gets_past_a_policy_that_envoys_rbac_would_apply(kind: str, transport: str, tmp_path: Path) -> None:
    text = policies(kind)
    config = tmp_path / "config"
    config.mkdir()
    (config / "policy.yaml").write_text(text)
    policy = AuthorizationPolicy.model_validate(yaml.safe_load(text))
    paths = [*ADMIN_SPELLINGS, *generated(150, seed=len(kind))]

    extprocs = {
        m: ExtprocProcess(
            [config],
            tmp_path,
            name=f"extproc-{m.value}",
            extra_args=["--path-normalization", m.value],
            http=transport == "authz-http",
        )
        for m in NORMALIZING
    }
    listeners: list[ec.HttpListener] = []
    clusters = []
    taken = {p for x in extprocs.values() for p in (x.grpc_port, x.admin_port, x.http_port) if p is not None}
    native_ports, ours_ports = {}, {}
    for m in NORMALIZING:
        native_ports[m], ours_ports[m] = distinct_port(taken), distinct_port(taken)
        native = rbac_filters([policy], for_tcp=False)
        listeners.append(ec.HttpListener(f"native-{m.value}", native_ports[m], native, hcm={**HCM[m], **ANSWER}))
        cluster = f"extproc-{m.value}"
        if transport == "authz":
            ours = [ec.ext_authz_http(cluster)]
        elif transport == "authz-http":
            ours = ec.http_check_chain(f"{cluster}-http")
        else:
            ours = ec.ext_proc_chain(cluster, observability_mode=False)
        # Envoy itself does not normalize here: extproc's own normalization is what holds.
        listeners.append(ec.HttpListener(f"ours-{m.value}", ours_ports[m], ours, hcm={**HCM[Mode.NONE], **ANSWER}))
        clusters.append(ec.cluster(cluster, "127.0.0.1", extprocs[m].grpc_port, http2=True))
        if extprocs[m].http_port is not None:
            clusters.append(ec.cluster(f"{cluster}-http", "127.0.0.1", extprocs[m].http_port))
    admin = distinct_port(taken)
    envoy = ec.EnvoyProcess(ec.bootstrap(admin, listeners, clusters), tmp_path, admin)
    try:
        for x in extprocs.values():
            x.wait_ready()
        envoy.wait_ready()
        differ = []
        for m in NORMALIZING:
            for p in paths:
                native, ours = raw_get(native_ports[m], p), raw_get(ours_ports[m], p)
                # Envoy rejects what it cannot normalize (400); extproc denies it as malformed.
                if native != ours and not (native == 400 and ours == 403):
                    differ.append((m.value, p, native, ours))
        assert not differ, differ[:20]
        for m in NORMALIZING:
            denied = [p for p in ADMIN_SPELLINGS if raw_get(ours_ports[m], p) == 403]
            # What a plain /admin request gets, every spelling that normalizes to it gets.
            for p in ADMIN_SPELLINGS:
                n = normalize(p, m)
                if n is not None and n.split("?")[0] == "/admin":
                    assert p in denied, (m.value, p)
            # One count per request whose path Envoy should have normalized: every path went to
            # this extproc once in the differential, the spellings once more just above.
            sent = [*paths, *ADMIN_SPELLINGS]
            expected = sum(1 for p in sent if normalize(p, m) not in (p, None))
            name = f'extproc_unnormalized_paths_total{{normalization="{m.value}"}}'
            got = [float(x.split()[-1]) for x in extprocs[m].metrics().splitlines() if x.startswith(name)]
            assert got == [expected], (m.value, got, expected)
    finally:
        envoy.stop()
        for x in extprocs.values():
            x.stop()
