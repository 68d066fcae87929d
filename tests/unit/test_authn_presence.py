"""`presence` and `spaceDelimitedClaims` of a jwtRule, end to end through the engines: YAML
loaded as `extproc validate` and `serve` load it, a snapshot built for a workload, real
signed tokens authenticated by the snapshot's program, and the result decided by its
AuthorizationPolicies (the status a client would see).

What Istio does (istio/istio#60823 and its implementation; policy_applier.go):
  * OPTIONAL (the default): a rule's token may be absent; one valid token of any rule is
    enough (`requires_any{P0.., requires_all{any{Pi, allow_missing}..}}`);
  * REQUIRED: that rule's token must be present and valid, whatever the other rules have;
    once any rule is REQUIRED the requirement is `requires_all` over every rule, the
    required ones bare, the optional ones with `allow_missing`; a missing required token is
    jwt_authn's 401 "Jwt is missing" (with a challenge that has no `error`);
  * spaceDelimitedClaims: the listed top-level string claims, plus `scope` and `permission`
    always, reach `request.auth.claims[...]` split on spaces (Envoy's
    normalize_payload_in_metadata); a nested claim or one not listed stays one string.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from extproc.authn.keys import KeySet
from extproc.authn.program import Provider, compile_rules
from extproc.authn.status import Status
from extproc.authn.verifier import authenticate, www_authenticate
from extproc.decision.decide import decide
from extproc.snapshot.compiled import Snapshot
from extproc.verdict import Verdict
from tests.unit.authn_helpers import ISS, ISS_B, KID, NOW, claims, default_keyset, jwk, jwks_json, rsa_key, rule, sign
from tests.unit.helpers import http_request, policy, snapshot_from_yaml

JWKS = jwks_json(jwk(rsa_key(0), kid=KID, alg="RS256"))
SCOPE_HEADER = "x-scope-token"


def request_authentication(name: str, rules: str, namespace: str = "foo") -> str:
    body = textwrap.indent(textwrap.dedent(rules).strip("\n"), "  ")
    return (
        f"apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  jwtRules:\n{body}\n---\n"
    )


def jwt_rule(issuer: str, presence: str | None = None, header: str | None = None, **extra: str) -> str:
    lines = [f"- issuer: {issuer}", f"  jwks: '{JWKS}'"]
    if presence:
        lines.append(f"  presence: {presence}")
    if header:
        lines.append(f"  fromHeaders: [{{name: {header}}}]")
    lines += [f"  {k}: {v}" for k, v in extra.items()]
    return "\n".join(lines)


def remote_keys(_: Provider) -> KeySet | None:
    return default_keyset()


def send(snap: Snapshot, headers: dict[str, str] | None = None) -> Verdict:
    """One GET through the snapshot's JWT stage and then its policies."""
    attrs = http_request(path="/api", headers=headers)
    assert attrs.http is not None
    hs = {k: v for k, v in attrs.http.headers.items()}
    authn = authenticate(snap.authn, "GET", hs, NOW, remote_keys) if snap.authn.enabled else None
    return decide(snap, attrs, authn)


def tok(iss: str = ISS, **extra: Any) -> str:
    return sign(claims(iss=iss, **extra))


A = {"authorization": f"Bearer {tok(ISS)}"}
B = {SCOPE_HEADER: tok(ISS_B)}
BAD_B = {SCOPE_HEADER: tok(ISS_B, exp=NOW - 3600)}


# --- presence ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("presence_a", "presence_b", "headers", "status"),
    [
        # Both OPTIONAL (Istio's behaviour before `presence`): any one valid token, or none.
        (None, None, {}, 200),
        (None, None, A, 200),
        (None, None, B, 200),
        (None, None, {**A, **B}, 200),
        (None, None, {**A, **BAD_B}, 200),  # requires_any: A alone satisfies it, B is never looked at
        ("OPTIONAL", "OPTIONAL", {}, 200),
        # A REQUIRED, B OPTIONAL: A must be there; B, if sent, must be valid.
        ("REQUIRED", None, {}, 401),
        ("REQUIRED", None, B, 401),
        ("REQUIRED", None, A, 200),
        ("REQUIRED", "OPTIONAL", {**A, **B}, 200),
        ("REQUIRED", None, {**A, **BAD_B}, 401),
        # Both REQUIRED: both tokens, both valid.
        ("REQUIRED", "REQUIRED", {**A, **B}, 200),
        ("REQUIRED", "REQUIRED", A, 401),
        ("REQUIRED", "REQUIRED", B, 401),
        ("REQUIRED", "REQUIRED", {}, 401),
        ("REQUIRED", "REQUIRED", {**A, **BAD_B}, 401),
    ],
)
def test_presence_decides_which_tokens_must_be_sent(
    tmp_path: Path, presence_a: str | None, presence_b: str | None, headers: dict[str, str], status: int
) -> None:
    text = request_authentication(
        "multi", jwt_rule(ISS, presence_a) + "\n" + jwt_rule(ISS_B, presence_b, header=SCOPE_HEADER)
    )
    verdict = send(snapshot_from_yaml(tmp_path, text), headers)
    assert (verdict.status if not verdict.allowed else 200) == status, verdict


def test_a_missing_required_token_is_jwt_authns_401_without_an_error_in_the_challenge(tmp_path: Path) -> None:
    snap = snapshot_from_yaml(tmp_path, request_authentication("one", jwt_rule(ISS, "REQUIRED")))
    result = authenticate(snap.authn, "GET", {":path": "/", ":authority": "h"}, NOW, remote_keys)
    assert result.status is Status.JWT_MISSED and result.http_code == 401
    assert www_authenticate(result.status, {":path": "/", ":authority": "h"}, "http") == 'Bearer realm="http://h/"'
    assert send(snap, {}).status == 401


