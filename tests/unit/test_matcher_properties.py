"""Property tests: matchers against independent formulations, and engine invariants."""

from __future__ import annotations

import ipaddress
import string
from pathlib import Path

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from extproc.attributes import parse_ip, remote_ip_from_xff
from extproc.authz import matchers as m
from tests.unit.helpers import http_request, policy, snapshot_from_yaml

PCHAR = string.ascii_letters + string.digits + "-._~%!$&'()+,;:@="
segment = st.text(PCHAR, min_size=1, max_size=6)
path_segments = st.lists(segment, min_size=0, max_size=5)


def template_reference(template: list[str], path: str) -> bool:
    """Segment-by-segment matching of Istio's {*}/{**} templates, written without regexes."""
    if not path.startswith("/"):
        return False
    parts = path[1:].split("/")
    for i, t in enumerate(template):
        if t == "{**}":
            if i >= len(parts):  # the "/" before {**} is literal: "/a/{**}" does not match "/a"
                return False
            rest = "/".join(parts[i:])
            return all(c in PCHAR + "/" for c in rest)
        if i >= len(parts):
            return False
        if t == "{*}":
            if not parts[i] or any(c not in PCHAR for c in parts[i]):
                return False
        elif parts[i] != t:
            return False
    return len(parts) == len(template)


@given(
    template=st.lists(st.one_of(segment, st.just("{*}")), min_size=1, max_size=4).flatmap(
        lambda t: st.one_of(st.just(t), st.just([*t, "{**}"]))
    ),
    path=path_segments.map(lambda p: "/" + "/".join(p)),
)
def test_path_template_matches_segment_semantics(template: list[str], path: str) -> None:
    value = "/" + "/".join(template)
    assert m.path_template_matcher(value)(path) == template_reference(template, path)


@given(template=st.lists(st.one_of(segment, st.just("{*}")), min_size=1, max_size=4), data=st.data())
def test_path_template_accepts_its_own_instances(template: list[str], data: st.DataObject) -> None:
    concrete = [data.draw(segment) if t == "{*}" else t for t in template]
    assert m.path_template_matcher("/" + "/".join(template))("/" + "/".join(concrete))


ips = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6))


@given(ip=ips, net=st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)), prefix=st.integers(0, 128))
def test_cidr_matches_ipaddress_membership(ip, net, prefix: int) -> None:  # type: ignore[no-untyped-def]
    prefix = min(prefix, net.max_prefixlen)
    network = ipaddress.ip_network(f"{net}/{prefix}", strict=False)
    expected = ip.version == network.version and ip in network
    assert m.cidr_matcher(f"{net}/{prefix}")(ip) == expected


def xff_reference(xff: str, direct: str, hops: int) -> str:
    entries = xff.split(",")
    if len(entries) <= hops:
        return direct
    candidate = entries[len(entries) - 1 - hops].strip(" \t")
    try:
        return str(ipaddress.ip_address(candidate))
    except ValueError:
        return direct


xff_entry = st.one_of(ips.map(str), st.sampled_from(["unknown", "", "1.2.3", "::zz"]))


@given(
    entries=st.lists(xff_entry, min_size=1, max_size=5),
    spaces=st.sampled_from([",", ", ", " ,  "]),
    hops=st.integers(0, 4),
)
def test_remote_ip_follows_envoy_xff_rules(entries: list[str], spaces: str, hops: int) -> None:
    xff = spaces.join(entries)
    direct = parse_ip("192.0.2.1")
    got = remote_ip_from_xff(xff, direct, hops)
    assert str(got) == xff_reference(xff, "192.0.2.1", hops)


label = st.text(string.ascii_lowercase + string.digits + "-", min_size=1, max_size=12)


