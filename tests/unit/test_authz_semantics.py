"""Table tests for every AuthorizationPolicy rule in shared/reference/authz.md.

Each expectation is derived from Istio's generator and Envoy's matchers as the
reference describes them, not from our implementation; the differential tests
against Envoy's RBAC filter check the same ground from the other side.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from extproc.authz import engine
from extproc.snapshot.compiled import Options
from tests.unit.helpers import allowed, decide, http_request, policy, snapshot_from_yaml, tcp_connection

SLEEP = "spiffe://cluster.local/ns/foo/sa/sleep"
OTHER = "spiffe://cluster.local/ns/bar/sa/other"


def allow_rule(rule: str) -> str:
    """An ALLOW policy with exactly one rule (given as YAML for the rule's body)."""
    return policy("p", "rules:\n- " + rule.strip().replace("\n", "\n  "))


def check(tmp_path: Path, text: str, attrs, expected: bool, **kw) -> None:  # type: ignore[no-untyped-def]
    snap = snapshot_from_yaml(tmp_path, text, **kw)
    d = decide(snap, attrs)
    assert d.allowed is expected, d.reason


# --- policy shapes and evaluation order --------------------------------------------------


def test_no_policy_allows_everything(tmp_path: Path) -> None:
    snap = snapshot_from_yaml(tmp_path, "")
    d = decide(snap, http_request())
    assert d.allowed and d.stage == "no-policy"
    assert allowed(snap, tcp_connection())


def test_empty_spec_allows_nothing(tmp_path: Path) -> None:
    snap = snapshot_from_yaml(tmp_path, policy("allow-nothing", "{}"))
    assert not allowed(snap, http_request(principal=SLEEP))
    assert not allowed(snap, tcp_connection(principal=SLEEP))


def test_empty_rule_allows_everything(tmp_path: Path) -> None:
    snap = snapshot_from_yaml(tmp_path, policy("allow-all", "rules: [{}]"))
    d = decide(snap, http_request())
    assert d.allowed and d.policy_id == "ns[foo]-policy[allow-all]-rule[0]"
    assert allowed(snap, tcp_connection())


def test_deny_empty_rule_denies_everything(tmp_path: Path) -> None:
    snap = snapshot_from_yaml(
        tmp_path, policy("deny-all", "action: DENY\nrules: [{}]") + policy("allow-all", "rules: [{}]")
    )
    d = decide(snap, http_request())
    assert not d.allowed and d.stage == "deny" and d.policy_id == "ns[foo]-policy[deny-all]-rule[0]"


def test_allow_policies_present_and_none_matching_denies(tmp_path: Path) -> None:
    snap = snapshot_from_yaml(tmp_path, allow_rule('to: [{operation: {paths: ["/ok"]}}]'))
    assert allowed(snap, http_request("/ok"))
    d = decide(snap, http_request("/nope"))
    assert not d.allowed and d.stage == "no-match"
    assert "to[0].operation.paths did not match" in d.reason


def test_deny_wins_over_allow(tmp_path: Path) -> None:
    text = policy("allow", "rules: [{}]") + policy(
        "deny", 'action: DENY\nrules:\n- to: [{operation: {methods: ["DELETE"]}}]'
    )
    snap = snapshot_from_yaml(tmp_path, text)
    assert allowed(snap, http_request(method="GET"))
    assert not allowed(snap, http_request(method="DELETE"))


def test_audit_never_changes_the_decision_but_is_recorded(tmp_path: Path) -> None:
    text = policy("audit", "action: AUDIT\nrules:\n- to: [{operation: {paths: ['/a']}}]")
    snap = snapshot_from_yaml(tmp_path, text)
    d = decide(snap, http_request("/a"))
    assert d.allowed and d.audit_policy_id == "ns[foo]-policy[audit]-rule[0]"
    assert decide(snap, http_request("/b")).audit_policy_id is None
    # AUDIT alone is not an ALLOW policy: nothing is denied.
    assert allowed(snap, tcp_connection())


def test_dry_run_deny_is_recorded_not_enforced(tmp_path: Path) -> None:
    text = policy("dry", "action: DENY\nrules: [{}]", annotations='{istio.io/dry-run: "true"}')
    snap = snapshot_from_yaml(tmp_path, text)
    d = decide(snap, http_request())
    assert d.allowed
    assert [(str(s.action), s.engine_result, s.policy_id) for s in d.shadow] == [
        ("DENY", "denied", "ns[foo]-policy[dry]-rule[0]")
    ]


def test_dry_run_allow_is_recorded_and_does_not_make_allow_policies_present(tmp_path: Path) -> None:
    text = policy("dry", "rules:\n- to: [{operation: {paths: ['/x']}}]", annotations='{istio.io/dry-run: "true"}')
    snap = snapshot_from_yaml(tmp_path, text)
    d = decide(snap, http_request("/y"))
    assert d.allowed and d.stage == "no-policy"
    assert [(s.engine_result, s.policy_id) for s in d.shadow] == [("denied", None)]
    assert decide(snap, http_request("/x")).shadow[0].policy_id == "ns[foo]-policy[dry]-rule[0]"


def test_dry_run_false_is_enforced(tmp_path: Path) -> None:
    text = policy("not-dry", "action: DENY\nrules: [{}]", annotations='{istio.io/dry-run: "false"}')
    assert not allowed(snapshot_from_yaml(tmp_path, text), http_request())


def test_shadow_allow_not_evaluated_when_deny_stops_the_chain(tmp_path: Path) -> None:
    text = policy("deny", "action: DENY\nrules: [{}]") + policy(
        "dry-allow", "rules: [{}]", annotations='{istio.io/dry-run: "true"}'
    )
    d = decide(snapshot_from_yaml(tmp_path, text), http_request())
    assert not d.allowed and d.shadow == ()


def test_rule_logic_or_over_from_and_to_and_over_fields(tmp_path: Path) -> None:
    rule = """
from:
- source: {principals: ["cluster.local/ns/foo/sa/sleep"]}
- source: {namespaces: ["bar"]}
to:
- operation: {methods: ["GET"], paths: ["/a"]}
- operation: {methods: ["POST"]}
when:
- key: request.headers[x-ok]
  values: ["yes"]
"""
    snap = snapshot_from_yaml(tmp_path, allow_rule(rule))
    ok = {"x-ok": "yes"}
    assert allowed(snap, http_request("/a", "GET", principal=SLEEP, headers=ok))
    assert allowed(snap, http_request("/zzz", "POST", principal=OTHER, headers=ok))
    assert not allowed(snap, http_request("/b", "GET", principal=SLEEP, headers=ok))  # to[0] needs both
    assert not allowed(snap, http_request("/a", "GET", principal=SLEEP))  # when fails
    assert not allowed(snap, http_request("/a", "GET", principal="spiffe://cluster.local/ns/baz/sa/x", headers=ok))


def test_values_and_not_values_combine(tmp_path: Path) -> None:
    rule = 'to: [{operation: {paths: ["/api/*"], notPaths: ["/api/admin*"]}}]'
    snap = snapshot_from_yaml(tmp_path, allow_rule(rule))
    assert allowed(snap, http_request("/api/users"))
    assert not allowed(snap, http_request("/api/admin/x"))
    assert not allowed(snap, http_request("/other"))


def test_not_field_is_true_when_attribute_absent(tmp_path: Path) -> None:
    """DENY notPrincipals: ["*"] denies plaintext (Istio's DENY-plaintext example)."""
    text = policy("deny-plaintext", 'action: DENY\nrules:\n- from: [{source: {notPrincipals: ["*"]}}]')
    snap = snapshot_from_yaml(tmp_path, text)
    assert not allowed(snap, http_request())
    assert allowed(snap, http_request(principal=SLEEP))
    assert not allowed(snap, tcp_connection())


# --- principals, namespaces, service accounts, trust domains -----------------------------


@pytest.mark.parametrize(
    ("value", "principal", "expected"),
    [
        ("cluster.local/ns/foo/sa/sleep", SLEEP, True),
        ("cluster.local/ns/foo/sa/sleep", OTHER, False),
        ("*", SLEEP, True),
        ("*", None, False),  # `*` means any authenticated peer
        ("cluster.local/ns/foo/*", SLEEP, True),
        ("cluster.local/ns/bar/*", SLEEP, False),
        ("*/sa/sleep", SLEEP, True),
        ("*/sa/sleep", "spiffe://cluster.local/ns/foo/sa/sleep-2", False),
        ("*sleep", SLEEP, True),
        # the suffix form is anchored after spiffe://: a bare subject never matches it
        ("*just-cn", "CN=just-cn", False),
        ("*", "CN=just-cn", True),
        # a literal `*` in the middle is not a wildcard
        ("cluster.local/ns/*/sa/sleep", SLEEP, False),
    ],
)
def test_principals(tmp_path: Path, value: str, principal: str | None, expected: bool) -> None:
    check(
        tmp_path,
        allow_rule(f'from: [{{source: {{principals: ["{value}"]}}}}]'),
        http_request(principal=principal),
        expected,
    )


def test_principal_any_san_of_the_peer_certificate(tmp_path: Path) -> None:
    """Envoy's `authenticated` matcher tries every URI SAN, then every DNS SAN, then the subject."""
    snap = snapshot_from_yaml(tmp_path, allow_rule('from: [{source: {principals: ["cluster.local/ns/y/sa/second"]}}]'))
    sans = (
        "spiffe://cluster.local/ns/x/sa/first",
        "spiffe://cluster.local/ns/y/sa/second",
        "multi.example.com",
        "CN=m",
    )
    assert allowed(snap, http_request(principals=sans))
    assert not allowed(snap, http_request(principals=sans[:1]))


@pytest.mark.parametrize(
    ("value", "principal", "expected"),
    [
        ("foo", SLEEP, True),
        ("bar", SLEEP, False),
        ("f*", SLEEP, True),
        ("*o", SLEEP, True),
        ("f*o", SLEEP, True),  # namespaces glob anywhere, unlike other fields
        ("*", SLEEP, True),
        ("*", None, False),
        ("fo", SLEEP, False),
    ],
)
def test_namespaces(tmp_path: Path, value: str, principal: str | None, expected: bool) -> None:
    check(
        tmp_path,
        allow_rule(f'from: [{{source: {{namespaces: ["{value}"]}}}}]'),
        http_request(principal=principal),
        expected,
    )


@pytest.mark.parametrize(
    ("value", "principal", "expected"),
    [
        ("sleep", SLEEP, True),  # namespace defaults to the policy's (foo)
        ("foo/sleep", SLEEP, True),
        ("bar/sleep", SLEEP, False),
        ("foo/slee", SLEEP, False),
        ("sleep", "spiffe://cluster.local/ns/foo/sa/sleep-2", False),
        ("sleep", "spiffe://td/ns/foo/extra/sa/sleep/more", True),
        ("sleep", None, False),
    ],
)
def test_service_accounts(tmp_path: Path, value: str, principal: str | None, expected: bool) -> None:
    check(
        tmp_path,
        allow_rule(f'from: [{{source: {{serviceAccounts: ["{value}"]}}}}]'),
        http_request(principal=principal),
        expected,
    )


@pytest.mark.parametrize(
    ("value", "principal", "expected"),
    [
        ("cluster.local", SLEEP, True),
        ("other.td", SLEEP, False),
        ("*", SLEEP, True),
        ("cluster.*", SLEEP, True),
        ("*.local", SLEEP, True),
        ("cluster", SLEEP, False),
    ],
)
def test_trust_domains(tmp_path: Path, value: str, principal: str, expected: bool) -> None:
    check(
        tmp_path,
        allow_rule(f'from: [{{source: {{trustDomains: ["{value}"]}}}}]'),
        http_request(principal=principal),
        expected,
    )


def test_trust_domain_aliases_rewrite_principals(tmp_path: Path) -> None:
    text = allow_rule('from: [{source: {principals: ["cluster.local/ns/foo/sa/sleep"]}}]')
    snap = snapshot_from_yaml(tmp_path, text, trust_domain="new-td", aliases=("old-td",))
    # "cluster.local" points at the local trust domain and its aliases.
    assert allowed(snap, http_request(principal="spiffe://new-td/ns/foo/sa/sleep"))
    assert allowed(snap, http_request(principal="spiffe://old-td/ns/foo/sa/sleep"))
    assert not allowed(snap, http_request(principal="spiffe://cluster.local/ns/foo/sa/sleep"))
    assert not allowed(snap, http_request(principal="spiffe://evil-td/ns/foo/sa/sleep"))


def test_trust_domain_aliases_leave_foreign_and_wildcard_principals(tmp_path: Path) -> None:
    text = allow_rule('from: [{source: {principals: ["foreign/ns/foo/sa/sleep", "*/ns/foo/sa/x"]}}]')
    snap = snapshot_from_yaml(tmp_path, text, trust_domain="new-td", aliases=("old-td",))
    assert allowed(snap, http_request(principal="spiffe://foreign/ns/foo/sa/sleep"))
    assert not allowed(snap, http_request(principal="spiffe://new-td/ns/foo/sa/sleep"))
    assert allowed(snap, http_request(principal="spiffe://anything/ns/foo/sa/x"))


def test_trust_domain_aliases_expand_trust_domains(tmp_path: Path) -> None:
    text = allow_rule('from: [{source: {trustDomains: ["new-td"]}}]')
    snap = snapshot_from_yaml(tmp_path, text, trust_domain="new-td", aliases=("old-td",))
    assert allowed(snap, http_request(principal="spiffe://old-td/ns/foo/sa/sleep"))
    assert not allowed(snap, http_request(principal="spiffe://third/ns/foo/sa/sleep"))


def test_source_principal_when_key_uses_aliases_too(tmp_path: Path) -> None:
    text = allow_rule('when: [{key: source.principal, values: ["cluster.local/ns/foo/sa/sleep"]}]')
    snap = snapshot_from_yaml(tmp_path, text, trust_domain="new-td", aliases=("old-td",))
    assert allowed(snap, http_request(principal="spiffe://old-td/ns/foo/sa/sleep"))


# --- addresses ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "kw", "expected"),
    [
        ("ipBlocks", "10.0.0.1", {"source_ip": "10.0.0.1"}, True),
        ("ipBlocks", "10.0.0.0/8", {"source_ip": "10.9.9.9"}, True),
        ("ipBlocks", "10.1.2.3/16", {"source_ip": "10.1.9.9"}, True),  # host bits are masked
        ("ipBlocks", "10.0.0.2", {"source_ip": "10.0.0.1"}, False),
        ("ipBlocks", "::/0", {"source_ip": "10.0.0.1"}, False),  # families never mix
        ("ipBlocks", "2001:db8::/32", {"source_ip": "2001:db8::1"}, True),
        # ipBlocks is the physical peer, never x-forwarded-for
        ("ipBlocks", "1.2.3.4", {"headers": {"x-forwarded-for": "1.2.3.4"}}, False),
        ("remoteIpBlocks", "1.2.3.4", {"headers": {"x-forwarded-for": "1.2.3.4"}}, True),
        ("remoteIpBlocks", "1.2.3.4", {"headers": {"x-forwarded-for": "1.2.3.4, 5.6.7.8"}}, False),
        ("remoteIpBlocks", "1.2.3.4", {"headers": {"x-forwarded-for": "1.2.3.4, 5.6.7.8"}, "xff_hops": 1}, True),
        ("remoteIpBlocks", "10.0.0.1", {"headers": {"x-forwarded-for": "garbage"}}, True),  # falls back to the peer
        ("remoteIpBlocks", "10.0.0.1", {}, True),
    ],
)
def test_ip_blocks(tmp_path: Path, field: str, value: str, kw: dict, expected: bool) -> None:
    check(tmp_path, allow_rule(f'from: [{{source: {{{field}: ["{value}"]}}}}]'), http_request(**kw), expected)


