"""CUSTOM action, differentially: the same provider behind Istio's native translation
(a shadow RBAC filter that enables Envoy's ext_authz filter) and behind extproc. A client
must see the same status, body and headers, and the upstream the same headers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures import envoy_config as ec
from tests.fixtures.procs import Proc, free_port, http_get, wait_until
from tests.fixtures.stack import ExtprocProcess, HttpClient, Response

pytestmark = pytest.mark.e2e

T = ec.T
RULE_ID = "istio-ext-authz-ns[foo]-policy[ext]-rule[0]"


@dataclass
class Provider:
    grpc_port: int
    http_port: int
    proc: Proc

    def received(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.proc.log().splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provider]:
    tmp = tmp_path_factory.mktemp("provider")
    g, h = free_port(), free_port()
    proc = Proc(
        "provider",
        [sys.executable, "-m", "tests.fixtures.authz_provider", "--grpc-port", str(g), "--http-port", str(h)],
        tmp / "provider.log",
    )
    wait_until(lambda: proc.check_alive() is None and "ready" in proc.log(), 20, "the provider")
    yield Provider(g, h, proc)
    proc.terminate()


BODY_SETTINGS = {"max_request_bytes": 8192, "allow_partial_message": True}


def istio_custom_filters(
    kind: str, timeout: str, fail_open: bool, status_on_error: int | None, body: bool = False
) -> list[dict[str, Any]]:
    """Istio's CUSTOM translation, by hand: a shadow RBAC whose DENY policy matches /ext*, and an
    ext_authz filter enabled only when that shadow policy matched (builder.go, extauthz.go)."""
    rbac = {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": T + "envoy.extensions.filters.http.rbac.v3.RBAC",
            "shadow_rules": {
                "action": "DENY",
                "policies": {
                    RULE_ID: {
                        "permissions": [
                            {
                                "and_rules": {
                                    "rules": [{"or_rules": {"rules": [{"url_path": {"path": {"prefix": "/ext"}}}]}}]
                                }
                            }
                        ],
                        "principals": [{"and_ids": {"ids": [{"any": True}]}}],
                    }
                },
            },
            "shadow_rules_stat_prefix": "istio_ext_authz_",
        },
    }
    authz: dict[str, Any] = {
        "@type": T + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
        "transport_api_version": "V3",
        "failure_mode_allow": fail_open,
        "filter_enabled_metadata": {
            "filter": "envoy.filters.http.rbac",
            "path": [{"key": "istio_ext_authz_shadow_effective_policy_id"}],
            "value": {"string_match": {"prefix": "istio-ext-authz"}},
        },
    }
    if status_on_error is not None:
        authz["status_on_error"] = {"code": status_on_error}
    if body:
        authz["with_request_body"] = BODY_SETTINGS
    if kind == "grpc":
        authz["grpc_service"] = {
            "envoy_grpc": {"cluster_name": "provider-grpc", "authority": "provider"},
            "timeout": timeout,
        }
    else:
        authz["http_service"] = {
            "server_uri": {"uri": "http://provider", "cluster": "provider-http", "timeout": timeout},
            "path_prefix": "/check",
            "authorization_request": {"headers_to_add": [{"key": "x-added-by-mesh", "value": "yes"}]},
            "authorization_response": {
                "allowed_upstream_headers": {"patterns": [{"exact": "x-ext-authz-check-result", "ignore_case": True}]},
                "allowed_client_headers": {"patterns": [{"exact": "x-ext-authz-check-result", "ignore_case": True}]},
                "allowed_client_headers_on_success": {
                    "patterns": [{"exact": "x-ext-authz-response", "ignore_case": True}]
                },
            },
        }
        authz["allowed_headers"] = {"patterns": [{"prefix": "x-ext-authz", "ignore_case": True}]}
    return [rbac, {"name": "envoy.filters.http.ext_authz", "typed_config": authz}]


def mesh_config(
    kind: str,
    provider: Provider,
    timeout: str,
    fail_open: bool,
    status_on_error: int | None,
    body: bool = False,
    service: str = "127.0.0.1",
) -> str:
    extra = f", failOpen: {str(fail_open).lower()}"
    if body:
        extra += ", includeRequestBodyInCheck: {maxRequestBytes: 8192, allowPartialMessage: true}"
    if status_on_error is not None:
        extra += f", statusOnError: '{status_on_error}'"
    if kind == "grpc":
        provider_yaml = (
            f"envoyExtAuthzGrpc: {{service: {service}, port: {provider.grpc_port}, timeout: {timeout}{extra}}}"
        )
    else:
        provider_yaml = (
            f"envoyExtAuthzHttp: {{service: {service}, port: {provider.http_port}, timeout: {timeout}{extra}, "
            "pathPrefix: /check, includeRequestHeadersInCheck: ['x-ext-authz*'], "
            "includeAdditionalHeadersInCheck: {x-added-by-mesh: 'yes'}, "
            "headersToUpstreamOnAllow: [x-ext-authz-check-result], headersToDownstreamOnDeny: [x-ext-authz-check-result], "
            "headersToDownstreamOnAllow: [x-ext-authz-response]}"
        )
    return (
        "apiVersion: extproc.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec:\n"
        f"  extensionProviders:\n  - {{name: ext, {provider_yaml}}}\n---\n"
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ext, namespace: foo}\n"
        "spec:\n  action: CUSTOM\n  provider: {name: ext}\n  rules:\n  - to: [{operation: {paths: ['/ext*']}}]\n"
    )


@dataclass
class Pair:
    native: int
    extproc: int  # ext_authz pointed at extproc (`authz+als` mode)
    ext_proc: int  # ext_proc pointed at extproc (`extproc` mode); no request body in this mode
    http_check: int  # ext_authz over HTTP pointed at extproc (`authz-http` mode)

    @property
    def ours(self) -> tuple[int, int, int]:
        return (self.extproc, self.http_check, self.ext_proc)


def start_pair(
    tmp: Path,
    start_envoy: Any,
    provider: Provider,
    upstream: int,
    kind: str,
    *,
    timeout: str = "2s",
    fail_open: bool = False,
    status_on_error: int | None = None,
    body: bool = False,
    service: str = "127.0.0.1",
    launcher: list[str] | None = None,
) -> tuple[Pair, ExtprocProcess]:
    cfg = tmp / f"cfg-{kind}"
    cfg.mkdir()
    (cfg / "p.yaml").write_text(mesh_config(kind, provider, timeout, fail_open, status_on_error, body, service))
    x = ExtprocProcess([cfg], tmp, name=f"extproc-{kind}", launcher=launcher, http=True)
    x.wait_ready()
    native, via, via_proc, via_http, admin = (free_port() for _ in range(5))
    listeners: list[Any] = [
        ec.HttpListener("native", native, istio_custom_filters(kind, timeout, fail_open, status_on_error, body)),
        ec.HttpListener("extproc", via, [ec.ext_authz_http(**({"with_request_body": BODY_SETTINGS} if body else {}))]),
        # extproc waits for the provider itself: Envoy must wait longer than the provider timeout.
        ec.HttpListener("ext_proc", via_proc, ec.ext_proc_chain(message_timeout="10s")),
        # The provider's response header for the client on allow is listed, as the README says
        # for headersToDownstreamOnAllow.
        ec.HttpListener(
            "http_check",
            via_http,
            ec.http_check_chain(
                timeout="10s",
                client_headers_on_success=("x-ext-authz-response",),
                # A provider's statusOnError reaches the client as the filter's status_on_error.
                **({"status_on_error": {"code": status_on_error}} if status_on_error else {}),
                **({"with_request_body": BODY_SETTINGS} if body else {}),
            ),
        ),
    ]
    clusters = [
        ec.cluster("upstream", "127.0.0.1", upstream),
        *x.clusters(),
        ec.cluster("provider-grpc", "127.0.0.1", provider.grpc_port, http2=True),
        ec.cluster("provider-http", "127.0.0.1", provider.http_port),
    ]
    # extproc waits for the provider itself, so give the outer call more room than the provider timeout
    listeners[1].filters[0]["typed_config"]["grpc_service"]["timeout"] = "10s"
    start_envoy(ec.bootstrap(admin, listeners, clusters), admin, name=f"envoy-{kind}")
    return Pair(native, via, via_proc, via_http), x


CLIENT_HEADERS = ("x-ext-authz-check-result", "x-ext-authz-response", "x-ext-authz-extra", "content-type")
UPSTREAM_HEADERS = ("x-ext-authz-check-result", "x-ext-authz", "x-added-by-mesh", "x-not-forwarded")

CASES = [
    ("/ext/allowed", {"x-ext-authz": "allow"}),
    ("/ext/denied", {"x-ext-authz": "deny"}),
    ("/ext/no-header", {}),
    ("/ext/error", {"x-ext-authz": "error"}),
    ("/ext/slow", {"x-ext-authz": "allow", "x-ext-authz-delay": "3"}),
    ("/not-custom", {"x-ext-authz": "deny"}),
    ("/ext/q?a=1&b=2", {"x-ext-authz": "allow", "authorization": "Bearer abc", "x-other": "1"}),
]


def observe(r: Response) -> dict[str, Any]:
    out: dict[str, Any] = {"status": r.status, "headers": {h: r.headers.get(h) for h in CLIENT_HEADERS}}
    if r.status == 200:
        seen = r.json()["headers"]
        out["upstream"] = {h: seen.get(h) for h in UPSTREAM_HEADERS}
    else:
        out["body"] = r.body
    return out


@pytest.mark.parametrize(
    ("kind", "fail_open", "status_on_error"),
    [("grpc", False, None), ("grpc", True, None), ("http", False, 503), ("http", True, None)],
)
def test_custom_matches_envoys_own_ext_authz(
    tmp_path: Path,
    start_envoy: Any,
    provider: Provider,
    upstream: int,
    kind: str,
    fail_open: bool,
    status_on_error: int | None,
) -> None:
    pair, x = start_pair(
        tmp_path, start_envoy, provider, upstream, kind, fail_open=fail_open, status_on_error=status_on_error
    )
    try:
        for path, headers in CASES:
            native = observe(HttpClient(pair.native).get(path, headers))
            ours = observe(HttpClient(pair.extproc).get(path, headers))
            assert ours == native, (path, headers)
            assert observe(HttpClient(pair.ext_proc).get(path, headers)) == native, ("ext_proc", path, headers)
            assert observe(HttpClient(pair.http_check).get(path, headers)) == native, ("authz-http", path, headers)
        # the provider saw the same request from both (HTTP: method, path, the headers it is allowed to see)
        if kind == "http":
            calls = [c for c in provider.received() if c["kind"] == "http" and c["path"].startswith("/check/ext/q")]
            native_call, our_call, proc_call, http_call = calls[-4], calls[-3], calls[-2], calls[-1]
            assert proc_call["path"] == native_call["path"] and proc_call["method"] == native_call["method"]
            assert our_call["method"] == native_call["method"] == "GET"
            assert our_call["path"] == native_call["path"] == "/check/ext/q?a=1&b=2"
            # Envoy's async client adds x-envoy-internal and its router x-envoy-expected-rq-timeout-ms
            # (2000 here): both compared. Still left out, as before: x-forwarded-for (Envoy appends its
            # own local address, which extproc cannot know), x-request-id and x-forwarded-proto.
            ignore = {"x-request-id", "x-forwarded-proto", "x-forwarded-for"}
            assert native_call["headers"]["x-envoy-internal"] == "true"
            assert native_call["headers"]["x-envoy-expected-rq-timeout-ms"] == "2000"

            def stable(h: dict[str, str]) -> dict[str, str]:
                out = {k: v for k, v in h.items() if k not in ignore}
                out["host"] = out["host"].rsplit(":", 1)[0]  # the two listeners have different ports
                return out

            assert stable(our_call["headers"]) == stable(native_call["headers"])
            assert stable(proc_call["headers"]) == stable(native_call["headers"])
            assert stable(http_call["headers"]) == stable(native_call["headers"])
            assert http_call["path"] == native_call["path"] and http_call["method"] == native_call["method"]
    finally:
        x.stop()


def test_custom_grpc_provider_decides_tcp_connections(
    tmp_path: Path, start_envoy: Any, provider: Provider, upstream: int, pki: dict[str, Any]
) -> None:
    """Network ext_authz: a CUSTOM gRPC provider sees the TCP check (here it allows by SNI)."""
    from tests.fixtures.stack import tcp_roundtrip

    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "p.yaml").write_text(
        mesh_config("grpc", provider, "2s", False, None).replace(
            "rules:\n  - to: [{operation: {paths: ['/ext*']}}]", "rules: [{}]"
        )
    )
    x = ExtprocProcess([cfg], tmp_path)
    x.wait_ready()
    try:
        port, admin = free_port(), free_port()
        server = pki["server"]
        tls = ec.Tls(server.cert_path, server.key_path, pki["ca"].cert_path)
        start_envoy(
            ec.bootstrap(
                admin,
                [ec.TcpListener("tcp", port, [ec.ext_authz_network()], tls=tls)],
                [
                    ec.cluster("upstream", "127.0.0.1", upstream),
                    ec.cluster("extproc", "127.0.0.1", x.grpc_port, http2=True),
                ],
            ),
            admin,
        )
        payload = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        ca = pki["ca"].cert_path
        assert tcp_roundtrip(port, payload, ca=ca, server_name="allow.example") is not None
        assert tcp_roundtrip(port, payload, ca=ca, server_name="deny.example") is None
        assert any(c["kind"] == "grpc" and c["is_http"] is False for c in provider.received())
    finally:
        x.stop()


# --- a provider named the Istio way, `namespace/hostname` -------------------------------------

PROVIDER_HOST = "my-custom-ext-authz.foo.svc.cluster.local"


def hosts_launcher(tmp: Path) -> list[str]:
    """A command that runs extproc in a mount namespace whose /etc/hosts maps PROVIDER_HOST to
    127.0.0.1, so the provider's name resolves as a Kubernetes service name does in a pod."""
    hosts = tmp / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n127.0.0.1 {PROVIDER_HOST}\n")
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("needs unshare(1) to give extproc its own /etc/hosts")
    launcher = [unshare, "--map-root-user", "--mount", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"']
    launcher.append(str(hosts))
    probe = subprocess.run([*launcher, "getent", "ahostsv4", PROVIDER_HOST], capture_output=True, timeout=10)
    if probe.returncode != 0 or b"127.0.0.1" not in probe.stdout:
        pytest.skip(f"unprivileged user and mount namespaces unavailable: {probe.stderr.decode()[-200:]}")
    return launcher


@pytest.mark.parametrize("kind", ["grpc", "http"])
def test_provider_named_namespace_slash_host_is_called(
    tmp_path: Path, start_envoy: Any, provider: Provider, upstream: int, kind: str
) -> None:
    """`foo/my-custom-ext-authz.foo.svc.cluster.local`: extproc dials the host, as istiod resolves
    it, so the provider's denial and its added headers reach the client as through Envoy's filter."""
    launcher = hosts_launcher(tmp_path)
    pair, x = start_pair(
        tmp_path, start_envoy, provider, upstream, kind, service=f"foo/{PROVIDER_HOST}", launcher=launcher
    )
    try:
        cases = [CASES[0], CASES[1], CASES[5]]  # allowed, denied, not matched by the CUSTOM rule
        native = [observe(HttpClient(pair.native).get(path, headers)) for path, headers in cases]
        before = len(provider.received())
        for port in pair.ours:
            assert [observe(HttpClient(port).get(path, headers)) for path, headers in cases] == native, port
        assert len(provider.received()) - before == 6  # two CUSTOM requests on each listener
        allowed, denied, _ = native
        assert allowed["status"] == 200 and allowed["upstream"]["x-ext-authz-check-result"] == "allowed"
        assert denied["status"] == 403 and denied["headers"]["x-ext-authz-check-result"] == "denied"
        assert denied["body"].decode().startswith("denied by ext_authz")
    finally:
        x.stop()


def test_invalid_provider_denies_its_custom_rules_and_serves_the_rest(
    tmp_path: Path, start_envoy: Any, upstream: int
) -> None:
    """A port of 999999: istiod replaces the CUSTOM filter pair with an RBAC filter denying what
    the CUSTOM rules match (`...-deny-due-to-bad-CUSTOM-action`); the other policies still apply."""
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "p.yaml").write_text(
        "apiVersion: extproc.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec:\n  extensionProviders:\n"
        "  - {name: ext, envoyExtAuthzHttp: {service: 127.0.0.1, port: 999999}}\n---\n"
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ext, namespace: foo}\n"
        "spec:\n  action: CUSTOM\n  provider: {name: ext}\n  rules:\n  - to: [{operation: {paths: ['/ext*']}}]\n---\n"
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny, namespace: foo}\n"
        "spec:\n  action: DENY\n  rules:\n  - to: [{operation: {paths: ['/deny']}}]\n"
    )
    x = ExtprocProcess([cfg], tmp_path, http=True)
    x.wait_ready()  # the configuration loads

    def deny_rbac(policy: str, prefix: str) -> dict[str, Any]:
        permission = {"and_rules": {"rules": [{"or_rules": {"rules": [{"url_path": {"path": {"prefix": prefix}}}]}}]}}
        return {
            "name": "envoy.filters.http.rbac",
            "typed_config": {
                "@type": T + "envoy.extensions.filters.http.rbac.v3.RBAC",
                "rules": {
                    "action": "DENY",
                    "policies": {policy: {"permissions": [permission], "principals": [{"any": True}]}},
                },
            },
        }

    try:
        native, via, via_proc, via_http, admin = (free_port() for _ in range(5))
        istio = [
            deny_rbac(RULE_ID + "-deny-due-to-bad-CUSTOM-action", "/ext"),
            deny_rbac("ns[foo]-policy[deny]-rule[0]", "/deny"),
        ]
        listeners: list[Any] = [
            ec.HttpListener("native", native, istio),
            ec.HttpListener("extproc", via, [ec.ext_authz_http()]),
            ec.HttpListener("ext_proc", via_proc, ec.ext_proc_chain()),
            ec.HttpListener("http_check", via_http, ec.http_check_chain()),
        ]
        clusters = [ec.cluster("upstream", "127.0.0.1", upstream), *x.clusters()]
        start_envoy(ec.bootstrap(admin, listeners, clusters), admin)
        for path in ("/ext/a", "/deny", "/ok"):
            want = HttpClient(native).get(path, {})
            assert want.status == (200 if path == "/ok" else 403), path
            for port in (via, via_proc, via_http):
                got = HttpClient(port).get(path, {})
                assert (got.status, got.body if got.status != 200 else b"") == (
                    want.status,
                    want.body if want.status != 200 else b"",
                ), (port, path)
        # said loudly: a warning naming the field on /readyz, the entry on /debug/config, an error in the log
        warnings = x.readyz()["last_reload"]["warnings"]
        assert any("spec.extensionProviders[0].envoyExtAuthzHttp.port" in w for w in warnings), warnings
        debug = json.loads(http_get(f"http://127.0.0.1:{x.admin_port}/debug/config")[1])
        assert list(debug["invalid_providers"]) == ["ext"] and "ext" not in debug["providers"]
        assert "extension provider 'ext' is invalid" in x.proc.log()
    finally:
        x.stop()
