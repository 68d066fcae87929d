"""RequestAuthentication, differentially: Envoy's own jwt_authn filter against extproc.

Each scenario is a set of RequestAuthentications (and, in one, an AuthorizationPolicy).
One Envoy serves every scenario twice:
  * on a "native" listener per scenario, with jwt_authn configured exactly as istiod
    translates the jwtRules (pilot/pkg/security/authn/policy_applier.go
    `convertToEnvoyJwtConfig`, written out independently below) and, when the scenario
    has an AuthorizationPolicy, the RBAC filter istiod would generate;
  * on one "extproc" listener with only ext_authz, pointed at an extproc that serves the
    scenario's YAML (reloaded between scenarios).
Every request goes to both, with the same Host header, so the `www-authenticate` realm is
the same. The client must see the same status, body and `www-authenticate`, and the
upstream (a header echo that keeps duplicates and order) the same headers and path.
Every case also states the status Envoy gives, so a broken native side cannot make the
comparison vacuous.

Two normalisations, both for things ext_authz cannot express: several values of one
header (jwt_authn adds a line per verified token) are compared comma-joined; an object
claim header is compared as decoded JSON (Envoy prints protobuf map order, which varies
per request). Not reproduced, so not in the corpus: when it strips a query token Envoy
rewrites the other parameters percent-decoded (`x=a%20b` reaches the upstream as `x=a b`,
an invalid request line); through ext_authz they stay as sent.

JWT_DIFF_DUMP=1 (with -s) prints every case, differing ones as a diff.
"""

from __future__ import annotations

import base64
import dataclasses
import difflib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec as ec_keys
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from extproc.config.models import AuthorizationPolicy
from reference.envoy_jwt import jwt_authn_filter
from reference.envoy_rbac import rbac_filters
from tests.e2e.conftest import MODES, http_filters
from tests.fixtures import envoy_config as ec
from tests.fixtures.jwks_server import HeaderEcho
from tests.fixtures.procs import free_port
from tests.fixtures.stack import ExtprocProcess, HttpClient, Response

pytestmark = pytest.mark.e2e

# Istio sorts jwtRules by issuer: A < B, so A's rule is origins-0 wherever both apply.
ISS_A = "https://a.issuer.example"
ISS_B = "https://b.issuer.example"
ISS_C = "https://c.issuer.example"  # configured nowhere
HOST = "api.example.com"
AUDIENCES = ["api.example.com", "http://svc.example.com/"]
# Headers that differ between any two requests whatever the filter.
VOLATILE_UPSTREAM_HEADERS = {"x-request-id"}
# Headers carrying an object claim (base64 JSON). Envoy prints it from a protobuf Struct,
# whose map order is random per request, so these are compared as decoded JSON.
OBJECT_CLAIM_HEADERS = {"x-org"}


# --- keys and tokens ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    kid: str
    alg: str
    private: Any

    def jwk(self, with_alg: bool = True) -> dict[str, Any]:
        algo = jwt.get_algorithm_by_name(self.alg)
        public = self.private if isinstance(self.private, bytes) else self.private.public_key()
        d: dict[str, Any] = algo.to_jwk(public, as_dict=True)
        d["kid"] = self.kid
        if with_alg:
            d["alg"] = self.alg
        return d


def rsa_key(kid: str) -> Key:
    return Key(kid, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))


def es_key(kid: str, alg: str = "ES256", curve: ec_keys.EllipticCurve | None = None) -> Key:
    return Key(kid, alg, ec_keys.generate_private_key(curve or ec_keys.SECP256R1()))


def jwks(*keys: Key) -> str:
    return json.dumps({"keys": [k.jwk() for k in keys]})


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _part(value: dict[str, Any] | bytes) -> str:
    return b64(value if isinstance(value, bytes) else json.dumps(value).encode())


def payload_with(claims: dict[str, Any], extra: str | bytes) -> bytes:
    """The JSON of `claims` with raw `extra` text spliced in as further members."""
    text = json.dumps(claims).encode()
    return text[:-1] + b", " + (extra.encode() if isinstance(extra, str) else extra) + b"}"


def mint(
    key: Key,
    payload: dict[str, Any] | bytes,
    *,
    kid: str | None = "",
    alg: str = "",
    header: dict[str, Any] | bytes | None = None,
) -> str:
    """A compact JWS signed by `key`, with full control of the header and the payload bytes
    (so malformed claims still carry a valid signature). kid "" = the key's, None = no kid.
    `alg` names the algorithm in the header and signs with it; an explicit `header` is
    signed with the key's own algorithm, whatever it claims."""
    signer = alg if header is None and alg else key.alg
    if header is None:
        header = {"alg": alg or key.alg, "typ": "JWT"}
        if kid is not None:
            header["kid"] = kid or key.kid
    signing_input = f"{_part(header)}.{_part(payload)}"
    sig = jwt.get_algorithm_by_name(signer).sign(signing_input.encode(), key.private)
    return f"{signing_input}.{b64(sig)}"