def test_required_rules_of_different_resources_combine(tmp_path: Path) -> None:
    # The root namespace's rule is REQUIRED, the workload namespace's OPTIONAL: every rule of
    # every applicable resource goes into one requirement, so the root's token is needed.
    text = request_authentication("mesh", jwt_rule(ISS, "REQUIRED"), namespace="istio-system")
    text += request_authentication("ns", jwt_rule(ISS_B, header=SCOPE_HEADER))
    snap = snapshot_from_yaml(tmp_path, text)
    assert send(snap, B).status == 401
    assert send(snap, {**A, **B}).allowed


def test_required_rule_holds_even_when_an_authorization_policy_would_allow(tmp_path: Path) -> None:
    text = request_authentication("one", jwt_rule(ISS, "REQUIRED")) + policy("allow-all", "rules: [{}]")
    verdict = send(snapshot_from_yaml(tmp_path, text), {})
    assert not verdict.allowed and verdict.status == 401


def test_presence_compiles_to_istios_requirement_tree() -> None:
    from extproc.authn.program import RequireAll, RequireAny, RequireProvider

    one = compile_rules([rule(ISS, required=True)])
    assert isinstance(one.root, RequireProvider)
    mixed = compile_rules([rule(ISS_B), rule(ISS, required=True)])  # sorted by issuer: ISS first
    assert isinstance(mixed.root, RequireAll)
    first, second = mixed.root.children
    assert isinstance(first, RequireProvider) and first.provider.issuer == ISS
    assert isinstance(second, RequireAny) and second.allow_missing


def test_envoy_translation_drops_allow_missing_for_required_rules() -> None:
    from reference.envoy_jwt import jwt_authn_filter

    ra = {"spec": {"jwtRules": [{"issuer": "b", "jwks": JWKS}, {"issuer": "a", "jwks": JWKS, "presence": "REQUIRED"}]}}
    requires = jwt_authn_filter([ra])["typed_config"]["rules"][0]["requires"]
    assert requires == {
        "requires_all": {
            "requirements": [
                {"provider_name": "origins-0"},
                {"requires_any": {"requirements": [{"provider_name": "origins-1"}, {"allow_missing": {}}]}},
            ]
        }
    }


# --- a jwksUri without an issuer --------------------------------------------------------------


def test_a_rule_with_only_a_jwks_uri_verifies_tokens_of_any_issuer(tmp_path: Path) -> None:
    text = request_authentication("keys-only", "- jwksUri: https://keys.example.com/jwks.json")
    snap = snapshot_from_yaml(tmp_path, text)
    (provider,) = snap.authn.providers
    assert provider.issuer == "" and provider.remote is not None
    assert send(snap, {"authorization": f"Bearer {tok('https://anyone.example')}"}).allowed
    assert send(snap, {"authorization": f"Bearer {tok(exp=NOW - 3600)}"}).status == 401


# --- spaceDelimitedClaims -----------------------------------------------------------------------


def claim_policy(key: str, value: str) -> str:
    return policy("claim", f"rules:\n- when:\n  - key: request.auth.claims{key}\n    values: ['{value}']")


@pytest.mark.parametrize(
    ("delimited", "payload", "key", "value", "allowed"),
    [
        # scope and permission are always split
        (None, {"scope": "read write"}, "[scope]", "write", True),
        (None, {"permission": "a b"}, "[permission]", "b", True),
        (None, {"scope": "read write"}, "[scope]", "read write", False),
        # a listed claim is split; an unlisted one is not
        ("[roles]", {"roles": "user admin"}, "[roles]", "admin", True),
        (None, {"roles": "user admin"}, "[roles]", "admin", False),
        (None, {"roles": "user admin"}, "[roles]", "user admin", True),
        # listing claims keeps the defaults
        ("[roles]", {"scope": "read write"}, "[scope]", "read", True),
        # repeated and surrounding spaces give no empty items; a one-word value is a one-item list
        ("[roles]", {"roles": "  user   admin "}, "[roles]", "admin", True),
        ("[roles]", {"roles": "admin"}, "[roles]", "admin", True),
        # a dotted name is a top-level claim of that name, never a path
        ("['a.b']", {"a.b": "x y"}, "[a.b]", "y", True),
        ("['a.b']", {"a": {"b": "x y"}}, "[a][b]", "y", False),
        ("['a.b']", {"a": {"b": "x y"}}, "[a][b]", "x y", True),
        # only strings are split; a list stays a list
        ("[roles]", {"roles": ["user admin", "ops"]}, "[roles]", "ops", True),
        ("[roles]", {"roles": ["user admin", "ops"]}, "[roles]", "admin", False),
    ],
)
def test_space_delimited_claims_reach_authorization_as_lists(
    tmp_path: Path, delimited: str | None, payload: dict[str, Any], key: str, value: str, allowed: bool
) -> None:
    extra = {"spaceDelimitedClaims": delimited} if delimited else {}
    text = request_authentication("ra", jwt_rule(ISS, **extra)) + claim_policy(key, value)
    snap = snapshot_from_yaml(tmp_path, text)
    verdict = send(snap, {"authorization": f"Bearer {tok(**payload)}"})
    assert verdict.allowed is allowed, verdict
    if not allowed:
        assert verdict.status == 403
