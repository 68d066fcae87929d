"""extproc.authn.keys: JWKS parsing with jwt_verify_lib's rules (jwks.cc) and key selection and
signature checks as in verifyJwtWithoutTimeChecking (verify.cc), with the stricter key fit."""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from extproc.authn.keys import EMPTY, KeySet, PublicKey, parse_jwks
from extproc.authn.status import JwksError, Status
from extproc.authn.token import Jwt, parse
from tests.unit.authn_helpers import (
    HMAC_SECRET,
    b64url,
    ec_key,
    ed25519_key,
    jwk,
    jwks_json,
    raw_token,
    rsa_key,
    sign,
)

PAYLOAD = {"iss": "https://issuer.example.com", "sub": "alice"}


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    """Every private key the module signs with, generated once."""
    return {
        "rsa": rsa_key(0),
        "rsa2": rsa_key(1),
        "P-256": ec_key("P-256"),
        "P-384": ec_key("P-384"),
        "P-521": ec_key("P-521"),
        "ed": ed25519_key(0),
        "ed2": ed25519_key(1),
        "hmac": HMAC_SECRET,
    }


ALG_KEY = {
    "RS256": "rsa",
    "RS384": "rsa",
    "RS512": "rsa",
    "PS256": "rsa",
    "PS384": "rsa",
    "PS512": "rsa",
    "ES256": "P-256",
    "ES384": "P-384",
    "ES512": "P-521",
    "HS256": "hmac",
    "HS384": "hmac",
    "HS512": "hmac",
    "EdDSA": "ed",
}


def jwt_of(tok: str) -> Jwt:
    result = parse(tok)
    assert isinstance(result, Jwt), result
    return result


def keyset(*jwks: dict[str, Any]) -> KeySet:
    return parse_jwks(jwks_json(*jwks))


def resign(tok: str, new_header: dict[str, Any]) -> str:
    """The same payload and signature under another header: a label swap."""
    _, p, s = tok.split(".")
    return f"{b64url(json.dumps(new_header))}.{p}.{s}"