@given(iss=st.text(min_size=1, max_size=20).filter(lambda s: "\n" not in s), sub=label)
def test_request_principal_round_trip(iss: str, sub: str) -> None:
    """`iss/sub` matches exactly the token with that issuer and subject, even when iss has slashes."""
    assume(not iss.startswith("*") and not sub.endswith("*"))
    match = m.request_principal_matcher(f"{iss}/{sub}")
    assert match(iss, sub)
    assert not match(iss, sub + "x")
    assert not match(iss + "x", sub)


@given(ns=label, data=st.data())
def test_namespace_glob_anywhere(ns: str, data: st.DataObject) -> None:
    principal = f"spiffe://cluster.local/ns/{ns}/sa/default"
    i = data.draw(st.integers(0, len(ns)))
    j = data.draw(st.integers(i, len(ns)))
    glob = ns[:i] + "*" + ns[j:]
    assert m.namespace_matcher(ns)(principal)
    assert m.namespace_matcher(glob)(principal)
    assert not m.namespace_matcher(ns + "x")(principal)


@given(value=st.text(max_size=8), s=st.text(max_size=8))
def test_istio_string_presence_never_matches_empty(value: str, s: str) -> None:
    assert not m.istio_string("*")("")
    if value and value != "*" and "*" not in value:
        assert m.istio_string(value)(s) == (s == value)


@given(s=st.text(max_size=10))
def test_ascii_only_case_folding(s: str) -> None:
    """Envoy folds ASCII letters only; Python's str.lower folds more."""
    assert m.exact(s.upper(), ignore_case=True)(s) == (m.ascii_lower(s.upper()) == m.ascii_lower(s))


RICH = policy(
    "rich",
    """
rules:
- from:
  - source: {principals: ["cluster.local/ns/foo/*"], notIpBlocks: ["10.9.0.0/16"]}
  - source: {namespaces: ["b*"], requestPrincipals: ["*"]}
  to:
  - operation: {methods: ["GET", "HEAD"], paths: ["/api/{*}/items", "/public*"]}
  - operation: {hosts: ["*.example.com"], notPaths: ["/admin*"]}
  when:
  - key: request.headers[x-tenant]
    notValues: ["blocked"]
  - key: request.auth.claims[scope]
    values: ["read"]
""",
) + policy("deny", "action: DENY\nrules:\n- when: [{key: remote.ip, values: ['203.0.113.0/24']}]")

request_strategy = st.builds(
    http_request,
    path=st.sampled_from(["/api/x/items", "/api/x/y/items", "/public/a", "/admin", "/other?q=1"]),
    method=st.sampled_from(["GET", "HEAD", "POST"]),
    host=st.sampled_from(["a.example.com", "example.com", "A.EXAMPLE.COM"]),
    headers=st.fixed_dictionaries(
        {},
        optional={
            "x-tenant": st.sampled_from(["blocked", "ok"]),
            "x-forwarded-for": st.sampled_from(["203.0.113.5", "198.51.100.1"]),
        },
    ),
    principal=st.sampled_from([None, "spiffe://cluster.local/ns/foo/sa/a", "spiffe://cluster.local/ns/bar/sa/b"]),
    source_ip=st.sampled_from(["10.9.1.1", "10.0.0.1"]),
    jwt=st.one_of(
        st.none(),
        st.fixed_dictionaries(
            {"iss": st.just("i"), "sub": st.just("s"), "scope": st.sampled_from(["read", "read write", "write"])}
        ),
    ),
)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=300)
@given(attrs=request_strategy)
def test_explanation_agrees_with_evaluation(tmp_path_factory, attrs) -> None:  # type: ignore[no-untyped-def]
    snap = _rich_snapshot(tmp_path_factory)
    for rule in (*snap.http.allow.enforced, *snap.http.deny.enforced):
        assert rule.matches(attrs) == (rule.first_failure(attrs) is None)


_cache: dict[str, object] = {}


def _rich_snapshot(tmp_path_factory):  # type: ignore[no-untyped-def]
    if "snap" not in _cache:
        _cache["snap"] = snapshot_from_yaml(Path(tmp_path_factory.mktemp("rich")), RICH)
    return _cache["snap"]