@dataclass
class Keys:
    now: int
    a_rsa: Key = field(default_factory=lambda: rsa_key("a-rsa"))
    a_ec: Key = field(default_factory=lambda: es_key("a-ec"))
    rogue: Key = field(default_factory=lambda: rsa_key("a-rsa"))  # same kid, other key
    b_rsa: Key = field(default_factory=lambda: rsa_key("b-rsa"))
    c_rsa: Key = field(default_factory=lambda: rsa_key("c-rsa"))
    a_hmac: Key = field(default_factory=lambda: Key("a-hmac", "HS256", os.urandom(32)))
    a_ed: Key = field(default_factory=lambda: Key("a-ed", "EdDSA", Ed25519PrivateKey.generate()))
    a_es384: Key = field(default_factory=lambda: es_key("a-es384", "ES384", ec_keys.SECP384R1()))

    @property
    def a_rsa_any(self) -> Key:
        """a-rsa's key again, under another kid and published without an `alg`."""
        return Key("a-rsa-any", "RS256", self.a_rsa.private)

    def a_jwks(self) -> str:
        keys = [self.a_rsa, self.a_ec, self.a_hmac, self.a_ed, self.a_es384]
        return json.dumps({"keys": [k.jwk() for k in keys] + [self.a_rsa_any.jwk(with_alg=False)]})

    def claims(self, iss: str | None = ISS_A, sub: str = "alice", aud: Any = "api.example.com", **extra: Any) -> dict:
        c: dict[str, Any] = {"sub": sub, "iat": self.now, "exp": self.now + 3600}
        if iss is not None:
            c["iss"] = iss
        if aud is not None:
            c["aud"] = aud
        c.update(extra)
        return {k: v for k, v in c.items() if v is not None}

    def a(self, **kw: Any) -> str:
        return mint(self.a_rsa, self.claims(**kw))

    def b(self, **kw: Any) -> str:
        return mint(self.b_rsa, self.claims(iss=ISS_B, **kw))


RICH = {
    "n_int": 42,
    "n_float": 1.5,
    "n_neg": -7,
    "n_big": 2**60,
    "n_exp": 1e21,
    "flag": True,
    "off": False,
    "org": {"team": "payments", "size": 3, "tags": ["x", "y"]},
    "groups": ["dev", "admin"],
    "dotted.key": "literal",
    "empty": "",
    "scope": "read write",
    "unicode": "caf\u00e9",
    # printed by protobuf's JSON printer inside a list claim
    "printed": [
        1e15,
        1000000000000000,
        0.3333333333333333,
        -0.0,
        9007199254740993,
        5e-324,
        1e21,
        1e-7,
        123456789.125,
        -7,
        "<a>&'=",
        "\u007f\u0080\u00ad\u200b\u2028\u2029\ufeff",
        '"\\/\b\f\n\r\t\u0001',
        "\U0001f600",
        {"k": -0.0},
        None,
        True,
    ],
}


# --- scenarios ---------------------------------------------------------------------------------


def doc(kind: str, name: str, spec: dict[str, Any], version: str = "v1") -> dict[str, Any]:
    return {
        "apiVersion": f"security.istio.io/{version}",
        "kind": kind,
        "metadata": {"name": name, "namespace": "foo"},
        "spec": spec,
    }


@dataclass(frozen=True)
class Case:
    name: str
    want: int  # the status Envoy's jwt_authn gives: checked on the native side too
    headers: dict[str, str] = field(default_factory=dict)
    path: str = "/get"
    method: str = "GET"
    lines: tuple[tuple[str, str], ...] = ()  # more header lines, a name may repeat


@dataclass
class Scenario:
    docs: list[dict[str, Any]]
    cases: list[Case]


def bearer(tok: str) -> dict[str, str]:
    return {"authorization": f"Bearer {tok}"}


