"""Central mode (`--central`): one server, many workloads.

Which workload a Check names (context extensions) and an access log stream names (Envoy
node metadata), the per-workload snapshots built from one loaded configuration, their
bounded cache and its counters, and reloads that replace every workload's snapshot at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import wrappers_pb2
from google.rpc import code_pb2

from extproc.server.settings import SettingsError, add_serve_arguments, serve_settings
from extproc.services.accesslog import AccessLogService
from extproc.services.authz import AuthorizationService
from extproc.services.central import (
    ContextWorkloads,
    IdentityError,
    NodeWorkloads,
    context_identity,
    node_workload,
)
from extproc.services.check_adapter import CheckAdapter
from extproc.services.processor import CENTRAL_MODE_MESSAGE, CentralModeProcessor
from extproc.snapshot import loader
from extproc.snapshot.central import WorkloadSnapshots, mesh_identity, workload_key
from extproc.snapshot.compiled import Options, Snapshot
from extproc.snapshot.reload import SnapshotHolder
from extproc.telemetry import exchange as mx
from extproc.telemetry.peer import Workload, decode
from extproc.telemetry.recorder import Telemetry
from tests.fixtures.exposition import samples

POLICIES = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-a, namespace: shop}
spec:
  selector: {matchLabels: {app: a}}
  action: DENY
  rules: [{to: [{operation: {paths: ["/a-private*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: shop-wide, namespace: shop}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: ["/shop-private*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-wide, namespace: istio-system}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: ["/mesh-private*"]}}]}]
"""


def write(d: Path, text: str, name: str = "p.yaml") -> Path:
    d.mkdir(exist_ok=True)
    (d / name).write_text(textwrap.dedent(text))
    return d


def snapshots(tmp_path: Path, text: str = POLICIES, size: int = 16) -> WorkloadSnapshots:
    return WorkloadSnapshots(loader.load([write(tmp_path / "cfg", text)]), mesh_identity(), Options(), 1, size=size)


def names(snap: Snapshot) -> set[str]:
    return {f"{p.ref.namespace}/{p.ref.name}" for p in snap.policies}


# --- which workload a Check names --------------------------------------------------------


def test_context_extensions_name_the_workload() -> None:
    ident = context_identity(
        {
            "destination.namespace": "shop",
            "destination.labels": "app=cart, version=v2",
            "destination.workload.name": "cart-v2",
            "destination.service_account": "cart",
            "unrelated": "ignored",
        }
    )
    assert (ident.namespace, dict(ident.labels), ident.name, ident.service_account) == (
        "shop",
        {"app": "cart", "version": "v2"},
        "cart-v2",
        "cart",
    )
    # Only the namespace and the labels key the snapshot; label order does not matter.
    other = context_identity({"destination.namespace": "shop", "destination.labels": "version=v2,app=cart"})
    assert other.key == ident.key == workload_key("shop", {"app": "cart", "version": "v2"})
    assert context_identity({"destination.namespace": "shop"}).labels == {}


@pytest.mark.parametrize(
    ("extensions", "kind", "message"),
    [
        ({}, "workload_missing_namespace", "destination.namespace is missing"),
        ({"destination.labels": "app=a"}, "workload_missing_namespace", "destination.namespace is missing"),
        ({"destination.namespace": "Shop_1"}, "workload_bad_namespace", "not a namespace name"),
        ({"destination.namespace": "a" * 64}, "workload_bad_namespace", "not a namespace name"),
        (
            {"destination.namespace": "shop", "destination.labels": "novalue"},
            "workload_bad_labels",
            "destination.labels: expected k=v",
        ),
        (
            {"destination.namespace": "shop", "destination.labels": "app=a,=x"},
            "workload_bad_labels",
            "expected k=v",
        ),
    ],
)
def test_unusable_context_extensions_are_errors(extensions: dict[str, str], kind: str, message: str) -> None:
    with pytest.raises(IdentityError, match=message) as e:
        context_identity(extensions)
    assert e.value.kind == kind


def test_each_distinct_identity_problem_is_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ws = snapshots(tmp_path)
    checks = ContextWorkloads(lambda: ws)
    caplog.set_level(logging.WARNING, logger="extproc.central")
    for _ in range(5):
        assert isinstance(checks.resolve({"destination.labels": "app=a"}), IdentityError)
    assert isinstance(checks.resolve({"destination.namespace": "shop", "destination.labels": "bad"}), IdentityError)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings
    assert "destination.namespace is missing" in warnings[0] and "destination.labels" in warnings[1]
    assert (checks.counters.hits, checks.counters.misses) == (4, 2)


