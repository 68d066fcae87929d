"""Extension providers as istiod reads them: how `service` names the authorizer, what an
invalid entry does (its CUSTOM rules deny what they match, everything else is served), and
the headers Envoy's own HTTP ext_authz client adds to each call."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from envoy.service.auth.v3 import external_auth_pb2

from extproc.authz import engine
from extproc.config.providers import GrpcProviderSettings, HttpProviderSettings, resolve_service
from extproc.services.custom import ProviderPool, timeout_ms
from extproc.snapshot import loader
from extproc.snapshot.compiled import Options, WorkloadIdentity
from extproc.snapshot.reload import SnapshotHolder
from tests.unit.helpers import decide, http_request, policy, snapshot_from_yaml, tcp_connection

MESH_HEAD = "apiVersion: extproc.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec:\n  extensionProviders:\n"
BAD_SUFFIX = "-deny-due-to-bad-CUSTOM-action"

# --- `service`: istiod's validateExtensionProviderService, then model.LookupCluster -------------


@pytest.mark.parametrize(
    ("service", "host"),
    [
        # namespace/hostname: the form the Istio docs use; the host is what is dialled
        ("foo/my-custom-ext-authz.foo.svc.cluster.local", "my-custom-ext-authz.foo.svc.cluster.local"),
        ("foo/authz.example.com", "authz.example.com"),
        ("istio-system/opa.istio-system.svc.cluster.local", "opa.istio-system.svc.cluster.local"),
        ("foo/authz.foo.svc.corp.internal", "authz.foo.svc.corp.internal"),  # another cluster domain
        # a hostname alone (unique in the registry), short or fully qualified
        ("my-custom-ext-authz.foo.svc.cluster.local", "my-custom-ext-authz.foo.svc.cluster.local"),
        ("authz", "authz"),
        ("localhost", "localhost"),
        ("istio.io.", "istio.io."),  # a trailing dot is a valid FQDN
        ("x.99999999999999999999", "x.99999999999999999999"),  # Go's Atoi overflows: not "all-numeric"
        # an IP address, only without a namespace
        ("127.0.0.1", "127.0.0.1"),
        ("::1", "::1"),
    ],
)
def test_service_names_istiod_resolves(service: str, host: str) -> None:
    assert resolve_service(service) == (host, [])


@pytest.mark.parametrize(
    ("service", "problem"),
    [
        ("", "service must not be empty"),
        # the port is its own field: `host:port` is neither a hostname nor an IP
        ("authz.foo.svc.cluster.local:9000", "invalid service fmt"),
        ("127.0.0.1:9000", "invalid service fmt"),
        ("foo/authz.foo.svc.cluster.local:9000", "label 'local:9000' invalid"),
        ("authz_1.example", "invalid service fmt"),
        ("authz.123", "invalid service fmt"),  # all-numeric top-level label
        ("http://authz.example", "invalid namespace value 'http:'"),  # split at the first `/`
        # namespace/hostname: a FQDN, a DNS-label namespace, both present
        ("foo/my-custom-ext-authz", "short names (non FQDN) are not allowed"),
        ("foo/", "cannot be empty"),
        ("/authz.example", "cannot be empty"),
        ("Foo_Bar/authz.example", "invalid namespace value 'Foo_Bar'"),
        ("foo/10.0.0.1", "cannot be all-numeric"),  # an IP is not a hostname here
        ("foo/a*.example.com", "partial wildcard"),
        ("a/b/c.example", "label 'b/c' invalid"),
        # valid syntax that names no registry entry
        ("*/authz.foo.svc.cluster.local", "could not find service"),
        ("./authz.foo.svc.cluster.local", "could not find service"),
        ("~foo/authz.foo.svc.cluster.local", "could not find service"),
        ("foo/*.example.com", "could not find service"),
        ("foo/*", "could not find service"),
        ("bar/authz.foo.svc.cluster.local", "is in namespace 'foo', not 'bar'"),
    ],
)
def test_service_names_istiod_cannot_use(service: str, problem: str) -> None:
    host, problems = resolve_service(service)
    assert host == "" and any(problem in p for p in problems), problems


def test_namespaced_service_is_dialled_by_its_host(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text(
        MESH_HEAD
        + "  - {name: g, envoyExtAuthzGrpc: {service: foo/authz.foo.svc.cluster.local, port: 9000}}\n"
        + "  - {name: h, envoyExtAuthzHttp: {service: foo/authz.foo.svc.cluster.local, port: 8000}}\n"
        + "  - {name: v6, envoyExtAuthzGrpc: {service: '::1', port: 9000}}\n"
    )
    loaded = loader.load([tmp_path])
    g, h, v6 = loaded.providers["g"], loaded.providers["h"], loaded.providers["v6"]
    assert isinstance(g, GrpcProviderSettings) and isinstance(h, HttpProviderSettings)
    assert g.target == "authz.foo.svc.cluster.local:9000"
    assert h.base_url == "http://authz.foo.svc.cluster.local:8000"
    assert isinstance(v6, GrpcProviderSettings) and v6.target == "[::1]:9000"
    assert not loaded.invalid_providers and not loaded.warnings


# --- an invalid entry: istiod warns and denies its CUSTOM rules; the rest loads ----------------


@pytest.mark.parametrize(
    ("entry", "field", "message"),
    [
        ("{name: p, envoyExtAuthzHttp: {service: a.b, port: 999999}}", "envoyExtAuthzHttp.port", "range [1, 65535]"),
        ("{name: p, envoyExtAuthzGrpc: {service: a.b, port: 0}}", "envoyExtAuthzGrpc.port", "range [1, 65535]"),
        (
            "{name: p, envoyExtAuthzGrpc: {service: a.b, port: 1, statusOnError: '999'}}",
            "envoyExtAuthzGrpc.statusOnError",
            "unsupported statusOnError",
        ),
        (
            "{name: p, envoyExtAuthzHttp: {service: a.b, port: 1, pathPrefix: check}}",
            "envoyExtAuthzHttp.pathPrefix",
            "pathPrefix must begin with `/`",
        ),
        (
            "{name: p, envoyExtAuthzHttp: {service: a.b, port: 1, headersToUpstreamOnAllow: [x-a, '*']}}",
            "envoyExtAuthzHttp.headersToUpstreamOnAllow[1]",
            "single wildcard",
        ),
        (
            "{name: p, envoyExtAuthzGrpc: {service: 'a.b:9000', port: 9000}}",
            "envoyExtAuthzGrpc.service",
            "invalid service fmt",
        ),
        (
            "{name: p, envoyExtAuthzHttp: {service: foo/authz, port: 1}}",
            "envoyExtAuthzHttp.service",
            "short names",
        ),
        ("{name: P_1, envoyExtAuthzGrpc: {service: a.b, port: 1}}", "name", "invalid character"),
    ],
)
def test_invalid_provider_loads_with_a_warning_naming_file_line_and_field(
    tmp_path: Path, entry: str, field: str, message: str
) -> None:
    (tmp_path / "mesh.yaml").write_text(
        MESH_HEAD + "  - {name: ok, envoyExtAuthzGrpc: {service: a.b, port: 1}}\n" + f"  - {entry}\n"
    )
    loaded = loader.load([tmp_path])  # no ConfigError: one bad entry does not stop the load
    assert "ok" in loaded.providers
    [bad] = loaded.invalid_providers.values()
    assert bad.name not in loaded.providers
    assert any(p.startswith(f"{field}: ") and message in p for p in bad.problems), bad.problems
    [warning] = [w.render() for w in loaded.warnings]
    assert warning.startswith(
        f"{tmp_path}/mesh.yaml: document 1, line 7: warning: spec.extensionProviders[1].{field}: "
    )
    assert message in warning and "CUSTOM rules naming it deny the requests they match" in warning


def test_a_repeated_provider_name_makes_the_name_unusable(tmp_path: Path) -> None:
    """istiod keeps the last entry of a name, with the duplicate error attached."""
    (tmp_path / "mesh.yaml").write_text(
        MESH_HEAD
        + "  - {name: g, envoyExtAuthzGrpc: {service: a.b, port: 1}}\n"
        + "  - {name: g, envoyExtAuthzHttp: {service: a.b, port: 2}}\n"
    )
    loaded = loader.load([tmp_path])
    assert "g" not in loaded.providers
    assert any("must be unique" in p for p in loaded.invalid_providers["g"].problems)


def test_a_tracing_provider_of_the_same_name_is_no_duplicate(tmp_path: Path) -> None:
    """istiod's authz builder indexes ext_authz entries only."""
    (tmp_path / "mesh.yaml").write_text(
        MESH_HEAD
        + "  - {name: g, zipkin: {service: zipkin.istio-system.svc.cluster.local, port: 9411}}\n"
        + "  - {name: g, envoyExtAuthzGrpc: {service: a.b, port: 1}}\n"
    )
    loaded = loader.load([tmp_path])
    assert "g" in loaded.providers and not loaded.invalid_providers


