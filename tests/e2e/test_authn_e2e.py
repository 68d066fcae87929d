"""RequestAuthentication through a real Envoy and extproc, with keys from a real jwksUri.

The module-scoped stack (tests/e2e/conftest.py) runs Envoy with only ext_authz, pointed at
extproc; local JWKS servers (tests/fixtures/jwks_server.py) serve the keys extproc
fetches. What a user sees is checked: status codes and bodies (401 for a bad token, 403
for a wrong audience or for a policy that wants a principal), what the upstream receives
(claim and payload headers, the token stripped or kept), AuthorizationPolicies decided on
extproc's own verification (this Envoy has no jwt_authn filter), a key rotation picked up
without a restart, and a JWKS server that is down from the start.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import Stack
from tests.fixtures.jwks_server import JwksServer
from tests.fixtures.jwt_keys import TokenIssuer
from tests.fixtures.procs import free_port, http_get
from tests.fixtures.stack import Response

pytestmark = pytest.mark.e2e

ISS = "https://issuer.e2e.example"
OTHER_ISS = "https://other.e2e.example"
AUD = "api.e2e.example"
HOST = "httpbin.foo"
RBAC_DENIED = "RBAC: access denied"
EXPIRED = "Jwt is expired"
UNKNOWN_ISSUER = "Jwt issuer is not configured"
BAD_AUDIENCE = "Audiences in Jwt are not allowed"
VERIFICATION_FAILS = "Jwt verification fails"
NO_MATCHING_KEY = "Jwks doesn't have key to match kid or alg from Jwt"
BAD_FORMAT = "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"


def jwks_of(*issuers: TokenIssuer) -> dict[str, Any]:
    return {"keys": [k for i in issuers for k in json.loads(i.jwks())["keys"]]}


def request_authentication(jwks_uri: str, **rule: Any) -> str:
    spec_rule: dict[str, Any] = {
        "issuer": ISS,
        "jwksUri": jwks_uri,
        "audiences": [AUD],
        "outputPayloadToHeader": "x-jwt-payload",
        "outputClaimToHeaders": [
            {"header": "x-jwt-sub", "claim": "sub"},
            {"header": "x-jwt-team", "claim": "org.team"},
            {"header": "x-jwt-level", "claim": "level"},
        ],
        **rule,
    }
    doc = {
        "apiVersion": "security.istio.io/v1",
        "kind": "RequestAuthentication",
        "metadata": {"name": "jwt", "namespace": "foo"},
        "spec": {"selector": {"matchLabels": {"app": "httpbin"}}, "jwtRules": [spec_rule]},
    }
    return yaml.safe_dump(doc, sort_keys=False) + "---\n"


def authorization_policy(name: str, spec: str) -> str:
    head = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "foo"},
    }
    return (
        yaml.safe_dump(head, sort_keys=False)
        + "spec:\n"
        + textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ")
        + "\n---\n"
    )


REQUIRE_PRINCIPAL = authorization_policy("require-jwt", 'rules:\n- from: [{source: {requestPrincipals: ["*"]}}]')
ALLOW_ALL = authorization_policy("allow-all", "rules: [{}]")


@pytest.fixture(scope="module")
def issuer() -> TokenIssuer:
    return TokenIssuer(ISS, kid="k1")


@pytest.fixture(scope="module")
def jwks(issuer: TokenIssuer) -> Iterator[JwksServer]:
    server = JwksServer(jwks_of(issuer)).start()
    try:
        yield server
    finally:
        server.stop()


def claims(sub: str = "alice", aud: Any = AUD, **extra: Any) -> dict[str, Any]:
    return {"sub": sub, "aud": aud, **extra}


def send(stack: Stack, token: str | None = None, path: str = "/anything", **headers: str) -> Response:
    h = {"host": HOST, **{k.replace("_", "-"): v for k, v in headers.items()}}
    if token is not None:
        h["authorization"] = f"Bearer {token}"
    client = stack.http()
    try:
        return client.get(path, h)
    finally:
        client.close()


def outcome(r: Response) -> tuple[int, str]:
    return r.status, "" if r.status == 200 else r.body.decode()


def check_table(stack: Stack, cases: dict[str, tuple[str | None, str, tuple[int, str]]]) -> list[str]:
    """cases: name -> (token, path, (status, body)). Returns readable mismatches."""
    bad = []
    for name, (token, path, want) in cases.items():
        got = outcome(send(stack, token, path))
        if got != want:
            bad.append(f"  {name:<28} want {want!r:<48} got {got!r}")
    return bad


def test_status_table_with_and_without_a_policy(stack: Stack, jwks: JwksServer, issuer: TokenIssuer) -> None:
    valid = issuer.token(claims())
    tokens: dict[str, str | None] = {
        "missing": None,
        "valid": valid,
        "expired": issuer.token(claims(), lifetime_s=-120),
        "expired-within-skew": issuer.token(claims(), lifetime_s=-30),
        "wrong-issuer": TokenIssuer(OTHER_ISS, kid="k1").token(claims()),
        "wrong-audience": issuer.token(claims(aud="elsewhere")),
        "no-audience": issuer.token({"sub": "alice"}),
        "audience-as-url": issuer.token(claims(aud=f"https://{AUD}/")),
        "malformed": "not-a-jwt",
    }
    # RequestAuthentication alone: no token passes, a bad one never does.
    alone: dict[str, tuple[int, str]] = {
        "missing": (200, ""),
        "valid": (200, ""),
        "expired": (401, EXPIRED),
        "expired-within-skew": (200, ""),
        "wrong-issuer": (401, UNKNOWN_ISSUER),
        "wrong-audience": (403, BAD_AUDIENCE),
        "no-audience": (403, BAD_AUDIENCE),
        "audience-as-url": (200, ""),
        "malformed": (401, BAD_FORMAT),
    }
    table = {
        "no policy": alone,
        # A policy wanting a principal turns "no token" into 403, not 401.
        "requestPrincipals *": {**alone, "missing": (403, RBAC_DENIED)},
        # A bad token is refused even when the policy would allow everything.
        "allow everything": alone,
    }
    policies = {"no policy": "", "requestPrincipals *": REQUIRE_PRINCIPAL, "allow everything": ALLOW_ALL}
    ra = request_authentication(jwks.url)
    mismatches: list[str] = []
    for label, policy in policies.items():
        stack.set_policies(ra + policy)
        cases = {name: (tokens[name], f"/status/{name}", want) for name, want in table[label].items()}
        bad = check_table(stack, cases)
        if bad:
            mismatches.append(f"with {label}:\n" + "\n".join(bad))
    assert not mismatches, "\n".join(mismatches)

    # The challenge names the request, as Envoy's jwt_authn does.
    r = send(stack, tokens["expired"], "/some/path?q=1")
    assert r.headers.get("www-authenticate") == f'Bearer realm="http://{HOST}/some/path?q=1", error="invalid_token"'


def test_policies_are_decided_on_extprocs_own_verification(stack: Stack, jwks: JwksServer, issuer: TokenIssuer) -> None:
    policy = authorization_policy(
        "jwt-rules",
        f"""
        rules:
        - from: [{{source: {{requestPrincipals: ["{ISS}/alice"]}}}}]
          to: [{{operation: {{paths: ["/alice/*"]}}}}]
        - when: [{{key: "request.auth.claims[groups]", values: ["admin"]}}]
        - to: [{{operation: {{paths: ["/write/*"]}}}}]
          when: [{{key: "request.auth.claims[scope]", values: ["write"]}}]
        - to: [{{operation: {{paths: ["/team/*"]}}}}]
          when: [{{key: "request.auth.claims[org][team]", values: ["pay*"]}}]
        """,
    )
    stack.set_policies(request_authentication(jwks.url) + policy)
    rogue = TokenIssuer(ISS, kid="k1")  # same issuer and kid, another key
    alice = issuer.token(claims("alice", groups=["dev"]))
    cases: dict[str, tuple[str | None, str, tuple[int, str]]] = {
        "alice-own-path": (alice, "/alice/x", (200, "")),
        "alice-elsewhere": (alice, "/other", (403, RBAC_DENIED)),
        "bob-alices-path": (issuer.token(claims("bob")), "/alice/x", (403, RBAC_DENIED)),
        "admin-group": (issuer.token(claims("bob", groups=["dev", "admin"])), "/other", (200, "")),
        "admin-group-as-string": (issuer.token(claims("bob", groups="admin")), "/other", (200, "")),
        "scope-space-delimited": (issuer.token(claims("carol", scope="read write")), "/write/x", (200, "")),
        "scope-without-write": (issuer.token(claims("carol", scope="read writer")), "/write/x", (403, RBAC_DENIED)),
        "nested-claim": (issuer.token(claims("dave", org={"team": "payments"})), "/team/x", (200, "")),
        "no-token": (None, "/alice/x", (403, RBAC_DENIED)),
        "forged-alice": (rogue.token(claims("alice")), "/alice/x", (401, VERIFICATION_FAILS)),
        "forged-admin": (rogue.token(claims("bob", groups=["admin"])), "/other", (401, VERIFICATION_FAILS)),
    }
    bad = check_table(stack, cases)
    assert not bad, "\n".join(bad)


def test_upstream_sees_claims_and_payload_but_not_the_token(
    stack: Stack, jwks: JwksServer, issuer: TokenIssuer
) -> None:
    token = issuer.token(claims("alice", org={"team": "payments"}, level=3))
    spoofed = {"x_jwt_sub": "mallory", "x_jwt_payload": "e30", "x_jwt_level": "99"}

    stack.set_policies(request_authentication(jwks.url))
    seen = send(stack, token, **spoofed).json()["headers"]
    assert "authorization" not in seen
    assert seen["x-jwt-sub"] == "alice"
    assert seen["x-jwt-team"] == "payments"
    assert seen["x-jwt-level"] == "3"
    assert seen["x-jwt-payload"] == token.split(".")[1]  # base64url, unpadded, as in the token
    # Without a token the output headers are still removed: they cannot be forged.
    seen = send(stack, None, **spoofed).json()["headers"]
    assert not {"x-jwt-sub", "x-jwt-payload", "x-jwt-level"} & seen.keys(), seen
    # Another Authorization scheme is not a token and goes through untouched.
    seen = send(stack, None, authorization="Basic dXNlcjpwYXNz").json()["headers"]
    assert seen["authorization"] == "Basic dXNlcjpwYXNz"

    stack.set_policies(request_authentication(jwks.url, forwardOriginalToken=True))
    seen = send(stack, token).json()["headers"]
    assert seen["authorization"] == f"Bearer {token}"
    assert seen["x-jwt-sub"] == "alice"


def rechecks(metrics: str) -> float:
    (line,) = [m for m in metrics.splitlines() if m.startswith("extproc_jwt_rechecks_total ")]
    return float(line.split()[1])


def test_key_rotation_is_picked_up_without_a_restart(stack: Stack, issuer: TokenIssuer) -> None:
    new = TokenIssuer(ISS, kid="k2")
    # Its own server and jwksUri: the unknown-kid refetch is rate-limited per source.
    server = JwksServer(jwks_of(issuer), delay_s=1.0).start()
    try:
        pid = stack.extproc.proc.popen.pid
        rechecks_before = rechecks(stack.extproc.metrics())
        stack.set_policies(request_authentication(server.url))
        # The first request waits for the initial fetch, still in flight, instead of failing.
        assert outcome(send(stack, issuer.token(claims()))) == (200, "")

        server.delay_s = 0.0
        server.set_jwks(jwks_of(issuer, new))
        before = server.fetches
        assert outcome(send(stack, new.token(claims("rotated")))) == (200, "")
        assert server.fetches == before + 1  # one refetch, for the unknown kid
        assert outcome(send(stack, issuer.token(claims()))) == (200, "")  # the old key still works

        unknown = TokenIssuer(ISS, kid="k3").token(claims())
        assert outcome(send(stack, unknown)) == (401, NO_MATCHING_KEY)
        assert outcome(send(stack, unknown)) == (401, NO_MATCHING_KEY)
        assert server.fetches <= before + 2  # made-up kids cannot make extproc hammer the server
        assert stack.extproc.proc.popen.pid == pid and stack.extproc.proc.alive()

        # Fetch status and key age are visible to operators.
        status, body = http_get(f"http://127.0.0.1:{stack.extproc.admin_port}/debug/jwks")
        assert status == 200
        (rule,) = json.loads(body)["jwtRules"]
        keys = rule["keys"]
        assert (rule["issuer"], keys["jwksUri"], keys["haveKeys"]) == (ISS, server.url, True)
        assert sorted(k["kid"] for k in keys["keys"]) == sorted(["k2", issuer.kid])
        assert keys["kidRefreshes"] >= 1 and keys["fetches"]["success"] >= 2 and keys["keyAgeSeconds"] < 60
        metrics = stack.extproc.metrics()
        src = f'issuer="{ISS}",source="{server.url}"'
        assert f"extproc_jwks_keys{{{src}}} 2.0" in metrics
        assert f'extproc_jwks_fetches_total{{issuer="{ISS}",result="success",source="{server.url}"}} 2.0' in metrics
        assert 'extproc_jwt_verifications_total{outcome="verified"}' in metrics
        assert 'extproc_jwt_verifications_total{outcome="jwks_kid_alg_mismatch"}' in metrics
        assert 'extproc_cache_lookups_total{cache="jwt_signature",result="hit"}' in metrics
        # Verified again twice: after the slow first fetch and after the refetch for the new kid.
        assert rechecks(metrics) == rechecks_before + 2
    finally:
        server.stop()


def test_jwks_server_down_from_the_start(stack: Stack, issuer: TokenIssuer) -> None:
    nobody = f"http://127.0.0.1:{free_port()}/jwks"  # nothing listens there
    stack.set_policies(request_authentication(nobody, timeout="1s"))
    cases: dict[str, tuple[str | None, str, tuple[int, str]]] = {
        "no-token": (None, "/a", (200, "")),
        "valid": (issuer.token(claims()), "/b", (401, VERIFICATION_FAILS)),
        "valid-again": (issuer.token(claims("bob")), "/c", (401, VERIFICATION_FAILS)),
        # time and audience are checked before the keys are needed
        "expired": (issuer.token(claims(), lifetime_s=-120), "/d", (401, EXPIRED)),
        "wrong-audience": (issuer.token(claims(aud="x")), "/e", (403, BAD_AUDIENCE)),
    }
    bad = check_table(stack, cases)
    assert not bad, "\n".join(bad)

    stack.set_policies(request_authentication(nobody, timeout="1s") + REQUIRE_PRINCIPAL)
    bad = check_table(
        stack,
        {
            "no-token": (None, "/a", (403, RBAC_DENIED)),
            "valid": (issuer.token(claims()), "/b", (401, VERIFICATION_FAILS)),
        },
    )
    assert not bad, "\n".join(bad)