def test_context_workloads_share_snapshots_by_namespace_and_labels_but_not_the_exchange(tmp_path: Path) -> None:
    ws = snapshots(tmp_path)
    checks = ContextWorkloads(lambda: ws, trust_domain="td", cluster="east")
    first = checks.resolve(
        {
            "destination.namespace": "shop",
            "destination.labels": "app=a,version=v1",
            "destination.workload.name": "a-v1",
            "destination.service_account": "sa-a",
        }
    )
    second = checks.resolve({"destination.namespace": "shop", "destination.labels": "version=v1,app=a"})
    assert not isinstance(first, IdentityError) and not isinstance(second, IdentityError)
    assert first[0] is second[0]  # one snapshot for the workload, whatever else the sidecars say
    assert first[1].node_id == "sidecar~a-v1.shop"
    ours = decode(dict(first[1].headers)[mx.METADATA_HEADER])
    assert ours == Workload.from_labels(
        {"app": "a", "version": "v1"},
        workload_name="a-v1",
        namespace="shop",
        cluster="east",
        identity="spiffe://td/ns/shop/sa/sa-a",
    )
    assert decode(dict(second[1].headers)[mx.METADATA_HEADER]).workload_name == ""  # type: ignore[union-attr]


# --- which policies apply to which workload ----------------------------------------------


def test_policies_are_selected_per_workload(tmp_path: Path) -> None:
    ws = snapshots(tmp_path)
    a = ws.get(workload_key("shop", {"app": "a", "version": "v1"}))
    b = ws.get(workload_key("shop", {"app": "b"}))
    elsewhere = ws.get(workload_key("bar", {"app": "a"}))
    assert names(a) == {"shop/only-a", "shop/shop-wide", "istio-system/mesh-wide"}
    assert names(b) == {"shop/shop-wide", "istio-system/mesh-wide"}
    assert names(elsewhere) == {"istio-system/mesh-wide"}
    assert {w for w, _ in b.ignored_policies} == {"shop/only-a"}
    assert a.workload.namespace == "shop" and dict(a.workload.labels) == {"app": "a", "version": "v1"}
    assert a.version == b.version == 1
    # A policy compiles once per configuration, whichever workloads use it.
    assert next(p for p in a.policies if p.ref.name == "mesh-wide") is next(
        p for p in elsewhere.policies if p.ref.name == "mesh-wide"
    )


def test_the_mesh_view_holds_everything_and_allows_nothing(tmp_path: Path) -> None:
    ws = snapshots(tmp_path)
    assert names(ws.mesh) == {"shop/only-a", "shop/shop-wide", "istio-system/mesh-wide"}
    from tests.unit.helpers import allowed, http_request

    assert not allowed(ws.mesh, http_request("/anything"))  # never evaluated; fails closed if it were


class FakeContext:
    """The parts of grpc.aio.ServicerContext the services use."""

    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def invocation_metadata(self) -> tuple[Any, ...]:
        return ()

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise asyncio.CancelledError  # grpc.aio raises to end the call


def check_request(path: str, **extensions: str) -> external_auth_pb2.CheckRequest:
    req = external_auth_pb2.CheckRequest()
    a = req.attributes
    a.source.address.socket_address.address = "10.0.0.7"
    a.source.address.socket_address.port_value = 51000
    a.destination.address.socket_address.address = "10.0.0.9"
    a.destination.address.socket_address.port_value = 8080
    h = a.request.http
    h.method, h.path, h.host, h.scheme, h.protocol = "GET", path, "svc:8080", "http", "HTTP/1.1"
    for k, v in {":authority": "svc:8080", ":method": "GET", ":path": path}.items():
        h.headers[k] = v
    for k, v in extensions.items():
        a.context_extensions[k.replace("_", ".", 1) if k.startswith("destination_") else k] = v
    return req


def central_service(ws: WorkloadSnapshots) -> AuthorizationService:
    checks = ContextWorkloads(lambda: ws)
    return AuthorizationService(lambda: ws.mesh, CheckAdapter(), central=checks)