def single_scenario(k: Keys) -> Scenario:
    rule = {
        "issuer": ISS_A,
        "audiences": AUDIENCES,
        "jwks": k.a_jwks(),
        "outputPayloadToHeader": "x-jwt-payload",
        "outputClaimToHeaders": [
            {"header": "x-sub", "claim": "sub"},
            {"header": "x-int", "claim": "n_int"},
            {"header": "x-float", "claim": "n_float"},
            {"header": "x-neg", "claim": "n_neg"},
            {"header": "x-big", "claim": "n_big"},
            {"header": "x-exp-num", "claim": "n_exp"},
            {"header": "x-flag", "claim": "flag"},
            {"header": "x-off", "claim": "off"},
            {"header": "x-team", "claim": "org.team"},
            {"header": "x-size", "claim": "org.size"},
            {"header": "x-groups", "claim": "groups"},
            {"header": "x-org", "claim": "org"},
            {"header": "x-tags", "claim": "org.tags"},
            {"header": "x-dotted", "claim": "dotted.key"},
            {"header": "x-empty", "claim": "empty"},
            {"header": "x-absent", "claim": "absent"},
            {"header": "x-scope", "claim": "scope"},
            {"header": "x-unicode", "claim": "unicode"},
            {"header": "x-printed", "claim": "printed"},
        ],
    }
    now = k.now
    valid = k.a(**RICH)
    expired = k.a(exp=now - 120)
    c = k.claims
    raw_ok = c()
    hb = _part({"alg": "RS256", "kid": "a-rsa"})
    pb = _part(raw_ok)
    sig = valid.split(".")[2]  # a signature of another token
    vh, vp, vs = valid.split(".")
    long_path = "/" + "p" * 300 + "?q=1"
    cases = [
        Case("missing", 200),
        Case("valid-rs256-rich-claims", 200, bearer(valid)),
        Case("valid-es256", 200, bearer(mint(k.a_ec, c(sub="ec-user")))),
        Case("valid-no-kid", 200, bearer(mint(k.a_rsa, c(sub="nokid"), kid=None))),
        Case("valid-ps256-key-without-alg", 200, bearer(mint(k.a_rsa_any, c(), alg="PS256"))),
        Case("valid-rs384-no-kid-key-without-alg", 200, bearer(mint(k.a_rsa_any, c(), alg="RS384", kid=None))),
        Case("valid-hs256", 200, bearer(mint(k.a_hmac, c(sub="hmac")))),
        Case("valid-eddsa", 200, bearer(mint(k.a_ed, c(sub="ed")))),
        Case("valid-es384", 200, bearer(mint(k.a_es384, c(sub="es384")))),
        Case("es256-naming-the-es384-key", 401, bearer(mint(k.a_ec, c(), kid="a-es384"))),
        Case("eddsa-short-signature", 401, bearer(mint(k.a_ed, c())[:-4])),
        Case("valid-no-exp", 200, bearer(k.a(exp=None))),
        Case("expired-beyond-skew", 401, bearer(expired)),
        Case("expired-within-skew", 200, bearer(k.a(exp=now - 30))),
        Case("nbf-future", 401, bearer(k.a(nbf=now + 300))),
        Case("nbf-within-skew", 200, bearer(k.a(nbf=now + 30))),
        Case("bad-signature", 401, bearer(mint(k.rogue, c()))),
        Case("signature-of-other-token", 401, bearer(f"{hb}.{pb}.{sig}")),
        Case("unknown-kid", 401, bearer(mint(k.a_rsa, c(), kid="nope"))),
        Case("alg-not-in-jwks", 401, bearer(mint(k.a_rsa, c(), alg="RS512"))),
        Case("hs256-with-rsa-kid", 401, bearer(mint(k.a_rsa, c(), header={"alg": "HS256", "kid": "a-rsa"}))),
        Case("wrong-issuer", 401, bearer(mint(k.a_rsa, c(iss=ISS_C)))),
        Case("no-issuer", 401, bearer(k.a(iss=None))),
        Case("issuer-trailing-slash", 401, bearer(k.a(iss=ISS_A + "/"))),
        Case("issuer-not-string", 401, bearer(k.a(iss=7))),
        Case("wrong-audience", 403, bearer(k.a(aud="other.example.com"))),
        Case("no-audience", 403, bearer(k.a(aud=None))),
        Case("empty-audience-list", 403, bearer(k.a(aud=[]))),
        Case("audience-https-slash", 200, bearer(k.a(aud="https://api.example.com/"))),
        Case("audience-http", 200, bearer(k.a(aud="http://api.example.com"))),
        Case("audience-trailing-slash", 200, bearer(k.a(aud="api.example.com/"))),
        Case("audience-configured-with-scheme", 200, bearer(k.a(aud="svc.example.com"))),
        Case("audience-configured-with-scheme-2", 200, bearer(k.a(aud="https://svc.example.com"))),
        Case("audience-double-slash", 403, bearer(k.a(aud="api.example.com//"))),
        Case("audience-in-list", 200, bearer(k.a(aud=["x", "api.example.com"]))),
        Case("audience-case", 403, bearer(k.a(aud="API.example.com"))),
        Case("audience-number", 401, bearer(k.a(aud=5))),
        Case("audience-list-with-number", 401, bearer(k.a(aud=["api.example.com", 5]))),
        Case("alg-none", 401, bearer(f"{_part({'alg': 'none'})}.{pb}.{sig}")),
        Case("alg-none-unsigned", 401, bearer(f"{_part({'alg': 'none'})}.{pb}.")),
        Case("alg-missing", 401, bearer(f"{_part({'typ': 'JWT'})}.{pb}.{sig}")),
        Case("two-segments", 401, bearer(f"{hb}.{pb}")),
        Case("four-segments", 401, bearer(f"{hb}.{pb}.{sig}.{sig}")),
        Case("empty-middle-segment", 401, bearer(f"{hb}..{sig}")),
        Case("header-bad-base64", 401, bearer(f"{hb}A.{pb}.{sig}" if len(hb) % 4 == 0 else f"abcde.{pb}.{sig}")),
        Case("header-base64-padding", 401, bearer(f"{hb}==.{pb}.{sig}")),
        Case("header-not-json", 401, bearer(f"{_part(b'not json')}.{pb}.{sig}")),
        Case("header-json-array", 401, bearer(f"{_part(b'[1]')}.{pb}.{sig}")),
        Case("kid-not-string", 401, bearer(mint(k.a_rsa, c(), header={"alg": "RS256", "kid": 5}))),
        Case("payload-bad-base64", 401, bearer(f"{hb}.abcde.{sig}")),
        Case("payload-not-object", 401, bearer(mint(k.a_rsa, b"[1, 2]"))),
        Case("payload-not-json", 401, bearer(mint(k.a_rsa, b"{nope"))),
        Case("signature-bad-base64", 401, bearer(f"{hb}.{pb}.abcde")),
        Case("exp-as-string", 401, bearer(k.a(exp=str(now + 3600)))),
        Case("exp-float", 200, bearer(k.a(exp=now + 3600.5))),
        Case("exp-huge", 401, bearer(k.a(exp=1e30))),
        Case("exp-negative", 401, bearer(k.a(exp=-5))),
        Case("exp-bool", 401, bearer(k.a(exp=True))),
        Case("nbf-as-string", 401, bearer(k.a(nbf="0"))),
        Case("iat-negative", 401, bearer(k.a(iat=-1))),
        Case("iat-future", 200, bearer(k.a(iat=now + 10_000))),
        Case("sub-not-string", 401, bearer(k.a(sub=5))),  # type: ignore[arg-type]
        Case("jti-not-string", 401, bearer(k.a(jti=5))),
        Case(
            "duplicate-json-keys",
            401,
            bearer(
                mint(
                    k.a_rsa,
                    (
                        f'{{"iss": "{ISS_C}", "iss": "{ISS_A}", "sub": "dup", "aud": "api.example.com", '
                        f'"exp": {now + 3600}}}'
                    ).encode(),
                )
            ),
        ),
        Case(
            "duplicate-json-keys-same-value",
            401,
            bearer(
                mint(
                    k.a_rsa,
                    f'{{"iss": "{ISS_A}", "sub": "a", "sub": "b", "aud": "api.example.com"}}'.encode(),
                )
            ),
        ),
        # JSON as protobuf's parser (legacy syntax) takes it, not as RFC 8259 has it
        Case("json-trailing-comma", 200, bearer(mint(k.a_rsa, payload_with(c(), '"n": [1, 2,],')))),
        Case("json-single-quotes", 200, bearer(mint(k.a_rsa, payload_with(c(), r"""'q': 'it\'s "quoted"'""")))),
        Case("json-bare-word-key", 200, bearer(mint(k.a_rsa, payload_with(c(), "bare_key: 1")))),
        Case("json-raw-control-character", 200, bearer(mint(k.a_rsa, payload_with(c(), '"t": "a\tb\x01"')))),
        Case("json-upper-u-escape", 200, bearer(mint(k.a_rsa, payload_with(c(), '"u": "\\U0041"')))),
        Case("json-duplicate-nested-key", 401, bearer(mint(k.a_rsa, payload_with(c(), '"o": {"x": 1, "x": 1}')))),
        Case("json-depth-100", 200, bearer(mint(k.a_rsa, payload_with(c(), '"d": ' + "[" * 99 + "]" * 99)))),
        Case("json-depth-101", 401, bearer(mint(k.a_rsa, payload_with(c(), '"d": ' + "[" * 100 + "]" * 100)))),
        Case("json-lone-surrogate", 401, bearer(mint(k.a_rsa, payload_with(c(), '"s": "\\ud800"')))),
        Case("json-number-overflow", 401, bearer(mint(k.a_rsa, payload_with(c(), '"n": 1e400')))),
        Case("json-leading-zero", 401, bearer(mint(k.a_rsa, payload_with(c(), '"n": 01')))),
        Case(
            "json-header-trailing-comma", 200, bearer(mint(k.a_rsa, c(), header=b'{"alg": "RS256", "kid": "a-rsa",}'))
        ),
        Case(
            "json-header-duplicate-kid",
            401,
            bearer(mint(k.a_rsa, c(), header=b'{"alg": "RS256", "kid": "x", "kid": "a-rsa"}')),
        ),
        # base64url as absl decodes it: whitespace skipped, padding all or nothing
        Case("base64-space-inside-signature", 200, {"authorization": f"Bearer {vh}.{vp}.{vs[:8]} {vs[8:]}"}),
        Case("base64-space-after-payload", 401, {"authorization": f"Bearer {vh}.{vp} .{vs}"}),
        Case("base64-signature-padding", 401, bearer(f"{vh}.{vp}.{vs}=")),
        # token locations: the default is `Authorization: Bearer ` and ?access_token=
        Case("bearer-junk-before-token", 200, {"authorization": f"Bearer   ,{valid}"}),
        Case("bearer-junk-after-token", 401, {"authorization": f"Bearer {valid} trailing"}),
        Case("bearer-lowercase-prefix", 200, {"authorization": f"bearer {expired}"}),
        Case("bearer-prefix-later-in-value", 200, {"authorization": f"Token x, Bearer {valid}"}),
        Case("bearer-punctuation-after-token", 401, {"authorization": f"Bearer {valid}!x"}),
        Case("bearer-equals-before-token", 200, {"authorization": f"Bearer ={valid}"}),
        Case("bearer-twice", 401, {"authorization": f"Bearer {valid}, Bearer {valid}"}),
        Case("bearer-empty", 200, {"authorization": "Bearer "}),
        Case("basic-auth", 200, {"authorization": "Basic dXNlcjpwYXNz"}),
        Case("query-access-token", 200, path=f"/get?a=1&access_token={valid}&b=2"),
        Case("query-access-token-alone", 200, path=f"/get?access_token={valid}"),
        Case("query-access-token-others-resorted", 200, path=f"/get?z=1&access_token={valid}&a=2&a=1&m"),
        Case("query-access-token-repeated", 200, path=f"/get?access_token={valid}&a=1&access_token={valid}"),
        Case("query-access-token-empty-parts", 200, path=f"/get?&&access_token={valid}&&a=1"),
        Case("query-access-token-encoded-name", 200, path=f"/get?access%5Ftoken={valid}&q=1"),
        Case("query-access-token-expired", 401, path=f"/get?access_token={expired}"),
        Case("query-access-token-percent-encoded", 200, path=f"/get?access_token={valid.replace('.', '%2E')}"),
        Case("query-access-token-twice", 401, path=f"/get?access_token={expired}&access_token={valid}"),
        Case("query-other-name", 200, path=f"/get?token={expired}"),
        Case("two-tokens-header-valid-query-expired", 401, bearer(valid), path=f"/get?access_token={expired}"),
        Case("two-tokens-header-expired-query-valid", 401, bearer(expired), path=f"/get?access_token={valid}"),
        Case("two-tokens-both-valid", 200, bearer(valid), path=f"/get?access_token={valid}"),
        # outputs can't be forged
        Case("spoofed-outputs-no-token", 200, {"x-jwt-payload": "e30", "x-sub": "mallory", "x-team": "root"}),
        Case("spoofed-outputs-valid-token", 200, {**bearer(valid), "x-jwt-payload": "e30", "x-sub": "mallory"}),
        Case("spoofed-outputs-expired-token", 401, {**bearer(expired), "x-sub": "mallory"}),
        # CORS preflight is not checked
        Case(
            "cors-preflight-expired",
            200,
            {**bearer(expired), "origin": "https://web.example", "access-control-request-method": "GET"},
            method="OPTIONS",
        ),
        Case(
            "cors-preflight-spoofed-outputs",
            200,
            {"origin": "https://web.example", "access-control-request-method": "GET", "x-sub": "mallory"},
            method="OPTIONS",
        ),
        Case("options-without-origin-expired", 401, bearer(expired), method="OPTIONS"),
        Case(
            "options-origin-without-acrm-expired",
            401,
            {**bearer(expired), "origin": "https://web.example"},
            method="OPTIONS",
        ),
        # the realm of www-authenticate
        Case("realm-long-path", 401, bearer(expired), path=long_path),
        Case("realm-query-and-fragment", 401, bearer(expired), path="/a/b?c=d%20e&f"),
        Case("realm-forwarded-proto", 401, {**bearer(expired), "x-forwarded-proto": "https"}),
        Case("realm-original-path", 401, {**bearer(expired), "x-envoy-original-path": "/orig"}),
        Case("post-valid", 200, bearer(valid), method="POST"),
    ]
    return Scenario([doc("RequestAuthentication", "jwt-a", {"jwtRules": [rule]})], cases)