@pytest.mark.parametrize(
    ("key", "value", "kw", "expected"),
    [
        ("source.ip", "10.0.0.1", {}, True),
        ("remote.ip", "9.9.9.9", {"headers": {"x-forwarded-for": "9.9.9.9"}}, True),
        ("destination.ip", "10.0.0.0/24", {"destination_ip": "10.0.0.2"}, True),
        ("destination.ip", "10.0.1.0/24", {"destination_ip": "10.0.0.2"}, False),
        ("destination.port", "8000", {"destination_port": 8000}, True),
        ("destination.port", "8001", {"destination_port": 8000}, False),
        ("connection.sni", "api.example.com", {"sni": "api.example.com"}, True),
        ("connection.sni", "*.example.com", {"sni": "api.example.com"}, True),
        ("connection.sni", "api.*", {"sni": "api.example.com"}, True),
        ("connection.sni", "*", {"sni": ""}, False),
        ("source.namespace", "foo", {"principal": SLEEP}, True),
        ("source.serviceAccount", "foo/sleep", {"principal": SLEEP}, True),
        ("source.trustDomain", "cluster.local", {"principal": SLEEP}, True),
        ("source.principal", "cluster.local/ns/foo/sa/sleep", {"principal": SLEEP}, True),
    ],
)
def test_when_connection_keys(tmp_path: Path, key: str, value: str, kw: dict, expected: bool) -> None:
    check(tmp_path, allow_rule(f'when: [{{key: {key}, values: ["{value}"]}}]'), http_request(**kw), expected)