def decide(svc: AuthorizationService, req: external_auth_pb2.CheckRequest) -> external_auth_pb2.CheckResponse:
    return external_auth_pb2.CheckResponse.FromString(asyncio.run(svc.Check(req, FakeContext())))  # type: ignore[arg-type]


def test_a_check_is_decided_by_the_policies_of_the_workload_it_names(tmp_path: Path) -> None:
    svc = central_service(snapshots(tmp_path))
    a = {"destination_namespace": "shop", "destination_labels": "app=a"}
    b = {"destination_namespace": "shop", "destination_labels": "app=b"}
    bar = {"destination_namespace": "bar", "destination_labels": "app=a"}
    assert decide(svc, check_request("/a-private", **a)).status.code == code_pb2.PERMISSION_DENIED
    assert decide(svc, check_request("/a-private", **b)).status.code == code_pb2.OK
    assert decide(svc, check_request("/shop-private", **b)).status.code == code_pb2.PERMISSION_DENIED
    assert decide(svc, check_request("/shop-private", **bar)).status.code == code_pb2.OK
    denied = decide(svc, check_request("/mesh-private", **bar))
    assert denied.status.code == code_pb2.PERMISSION_DENIED
    assert denied.dynamic_metadata["enforced_effective_policy_id"] == "ns[istio-system]-policy[mesh-wide]-rule[0]"
    assert decide(svc, check_request("/public", **a)).status.code == code_pb2.OK


def test_tcp_checks_name_their_workload_in_the_destination_labels_from_node_metadata(tmp_path: Path) -> None:
    """The network filter has no context extensions; `bootstrap_metadata_labels_key` copies a
    node metadata struct into attributes.destination.labels, with the same keys."""
    svc = central_service(snapshots(tmp_path, POLICIES.split("---")[0]))

    def tcp(**labels: str) -> external_auth_pb2.CheckRequest:
        req = check_request("/")
        req.attributes.ClearField("request")
        for k, v in labels.items():
            req.attributes.destination.labels[k.replace("_", ".", 1)] = v
        return req

    # shop/only-a is a DENY with only HTTP conditions: it closes every TCP connection of app=a.
    denied = decide(svc, tcp(destination_namespace="shop", destination_labels="app=a"))
    assert denied.status.code == code_pb2.PERMISSION_DENIED and not denied.HasField("denied_response")
    assert denied.dynamic_metadata["enforced_effective_policy_id"] == "ns[shop]-policy[only-a]-rule[0]"
    assert decide(svc, tcp(destination_namespace="bar", destination_labels="app=a")).status.code == code_pb2.OK
    assert decide(svc, tcp(destination_namespace="shop", destination_labels="app=b")).status.code == code_pb2.OK
    assert decide(svc, tcp(app="a")).status.code == code_pb2.PERMISSION_DENIED  # plain pod labels name nothing
    assert svc.stats.malformed == {"workload_missing_namespace": 1}
    # Context extensions, when they name a namespace, win over the destination labels.
    req = check_request("/a-private", destination_namespace="shop", destination_labels="app=b")
    req.attributes.destination.labels.update({"destination.namespace": "shop", "destination.labels": "app=a"})
    assert decide(svc, req).status.code == code_pb2.OK


@pytest.mark.parametrize(
    ("extensions", "kind", "reason"),
    [
        ({}, "workload_missing_namespace", "destination.namespace is missing"),
        ({"destination_namespace": "NotANamespace"}, "workload_bad_namespace", "not a namespace name"),
        ({"destination_namespace": "shop", "destination_labels": "app"}, "workload_bad_labels", "expected k=v"),
    ],
)
def test_a_check_without_a_usable_workload_is_denied(
    tmp_path: Path, extensions: dict[str, str], kind: str, reason: str
) -> None:
    svc = central_service(snapshots(tmp_path))
    resp = decide(svc, check_request("/public", **extensions))
    assert resp.status.code == code_pb2.PERMISSION_DENIED
    assert resp.denied_response.status.code == 403 and resp.denied_response.body == "RBAC: access denied"
    md = resp.dynamic_metadata
    assert md["enforced_engine_result"] == "denied" and md["extproc_stage"] == "error"
    assert reason in md["extproc_reason"] and md["extproc_reason"].startswith("central mode: no workload identity")
    assert svc.stats.malformed == {kind: 1}
    assert svc.stats.decisions == {("http", "denied", "malformed"): 1}


