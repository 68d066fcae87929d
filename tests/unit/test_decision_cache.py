"""The decision cache: a request with the same referenced values gets the same answer, and no
cached answer outlives its snapshot, the JWKS keys it was verified with, or its tokens' exp/nbf.

The strongest check is differential: the same sequence of requests, at advancing times, through
a server with the cache and one without, must get byte-identical responses (ext_authz) and
identical replies (ext_proc).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2
from google.rpc import code_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.decision.cache import key_plan
from extproc.decision.decide import Changes
from extproc.services.authz import AuthorizationService
from extproc.services.check_adapter import CheckAdapter
from extproc.services.custom import CustomAllowed, CustomOutcome
from extproc.services.enforcer import Enforcer
from extproc.services.processor import ExternalProcessorService
from extproc.snapshot.compiled import Snapshot
from extproc.telemetry.peer import Workload
from extproc.telemetry.recorder import Telemetry
from tests.unit.authn_helpers import ISS, KID, NOW, claims, jwk, rsa_key, sign
from tests.unit.helpers import snapshot_from_yaml

JWKS = json.dumps({"keys": [jwk(rsa_key(0), kid=KID, alg="RS256")]})
POLICIES = f"""
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: foo}}
spec:
  jwtRules:
  - issuer: {ISS}
    jwks: '{JWKS}'
    audiences: [shop]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-tenant, namespace: foo}}
spec:
  action: DENY
  rules:
  - when:
    - key: "request.headers[x-tenant]"
      values: [evil]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: readers, namespace: foo}}
spec:
  rules:
  - from: [{{source: {{requestPrincipals: ["{ISS}/*"]}}}}]
    to: [{{operation: {{methods: [GET], paths: ["/api/*"]}}}}]
  - from: [{{source: {{principals: ["cluster.local/ns/foo/sa/batch"]}}}}]
  - from: [{{source: {{remoteIpBlocks: ["203.0.113.0/24"]}}}}]
    to: [{{operation: {{paths: ["/public"]}}}}]