def test_ports(tmp_path: Path) -> None:
    snap = snapshot_from_yaml(tmp_path, allow_rule('to: [{operation: {ports: ["8000", "9000"]}}]'))
    assert allowed(snap, http_request(destination_port=9000))
    assert not allowed(snap, http_request(destination_port=9001))
    assert allowed(snap, tcp_connection(destination_port=8000))  # ports work on TCP


# --- request principals and JWT claims -----------------------------------------------------

JWT = {"iss": "https://accounts.example.com/realm", "sub": "user-1", "aud": ["api", "web"], "azp": "client-9"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("https://accounts.example.com/realm/user-1", True),  # split at the LAST "/"
        ("https://accounts.example.com/realm/user-2", False),
        ("*", True),
        ("https://accounts.example.com/realm/*", True),  # iss exact, sub any
        ("https://other/realm/*", False),
        ("*/user-1", True),  # iss any, sub exact
        ("*example.com/realm/user-1", True),  # iss suffix, sub exact
        ("*-1", True),  # no "/": iss any, sub suffix
        ("*-2", False),
        ("https*", True),  # no "/": an issuer prefix with any subject
        ("https://accounts.example.com/realm/user*", True),  # with "/": iss exact, sub prefix
    ],
)
def test_request_principals(tmp_path: Path, value: str, expected: bool) -> None:
    check(
        tmp_path, allow_rule(f'from: [{{source: {{requestPrincipals: ["{value}"]}}}}]'), http_request(jwt=JWT), expected
    )