def flip_signature(tok: str) -> str:
    h, p, _ = tok.split(".")
    sig = bytearray(jwt_of(tok).signature)
    sig[len(sig) // 2] ^= 0x01
    return f"{h}.{p}.{b64url(bytes(sig))}"


# --- round trips with real keys ------------------------------------------------------------------


@pytest.mark.parametrize("alg", list(ALG_KEY))
@pytest.mark.parametrize("jwk_alg", [False, True], ids=["jwk-without-alg", "jwk-with-alg"])
def test_every_algorithm_round_trips_with_a_real_key(keys: dict[str, Any], alg: str, jwk_alg: bool) -> None:
    key = keys[ALG_KEY[alg]]
    ks = keyset(jwk(key, kid="k1", alg=alg if jwk_alg else None))
    tok = sign(PAYLOAD, key, alg, kid="k1")
    assert ks.verify(jwt_of(tok)) is Status.OK


@pytest.mark.parametrize("alg", list(ALG_KEY))
def test_every_algorithm_rejects_a_tampered_signature(keys: dict[str, Any], alg: str) -> None:
    key = keys[ALG_KEY[alg]]
    ks = keyset(jwk(key, kid="k1"))
    assert ks.verify(jwt_of(flip_signature(sign(PAYLOAD, key, alg, kid="k1")))) is Status.JWT_VERIFICATION_FAIL


@pytest.mark.parametrize("alg", list(ALG_KEY))
def test_every_algorithm_rejects_a_tampered_payload(keys: dict[str, Any], alg: str) -> None:
    key = keys[ALG_KEY[alg]]
    ks = keyset(jwk(key))
    h, _, s = sign(PAYLOAD, key, alg).split(".")
    forged = f"{h}.{b64url(json.dumps({**PAYLOAD, 'sub': 'mallory'}))}.{s}"
    assert ks.verify(jwt_of(forged)) is Status.JWT_VERIFICATION_FAIL


@pytest.mark.parametrize("alg", list(ALG_KEY))
def test_every_algorithm_fails_against_keys_of_every_other_type(keys: dict[str, Any], alg: str) -> None:
    """Keys without kid or alg are all candidates; none of another type may verify."""
    own = ALG_KEY[alg]
    others = [jwk(keys[name]) for name in ("rsa", "P-256", "P-384", "P-521", "hmac", "ed") if name != own]
    tok = sign(PAYLOAD, keys[own], alg, kid=None)
    assert keyset(*others).verify(jwt_of(tok)) is Status.JWT_VERIFICATION_FAIL
    assert keyset(*others, jwk(keys[own])).verify(jwt_of(tok)) is Status.OK


# --- key selection ------------------------------------------------------------------------------


def test_kid_less_token_tries_every_key(keys: dict[str, Any]) -> None:
    ks = keyset(jwk(keys["rsa"], kid="a"), jwk(keys["rsa2"], kid="b"))
    assert ks.verify(jwt_of(sign(PAYLOAD, keys["rsa2"], kid=None))) is Status.OK
    assert ks.verify(jwt_of(sign(PAYLOAD, keys["rsa"], kid=None))) is Status.OK


def test_token_kid_selects_only_the_key_with_that_kid(keys: dict[str, Any]) -> None:
    ks = keyset(jwk(keys["rsa"], kid="a"), jwk(keys["rsa2"], kid="b"))
    assert ks.verify(jwt_of(sign(PAYLOAD, keys["rsa2"], kid="b"))) is Status.OK
    # Signed by b's key but naming a: only key a is a candidate, and it does not verify.
    assert ks.verify(jwt_of(sign(PAYLOAD, keys["rsa2"], kid="a"))) is Status.JWT_VERIFICATION_FAIL


def test_key_without_kid_is_a_candidate_for_any_token_kid(keys: dict[str, Any]) -> None:
    ks = keyset(jwk(keys["rsa"], kid="a"), jwk(keys["rsa2"]))
    assert ks.verify(jwt_of(sign(PAYLOAD, keys["rsa2"], kid="unknown"))) is Status.OK


def test_unknown_kid_with_only_kid_keys_is_a_kid_alg_mismatch(keys: dict[str, Any]) -> None:
    ks = keyset(jwk(keys["rsa"], kid="a"), jwk(keys["rsa2"], kid="b"))
    assert ks.verify(jwt_of(sign(PAYLOAD, keys["rsa"], kid="c"))) is Status.JWKS_KID_ALG_MISMATCH


def test_key_alg_must_equal_the_token_alg(keys: dict[str, Any]) -> None:
    ks = keyset(jwk(keys["rsa"], alg="RS384"))
    assert ks.verify(jwt_of(sign(PAYLOAD, keys["rsa"], "RS256", kid=None))) is Status.JWKS_KID_ALG_MISMATCH
    assert ks.verify(jwt_of(sign(PAYLOAD, keys["rsa"], "PS384", kid=None))) is Status.JWKS_KID_ALG_MISMATCH
    assert ks.verify(jwt_of(sign(PAYLOAD, keys["rsa"], "RS384", kid=None))) is Status.OK


def test_candidates_that_do_not_verify_give_verification_fail(keys: dict[str, Any]) -> None:
    ks = keyset(jwk(keys["rsa2"], kid="k1"))
    assert ks.verify(jwt_of(sign(PAYLOAD, keys["rsa"], kid="k1"))) is Status.JWT_VERIFICATION_FAIL


def test_candidate_of_the_wrong_type_still_counts_as_matched(keys: dict[str, Any]) -> None:
    """jwt_verify_lib marks kid/alg as matched before looking at the key type."""
    ks = keyset(jwk(keys["P-256"], kid="k1"))
    assert ks.verify(jwt_of(sign(PAYLOAD, keys["rsa"], kid="k1"))) is Status.JWT_VERIFICATION_FAIL


def test_empty_keyset_matches_nothing(keys: dict[str, Any]) -> None:
    assert EMPTY.verify(jwt_of(sign(PAYLOAD, keys["rsa"]))) is Status.JWKS_KID_ALG_MISMATCH
    assert not EMPTY.has_kid("k1")


def test_has_kid(keys: dict[str, Any]) -> None:
    ks = keyset(jwk(keys["rsa"], kid="a"), jwk(keys["rsa2"]))
    assert ks.has_kid("a")
    assert not ks.has_kid("b")


# --- algorithm confusion ------------------------------------------------------------------------


def _hs256_with_secret(secret: bytes, kid: str | None = None) -> str:
    header: dict[str, Any] = {"alg": "HS256", "typ": "JWT"}
    if kid:
        header["kid"] = kid
    signing_input = f"{b64url(json.dumps(header))}.{b64url(json.dumps(PAYLOAD))}"
    return f"{signing_input}.{b64url(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


@pytest.mark.parametrize(
    "encoding",
    [
        (serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        (serialization.Encoding.PEM, serialization.PublicFormat.PKCS1),
        (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
        (serialization.Encoding.DER, serialization.PublicFormat.PKCS1),
    ],
    ids=["pem-spki", "pem-pkcs1", "der-spki", "der-pkcs1"],
)
@pytest.mark.parametrize("kid", [None, "k1"])
def test_rsa_public_key_is_never_an_hmac_secret(
    keys: dict[str, Any], encoding: tuple[Any, Any], kid: str | None
) -> None:
    pub = keys["rsa"].public_key()
    secret = pub.public_bytes(*encoding)
    ks = keyset(jwk(pub, kid="k1"))
    assert ks.verify(jwt_of(_hs256_with_secret(secret, kid))) is Status.JWT_VERIFICATION_FAIL


def test_ec_and_ed25519_public_keys_are_never_hmac_secrets(keys: dict[str, Any]) -> None:
    for name in ("P-256", "ed"):
        pub = keys[name].public_key()
        ks = keyset(jwk(pub))
        for enc, fmt in [
            (serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
            (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
        ]:
            assert ks.verify(jwt_of(_hs256_with_secret(pub.public_bytes(enc, fmt)))) is Status.JWT_VERIFICATION_FAIL


def test_rs256_signature_relabelled_as_ps256_fails(keys: dict[str, Any]) -> None:
    ks = keyset(jwk(keys["rsa"]))
    tok = sign(PAYLOAD, keys["rsa"], "RS256", kid=None)
    assert ks.verify(jwt_of(tok)) is Status.OK
    assert ks.verify(jwt_of(resign(tok, {"alg": "PS256"}))) is Status.JWT_VERIFICATION_FAIL


def test_ps256_signature_relabelled_as_rs256_fails(keys: dict[str, Any]) -> None:
    key = keys["rsa"]
    header = b64url(json.dumps({"alg": "RS256"}))
    signing_input = f"{header}.{b64url(json.dumps(PAYLOAD))}"
    sig = key.sign(
        signing_input.encode(), padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32), hashes.SHA256()
    )
    assert keyset(jwk(key)).verify(jwt_of(f"{signing_input}.{b64url(sig)}")) is Status.JWT_VERIFICATION_FAIL


def _es_label_swap(key: ec.EllipticCurvePrivateKey, label: str, digest: hashes.HashAlgorithm) -> str:
    """A valid ECDSA signature by `key` with `digest`, labelled `label` (raw r||s, as JWS wants)."""
    signing_input = f"{b64url(json.dumps({'alg': label}))}.{b64url(json.dumps(PAYLOAD))}"
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(digest)))
    size = (key.curve.key_size + 7) // 8
    return f"{signing_input}.{b64url(r.to_bytes(size, 'big') + s.to_bytes(size, 'big'))}"


def test_es256_token_against_a_p384_key_fails(keys: dict[str, Any]) -> None:
    p384 = keyset(jwk(keys["P-384"]))
    # A genuine ES256 token from a P-256 key, and a P-384/SHA-256 signature labelled ES256.
    assert p384.verify(jwt_of(sign(PAYLOAD, keys["P-256"], "ES256", kid=None))) is Status.JWT_VERIFICATION_FAIL
    assert p384.verify(jwt_of(_es_label_swap(keys["P-384"], "ES256", hashes.SHA256()))) is Status.JWT_VERIFICATION_FAIL


def test_es384_with_sha256_is_not_accepted(keys: dict[str, Any]) -> None:
    ks = keyset(jwk(keys["P-384"]))
    assert ks.verify(jwt_of(_es_label_swap(keys["P-384"], "ES384", hashes.SHA384()))) is Status.OK
    assert ks.verify(jwt_of(_es_label_swap(keys["P-384"], "ES384", hashes.SHA256()))) is Status.JWT_VERIFICATION_FAIL


def test_ecdsa_signature_of_the_wrong_length_fails_without_raising(keys: dict[str, Any]) -> None:
    ks = keyset(jwk(keys["P-256"]))
    tok = sign(PAYLOAD, keys["P-256"], "ES256", kid=None)
    h, p, _ = tok.split(".")
    sig = jwt_of(tok).signature
    for bad in (sig[:-1], sig + b"\x00", b"\x00", b"\x00" * 64, sig[:32], sig[32:] + sig[:32]):
        forged = f"{h}.{p}.{b64url(bad)}"
        assert ks.verify(jwt_of(forged)) is Status.JWT_VERIFICATION_FAIL


def test_hmac_with_another_secret_fails(keys: dict[str, Any]) -> None:
    ks = keyset(jwk(b"another secret that is long enough for hs256!!"))
    assert ks.verify(jwt_of(sign(PAYLOAD, HMAC_SECRET, "HS256", kid=None))) is Status.JWT_VERIFICATION_FAIL


# --- EdDSA --------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 32, 63, 65, 128])
def test_eddsa_signature_of_the_wrong_length_is_reported(keys: dict[str, Any], length: int) -> None:
    ks = keyset(jwk(keys["ed"]))
    h, p, _ = sign(PAYLOAD, keys["ed"], "EdDSA", kid=None).split(".")
    assert ks.verify(jwt_of(f"{h}.{p}.{b64url(b'x' * length)}")) is Status.JWT_ED25519_SIGNATURE_WRONG_LENGTH


def test_eddsa_signature_of_the_right_length_but_wrong_is_a_verification_fail(keys: dict[str, Any]) -> None:
    ks = keyset(jwk(keys["ed"]))
    h, p, _ = sign(PAYLOAD, keys["ed"], "EdDSA", kid=None).split(".")
    assert ks.verify(jwt_of(f"{h}.{p}.{b64url(bytes(64))}")) is Status.JWT_VERIFICATION_FAIL


def test_eddsa_tries_the_next_key_after_a_failed_verification(keys: dict[str, Any]) -> None:
    ks = keyset(jwk(keys["ed2"]), jwk(keys["ed"]))
    assert ks.verify(jwt_of(sign(PAYLOAD, keys["ed"], "EdDSA", kid=None))) is Status.OK


def test_eddsa_token_against_rsa_keys_is_a_verification_fail_not_wrong_length(keys: dict[str, Any]) -> None:
    ks = keyset(jwk(keys["rsa"]))
    assert ks.verify(jwt_of(sign(PAYLOAD, keys["ed"], "EdDSA", kid=None))) is Status.JWT_VERIFICATION_FAIL


# --- JWKS parsing -------------------------------------------------------------------------


def test_jwks_of_every_key_type_parses(keys: dict[str, Any]) -> None:
    ks = keyset(
        jwk(keys["rsa"], kid="r", alg="RS256"),
        jwk(keys["P-256"], kid="e1"),
        jwk(keys["P-384"], kid="e2"),
        jwk(keys["P-521"], kid="e3"),
        jwk(HMAC_SECRET, kid="h"),
        jwk(keys["ed"], kid="o"),
    )
    summary = [(k.kty, k.kid, k.alg, k.crv) for k in ks.keys]
    assert summary == [
        ("RSA", "r", "RS256", ""),
        ("EC", "e1", "", "P-256"),
        ("EC", "e2", "", "P-384"),
        ("EC", "e3", "", "P-521"),
        ("oct", "h", "", ""),
        ("OKP", "o", "", "Ed25519"),
    ]
    assert ks.keys[4].key == HMAC_SECRET


def test_ec_key_without_alg_or_crv_defaults_to_p256(keys: dict[str, Any]) -> None:
    ks = keyset(jwk(keys["P-256"], crv=None))
    assert ks.keys[0].crv == "P-256"
    assert ks.verify(jwt_of(sign(PAYLOAD, keys["P-256"], "ES256", kid=None))) is Status.OK


def test_ec_key_without_alg_or_crv_is_not_another_curve(keys: dict[str, Any]) -> None:
    with pytest.raises(JwksError):
        keyset(jwk(keys["P-384"], crv=None))


@pytest.mark.parametrize(("alg", "crv"), [("ES256", "P-256"), ("ES384", "P-384"), ("ES512", "P-521")])
def test_ec_curve_follows_alg_when_crv_is_absent(keys: dict[str, Any], alg: str, crv: str) -> None:
    ks = keyset(jwk(keys[crv], crv=None, alg=alg))
    assert ks.keys[0].crv == crv
    assert ks.verify(jwt_of(sign(PAYLOAD, keys[crv], alg, kid=None))) is Status.OK


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"alg": "ES384"}, "not compatible"),  # crv P-256 from the key
        ({"alg": "RS256"}, "[ES]"),
        ({"crv": "P-192"}, "not supported"),
        ({"crv": 256}, "not string"),
        ({"alg": "ES999", "crv": None}, "not supported"),
        ({"x": None}, "[x] field is missing"),
        ({"y": 7}, "[y] field is not string"),
        ({"x": "!!"}, "Base64"),
        ({"x": "AAAA", "y": "AAAA"}, "parse error"),
    ],
)
def test_invalid_ec_keys_are_rejected(keys: dict[str, Any], members: dict[str, Any], message: str) -> None:
    with pytest.raises(JwksError, match=message.replace("[", r"\[").replace("]", r"\]")):
        keyset(jwk(keys["P-256"], **members))


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"alg": "ES256"}, r"\[RS\] or \[PS\]"),
        ({"n": None}, r"\[n\] field is missing"),
        ({"e": None}, r"\[e\] field is missing"),
        ({"n": 12}, r"\[n\] field is not string"),
        ({"n": "!!"}, "parse error"),
        ({"n": ""}, "parse error"),
        ({"e": "AAAA"}, "parse error"),
    ],
)
def test_invalid_rsa_keys_are_rejected(keys: dict[str, Any], members: dict[str, Any], message: str) -> None:
    with pytest.raises(JwksError, match=message):
        keyset(jwk(keys["rsa"], **members))


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"alg": "RS256"}, "HS"),
        ({"k": None}, r"\[k\] field is missing"),
        ({"k": 5}, r"\[k\] field is not string"),
        ({"k": ""}, "invalid Base64"),
        ({"k": "a+b/"}, "invalid Base64"),
    ],
)
def test_invalid_hmac_keys_are_rejected(members: dict[str, Any], message: str) -> None:
    with pytest.raises(JwksError, match=message):
        keyset(jwk(HMAC_SECRET, **members))


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"alg": "ES256"}, "EdDSA"),
        ({"crv": None}, r"\[crv\] field is missing"),
        ({"crv": "X25519"}, "not supported"),
        ({"crv": "Ed448"}, "not supported"),
        ({"x": None}, r"\[x\] field is missing"),
        ({"x": "a+b/"}, "invalid Base64"),
        ({"x": b64url(bytes(31))}, "wrong length"),
        ({"x": b64url(bytes(33))}, "wrong length"),
    ],
)
def test_invalid_okp_keys_are_rejected(keys: dict[str, Any], members: dict[str, Any], message: str) -> None:
    with pytest.raises(JwksError, match=message):
        keyset(jwk(keys["ed"], **members))