"""

TOKENS = {
    "valid": sign(claims(aud="shop", exp=NOW + 100)),
    "expires-soon": sign(claims(aud="shop", exp=NOW + 30)),
    "not-yet": sign(claims(aud="shop", nbf=NOW + 200, exp=NOW + 3600)),
    "wrong-aud": sign(claims(aud="other")),
    "bad-signature": sign(claims(aud="shop"))[:-6] + "AAAAAA",
}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    return snapshot_from_yaml(tmp_path_factory.mktemp("cache"), POLICIES)


@pytest.fixture
def snap(shared: Snapshot) -> Snapshot:
    """The compiled policies, with an empty decision cache for each test."""
    shared.memo.clear()
    return shared


class Clock:
    def __init__(self, now: int = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return float(self.now)


def check_request(
    path: str = "/api/items",
    method: str = "GET",
    token: str | None = "valid",
    headers: dict[str, str] | None = None,
    principal: str = "",
    source: str = "10.0.0.1",
) -> external_auth_pb2.CheckRequest:
    req = external_auth_pb2.CheckRequest()
    a = req.attributes
    a.source.address.socket_address.address = source
    a.source.address.socket_address.port_value = 40000
    if principal:
        a.source.principal = principal
    a.destination.address.socket_address.address = "10.0.0.2"
    a.destination.address.socket_address.port_value = 8000
    h = a.request.http
    h.method, h.path, h.host, h.scheme = method, path, "httpbin.foo", "http"
    h.headers.update({":method": method, ":path": path, ":authority": "httpbin.foo", "x-request-id": "r"})
    if token is not None:
        h.headers["authorization"] = f"Bearer {TOKENS.get(token, token)}"
    h.headers.update(headers or {})
    return req


def service(snap: Snapshot, clock: Clock, cache_size: int = 4096, **kw: Any) -> AuthorizationService:
    return AuthorizationService(lambda: snap, CheckAdapter(), Enforcer(cache_size=cache_size, **kw), clock=clock)


def check(svc: AuthorizationService, req: external_auth_pb2.CheckRequest) -> external_auth_pb2.CheckResponse:
    return external_auth_pb2.CheckResponse.FromString(asyncio.run(svc.Check(req, None)))  # type: ignore[arg-type]


def test_a_repeated_request_is_answered_from_the_cache(snap: Snapshot) -> None:
    svc = service(snap, Clock())
    first = check(svc, check_request())
    again = check(svc, check_request())
    assert first.status.code == code_pb2.OK and again == first
    assert (svc.stats.cache.misses, svc.stats.cache.hits) == (1, 1)
    # The counters a hit bumps are the same as a decision's.
    assert svc.stats.decisions == {("http", "allowed", "allow"): 2}
    assert svc.stats.jwt == {"verified": 2}


def test_headers_no_policy_reads_do_not_split_the_cache(snap: Snapshot) -> None:
    svc = service(snap, Clock())
    check(svc, check_request())
    check(svc, check_request(headers={"x-request-id": "other", "user-agent": "curl/8"}))
    assert svc.stats.cache.hits == 1
    denied = check(svc, check_request(headers={"x-tenant": "evil"}))
    assert denied.status.code == code_pb2.PERMISSION_DENIED
    assert svc.stats.cache.misses == 2  # x-tenant is read by a policy: a new key


def test_the_plan_holds_what_policies_and_jwt_rules_read(snap: Snapshot) -> None:
    plan = key_plan(snap)
    assert {"x-tenant", "x-forwarded-for", "authorization", ":path", ":method"} <= set(plan.headers)
    assert "user-agent" not in plan.headers and "x-request-id" not in plan.headers
    assert not plan.metadata


def test_a_cached_allow_ends_when_the_token_expires(snap: Snapshot) -> None:
    clock = Clock()
    svc = service(snap, clock)
    req = check_request(token="expires-soon")
    assert check(svc, req).status.code == code_pb2.OK
    clock.now = NOW + 30 + 60  # exp plus jwt_authn's 60 s of skew: still valid, still cached
    assert check(svc, req).status.code == code_pb2.OK
    assert svc.stats.cache.hits == 1
    clock.now += 1
    expired = check(svc, req)
    assert expired.status.code == code_pb2.UNAUTHENTICATED
    assert expired.denied_response.body == "Jwt is expired"
    assert svc.stats.cache.hits == 1


def test_a_cached_denial_of_a_token_not_yet_valid_ends_at_its_nbf(snap: Snapshot) -> None:
    clock = Clock()
    svc = service(snap, clock)
    req = check_request(token="not-yet")
    assert check(svc, req).denied_response.body == "Jwt not yet valid"
    assert check(svc, req).denied_response.body == "Jwt not yet valid"
    assert svc.stats.cache.hits == 1
    clock.now = NOW + 200 - 60  # nbf minus the skew
    assert check(svc, req).status.code == code_pb2.OK


def test_a_jwks_key_change_empties_the_cache(snap: Snapshot) -> None:
    svc = service(snap, Clock())
    check(svc, check_request())
    svc.enforcer.jwks.generation += 1  # what a fetch bringing other keys does
    check(svc, check_request())
    assert (svc.stats.cache.misses, svc.stats.cache.hits) == (2, 0)


def test_a_new_snapshot_starts_with_an_empty_cache(snap: Snapshot, tmp_path: Path) -> None:
    current = [snap]
    svc = AuthorizationService(lambda: current[0], CheckAdapter(), Enforcer(), clock=Clock())
    check(svc, check_request())
    current[0] = snapshot_from_yaml(tmp_path, POLICIES)
    check(svc, check_request())
    assert (svc.stats.cache.misses, svc.stats.cache.hits) == (2, 0)
    assert len(current[0].memo["decisions"]) == 1 and len(snap.memo["decisions"]) >= 1


def test_header_names_not_in_lower_case_are_decided_without_the_cache(snap: Snapshot) -> None:
    svc = service(snap, Clock())
    check(svc, check_request())
    odd = check_request(headers={"X-Tenant": "evil"})  # Envoy never sends this; read the slow way
    assert check(svc, odd).status.code == code_pb2.PERMISSION_DENIED
    assert svc.stats.cache.hits == 0


def test_the_cache_is_bounded(snap: Snapshot) -> None:
    svc = service(snap, Clock(), cache_size=3)
    for i in range(10):
        check(svc, check_request(path=f"/api/{i}"))
    assert len(snap.memo) and svc.stats.cache.evictions == 7


class AllowingProviders:
    """A CUSTOM provider that allows and adds a header: stands in for the network call."""

    def __init__(self) -> None:
        self.calls = 0

    async def check(self, *_: Any) -> CustomOutcome:
        self.calls += 1
        return CustomAllowed("allowed", "ok", changes=Changes(remove_headers=(f"x-call-{self.calls}",)))


def test_a_decision_that_asked_a_custom_provider_is_never_cached(tmp_path: Path) -> None:
    custom = """
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    extensionProviders:
    - name: ext
      envoyExtAuthzGrpc: {service: ext.foo.svc.cluster.local, port: 9000}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: foo}