def test_outside_central_mode_context_extensions_do_not_change_the_workload(tmp_path: Path) -> None:
    loaded = loader.load([write(tmp_path / "cfg", POLICIES)])
    from extproc.snapshot.compiled import WorkloadIdentity, build_snapshot

    snap = build_snapshot(loaded, WorkloadIdentity("shop", {"app": "b"}), Options(), 1)
    svc = AuthorizationService(lambda: snap, CheckAdapter())
    naming_a = {"destination_namespace": "shop", "destination_labels": "app=a"}
    assert decide(svc, check_request("/a-private", **naming_a)).status.code == code_pb2.OK
    assert decide(svc, check_request("/shop-private", **naming_a)).status.code == code_pb2.PERMISSION_DENIED
    assert decide(svc, check_request("/public")).status.code == code_pb2.OK  # no extensions: no denial


# --- the bounded cache --------------------------------------------------------------------


def test_the_workload_cache_is_bounded_and_counts_hits_misses_and_evictions(tmp_path: Path) -> None:
    ws = snapshots(tmp_path, size=2)
    ka, kb, kc = (workload_key("shop", {"app": x}) for x in "abc")
    first_a = ws.get(ka)
    assert ws.get(ka) is first_a
    ws.get(kb)
    ws.get(ka)  # a is now the most recently used
    ws.get(kc)  # evicts b
    assert ws.keys() == [ka, kc] and len(ws) == 2
    assert ws.get(ka) is first_a
    ws.get(kb)  # evicts c
    assert ws.keys() == [ka, kb]
    assert (ws.stats.hits, ws.stats.misses, ws.stats.evictions) == (3, 4, 2)


# --- reloads -------------------------------------------------------------------------------

EXTRA = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: new-for-a, namespace: shop}
spec:
  selector: {matchLabels: {app: a}}
  action: DENY
  rules: [{to: [{operation: {paths: ["/new*"]}}]}]
"""


def test_a_reload_replaces_every_workload_snapshot_and_a_bad_one_keeps_them(tmp_path: Path) -> None:
    d = write(tmp_path / "cfg", POLICIES)
    holder = SnapshotHolder.initial([str(d)], mesh_identity(), Options(), central_cache_size=8)
    assert holder.central and holder.current is holder.workloads.mesh  # type: ignore[union-attr]
    first = holder.workloads
    assert first is not None
    ka = workload_key("shop", {"app": "a"})
    old_a = first.get(ka)
    swapped: list[Snapshot] = []
    holder.on_swap.append(swapped.append)

    write(d, EXTRA, "extra.yaml")
    status = asyncio.run(holder.reload())
    assert status.ok and status.version == 2
    second = holder.workloads
    assert second is not None and second is not first
    assert holder.current is second.mesh and swapped == [second.mesh]
    # The workloads served before are rebuilt from the new configuration, not carried over.
    assert ka in second and second.version == 2
    new_a = second.get(ka)
    assert new_a is not old_a and new_a.version == 2 and "shop/new-for-a" in names(new_a)
    # The previous generation is untouched: a request that read it finishes on version 1.
    assert first.get(ka) is old_a and "shop/new-for-a" not in names(old_a)
    assert second.stats is first.stats is holder.cache_stats  # counters outlive reloads

    (d / "extra.yaml").write_text(EXTRA.replace("paths:", "pathz:"))
    status = asyncio.run(holder.reload())
    assert not status.ok and status.version == 2 and any("pathz" in e for e in status.errors)
    assert holder.workloads is second and holder.current is second.mesh and swapped == [second.mesh]
    assert holder.counters.success == 2 and holder.counters.failure == 1


JWT_RULES = """
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: a-jwt, namespace: shop}
spec:
  selector: {matchLabels: {app: a}}
  jwtRules: [{issuer: "https://a.example", jwksUri: "https://a.example/jwks"}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: bar-jwt, namespace: bar}
spec:
  jwtRules: [{issuer: "https://bar.example", jwksUri: "https://bar.example/jwks"}]