def test_request_principal_prefix_forms(tmp_path: Path) -> None:
    """`x*` without "/" is an issuer prefix with any subject; with "/" the subject is the prefix."""
    jwt = {"iss": "issuer-a", "sub": "alice"}
    snap = snapshot_from_yaml(tmp_path, allow_rule('from: [{source: {requestPrincipals: ["issuer*"]}}]'))
    assert allowed(snap, http_request(jwt=jwt))
    snap = snapshot_from_yaml(tmp_path, allow_rule('from: [{source: {requestPrincipals: ["issuer-a/al*"]}}]'))
    assert allowed(snap, http_request(jwt=jwt))
    assert not allowed(snap, http_request(jwt={"iss": "issuer-a", "sub": "bob"}))


def test_request_principals_need_a_token(tmp_path: Path) -> None:
    snap = snapshot_from_yaml(tmp_path, allow_rule('from: [{source: {requestPrincipals: ["*"]}}]'))
    assert not allowed(snap, http_request())
    assert not allowed(snap, http_request(jwt={"iss": "x"}))  # no sub
    assert not allowed(snap, http_request(jwt={"iss": "x", "sub": 5}))  # not a string
    deny = policy("deny-no-token", 'action: DENY\nrules:\n- from: [{source: {notRequestPrincipals: ["*"]}}]')
    snap = snapshot_from_yaml(tmp_path, deny)
    assert not allowed(snap, http_request())
    assert allowed(snap, http_request(jwt=JWT))