MIXED = (
    MESH_HEAD
    + "  - {name: good, envoyExtAuthzGrpc: {service: authz.foo.svc.cluster.local, port: 9000}}\n"
    + "  - {name: broken, envoyExtAuthzHttp: {service: foo/authz.foo.svc.cluster.local, port: 999999}}\n"
    + "---\n"
)


def test_invalid_provider_denies_what_its_custom_rules_match_and_serves_the_rest(tmp_path: Path) -> None:
    text = (
        MIXED
        + policy("ext", "action: CUSTOM\nprovider: {name: broken}\nrules:\n- to: [{operation: {paths: ['/ext*']}}]")
        + policy("deny", "action: DENY\nrules:\n- to: [{operation: {paths: ['/deny']}}]")
        + policy("allow", "action: ALLOW\nrules:\n- to: [{operation: {paths: ['/ext/*', '/ok']}}]")
    )
    snap = snapshot_from_yaml(tmp_path, text)
    d = decide(snap, http_request("/ext/a"))
    assert not d.allowed and d.stage == "custom"
    assert d.policy_id == "ns[foo]-policy[ext]-rule[0]" + BAD_SUFFIX
    assert "provider 'broken' is invalid" in d.reason and "envoyExtAuthzHttp.port" in d.reason
    assert decide(snap, http_request("/ok")).allowed  # the ALLOW policy is served
    d = decide(snap, http_request("/deny"))
    assert not d.allowed and d.stage == "deny"  # so is the DENY policy
    assert not decide(snap, http_request("/elsewhere")).allowed  # and ALLOW's "no match"
    assert set(snap.invalid_providers) == {"broken"} and set(snap.providers) == {"good"}


