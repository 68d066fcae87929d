"""Keys, tokens and programs for the authn engine unit tests.

Keys are generated once per test process (RSA generation is slow) and shared by every module
that asks for them; tokens are signed by PyJWT, or by hand when a test needs a payload PyJWT
would refuse to produce (raw JSON text, invalid UTF-8, a public key used as an HMAC secret).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
from collections.abc import Callable, Mapping
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, HMACAlgorithm, OKPAlgorithm, RSAAlgorithm

from extproc.authn.cache import TokenCache
from extproc.authn.keys import KeySet, parse_jwks
from extproc.authn.program import AuthnProgram, Provider, RuleInput
from extproc.authn.verifier import AuthnResult, authenticate

NOW = 1_700_000_000
ISS = "https://issuer.example.com"
ISS_B = "https://other.example.com"
ISS_C = "https://stranger.example.com"
KID = "key-1"
HMAC_KID = "hmac-1"
HMAC_SECRET = bytes(range(64))

_CURVES: dict[str, ec.EllipticCurve] = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}


def b64url(data: bytes | str) -> str:
    """Unpadded base64url, as JWS segments are written."""
    raw = data.encode() if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _segment(part: Mapping[str, Any] | str | bytes) -> str:
    if isinstance(part, Mapping):
        return b64url(json.dumps(part, separators=(",", ":")))
    return b64url(part)


# --- keys --------------------------------------------------------------------------------


@functools.cache
def rsa_key(index: int = 0) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@functools.cache
def ec_key(crv: str = "P-256", index: int = 0) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(_CURVES[crv])


@functools.cache
def ed25519_key(index: int = 0) -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def jwk(key: Any, **extra: Any) -> dict[str, Any]:
    """The public JWK of a private or public key (or an HMAC secret), plus extra members."""
    if isinstance(key, bytes):
        out = HMACAlgorithm.to_jwk(key, as_dict=True)
    elif isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        out = RSAAlgorithm.to_jwk(key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key, as_dict=True)
    elif isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        pub = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
        out = ECAlgorithm.to_jwk(pub, as_dict=True)
    elif isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        pub = key.public_key() if isinstance(key, ed25519.Ed25519PrivateKey) else key
        out = OKPAlgorithm.to_jwk(pub, as_dict=True)
    else:  # pragma: no cover - a test bug
        raise TypeError(f"no JWK for {type(key)}")
    out = dict(out)
    for name, value in extra.items():
        if value is None:
            out.pop(name, None)
        else:
            out[name] = value
    return out


def jwks_json(*keys: Mapping[str, Any]) -> str:
    return json.dumps({"keys": list(keys)})


@functools.cache
def default_keyset() -> KeySet:
    """RSA key `KID` (RS256) and an HMAC key `HMAC_KID` (HS256): what most rules trust."""
    return parse_jwks(jwks_json(jwk(rsa_key(0), kid=KID, alg="RS256"), jwk(HMAC_SECRET, kid=HMAC_KID, alg="HS256")))


# --- tokens ------------------------------------------------------------------------------


def claims(**extra: Any) -> dict[str, Any]:
    """A valid claim set at NOW for ISS; keyword None removes a claim."""
    out: dict[str, Any] = {"iss": ISS, "sub": "alice", "iat": NOW, "exp": NOW + 3600}
    for name, value in extra.items():
        if value is None:
            out.pop(name, None)
        else:
            out[name] = value
    return out


def sign(payload: Mapping[str, Any], key: Any = None, alg: str = "RS256", kid: str | None = KID, **headers: Any) -> str:
    """A token signed by PyJWT (default: RSA key 0, RS256, kid KID)."""
    hdrs = dict(headers)
    if kid is not None:
        hdrs["kid"] = kid
    return jwt.encode(dict(payload), rsa_key(0) if key is None else key, algorithm=alg, headers=hdrs or None)


def token(**extra: Any) -> str:
    """The usual valid RS256 token of ISS, with claims changed by keyword."""
    return sign(claims(**extra))


def raw_token(
    header: Mapping[str, Any] | str | bytes, payload: Mapping[str, Any] | str | bytes, signature: bytes = b"sig"
) -> str:
    """An unsigned token from arbitrary header and payload text (for parsing tests)."""
    return f"{_segment(header)}.{_segment(payload)}.{b64url(signature)}"


def hmac_token(
    payload: Mapping[str, Any] | str | bytes,
    header: Mapping[str, Any] | str | bytes | None = None,
    secret: bytes = HMAC_SECRET,
    alg: str = "HS256",
) -> str:
    """A correctly HMAC-signed token whose payload may be any text or bytes."""
    if header is None:
        header = {"alg": alg, "kid": HMAC_KID}
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    signing_input = f"{_segment(header)}.{_segment(payload)}"
    sig = hmac.new(secret, signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64url(sig)}"


# --- programs and requests -----------------------------------------------------------------

_UNSET: Any = object()


def rule(issuer: str = ISS, *, keys: KeySet | None = _UNSET, origin: str = "foo/jwt", **kw: Any) -> RuleInput:
    """A jwtRule with the default inline keys unless `keys` is given (None = remote keys)."""
    return RuleInput(origin=origin, issuer=issuer, inline_keys=default_keyset() if keys is _UNSET else keys, **kw)


def inline_keys(p: Provider) -> KeySet | None:
    return p.inline_keys


def run(
    program: AuthnProgram,
    headers: Mapping[str, str] | None = None,
    *,
    path: str = "/api",
    method: str = "GET",
    now: int = NOW,
    keys: Callable[[Provider], KeySet | None] = inline_keys,
    cache: TokenCache | None = None,
    lines: Mapping[str, tuple[str, ...]] | None = None,
) -> AuthnResult:
    """`lines`: header names sent on several lines (their `headers` value is the lines joined)."""
    hs = {":path": path, ":authority": "svc.example.com", ":method": method, **(headers or {})}
    for name, entries in (lines or {}).items():
        hs[name] = ",".join(entries)
    return authenticate(program, method, hs, now, keys, cache, lines or {})


def bearer(tok: str) -> dict[str, str]:
    return {"authorization": f"Bearer {tok}"}


def set_headers(result: AuthnResult) -> dict[str, tuple[str, ...]]:
    return dict(result.set_headers)