@pytest.mark.parametrize(
    ("key", "values", "jwt", "expected"),
    [
        ("request.auth.audiences", ["api"], JWT, True),  # element of a list claim
        ("request.auth.audiences", ["mobile"], JWT, False),
        ("request.auth.audiences", ["api"], {"aud": "api"}, True),  # plain string claim
        ("request.auth.presenter", ["client-9"], JWT, True),
        ("request.auth.presenter", ["client-*"], JWT, True),
        ("request.auth.principal", ["https://accounts.example.com/realm/user-1"], JWT, True),
        ("request.auth.claims[groups]", ["admin"], {"groups": ["dev", "admin"]}, True),
        ("request.auth.claims[groups]", ["adm*"], {"groups": ["dev", "admin"]}, True),
        ("request.auth.claims[groups]", ["admin"], {"groups": "admin"}, True),
        ("request.auth.claims[nested][key]", ["v"], {"nested": {"key": "v"}}, True),
        ("request.auth.claims[nested][key]", ["v"], {"nested": {"key": ["v"]}}, True),
        ("request.auth.claims[nested][key]", ["v"], {"nested": [{"key": "v"}]}, False),
        ("request.auth.claims[a.b]", ["v"], {"a.b": "v"}, True),  # dots in brackets are literal
        ("request.auth.claims[a.b]", ["v"], {"a": {"b": "v"}}, False),
        ("request.auth.claims[admin]", ["true"], {"admin": True}, False),  # booleans never match
        ("request.auth.claims[level]", ["5"], {"level": 5}, False),  # numbers never match
        ("request.auth.claims[level]", ["*"], {"level": 5}, False),
        ("request.auth.claims[scope]", ["write"], {"scope": "read write"}, True),  # split on spaces
        ("request.auth.claims[permission]", ["b"], {"permission": "a b"}, True),
        ("request.auth.claims[roles]", ["write"], {"roles": "read write"}, False),  # only scope/permission split
        ("request.auth.claims[scope]", ["read write"], {"scope": "read write"}, False),
        ("request.auth.claims[nested][scope]", ["b"], {"nested": {"scope": "a b"}}, False),  # top-level only
        ("request.auth.claims[missing]", ["*"], JWT, False),
    ],
)
def test_jwt_claims(tmp_path: Path, key: str, values: list[str], jwt: dict, expected: bool) -> None:
    vals = ", ".join(f'"{v}"' for v in values)
    check(tmp_path, allow_rule(f"when: [{{key: '{key}', values: [{vals}]}}]"), http_request(jwt=jwt), expected)