def locations_scenario(k: Keys) -> Scenario:
    rule = {
        "issuer": ISS_A,
        "jwks": jwks(k.a_rsa),
        "fromHeaders": [{"name": "x-jwt", "prefix": "Token "}, {"name": "X-Raw"}],
        "fromParams": ["tok"],
        "fromCookies": ["session"],
        "outputClaimToHeaders": [{"header": "x-sub", "claim": "sub"}],
    }
    valid = k.a(sub="loc")
    expired = k.a(exp=k.now - 120)
    cases = [
        Case("missing", 200),
        Case("prefixed-header", 200, {"x-jwt": f"Token {valid}"}),
        # A header on two lines: jwt_authn takes a token from each line.
        Case("header-second-line-garbage", 401, lines=(("x-jwt", f"Token {valid}"), ("x-jwt", "Token garbage"))),
        Case("header-first-line-garbage", 401, lines=(("x-raw", "garbage"), ("x-raw", valid))),
        Case("header-two-valid-lines", 200, lines=(("x-raw", valid), ("x-raw", valid))),
        Case("header-second-line-no-prefix", 200, lines=(("x-jwt", f"Token {valid}"), ("x-jwt", "garbage"))),
        Case("prefixed-header-without-prefix", 200, {"x-jwt": valid}),
        Case("prefixed-header-junk", 200, {"x-jwt": f"Token   ,{valid}"}),
        Case("prefixed-header-prefix-later", 200, {"x-jwt": f"abc Token {valid}"}),
        Case("prefixed-header-prefix-case", 200, {"x-jwt": f"token {valid}"}),
        Case("prefixed-header-expired", 401, {"x-jwt": f"Token {expired}"}),
        Case("prefixed-header-expired-without-prefix", 200, {"x-jwt": expired}),
        Case("raw-header", 200, {"x-raw": valid}),
        Case("raw-header-with-bearer", 401, {"x-raw": f"Bearer {valid}"}),
        Case("raw-header-trailing-space-trimmed", 200, {"x-raw": f"{valid} "}),
        Case("authorization-is-not-a-location", 200, bearer(expired)),
        Case("access-token-is-not-a-location", 200, path=f"/get?access_token={expired}"),
        Case("param", 200, path=f"/get?tok={valid}"),
        Case("param-among-others", 200, path=f"/get?b=2&tok={valid}&a=1"),
        Case("param-expired", 401, path=f"/get?tok={expired}"),
        Case("param-plus", 401, path=f"/get?tok=+{valid}"),
        Case("cookie", 200, {"cookie": f"session={valid}"}),
        Case("cookie-among-others", 200, {"cookie": f"a=b; session={valid}; c=d"}),
        Case("cookie-quoted", 200, {"cookie": f'session="{valid}"'}),
        Case("cookie-expired", 401, {"cookie": f"other=1;session={expired}"}),
        Case("cookie-twice", 401, {"cookie": f"session={expired}; session={valid}"}),
        Case("cookie-second-line", 200, lines=(("cookie", "a=b"), ("cookie", f"session={valid}"))),
        Case("cookie-first-line-wins", 401, lines=(("cookie", f"session={expired}"), ("cookie", f"session={valid}"))),
        Case("cookie-other-name", 200, {"cookie": f"sess={expired}"}),
        Case("header-valid-cookie-expired", 401, {"x-jwt": f"Token {valid}", "cookie": f"session={expired}"}),
        Case("header-expired-param-valid", 401, {"x-raw": expired}, path=f"/get?tok={valid}"),
        Case("two-headers-valid", 200, {"x-jwt": f"Token {valid}", "x-raw": valid}),
        Case(
            "all-locations-valid", 200, {"x-jwt": f"Token {valid}", "cookie": f"session={valid}"}, f"/get?tok={valid}"
        ),
        Case("spoofed-claim-header", 200, {"x-sub": "mallory"}),
    ]
    return Scenario([doc("RequestAuthentication", "jwt-loc", {"jwtRules": [rule]}, version="v1beta1")], cases)