def test_invalid_http_provider_denies_on_tcp_too(tmp_path: Path) -> None:
    """istiod's TCP builder fails on the bad provider before it skips HTTP providers."""
    snap = snapshot_from_yaml(tmp_path, MIXED + policy("ext", "action: CUSTOM\nprovider: {name: broken}\nrules: [{}]"))
    d = decide(snap, tcp_connection())
    assert not d.allowed and d.policy_id == "ns[foo]-policy[ext]-rule[0]" + BAD_SUFFIX


def test_invalid_provider_does_not_stop_a_valid_one(tmp_path: Path) -> None:
    text = (
        MIXED
        + policy("a", "action: CUSTOM\nprovider: {name: good}\nrules:\n- to: [{operation: {paths: ['/good']}}]")
        + policy("b", "action: CUSTOM\nprovider: {name: broken}\nrules:\n- to: [{operation: {paths: ['/bad']}}]")
    )
    snap = snapshot_from_yaml(tmp_path, text, options=Options(multiple_custom_providers=True))
    assert engine.custom_providers(snap.http, http_request("/good")) == ([("good", "ns[foo]-policy[a]-rule[0]")], None)
    _, bad = engine.custom_providers(snap.http, http_request("/bad"))
    assert bad is not None and bad.rule_id == "ns[foo]-policy[b]-rule[0]"
    assert engine.custom_providers(snap.http, http_request("/other")) == ([], None)