def test_not_values_on_claims_are_true_without_a_token(tmp_path: Path) -> None:
    text = allow_rule("when: [{key: 'request.auth.claims[groups]', notValues: ['banned']}]")
    snap = snapshot_from_yaml(tmp_path, text)
    assert allowed(snap, http_request())
    assert not allowed(snap, http_request(jwt={"groups": ["banned"]}))


# --- operations ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "host", "expected"),
    [
        ("httpbin.foo", "httpbin.foo", True),
        ("httpbin.foo", "HTTPBIN.Foo", True),  # case-insensitive
        ("HTTPBIN.FOO", "httpbin.foo", True),
        ("httpbin.foo", "httpbin.foo:8000", False),  # port-sensitive
        ("httpbin.foo:*", "httpbin.foo:8000", True),
        ("*.foo", "httpbin.FOO", True),
        ("httpbin.*", "Httpbin.bar", True),
        ("*", "anything", True),
    ],
)
def test_hosts(tmp_path: Path, value: str, host: str, expected: bool) -> None:
    check(tmp_path, allow_rule(f'to: [{{operation: {{hosts: ["{value}"]}}}}]'), http_request(host=host), expected)


@pytest.mark.parametrize(
    ("value", "method", "expected"),
    [("GET", "GET", True), ("GET", "get", False), ("P*", "POST", True), ("*T", "POST", True), ("*", "PATCH", True)],
)
def test_methods(tmp_path: Path, value: str, method: str, expected: bool) -> None:
    check(tmp_path, allow_rule(f'to: [{{operation: {{methods: ["{value}"]}}}}]'), http_request(method=method), expected)


@pytest.mark.parametrize(
    ("value", "path", "expected"),
    [
        ("/a", "/a", True),
        ("/a", "/a?x=1", True),  # compared without the query
        ("/a", "/a#frag", True),
        ("/a", "/a/", False),
        ("/a", "/A", False),
        ("/a*", "/abc/d", True),
        ("*.json", "/x/y.json?z", True),
        ("*", "/", True),
        ("/a/{*}/c", "/a/b/c", True),
        ("/a/{*}/c", "/a/b/b/c", False),
        ("/a/{*}/c", "/a//c", False),  # {*} is one non-empty segment
        ("/a/{**}", "/a/b/c/d", True),
        ("/a/{**}", "/a/", True),
        ("/a/{**}", "/a", False),
        ("/{*}/b/{**}", "/x/b/y/z?q=1", True),
        ("/a/{*}", "/a/b c", False),  # not a valid path segment character
        ("/a/{*}", "/a/b%20c", True),
    ],
)
def test_paths(tmp_path: Path, value: str, path: str, expected: bool) -> None:
    check(tmp_path, allow_rule(f'to: [{{operation: {{paths: ["{value}"]}}}}]'), http_request(path=path), expected)


@pytest.mark.parametrize(
    ("key", "value", "headers", "expected"),
    [
        ("request.headers[X-User]", "alice", {"x-user": "alice"}, True),  # name case-insensitive
        ("request.headers[x-user]", "alice", {"x-user": "Alice"}, False),  # value case-sensitive
        ("request.headers[x-user]", "ali*", {"x-user": "alice"}, True),
        ("request.headers[x-user]", "*ice", {"x-user": "alice"}, True),
        ("request.headers[x-user]", "*", {"x-user": ""}, True),  # `*` is a presence match
        ("request.headers[x-user]", "*", {}, False),
        ("request.headers[x-user]", "a,b", {"x-user": "a,b"}, True),  # repeated headers arrive joined
        ("request.headers[:method]", "GET", {}, True),
        ("request.headers[:authority]", "httpbin.foo", {}, True),
    ],
)
def test_request_headers(tmp_path: Path, key: str, value: str, headers: dict, expected: bool) -> None:
    check(
        tmp_path, allow_rule(f"when: [{{key: '{key}', values: ['{value}']}}]"), http_request(headers=headers), expected
    )


@pytest.mark.parametrize(
    ("values", "metadata", "expected"),
    [
        (["v1"], {"envoy.filters.http.custom": {"key": "v1"}}, True),
        (["v*"], {"envoy.filters.http.custom": {"key": "v1"}}, True),
        (["v1"], {"envoy.filters.http.custom": {"key": ["v1"]}}, False),
        (["[v1]"], {"envoy.filters.http.custom": {"key": ["v0", "v1"]}}, True),  # [v] is a list match
        (["[v1]"], {"envoy.filters.http.custom": {"key": "v1"}}, False),
        (["v1"], {"envoy.filters.http.other": {"key": "v1"}}, False),
        (["v1"], {}, False),
    ],
)
def test_experimental_envoy_filter_metadata(tmp_path: Path, values: list[str], metadata: dict, expected: bool) -> None:
    vals = ", ".join(f"'{v}'" for v in values)
    text = allow_rule(f"when: [{{key: 'experimental.envoy.filters.http.custom[key]', values: [{vals}]}}]")
    check(tmp_path, text, http_request(metadata=metadata), expected)
    # Metadata conditions are not HTTP-only: they apply to TCP connections too.
    check(tmp_path, text, tcp_connection(metadata=metadata), expected)