@pytest.mark.parametrize(
    ("kty", "message"), [(None, "missing"), (3, "bad"), ("RSA2", "not supported"), ("", "not supported")]
)
def test_keys_without_a_supported_kty_are_rejected(kty: Any, message: str) -> None:
    entry = {"kty": kty, "k": b64url(HMAC_SECRET)} if kty is not None else {"k": b64url(HMAC_SECRET)}
    with pytest.raises(JwksError, match=message):
        keyset(entry)


def test_invalid_keys_next_to_valid_ones_are_skipped(keys: dict[str, Any]) -> None:
    good = jwk(keys["rsa"], kid="good")
    doc = json.dumps(
        {"keys": [{"kty": "RSA", "kid": "bad"}, "not an object", 7, None, good, {"kty": "EC", "crv": "P-999"}, []]}
    )
    ks = parse_jwks(doc)
    assert [k.kid for k in ks.keys] == ["good"]
    assert ks.verify(jwt_of(sign(PAYLOAD, keys["rsa"], kid="good"))) is Status.OK


def test_jwks_with_no_valid_key_names_the_last_problem() -> None:
    with pytest.raises(JwksError, match=r"^Jwks doesn't have any valid public key \(.*\[kty\] is missing"):
        parse_jwks(json.dumps({"keys": [{"kty": "oct"}, {"n": "x"}]}))