def multi_scenario(k: Keys) -> Scenario:
    rule_a = {
        "issuer": ISS_A,
        "audiences": ["api.example.com"],
        "jwks": jwks(k.a_rsa),
        "outputPayloadToHeader": "x-a-payload",
        "outputClaimToHeaders": [{"header": "x-a-sub", "claim": "sub"}],
    }
    rule_b = {
        "issuer": ISS_B,
        "jwks": jwks(k.b_rsa),
        "fromHeaders": [{"name": "authorization", "prefix": "Bearer "}, {"name": "x-b-token"}],
        "forwardOriginalToken": True,
        "outputClaimToHeaders": [{"header": "x-b-sub", "claim": "sub"}],
    }
    a_ok, b_ok = k.a(sub="from-a"), k.b(sub="from-b")
    a_exp, b_exp = k.a(exp=k.now - 120), k.b(exp=k.now - 120)
    c_tok = mint(k.c_rsa, k.claims(iss=ISS_C))
    a_aud = k.a(aud="elsewhere")
    cases = [
        Case("missing", 200),
        Case("a-valid", 200, bearer(a_ok)),
        Case("b-valid-in-authorization", 200, bearer(b_ok)),
        Case("b-valid-in-own-header", 200, {"x-b-token": b_ok}),
        Case("third-issuer", 401, bearer(c_tok)),
        Case("third-issuer-in-b-header", 401, {"x-b-token": c_tok}),
        Case("a-expired", 401, bearer(a_exp)),
        Case("b-expired", 401, bearer(b_exp)),
        Case("a-wrong-audience", 403, bearer(a_aud)),
        Case("b-signed-by-a", 401, bearer(mint(k.a_rsa, k.claims(iss=ISS_B)))),
        Case("a-valid-b-expired-elsewhere", 200, {**bearer(a_ok), "x-b-token": b_exp}),
        Case("a-expired-b-valid-elsewhere", 401, {**bearer(a_exp), "x-b-token": b_ok}),
        Case("a-valid-b-valid", 200, {**bearer(a_ok), "x-b-token": b_ok}),
        Case("a-in-query-b-in-authorization", 200, bearer(b_ok), path=f"/get?access_token={a_ok}"),
        Case("a-expired-in-query-b-valid", 200, bearer(b_ok), path=f"/get?access_token={a_exp}"),
        Case("a-valid-in-query-b-expired", 401, bearer(b_exp), path=f"/get?access_token={a_ok}"),
        Case("c-in-query-b-valid", 200, bearer(b_ok), path=f"/get?access_token={c_tok}"),
        Case("a-wrong-audience-b-valid-elsewhere", 403, {**bearer(a_aud), "x-b-token": b_ok}),
        Case("c-in-authorization-b-valid-elsewhere", 401, {**bearer(c_tok), "x-b-token": b_ok}),
        Case("b-in-query", 401, path=f"/get?access_token={b_ok}"),
        Case("spoofed-headers-with-a", 200, {**bearer(a_ok), "x-b-sub": "mallory", "x-a-sub": "mallory"}),
        Case("spoofed-headers-with-b", 200, {**bearer(b_ok), "x-b-sub": "mallory", "x-a-sub": "mallory"}),
        Case("spoofed-headers-no-token", 200, {"x-b-sub": "mallory", "x-a-payload": "e30"}),
    ]
    docs = [
        doc("RequestAuthentication", "jwt-b", {"jwtRules": [rule_b]}),
        doc("RequestAuthentication", "jwt-a", {"jwtRules": [rule_a]}),
    ]
    return Scenario(docs, cases)


