"""JSON Web Key Sets: parsing with jwt_verify_lib's rules, and signature checks with PyJWT.

Key selection follows Envoy: a key is a candidate unless both it and the token name a `kid`
and they differ, or the key names an `alg` other than the token's. Unlike jwt_verify_lib, a
candidate is only used if the token's `alg` fits the key's type (RS*/PS* with RSA, ES256 with
P-256, ES384 with P-384, ES512 with P-521, HS* with oct, EdDSA with Ed25519), so a public key
can never serve as an HMAC secret and an algorithm label can never be swapped.
"""

from __future__ import annotations

import functools
import itertools
import json
from dataclasses import dataclass
from typing import Any

from extproc.authn.status import JwksError, Status
from extproc.authn.token import Jwt, b64url_decode

_ALG_CURVE = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
_CURVE_NAMES = frozenset(_ALG_CURVE.values())


@functools.cache
def _verifiers() -> dict[str, Any]:
    """PyJWT's algorithms by `alg`. cryptography (about 10 MB resident) is imported on the first
    key parsed, so a server without RequestAuthentication never loads it."""
    from jwt.algorithms import ECAlgorithm, HMACAlgorithm, OKPAlgorithm, RSAAlgorithm, RSAPSSAlgorithm

    return {
        "RS256": RSAAlgorithm(RSAAlgorithm.SHA256),
        "RS384": RSAAlgorithm(RSAAlgorithm.SHA384),
        "RS512": RSAAlgorithm(RSAAlgorithm.SHA512),
        "PS256": RSAPSSAlgorithm(RSAPSSAlgorithm.SHA256),
        "PS384": RSAPSSAlgorithm(RSAPSSAlgorithm.SHA384),
        "PS512": RSAPSSAlgorithm(RSAPSSAlgorithm.SHA512),
        "ES256": ECAlgorithm(ECAlgorithm.SHA256),
        "ES384": ECAlgorithm(ECAlgorithm.SHA384),
        "ES512": ECAlgorithm(ECAlgorithm.SHA512),
        "HS256": HMACAlgorithm(HMACAlgorithm.SHA256),
        "HS384": HMACAlgorithm(HMACAlgorithm.SHA384),
        "HS512": HMACAlgorithm(HMACAlgorithm.SHA512),
        "EdDSA": OKPAlgorithm(),
    }


def _curve(name: str) -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    curves: dict[str, type[ec.EllipticCurve]] = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1, "P-521": ec.SECP521R1}
    return curves[name]()


_versions = itertools.count(1)


@dataclass(frozen=True, slots=True)
class PublicKey:
    kty: str  # RSA | EC | oct | OKP
    kid: str
    alg: str
    crv: str
    key: Any  # a cryptography public key, or bytes for oct

    def fits(self, alg: str) -> bool:
        if self.kty == "RSA":
            return alg[:2] in ("RS", "PS")
        if self.kty == "EC":
            return _ALG_CURVE.get(alg) == self.crv
        if self.kty == "oct":
            return alg[:2] == "HS"
        return alg == "EdDSA" and self.crv == "Ed25519"


@dataclass(frozen=True, slots=True)
class KeySet:
    """An immutable set of keys. `version` identifies it in the token cache: new keys, new version."""

    keys: tuple[PublicKey, ...]
    version: int

    @classmethod
    def of(cls, keys: tuple[PublicKey, ...]) -> KeySet:
        return cls(keys, next(_versions))

    def verify(self, jwt: Jwt) -> Status:
        """jwt_verify_lib's `verifyJwtWithoutTimeChecking`, with the stricter key fit."""
        signed = jwt.signed_data
        matched = False
        for k in self.keys:
            if jwt.kid and k.kid and k.kid != jwt.kid:
                continue
            if k.alg and k.alg != jwt.alg:
                continue
            matched = True
            if not k.fits(jwt.alg):
                continue
            if k.kty == "OKP" and len(jwt.signature) != 64:
                return Status.JWT_ED25519_SIGNATURE_WRONG_LENGTH
            try:
                if _verifiers()[jwt.alg].verify(signed, k.key, jwt.signature):
                    return Status.OK
            except Exception:  # a malformed signature is a failed signature, never a crash
                continue
        return Status.JWT_VERIFICATION_FAIL if matched else Status.JWKS_KID_ALG_MISMATCH

    def has_kid(self, kid: str) -> bool:
        return any(k.kid == kid for k in self.keys)


# The fail-closed stand-in Istio inlines when it cannot fetch a jwksUri: no key verifies anything,
# so every token for that issuer fails with "Jwt verification fails" while no-token requests pass.
NO_KEYS_STATUS = Status.JWT_VERIFICATION_FAIL


def _b64int(s: str) -> int | None:
    raw = b64url_decode(s)
    if not raw:
        return None
    return int.from_bytes(raw, "big")