# --- TCP: HTTP-only attributes --------------------------------------------------------------


def test_tcp_allow_rule_with_http_field_is_dropped(tmp_path: Path) -> None:
    text = policy(
        "p",
        """
rules:
- from: [{source: {principals: ["cluster.local/ns/foo/sa/sleep"]}}]
  to: [{operation: {methods: ["GET"]}}]
- from: [{source: {principals: ["cluster.local/ns/bar/sa/other"]}}]
""",
    )
    snap = snapshot_from_yaml(tmp_path, text)
    # rule 0 uses methods (HTTP-only): on TCP the whole rule disappears
    assert not allowed(snap, tcp_connection(principal=SLEEP))
    assert allowed(snap, tcp_connection(principal=OTHER))
    assert allowed(snap, http_request(principal=SLEEP))


@pytest.mark.parametrize(
    "rule",
    [
        'to: [{operation: {methods: ["GET"]}}]',
        'to: [{operation: {notPaths: ["/x"]}}]',
        'to: [{operation: {hosts: ["h"]}}]',
        'from: [{source: {requestPrincipals: ["*"]}}]',
        "when: [{key: 'request.headers[x]', values: ['y']}]",
        "when: [{key: 'request.auth.claims[g]', values: ['y']}]",
        "when: [{key: request.auth.audiences, values: ['y']}]",
        "when: [{key: request.auth.presenter, values: ['y']}]",
        "when: [{key: request.auth.principal, values: ['y']}]",
    ],
)
def test_tcp_deny_rule_drops_only_http_conditions(tmp_path: Path, rule: str) -> None:
    text = policy("deny", "action: DENY\nrules:\n- " + rule)
    snap = snapshot_from_yaml(tmp_path, text)
    assert not allowed(snap, tcp_connection()), "the dropped condition widens DENY to every connection"


def test_tcp_deny_keeps_tcp_conditions(tmp_path: Path) -> None:
    text = policy(
        "deny",
        'action: DENY\nrules:\n- from: [{source: {namespaces: ["bar"]}}]\n  to: [{operation: {methods: ["GET"]}}]',
    )
    snap = snapshot_from_yaml(tmp_path, text)
    assert not allowed(snap, tcp_connection(principal=OTHER))
    assert allowed(snap, tcp_connection(principal=SLEEP))


def test_tcp_allow_policy_with_only_http_rules_denies_all(tmp_path: Path) -> None:
    snap = snapshot_from_yaml(tmp_path, allow_rule('to: [{operation: {paths: ["/"]}}]'))
    d = decide(snap, tcp_connection(principal=SLEEP))
    assert not d.allowed and "no ALLOW rule applies to this protocol" in d.reason


# --- which policies apply --------------------------------------------------------------------


def test_root_namespace_policy_applies_mesh_wide(tmp_path: Path) -> None:
    text = policy("mesh", "action: DENY\nrules: [{}]", namespace="istio-system")
    assert not allowed(snapshot_from_yaml(tmp_path, text), http_request())
    assert not allowed(snapshot_from_yaml(tmp_path, text, namespace="bar"), http_request())


def test_other_namespace_policy_does_not_apply(tmp_path: Path) -> None:
    assert allowed(
        snapshot_from_yaml(tmp_path, policy("p", "action: DENY\nrules: [{}]", namespace="bar")), http_request()
    )


def test_selector_must_be_a_subset_of_workload_labels(tmp_path: Path) -> None:
    text = policy("p", "action: DENY\nselector: {matchLabels: {app: httpbin, version: v1}}\nrules: [{}]")
    assert allowed(snapshot_from_yaml(tmp_path, text, labels={"app": "httpbin"}), http_request())
    assert not allowed(
        snapshot_from_yaml(tmp_path, text, labels={"app": "httpbin", "version": "v1", "x": "y"}), http_request()
    )


def test_root_namespace_selector_is_matched_in_every_namespace(tmp_path: Path) -> None:
    text = policy("p", "action: DENY\nselector: {matchLabels: {app: httpbin}}\nrules: [{}]", namespace="istio-system")
    assert not allowed(snapshot_from_yaml(tmp_path, text, namespace="bar"), http_request())
    assert allowed(snapshot_from_yaml(tmp_path, text, namespace="bar", labels={"app": "x"}), http_request())