def shared_outputs_scenario(k: Keys) -> Scenario:
    """Two issuers writing the same headers: what one provider wrote before failing, and
    what the next one writes, must end up exactly as under Envoy. It runs right after
    "multi" with the very same A token, so outputs cached under a provider's name
    (`origins-0` here and there, with other headers) would leak across the reload."""
    common = {"outputPayloadToHeader": "x-payload", "outputClaimToHeaders": [{"header": "x-sub", "claim": "sub"}]}
    rule_a = {"issuer": ISS_A, "jwks": jwks(k.a_rsa), **common}
    rule_b = {
        "issuer": ISS_B,
        "jwks": jwks(k.b_rsa),
        "fromHeaders": [{"name": "authorization", "prefix": "Bearer "}],
        **common,
    }
    a_ok, b_ok = k.a(sub="from-a"), k.b(sub="from-b")
    cases = [
        Case("a", 200, bearer(a_ok)),
        Case("b", 200, bearer(b_ok)),
        Case("a-in-query-then-b", 200, bearer(b_ok), path=f"/get?access_token={a_ok}"),
        Case("spoofed", 200, {"x-sub": "mallory", "x-payload": "e30"}),
        Case("spoofed-with-b", 200, {**bearer(b_ok), "x-sub": "mallory"}),
    ]
    docs = [doc("RequestAuthentication", "shared", {"jwtRules": [rule_a, rule_b]})]
    return Scenario(docs, cases)