def _jwk(obj: dict[str, Any]) -> PublicKey:
    kty = obj.get("kty")
    if kty is None:
        raise JwksError("[kty] is missing in [keys]")
    if not isinstance(kty, str):
        raise JwksError("[kty] is bad in [keys]")
    kid: str = obj["kid"] if isinstance(obj.get("kid"), str) else ""
    alg: str = obj["alg"] if isinstance(obj.get("alg"), str) else ""

    def field(name: str, what: str) -> str:
        if name not in obj:
            raise JwksError(f"[{name}] field is missing for {what}")
        v = obj[name]
        if not isinstance(v, str):
            raise JwksError(f"[{name}] field is not string for {what}")
        return v

    if kty == "RSA":
        from cryptography.exceptions import UnsupportedAlgorithm
        from cryptography.hazmat.primitives.asymmetric import rsa

        if alg and alg[:2] not in ("RS", "PS"):
            raise JwksError("[alg] is not started with [RS] or [PS] for an RSA key")
        n, e = _b64int(field("n", "a RSA key")), _b64int(field("e", "a RSA key"))
        if n is None or e is None or e not in (3, 65537):  # BoringSSL's limit, as in jwt_verify_lib
            raise JwksError("Jwks RSA [n] or [e] field is missing or has a parse error")
        try:
            return PublicKey("RSA", kid, alg, "", rsa.RSAPublicNumbers(e, n).public_key())
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise JwksError(f"Jwks RSA [n] or [e] field is missing or has a parse error ({exc})") from None
    if kty == "EC":
        if alg and alg[:2] != "ES":
            raise JwksError("[alg] is not started with [ES] for an EC key")
        crv = obj.get("crv", "")
        if not isinstance(crv, str):
            raise JwksError("[crv] field is not string for an EC key")
        if alg and crv and _ALG_CURVE.get(alg) != crv:
            raise JwksError("[crv] field specified is not compatible with [alg] for an EC key")
        if not alg and not crv:
            crv = "P-256"
        crv = _ALG_CURVE.get(alg, crv) if alg in _ALG_CURVE else crv
        if crv not in _CURVE_NAMES:
            raise JwksError("[crv] or [alg] field is not supported for an EC key")
        x, y = _b64int(field("x", "an EC key")), _b64int(field("y", "an EC key"))
        if x is None or y is None:
            raise JwksError("Jwks EC [x] or [y] field is an invalid Base64.")
        from cryptography.hazmat.primitives.asymmetric import ec

        try:
            key = ec.EllipticCurvePublicNumbers(x, y, _curve(crv)).public_key()
        except ValueError:
            raise JwksError("Jwks EC [x] and [y] fields have a parse error.") from None
        return PublicKey("EC", kid, alg, crv, key)
    if kty == "oct":
        if alg and alg not in ("HS256", "HS384", "HS512"):
            raise JwksError("[alg] does not start with [HS] for an HMAC key")
        secret = b64url_decode(field("k", "an HMAC key"))
        if not secret:
            raise JwksError("Jwks Oct key is an invalid Base64")
        return PublicKey("oct", kid, alg, "", secret)
    if kty == "OKP":
        if alg and alg != "EdDSA":
            raise JwksError("[alg] is not [EdDSA] for an OKP key")
        crv = field("crv", "an OKP key")
        if crv != "Ed25519":
            raise JwksError("[crv] field is not supported for an OKP key")
        raw = b64url_decode(field("x", "an OKP key"))
        if raw is None:
            raise JwksError("Jwks OKP [x] field is an invalid Base64.")
        if len(raw) != 32:
            raise JwksError("Jwks OKP [x] field is wrong length.")
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        return PublicKey("OKP", kid, alg, crv, Ed25519PublicKey.from_public_bytes(raw))
    raise JwksError("[kty] is not supported in [keys]")


_CERT_PREFIX, _CERT_SUFFIX = "-----BEGIN CERTIFICATE-----\n", "\n-----END CERTIFICATE-----\n"


def _x509_map(doc: dict[str, Any]) -> tuple[PublicKey, ...] | None:
    """Google's `{kid: PEM certificate}` form, accepted by jwt_verify_lib for RSA keys."""
    if not doc or not all(
        k and isinstance(v, str) and v.startswith(_CERT_PREFIX) and v.endswith(_CERT_SUFFIX) for k, v in doc.items()
    ):
        return None
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import rsa

    keys = []
    for kid, pem in sorted(doc.items()):
        try:
            pub = x509.load_pem_x509_certificate(pem.encode()).public_key()
        except ValueError:
            raise JwksError("X509 parse pubkey fails") from None
        if not isinstance(pub, rsa.RSAPublicKey):
            raise JwksError("X509 parse pubkey internal fails: get pubkey")
        keys.append(PublicKey("RSA", kid, "", "", pub))
    return tuple(keys)


def parse_jwks(text: str | bytes) -> KeySet:
    """A KeySet, or JwksError naming why no usable key was found. Bad keys next to good ones
    are skipped, as Envoy does; `skipped` problems are not errors."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        raise JwksError("Jwks is an invalid JSON") from None
    if not isinstance(doc, dict):
        raise JwksError("Jwks is an invalid JSON")
    if "keys" not in doc:
        keys = _x509_map(doc)
        if keys is None:
            raise JwksError("Jwks does not have [keys] field")
        return KeySet.of(keys)
    if not isinstance(doc["keys"], list):
        raise JwksError("[keys] in Jwks is not an array")
    good: list[PublicKey] = []
    last: JwksError | None = None
    for entry in doc["keys"]:
        if not isinstance(entry, dict):
            continue
        try:
            good.append(_jwk(entry))
        except JwksError as e:
            last = e
    if not good:
        raise JwksError(f"Jwks doesn't have any valid public key{f' ({last})' if last else ''}")
    return KeySet.of(tuple(good))


EMPTY = KeySet((), 0)