spec:
  action: CUSTOM
  provider: {name: ext}
  rules: [{to: [{operation: {paths: ["/ext"]}}]}]
"""
    snap = snapshot_from_yaml(tmp_path, custom)
    providers = AllowingProviders()
    svc = service(snap, Clock(), providers=providers)  # type: ignore[arg-type]
    first = check(svc, check_request("/ext", token=None))
    second = check(svc, check_request("/ext", token=None))
    assert providers.calls == 2
    assert list(first.ok_response.headers_to_remove) == ["x-call-1"]
    assert list(second.ok_response.headers_to_remove) == ["x-call-2"]
    assert svc.stats.cache.uncacheable == 2
    # A request no CUSTOM rule matches is cached as usual.
    check(svc, check_request("/other", token=None))
    check(svc, check_request("/other", token=None))
    assert svc.stats.cache.hits == 1 and providers.calls == 2


# --- differential: with the cache and without -------------------------------------------------------


def processing_request(req: external_auth_pb2.CheckRequest) -> ep.ProcessingRequest:
    """The ext_proc message Envoy sends for the same request as `req`."""
    a = req.attributes
    msg = ep.ProcessingRequest()
    for k, v in a.request.http.headers.items():
        msg.request_headers.headers.headers.append(base_pb2.HeaderValue(key=k, raw_value=v.encode()))
    s = struct_pb2.Struct()
    s.update(
        {
            "source.address": f"{a.source.address.socket_address.address}:40000",
            "destination.address": "10.0.0.2:8000",
            "connection.uri_san_peer_certificate": a.source.principal,
        }
    )
    msg.attributes["envoy.filters.http.ext_proc"].CopyFrom(s)
    return msg


def processor(snap: Snapshot, clock: Clock, cache_size: int) -> ExternalProcessorService:
    t = Telemetry.create(Workload(workload_name="httpbin", namespace="foo"))
    return ExternalProcessorService(
        t.recorder, t.peers, None, enforcer=Enforcer(cache_size=cache_size), snapshot=lambda: snap, clock=clock
    )


def process(svc: ExternalProcessorService, msg: ep.ProcessingRequest) -> ep.ProcessingResponse:
    async def run() -> bytes:
        async def one():  # type: ignore[no-untyped-def]
            yield msg

        out = [r async for r in svc.Process(one(), None)]  # type: ignore[arg-type]
        return out[0]

    return ep.ProcessingResponse.FromString(asyncio.run(run()))


requests = st.builds(
    check_request,
    path=st.sampled_from(["/api/items", "/api/x?access_token=t", "/public", "/admin", "/api"]),
    method=st.sampled_from(["GET", "POST"]),
    token=st.sampled_from([None, *TOKENS]),
    headers=st.sampled_from(
        [{}, {"x-tenant": "evil"}, {"x-tenant": "good"}, {"x-forwarded-for": "203.0.113.7"}, {"user-agent": "u"}]
    ),
    principal=st.sampled_from(["", "spiffe://cluster.local/ns/foo/sa/batch", "spiffe://cluster.local/ns/x/sa/y"]),
    source=st.sampled_from(["10.0.0.1", "203.0.113.9"]),
)
steps = st.lists(st.tuples(requests, st.integers(min_value=0, max_value=150)), min_size=1, max_size=25)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps)
def test_the_cache_never_changes_an_answer(snap: Snapshot, sequence: list[tuple[Any, int]]) -> None:
    snap.memo.clear()
    clock = Clock()
    cached, plain = service(snap, clock), service(snap, clock, cache_size=0)
    proc_cached, proc_plain = processor(snap, clock, 4096), processor(snap, clock, 0)
    for req, advance in sequence:
        clock.now += advance
        assert asyncio.run(cached.Check(req, None)) == asyncio.run(plain.Check(req, None))  # type: ignore[arg-type]
        msg = processing_request(req)
        assert process(proc_cached, msg) == process(proc_plain, msg)
    # Asked again at the same moment, the last request is answered from the cache, identically.
    req = sequence[-1][0]
    before = cached.stats.cache.hits
    assert asyncio.run(cached.Check(req, None)) == asyncio.run(plain.Check(req, None))  # type: ignore[arg-type]
    assert cached.stats.cache.hits == before + 1
    assert plain.stats.cache.hits == 0