def test_target_refs_are_ignored_for_a_sidecar(tmp_path: Path) -> None:
    text = policy(
        "p", "action: DENY\ntargetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}]\nrules: [{}]"
    )
    snap = snapshot_from_yaml(tmp_path, text)
    assert allowed(snap, http_request())
    assert snap.ignored_policies and "targetRef" in snap.ignored_policies[0][1]


# --- CUSTOM ---------------------------------------------------------------------------------

MESH = """
apiVersion: extproc.io/v1alpha1
kind: MeshConfig
metadata: {name: mesh}
spec:
  extensionProviders:
  - name: authz-grpc
    envoyExtAuthzGrpc: {service: authz.example, port: 9000}
  - name: authz-http
    envoyExtAuthzHttp: {service: authz.example, port: 8000}
---
"""


def test_custom_policy_selects_its_provider(tmp_path: Path) -> None:
    text = MESH + policy(
        "ext", "action: CUSTOM\nprovider: {name: authz-grpc}\nrules:\n- to: [{operation: {paths: ['/ext*']}}]"
    )
    snap = snapshot_from_yaml(tmp_path, text)
    hits, bad = engine.custom_providers(snap.http, http_request("/ext/a"))
    assert bad is None and hits == [("authz-grpc", "ns[foo]-policy[ext]-rule[0]")]
    assert engine.custom_providers(snap.http, http_request("/other")) == ([], None)
    # on TCP the paths condition is dropped (CUSTOM is built like DENY): every connection goes to the provider
    assert engine.custom_providers(snap.tcp, tcp_connection())[0] == [("authz-grpc", "ns[foo]-policy[ext]-rule[0]")]


def test_custom_http_provider_is_skipped_on_tcp(tmp_path: Path) -> None:
    text = MESH + policy("ext", "action: CUSTOM\nprovider: {name: authz-http}\nrules: [{}]")
    snap = snapshot_from_yaml(tmp_path, text)
    assert engine.custom_providers(snap.http, http_request())[0] == [("authz-http", "ns[foo]-policy[ext]-rule[0]")]
    assert engine.custom_providers(snap.tcp, tcp_connection()) == ([], None)


def test_custom_unknown_provider_denies_what_it_matches(tmp_path: Path) -> None:
    text = policy("ext", "action: CUSTOM\nprovider: {name: missing}\nrules:\n- to: [{operation: {paths: ['/ext']}}]")
    snap = snapshot_from_yaml(tmp_path, text)
    d = decide(snap, http_request("/ext"))
    assert not d.allowed and d.stage == "custom" and d.policy_id.endswith("-deny-due-to-bad-CUSTOM-action")
    assert allowed(snap, http_request("/other"))


def test_custom_several_providers_deny_unless_enabled(tmp_path: Path) -> None:
    text = (
        MESH
        + policy("a", "action: CUSTOM\nprovider: {name: authz-grpc}\nrules:\n- to: [{operation: {paths: ['/a']}}]")
        + policy("b", "action: CUSTOM\nprovider: {name: authz-http}\nrules:\n- to: [{operation: {paths: ['/b']}}]")
    )
    snap = snapshot_from_yaml(tmp_path, text)
    assert not allowed(snap, http_request("/a"))
    assert not allowed(snap, http_request("/b"))
    assert allowed(snap, http_request("/c"))
    snap = snapshot_from_yaml(tmp_path, text, options=Options(multiple_custom_providers=True))
    assert engine.custom_providers(snap.http, http_request("/b"))[0] == [("authz-http", "ns[foo]-policy[b]-rule[0]")]


# --- explanations ---------------------------------------------------------------------------


def test_effective_policy_is_the_first_by_name_like_envoy(tmp_path: Path) -> None:
    text = policy("zeta", "action: DENY\nrules: [{}]") + policy("alpha", "action: DENY\nrules: [{}, {}]")
    d = decide(snapshot_from_yaml(tmp_path, text), http_request())
    assert d.policy_id == "ns[foo]-policy[alpha]-rule[0]"


def test_trace_explains_every_rule(tmp_path: Path) -> None:
    text = allow_rule('from: [{source: {namespaces: ["bar"]}}]\nto: [{operation: {methods: ["GET"]}}]')
    snap = snapshot_from_yaml(tmp_path, text)
    [t] = engine.trace(snap.http, http_request(method="POST", principal=OTHER))
    assert not t.matched and t.why_not == "to[0].operation.methods did not match"
    [t] = engine.trace(snap.http, http_request(method="GET", principal=SLEEP))
    assert t.why_not == "from[0].source.namespaces did not match"