"""


def test_the_mesh_view_fetches_the_keys_of_every_workloads_request_authentication(tmp_path: Path) -> None:
    d = write(tmp_path / "cfg", JWT_RULES)
    holder = SnapshotHolder.initial([str(d)], mesh_identity(), Options(), central_cache_size=8)
    uris = {s.jwks_uri for s in holder.current.authn.remote_sources}
    assert uris == {"https://a.example/jwks", "https://bar.example/jwks"}
    assert holder.workloads is not None
    only_a = holder.workloads.get(workload_key("shop", {"app": "a"}))
    assert {p.issuer for p in only_a.authn.providers} == {"https://a.example"}
    fetched: list[set[str]] = []
    holder.on_swap.append(lambda snap: fetched.append({s.jwks_uri for s in snap.authn.remote_sources}))
    # A RequestAuthentication only some workload of namespace "other" could use.
    c = JWT_RULES.split("---")[0].replace("a-jwt", "c-jwt").replace("a.example", "c.example")
    write(d, c.replace("namespace: shop", "namespace: other"), "more.yaml")
    assert asyncio.run(holder.reload()).ok
    assert fetched == [{"https://a.example/jwks", "https://bar.example/jwks", "https://c.example/jwks"}]


# --- which workload an access log stream names ---------------------------------------------


def node(namespace: str | None, **md: Any) -> base_pb2.Node:
    n = base_pb2.Node(id=f"sidecar~10.0.0.1~{md.get('WORKLOAD_NAME', 'x')}-1.{namespace}~svc.cluster.local")
    if namespace is not None:
        n.metadata.fields["NAMESPACE"].string_value = namespace
    for k, v in md.items():
        if isinstance(v, dict):
            n.metadata.fields[k].struct_value.update(v)
        else:
            n.metadata.fields[k].string_value = v
    return n


def test_node_metadata_names_the_local_workload() -> None:
    n = node(
        "shop",
        WORKLOAD_NAME="cart-v2",
        LABELS={"app": "cart", "version": "v2", "service.istio.io/canonical-name": "carts"},
        SERVICE_ACCOUNT="cart",
        CLUSTER_ID="east",
    )
    assert node_workload(n, trust_domain="td") == Workload(
        workload_name="cart-v2",
        namespace="shop",
        canonical_service="carts",
        canonical_revision="v2",
        app="cart",
        version="v2",
        cluster="east",
        identity="spiffe://td/ns/shop/sa/cart",
    )
    bare = node_workload(node("shop"), cluster="Kubernetes")
    assert (bare.namespace, bare.cluster, bare.workload_name, bare.app, bare.identity) == (
        "shop",
        "Kubernetes",
        "",
        "",
        "",
    )
    with pytest.raises(IdentityError, match="NAMESPACE of node 'sidecar~"):
        node_workload(node(None, WORKLOAD_NAME="cart"))
    with pytest.raises(IdentityError, match="not a namespace name"):
        node_workload(node("Shop!"))


def http_entry(path: str) -> accesslog_pb2.HTTPAccessLogEntry:
    e = accesslog_pb2.HTTPAccessLogEntry()
    c = e.common_properties
    c.duration.FromMilliseconds(3)
    e.request.authority = "svc:8000"
    e.request.path = path
    e.request.request_method = base_pb2.RequestMethod.Value("GET")
    e.response.response_code.CopyFrom(wrappers_pb2.UInt32Value(value=200))
    return e


def stream(n: base_pb2.Node | None, *paths: str) -> list[als_pb2.StreamAccessLogsMessage]:
    first = als_pb2.StreamAccessLogsMessage()
    if n is not None:
        first.identifier.node.CopyFrom(n)
        first.identifier.log_name = "inbound"
    first.http_logs.log_entry.extend(http_entry(p) for p in paths[:1])
    rest = als_pb2.StreamAccessLogsMessage()
    rest.http_logs.log_entry.extend(http_entry(p) for p in paths[1:])
    return [first, rest]


async def _iterate(msgs: list[als_pb2.StreamAccessLogsMessage]) -> AsyncIterator[als_pb2.StreamAccessLogsMessage]:
    for m in msgs:
        yield m


def test_each_access_log_stream_records_for_the_workload_of_its_node(caplog: pytest.LogCaptureFixture) -> None:
    t = Telemetry.create(Workload.from_labels({}, workload_name="extproc-central", namespace="istio-system"))
    sinks = t.per_workload()
    als = AccessLogService(t.recorder, t.tcp, t.peers, central=NodeWorkloads(sinks, cluster="east"))
    a = node("shop", WORKLOAD_NAME="a", LABELS={"app": "a", "version": "v1"})
    b = node("bar", WORKLOAD_NAME="b", LABELS={"app": "b"}, CLUSTER_ID="west")
    caplog.set_level(logging.WARNING, logger="extproc.accesslog")

    async def main() -> None:
        for msgs in (stream(a, "/1", "/2", "/3"), stream(b, "/1"), stream(a, "/4"), stream(None, "/x", "/y")):
            await als.StreamAccessLogs(_iterate(msgs), FakeContext())  # type: ignore[arg-type]
        await als.StreamAccessLogs(_iterate(stream(node(None), "/z")), FakeContext())  # type: ignore[arg-type]

    asyncio.run(main())
    text = t.store.render()
    rows = {
        (lbl["destination_workload"], lbl["destination_workload_namespace"], lbl["destination_app"]): v
        for lbl, v in samples(text, "istio_requests_total")
    }
    assert rows == {("a", "shop", "a"): 4, ("b", "bar", "b"): 1}
    ((west, _),) = samples(text, "istio_requests_total", destination_workload="b")
    assert west["destination_cluster"] == "west" and west["destination_canonical_service"] == "b"
    assert samples(text, "istio_requests_total", destination_workload="a")[0][0]["destination_cluster"] == "east"
    assert als.unidentified_entries == 3
    assert (sinks.counters.hits, sinks.counters.misses, len(sinks)) == (1, 2, 2)
    assert t.recorder.stats.http["access_log"] == 5  # per-workload recorders share the counters
    dropped = [r.getMessage() for r in caplog.records if "dropping the entries" in r.getMessage()]
    assert len(dropped) == 2  # once per stream, not per entry
    assert "carried no identifier.node" in dropped[0] and "metadata NAMESPACE" in dropped[1]


def test_outside_central_mode_the_node_does_not_change_the_local_workload() -> None:
    t = Telemetry.create(Workload.from_labels({"app": "httpbin"}, workload_name="httpbin", namespace="foo"))
    als = AccessLogService(t.recorder, t.tcp, t.peers)
    msgs = stream(node("shop", WORKLOAD_NAME="a", LABELS={"app": "a"}), "/1", "/2")
    asyncio.run(als.StreamAccessLogs(_iterate(msgs), FakeContext()))  # type: ignore[arg-type]
    ((lbl, value),) = samples(t.store.render(), "istio_requests_total")
    assert (lbl["destination_workload"], lbl["destination_workload_namespace"], value) == ("httpbin", "foo", 2)
    assert t.workloads is None and als.unidentified_entries == 0


# --- ext_proc and settings -----------------------------------------------------------------


def test_ext_proc_streams_are_refused_in_central_mode() -> None:
    svc = CentralModeProcessor()
    ctx = FakeContext()

    async def main() -> None:
        async def nothing() -> AsyncIterator[Any]:
            return
            yield

        with pytest.raises(asyncio.CancelledError):
            async for _ in svc.Process(nothing(), ctx):  # type: ignore[arg-type]
                pass

    asyncio.run(main())
    assert ctx.aborted == (grpc.StatusCode.UNIMPLEMENTED, CENTRAL_MODE_MESSAGE)
    assert "ext_authz and the access log service only" in CENTRAL_MODE_MESSAGE and svc.refused == 1


def parse(argv: list[str], env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    return serve_settings(p.parse_args(argv), env or {})


def test_central_mode_needs_no_namespace_and_rejects_per_workload_flags() -> None:
    s = parse(["--config-dir", "/c", "--central"])
    assert s.central and s.namespace == "" and s.labels == {}
    assert parse(["--config-dir", "/c"], {"EXTPROC_CENTRAL": "true"}).central
    assert not parse(["--config-dir", "/c", "--namespace", "ns"]).central
    with pytest.raises(SettingsError, match="--namespace is required"):
        parse(["--config-dir", "/c"], {"EXTPROC_CENTRAL": "false"})
    with pytest.raises(SettingsError, match=r"--central cannot be combined with --namespace, --labels, --workload:"):
        parse(["--config-dir", "/c", "--central", "--namespace", "a", "--labels", "app=a", "--workload", "w"])
    with pytest.raises(SettingsError, match=r"--central cannot be combined with --labels \(EXTPROC_LABELS\)"):
        parse(["--config-dir", "/c", "--central"], {"EXTPROC_LABELS": "app=a"})
    with pytest.raises(SettingsError, match="--central: expected true or false"):
        parse(["--config-dir", "/c"], {"EXTPROC_CENTRAL": "maybe"})