def authz_scenario(k: Keys) -> Scenario:
    rule = {
        "issuer": ISS_A,
        "audiences": ["api.example.com"],
        "jwks": jwks(k.a_rsa),
        "forwardOriginalToken": True,
        "outputPayloadToHeader": "x-jwt-payload",
        "spaceDelimitedClaims": ["roles"],
    }
    valid = k.a(sub="authz")
    expired = k.a(exp=k.now - 120)
    preflight = {"origin": "https://web.example", "access-control-request-method": "GET"}
    cases = [
        Case("missing", 403),
        Case("valid", 200, bearer(valid)),
        Case("valid-in-query", 200, path=f"/get?access_token={valid}"),
        Case("expired", 401, bearer(expired)),
        Case("wrong-audience", 403, bearer(k.a(aud="elsewhere"))),
        Case("third-issuer", 401, bearer(mint(k.c_rsa, k.claims(iss=ISS_C)))),
        Case("lowercase-bearer", 403, {"authorization": f"bearer {valid}"}),
        Case("cors-preflight-no-token", 403, preflight, method="OPTIONS"),
        Case("cors-preflight-expired", 403, {**preflight, **bearer(expired)}, method="OPTIONS"),
        Case("cors-preflight-valid", 403, {**preflight, **bearer(valid)}, method="OPTIONS"),
        # space-delimited claims (the user's list plus scope and permission) become lists
        Case("roles-split", 200, bearer(k.a(roles="user admin")), path="/admin"),
        Case("roles-without-admin", 403, bearer(k.a(roles="user administrator")), path="/admin"),
        Case("roles-as-list", 200, bearer(k.a(roles=["admin"])), path="/admin"),
        Case("scope-split", 200, bearer(k.a(scope="read write")), path="/write"),
        Case("scope-without-write", 403, bearer(k.a(scope="read")), path="/write"),
        Case("permission-split", 200, bearer(k.a(permission="a write")), path="/write"),
    ]
    deny = {
        "action": "DENY",
        "rules": [
            {
                "to": [{"operation": {"paths": ["/admin"]}}],
                "when": [{"key": "request.auth.claims[roles]", "notValues": ["admin"]}],
            },
            {
                "to": [{"operation": {"paths": ["/write"]}}],
                "when": [
                    {"key": "request.auth.claims[scope]", "notValues": ["write"]},
                    {"key": "request.auth.claims[permission]", "notValues": ["write"]},
                ],
            },
        ],
    }
    docs = [
        doc("RequestAuthentication", "jwt", {"jwtRules": [rule]}),
        doc("AuthorizationPolicy", "require-jwt", {"rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}]}]}),
        doc("AuthorizationPolicy", "deny-by-claims", deny),
    ]
    return Scenario(docs, cases)


def presence_scenario(k: Keys, b_presence: str = "OPTIONAL") -> Scenario:
    """`presence: REQUIRED` (istio/istio#60823): A's token must be there and valid; B, on its
    own header, is OPTIONAL (the one B alone passed under "multi") or REQUIRED too."""
    rule_a = {"issuer": ISS_A, "jwks": jwks(k.a_rsa), "presence": "REQUIRED"}
    rule_b = {"issuer": ISS_B, "jwks": jwks(k.b_rsa), "fromHeaders": [{"name": "x-b-token"}], "presence": b_presence}
    a_ok, b_ok = k.a(sub="from-a"), k.b(sub="from-b")
    a_exp, b_exp = k.a(exp=k.now - 120), k.b(exp=k.now - 120)
    b_required = b_presence == "REQUIRED"
    cases = [
        Case("missing", 401),
        Case("a-valid", 401 if b_required else 200, bearer(a_ok)),
        Case("b-valid", 401, {"x-b-token": b_ok}),
        Case("a-valid-b-valid", 200, {**bearer(a_ok), "x-b-token": b_ok}),
        Case("a-valid-b-expired", 401, {**bearer(a_ok), "x-b-token": b_exp}),
        Case("a-expired-b-valid", 401, {**bearer(a_exp), "x-b-token": b_ok}),
        Case("a-in-query-b-valid", 200, {"x-b-token": b_ok}, path=f"/get?access_token={a_ok}"),
    ]
    docs = [doc("RequestAuthentication", "jwt-presence", {"jwtRules": [rule_b, rule_a]})]
    return Scenario(docs, cases)


SCENARIOS = {
    "single": single_scenario,
    "locations": locations_scenario,
    "multi": multi_scenario,
    "shared-outputs": shared_outputs_scenario,
    "authz": authz_scenario,
    "presence": presence_scenario,
    "presence-all": lambda k: presence_scenario(k, "REQUIRED"),
}


# --- Istio's translation (reference/envoy_jwt.py, policy_applier.go convertToEnvoyJwtConfig) ----------


def native_filters(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ras = [d for d in docs if d["kind"] == "RequestAuthentication"]
    aps = [AuthorizationPolicy.model_validate(d) for d in docs if d["kind"] == "AuthorizationPolicy"]
    return [jwt_authn_filter(ras), *rbac_filters(aps, for_tcp=False)]


# --- the harness -------------------------------------------------------------------------------


@dataclass
class Harness:
    keys: Keys
    scenarios: dict[str, Scenario]
    native_ports: dict[str, int]
    ext_ports: dict[str, int]  # by deployment mode: ext_authz ("authz", "authz-http") or ext_proc ("extproc")
    config_dir: Path
    extproc: ExtprocProcess


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    tmp = tmp_path_factory.mktemp("jwtdiff")
    keys = Keys(now=int(time.time()))
    scenarios = {name: build(keys) for name, build in SCENARIOS.items()}
    config_dir = tmp / "policies"
    config_dir.mkdir()
    echo = HeaderEcho().start()
    # No trace headers: the native side has no tracer, and only the JWT semantics are compared.
    x = ExtprocProcess(
        [config_dir], tmp, namespace="foo", labels="app=httpbin", extra_args=["--trace-formats", "none"], http=True
    )
    envoy: ec.EnvoyProcess | None = None
    try:
        native_ports = {name: free_port() for name in scenarios}
        ext_ports = {mode: free_port() for mode in MODES}
        admin = free_port()
        listeners = [
            ec.HttpListener(f"native-{name}", native_ports[name], native_filters(s.docs))
            for name, s in scenarios.items()
        ]
        # authz-http: the Envoy filter that removes a verified token's query parameter names
        # every fromParams name the scenarios use, as the README tells users to.
        listeners += [
            ec.HttpListener(
                f"extproc-{mode}",
                port,
                http_filters(mode, query_params=("access_token", "tok"))
                if mode == "authz-http"
                else http_filters(mode),
            )
            for mode, port in ext_ports.items()
        ]
        clusters = [ec.cluster("upstream", "127.0.0.1", echo.port), *x.clusters()]
        envoy = ec.EnvoyProcess(ec.bootstrap(admin, listeners, clusters), tmp / "envoy", admin)
        x.wait_ready()
        envoy.wait_ready()
        yield Harness(keys, scenarios, native_ports, ext_ports, config_dir, x)
    finally:
        if envoy is not None:
            envoy.stop()
        x.stop()
        echo.stop()


def observe(r: Response) -> dict[str, Any]:
    """What a client and the upstream can tell about one request."""
    out: dict[str, Any] = {"status": r.status}
    echoed = r.status == 200 and r.headers.get("content-type", "").startswith("application/json")
    if echoed:
        data = r.json()
        values: dict[str, list[str]] = {}
        for name, value in data["headers"]:
            if name not in VOLATILE_UPSTREAM_HEADERS:
                values.setdefault(name, []).append(value)
        # jwt_authn adds a header line per verified token; through ext_authz several values
        # of one header can only arrive comma-joined, which HTTP defines as equivalent.
        headers = {name: ",".join(v) for name, v in sorted(values.items())}
        for name in OBJECT_CLAIM_HEADERS & headers.keys():
            headers[name] = ",".join(
                json.dumps(json.loads(base64.b64decode(part)), sort_keys=True) for part in headers[name].split(",")
            )
        out["upstream_path"] = data["path"]
        out["upstream_headers"] = headers
    else:
        out["body"] = r.body.decode(errors="replace")
        out["www-authenticate"] = r.headers.get("www-authenticate")
    return out


def joined(case: Case) -> Case:
    """The case with each repeated name of `lines` sent as one line, its values joined with ","."""
    values: dict[str, list[str]] = {}
    for k, v in case.lines:
        values.setdefault(k, []).append(v)
    return dataclasses.replace(case, lines=tuple((k, ",".join(vs)) for k, vs in values.items()))


def send(client: HttpClient, case: Case) -> dict[str, Any]:
    headers = [("host", HOST), *case.headers.items(), *case.lines]
    return observe(client.request(case.method, case.path, headers, body=b"x" if case.method == "POST" else None))


def serve(h: Harness, docs: list[dict[str, Any]]) -> None:
    text = yaml.safe_dump_all(docs, sort_keys=False)
    target = h.config_dir / "policies.yaml"
    if target.exists() and target.read_text() == text:
        return
    before = h.extproc.snapshot_version()
    tmp = h.config_dir / ".policies.yaml.tmp"
    tmp.write_text(text)
    tmp.rename(target)
    ready = h.extproc.wait_reload(before)
    assert ready["last_reload"]["ok"], ready


def render(case: Case, native: dict[str, Any], ours: dict[str, Any]) -> str:
    a = json.dumps(native, indent=1, sort_keys=True, ensure_ascii=False).splitlines()
    b = json.dumps(ours, indent=1, sort_keys=True, ensure_ascii=False).splitlines()
    diff = "\n".join(difflib.unified_diff(a, b, "envoy jwt_authn", "extproc", lineterm="", n=2))
    return f"--- case {case.name} ({case.method} {case.path[:60]}):\n{diff}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_extproc_authenticates_like_envoy_jwt_authn(harness: Harness, scenario: str, mode: str) -> None:
    h = harness
    s = h.scenarios[scenario]
    serve(h, s.docs)
    native_client = HttpClient(h.native_ports[scenario])
    ext_client = HttpClient(h.ext_ports[mode])
    try:
        # (case, Envoy's answer, ours, the answer ours must equal). ext_authz's string map joins
        # repeated lines with ",": there extproc must answer as jwt_authn answers the request
        # with those lines joined into one.
        results = []
        for c in s.cases:
            n, o = send(native_client, c), send(ext_client, c)
            ref = send(native_client, joined(c)) if mode == "authz" and c.lines else n
            results.append((c, n, o, ref))
    finally:
        native_client.close()
        ext_client.close()

    if os.environ.get("JWT_DIFF_DUMP"):
        for c, _, o, n in results:
            print(render(c, n, o) if o != n else f"same: {c.name} {n['status']} {n.get('body', '')}")

    unexpected = [
        f"{c.name}: want {c.want}, Envoy gave {n['status']} {n.get('body', '')!r}"
        for c, n, _, _ in results
        if n["status"] != c.want
    ]
    assert not unexpected, "the native side itself is not as expected:\n" + "\n".join(unexpected)
    mismatches = [render(c, ref, o) for c, _, o, ref in results if ref != o]
    assert not mismatches, f"{len(mismatches)} of {len(results)} cases differ:\n" + "\n".join(mismatches)