def test_invalid_provider_is_reported_loudly_on_load(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "p.yaml").write_text(MIXED + policy("ext", "action: CUSTOM\nprovider: {name: broken}\nrules: [{}]"))
    with caplog.at_level(logging.WARNING, logger="extproc.config"):
        holder = SnapshotHolder.initial([str(tmp_path)], WorkloadIdentity("foo"), Options())
    assert holder.last.ok and any(
        "spec.extensionProviders[1].envoyExtAuthzHttp.port" in w for w in holder.last.warnings
    )
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("'broken' is invalid" in m and "port must be in the range" in m for m in errors), errors
    assert holder.current.invalid_providers["broken"].problems


# --- the HTTP call: what Envoy's async client and router add ------------------------------------


@pytest.mark.parametrize(
    ("timeout", "ms"), [("2s", 2000), ("0.58s", 580), ("1500us", 1), ("0.0005s", 0), ("1m", 60000)]
)
def test_timeout_in_whole_milliseconds_as_envoy_holds_it(timeout: str, ms: int) -> None:
    from extproc.config.providers import parse_duration

    assert timeout_ms(parse_duration(timeout)) == ms


def _call_http_provider(tmp_path: Path, settings: str, headers: dict[str, str]) -> dict[str, str]:
    """One CUSTOM call to an in-process HTTP provider; the headers it received."""
    seen: dict[str, str] = {}

    async def handler(request: web.Request) -> web.Response:
        seen.update({k.lower(): v for k, v in request.headers.items()})
        return web.Response(status=200)

    async def run() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        snap = snapshot_from_yaml(
            tmp_path,
            MESH_HEAD
            + f"  - {{name: h, envoyExtAuthzHttp: {{service: localhost, port: {port}{settings}}}}}\n---\n"
            + policy("ext", "action: CUSTOM\nprovider: {name: h}\nrules: [{}]"),
        )
        pool = ProviderPool()
        try:
            outcome = await pool.check(snap, "h", external_auth_pb2.CheckRequest(), http_request("/x", headers=headers))
            assert outcome.allowed, outcome
        finally:
            await pool.close()
            await runner.cleanup()

    asyncio.run(run())
    return seen


def test_http_provider_gets_envoys_internal_and_timeout_headers(tmp_path: Path) -> None:
    seen = _call_http_provider(tmp_path, ", timeout: 0.25s", {})
    assert seen["x-envoy-internal"] == "true"
    assert seen["x-envoy-expected-rq-timeout-ms"] == "250"


def test_http_provider_default_timeout_is_istios_600s(tmp_path: Path) -> None:
    assert _call_http_provider(tmp_path, "", {})["x-envoy-expected-rq-timeout-ms"] == "600000"


def test_envoys_headers_override_what_the_client_sent(tmp_path: Path) -> None:
    """Forwarded by includeRequestHeadersInCheck, then set again by Envoy's client and router."""
    headers: dict[str, Any] = {"x-envoy-internal": "false", "x-envoy-expected-rq-timeout-ms": "7"}
    seen = _call_http_provider(tmp_path, ", timeout: 3s, includeRequestHeadersInCheck: ['x-envoy-*']", headers)
    assert (seen["x-envoy-internal"], seen["x-envoy-expected-rq-timeout-ms"]) == ("true", "3000")