@pytest.mark.parametrize("doc", ['{"keys": []}', '{"keys": [1, "a", null]}'])
def test_jwks_with_no_key_objects_is_an_error(doc: str) -> None:
    with pytest.raises(JwksError, match=r"^Jwks doesn't have any valid public key$"):
        parse_jwks(doc)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("", "Jwks is an invalid JSON"),
        ("{", "Jwks is an invalid JSON"),
        ("[]", "Jwks is an invalid JSON"),
        ('"keys"', "Jwks is an invalid JSON"),
        ("[" * 100_000, "Jwks is an invalid JSON"),
        ("{}", r"Jwks does not have \[keys\] field"),
        ('{"other": 1}', r"Jwks does not have \[keys\] field"),
        ('{"keys": {}}', r"\[keys\] in Jwks is not an array"),
        ('{"keys": "abc"}', r"\[keys\] in Jwks is not an array"),
    ],
)
def test_malformed_jwks_documents_are_rejected(doc: str, message: str) -> None:
    with pytest.raises(JwksError, match=message):
        parse_jwks(doc)


def _rsa_jwk_with_exponent(keys: dict[str, Any], e: int) -> dict[str, Any]:
    out = jwk(keys["rsa"])
    out["e"] = b64url(e.to_bytes((e.bit_length() + 7) // 8, "big"))
    return out


def test_rsa_exponent_3_is_accepted(keys: dict[str, Any]) -> None:
    ks = keyset(_rsa_jwk_with_exponent(keys, 3))
    assert ks.verify(jwt_of(sign(PAYLOAD, keys["rsa"], kid=None))) is Status.JWT_VERIFICATION_FAIL


@pytest.mark.parametrize("e", [17, 257, 2**31 + 11])
def test_rsa_exponent_other_than_3_or_65537_is_rejected(keys: dict[str, Any], e: int) -> None:
    with pytest.raises(JwksError, match="parse error"):
        keyset(_rsa_jwk_with_exponent(keys, e))


def test_jwks_accepts_bytes(keys: dict[str, Any]) -> None:
    ks = parse_jwks(jwks_json(jwk(keys["rsa"])).encode())
    assert len(ks.keys) == 1


def test_each_parse_is_a_new_version(keys: dict[str, Any]) -> None:
    doc = jwks_json(jwk(keys["rsa"]))
    a, b = parse_jwks(doc), parse_jwks(doc)
    assert a.version != b.version
    assert a.version > 0 and b.version > 0
    assert KeySet.of(()).version not in (a.version, b.version)


def test_jwk_alg_and_kid_of_other_types_are_ignored(keys: dict[str, Any]) -> None:
    ks = keyset(jwk(keys["rsa"], kid=5, alg=["RS256"]))
    assert (ks.keys[0].kid, ks.keys[0].alg) == ("", "")


@pytest.mark.parametrize(
    ("key", "fits"),
    [
        (PublicKey("RSA", "", "", "", None), {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
        (PublicKey("EC", "", "", "P-256", None), {"ES256"}),
        (PublicKey("EC", "", "", "P-384", None), {"ES384"}),
        (PublicKey("EC", "", "", "P-521", None), {"ES512"}),
        (PublicKey("oct", "", "", "", b"s"), {"HS256", "HS384", "HS512"}),
        (PublicKey("OKP", "", "", "Ed25519", None), {"EdDSA"}),
    ],
)
def test_key_type_fits_exactly_its_algorithms(key: PublicKey, fits: set[str]) -> None:
    assert {alg for alg in ALG_KEY if key.fits(alg)} == fits


# --- X509 map (Google's certificate endpoint) ------------------------------------------------------


def _cert_pem(private_key: Any) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer.example.com")])
    now = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(private_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def test_x509_certificate_map_gives_rsa_keys_named_by_kid(keys: dict[str, Any]) -> None:
    ks = parse_jwks(json.dumps({"kb": _cert_pem(keys["rsa2"]), "ka": _cert_pem(keys["rsa"])}))
    assert sorted((k.kty, k.kid) for k in ks.keys) == [("RSA", "ka"), ("RSA", "kb")]
    assert ks.verify(jwt_of(sign(PAYLOAD, keys["rsa2"], kid="kb"))) is Status.OK
    assert ks.verify(jwt_of(sign(PAYLOAD, keys["rsa2"], kid="ka"))) is Status.JWT_VERIFICATION_FAIL
    assert ks.verify(jwt_of(sign(PAYLOAD, keys["rsa"], kid=None))) is Status.OK


def test_x509_map_with_an_ec_certificate_is_rejected(keys: dict[str, Any]) -> None:
    with pytest.raises(JwksError, match="X509"):
        parse_jwks(json.dumps({"ka": _cert_pem(keys["rsa"]), "kb": _cert_pem(keys["P-256"])}))


def test_x509_map_with_a_corrupt_certificate_is_rejected() -> None:
    with pytest.raises(JwksError, match="X509"):
        parse_jwks(json.dumps({"k": "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"}))


def test_map_with_a_non_certificate_value_is_not_an_x509_map(keys: dict[str, Any]) -> None:
    with pytest.raises(JwksError, match=r"does not have \[keys\]"):
        parse_jwks(json.dumps({"ka": _cert_pem(keys["rsa"]), "kb": "hello"}))
    with pytest.raises(JwksError, match=r"does not have \[keys\]"):
        parse_jwks(json.dumps({"": _cert_pem(keys["rsa"])}))


# --- hostile signatures --------------------------------------------------------------------


@pytest.mark.parametrize("alg", list(ALG_KEY))
@pytest.mark.parametrize("sig", [b"\x00", b"\xff" * 7, bytes(64), bytes(256), bytes(1 << 16)])
def test_garbage_signatures_never_raise(keys: dict[str, Any], alg: str, sig: bytes) -> None:
    ks = keyset(*(jwk(keys[n]) for n in ("rsa", "P-256", "P-384", "P-521", "hmac", "ed")))
    tok = raw_token({"alg": alg}, PAYLOAD, sig)
    assert ks.verify(jwt_of(tok)) in (Status.JWT_VERIFICATION_FAIL, Status.JWT_ED25519_SIGNATURE_WRONG_LENGTH)
