"""extproc.authn.token: compact JWS parsing with jwt_verify_lib's verdicts, time checks and
audience checks (google/jwt_verify_lib jwt.cc, struct_utils.cc, check_audience.cc)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.authn.status import Status
from extproc.authn.token import IMPLEMENTED_ALGS, AudienceCheck, Jwt, b64url_decode, parse, parse_json_object
from tests.unit.authn_helpers import b64url, raw_token

NOW = 1_700_000_000
ALL_ALGS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "HS256",
    "HS384",
    "HS512",
    "EdDSA",
)
HEADER = {"alg": "RS256", "kid": "k1"}


def parsed(header: Any = None, payload: Any = None, signature: bytes = b"sig") -> Jwt | Status:
    return parse(
        raw_token(HEADER if header is None else header, {"iss": "i"} if payload is None else payload, signature)
    )


def ok(result: Jwt | Status) -> Jwt:
    assert isinstance(result, Jwt), result
    return result


# --- segments ------------------------------------------------------------------------------


def test_well_formed_token_parses_into_its_parts() -> None:
    tok = raw_token(HEADER, {"iss": "https://i", "sub": "alice", "jti": "j1", "custom": {"x": [1, 2]}}, b"\x01\x02")
    jwt = ok(parse(tok))
    h, p, _ = tok.split(".")
    assert (jwt.token, jwt.header_b64, jwt.payload_b64) == (tok, h, p)
    assert (jwt.alg, jwt.kid, jwt.iss, jwt.sub) == ("RS256", "k1", "https://i", "alice")
    assert jwt.signature == b"\x01\x02"
    assert jwt.payload["custom"] == {"x": [1, 2]}
    assert jwt.header == HEADER
    assert jwt.signed_data == f"{h}.{p}".encode()


def test_absent_optional_claims_default_to_empty_and_zero() -> None:
    jwt = ok(parsed(header={"alg": "HS256"}, payload={}))
    assert (jwt.kid, jwt.iss, jwt.sub, jwt.iat, jwt.nbf, jwt.exp, jwt.audiences) == ("", "", "", 0, 0, 0, ())


@pytest.mark.parametrize(
    "token",
    ["", ".", "..", "...", "abc", "a.b", "a.b.c.d", "a..b", ".a.b", "a.b.", "eyJhbGciOiJSUzI1NiJ9..c2ln", "a.b.c.d.e"],
)
def test_token_without_exactly_three_non_empty_segments_is_bad_format(token: str) -> None:
    assert parse(token) is Status.JWT_BAD_FORMAT


@pytest.mark.parametrize(
    "shape", ["{h}..{p}.{s}", ".{h}.{p}.{s}", "{h}.{p}.{s}.", "{h}.{p}..{s}", "..{h}...{p}..{s}.."]
)
def test_empty_segments_are_skipped_like_absl_skip_empty(shape: str) -> None:
    h, p, s = raw_token(HEADER, {"iss": "i"}, b"signature").split(".")
    jwt = ok(parse(shape.format(h=h, p=p, s=s)))
    assert jwt.signed_data == f"{h}.{p}".encode()
    assert jwt.signature == b"signature"
    assert jwt.iss == "i"


def test_token_with_an_empty_signature_segment_is_bad_format_not_unsigned() -> None:
    h, p, _ = raw_token({"alg": "HS256"}, {"iss": "i"}).split(".")
    assert parse(f"{h}.{p}.") is Status.JWT_BAD_FORMAT


# --- base64url ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", b""),
        ("QQ", b"A"),
        ("QQ==", b"A"),
        ("QUI", b"AB"),
        ("QUI=", b"AB"),
        ("QUJD", b"ABC"),
        ("-_-_", bytes([0xFB, 0xFF, 0xBF])),
        ("Q Q", b"A"),
        ("QQ\n", b"A"),
        (" QU\tJD\r\n", b"ABC"),
        ("QQ =\n=", b"A"),
    ],
)
def test_base64url_is_absl_websafe_unescape_with_optional_padding_and_whitespace_skipped(
    text: str, expected: bytes
) -> None:
    assert b64url_decode(text) == expected


@pytest.mark.parametrize(
    "text", ["+/+/", "ab/c", "ab+c", "Q", "QUJDR", "QQ=", "QQ===", "QUI==", "=", "QQ=Q", "é", "QQ\x00", "Q\u00a0Q"]
)
def test_base64url_rejects_other_alphabets_bad_length_and_bad_padding(text: str) -> None:
    assert b64url_decode(text) is None


def test_header_in_standard_base64_is_bad_base64() -> None:
    h, p, s = raw_token(HEADER, {"iss": "i"}).split(".")
    assert parse(f"{h[:-1]}+.{p}.{s}") is Status.JWT_HEADER_BAD_BASE64
    assert parse(f"{h}/.{p}.{s}") is Status.JWT_HEADER_BAD_BASE64


def test_payload_in_bad_base64_is_reported_after_the_header_is_accepted() -> None:
    h, _, s = raw_token(HEADER, {"iss": "i"}).split(".")
    assert parse(f"{h}.ab+c.{s}") is Status.JWT_PAYLOAD_BAD_BASE64
    assert parse(f"{h}.a.{s}") is Status.JWT_PAYLOAD_BAD_BASE64


@pytest.mark.parametrize("sig", ["ab+c", "a", "ab/c", "abcde"])
def test_signature_in_bad_base64_is_reported_last(sig: str) -> None:
    h, p, _ = raw_token(HEADER, {"iss": "i"}).split(".")
    assert parse(f"{h}.{p}.{sig}") is Status.JWT_SIGNATURE_BAD_BASE64


def test_padded_segments_are_accepted() -> None:
    header = json.dumps({"alg": "RS256"}).encode()
    padded = base64.urlsafe_b64encode(header).decode()
    assert padded.endswith("=")
    jwt = ok(parse(f"{padded}.{b64url(b'{}')}.c2ln"))
    assert jwt.alg == "RS256"


# --- header -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        "[]",
        "null",
        '"RS256"',
        "42",
        "not json",
        '{"alg": NaN}',
        '{"alg": Infinity}',
        '{"alg": -Infinity}',
        '{"alg":"RS256"',
        b'{"alg":"RS256","x":"\xff"}',
        b"\xfe\xff",
        '{"alg":"RS256","alg":"RS256"}',
        b'\xef\xbb\xbf{"alg":"RS256"}',
        '{"alg":"RS256"} x',
    ],
)
def test_header_that_is_not_a_json_object_is_bad_json(header: str | bytes) -> None:
    assert parsed(header=header) is Status.JWT_HEADER_BAD_JSON


@pytest.mark.parametrize(
    "header",
    [
        b'{"alg":"RS256","kid":"k1",}',
        b"{'alg':'RS256','kid':'k1'}",
        b'{alg:"RS256",kid:"k1"}',
        b' \n{"alg":"RS256","kid":"k1"}\t ',
        b'{"alg":"RS256","kid":"k1","x":[1,2,],}',
    ],
)
def test_header_json_is_read_with_protobufs_legacy_syntax(header: bytes) -> None:
    jwt = ok(parsed(header=header))
    assert (jwt.alg, jwt.kid) == ("RS256", "k1")


@pytest.mark.parametrize("alg", [None, 256, True, ["RS256"], {"name": "RS256"}])
def test_header_alg_missing_or_not_a_string_is_bad_alg(alg: object) -> None:
    header = {} if alg is None else {"alg": alg}
    assert parsed(header=header) is Status.JWT_HEADER_BAD_ALG


def test_header_alg_null_is_bad_alg() -> None:
    assert parsed(header='{"alg": null}') is Status.JWT_HEADER_BAD_ALG


@pytest.mark.parametrize(
    "alg", ["none", "None", "NONE", "", "rs256", "HS1024", "ES256K", "Ed25519", "RSA-OAEP", "RS256 "]
)
def test_unsupported_or_none_alg_is_not_implemented(alg: str) -> None:
    assert parsed(header={"alg": alg}) is Status.JWT_HEADER_NOT_IMPLEMENTED_ALG


@pytest.mark.parametrize("alg", ALL_ALGS)
def test_all_thirteen_algorithms_are_implemented(alg: str) -> None:
    assert ok(parsed(header={"alg": alg})).alg == alg


def test_implemented_algs_are_exactly_jwt_verify_libs_thirteen() -> None:
    assert frozenset(ALL_ALGS) == IMPLEMENTED_ALGS


@pytest.mark.parametrize("kid", ["1", "null", "{}", "[]", "true"])
def test_header_kid_not_a_string_is_bad_kid(kid: str) -> None:
    assert parsed(header='{"alg":"RS256","kid":' + kid + "}") is Status.JWT_HEADER_BAD_KID


def test_none_alg_is_rejected_before_a_bad_kid_is_looked_at() -> None:
    assert parsed(header={"alg": "none", "kid": 1}) is Status.JWT_HEADER_NOT_IMPLEMENTED_ALG


def test_header_errors_win_over_payload_errors() -> None:
    assert parsed(header={"alg": 1}, payload="not json") is Status.JWT_HEADER_BAD_ALG
    assert parsed(header={"alg": "RS256", "kid": 2}, payload={"iss": 3}) is Status.JWT_HEADER_BAD_KID


# --- payload --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        "[]",
        "null",
        '"x"',
        "1",
        "{",
        '{"a": NaN}',
        '{"exp": Infinity}',
        '{"a": [-Infinity]}',
        b'{"iss":"\xc3\x28"}',
        b"\x80",
        '{"iss": "a", "iss": "b"}',
        '{"sub": "a", "o": {"k": 1, "k": 1}}',
        '{"a": "\\ud800"}',
        '{"a": ["\\udc00x"]}',
        '{"a": 1e400}',
        '{"a": -1e400}',
        '{"a": [1' + "0" * 400 + "]}",
        '{"exp": 1' + "0" * 400 + "}",
    ],
)
def test_payload_that_is_not_a_json_object_is_bad_json(payload: str | bytes) -> None:
    assert parsed(payload=payload) is Status.JWT_PAYLOAD_BAD_JSON


@pytest.mark.parametrize(
    ("claim", "status"),
    [("iss", Status.JWT_ISS_NOT_STRING), ("sub", Status.JWT_SUB_NOT_STRING), ("jti", Status.JWT_JTI_NOT_STRING)],
)
@pytest.mark.parametrize("value", [1, True, None, ["x"], {"x": 1}])
def test_string_claims_of_another_type_are_rejected(claim: str, status: Status, value: object) -> None:
    assert parsed(payload={claim: value}) is status


INT_CLAIMS = [
    ("iat", Status.JWT_IAT_NOT_INTEGER, Status.JWT_IAT_OUT_OF_RANGE),
    ("nbf", Status.JWT_NBF_NOT_INTEGER, Status.JWT_NBF_OUT_OF_RANGE),
    ("exp", Status.JWT_EXP_NOT_INTEGER, Status.JWT_EXP_OUT_OF_RANGE),
]


@pytest.mark.parametrize(("claim", "not_int", "_range"), INT_CLAIMS)
@pytest.mark.parametrize("value", ["true", "false", '"1700000000"', "null", "[1]", "{}"])
def test_time_claims_that_are_not_numbers_are_not_integer(
    claim: str, not_int: Status, _range: Status, value: str
) -> None:
    assert parsed(payload='{"' + claim + '":' + value + "}") is not_int


@pytest.mark.parametrize(("claim", "_not_int", "out_of_range"), INT_CLAIMS)
@pytest.mark.parametrize(
    "value",
    ["-1", "-0.5", "-1e300", "18446744073709551616", "18446744073709551615", "1e20", "1.7e308"],
)
def test_time_claims_outside_uint64_are_out_of_range(
    claim: str, _not_int: Status, out_of_range: Status, value: str
) -> None:
    assert parsed(payload='{"' + claim + '":' + value + "}") is out_of_range


@pytest.mark.parametrize("claim", ["iat", "nbf", "exp"])
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", 0),
        ("1.9", 1),
        ("1700000000.999", 1700000000),
        ("1e3", 1000),
        ("-0.0", 0),
        ("18446744073709549568", 18446744073709549568),  # the largest double below 2^64
    ],
)
def test_time_claims_are_truncated_to_uint64(claim: str, value: str, expected: int) -> None:
    jwt = ok(parsed(payload='{"' + claim + '":' + value + "}"))
    assert getattr(jwt, claim) == expected


@pytest.mark.parametrize("aud", [1, True, None, {"a": "b"}, ["a", 1], ["a", None], [["a"]]])
def test_audience_that_is_not_a_string_or_string_list_is_rejected(aud: object) -> None:
    assert parsed(payload={"aud": aud}) is Status.JWT_AUD_NOT_STRING


@pytest.mark.parametrize(("aud", "expected"), [("a", ("a",)), (["a", "b"], ("a", "b")), ([], ()), ("", ("",))])
def test_audience_string_or_list_is_collected(aud: object, expected: tuple[str, ...]) -> None:
    assert ok(parsed(payload={"aud": aud})).audiences == expected


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        ({"iss": 1, "sub": 1, "iat": "x", "nbf": "x", "exp": "x", "jti": 1, "aud": 1}, Status.JWT_ISS_NOT_STRING),
        ({"sub": 1, "iat": "x", "nbf": "x", "exp": "x", "jti": 1, "aud": 1}, Status.JWT_SUB_NOT_STRING),
        ({"iat": "x", "nbf": -1, "exp": "x", "jti": 1, "aud": 1}, Status.JWT_IAT_NOT_INTEGER),
        ({"iat": -1, "nbf": "x", "exp": "x", "jti": 1, "aud": 1}, Status.JWT_IAT_OUT_OF_RANGE),
        ({"nbf": "x", "exp": -1, "jti": 1, "aud": 1}, Status.JWT_NBF_NOT_INTEGER),
        ({"exp": -1, "jti": 1, "aud": 1}, Status.JWT_EXP_OUT_OF_RANGE),
        ({"jti": 1, "aud": 1}, Status.JWT_JTI_NOT_STRING),
    ],
)
def test_payload_claims_are_checked_in_jwt_verify_lib_order(payload: dict[str, object], status: Status) -> None:
    assert parsed(payload=payload) is status


def test_payload_errors_win_over_a_bad_signature_encoding() -> None:
    h, _, _ = raw_token(HEADER, {}).split(".")
    p = b64url(json.dumps({"aud": 7}))
    assert parse(f"{h}.{p}.ab+c") is Status.JWT_AUD_NOT_STRING


def test_unknown_claims_of_any_type_are_kept_in_the_payload() -> None:
    payload = {"iss": "i", "n": 1.5, "b": False, "z": None, "l": [1, "a"], "o": {"k": {"k2": "v"}}, "é": "ü"}
    assert ok(parsed(payload=payload)).payload == payload


def test_parse_json_object_rejects_constants_and_non_objects() -> None:
    assert parse_json_object(b'{"a": 1}') == {"a": 1}
    assert parse_json_object(b"[1]") is None
    assert parse_json_object(b'{"a": NaN}') is None
    assert parse_json_object(b"\xff") is None
    assert parse_json_object(b"[" * 100_000) is None


# --- time -------------------------------------------------------------------------------


def _timed(**claims: int) -> Jwt:
    return ok(parsed(payload=claims))


@pytest.mark.parametrize(
    ("claims", "status"),
    [
        ({"nbf": NOW + 60}, Status.OK),
        ({"nbf": NOW + 61}, Status.JWT_NOT_YET_VALID),
        ({"nbf": NOW}, Status.OK),
        ({"exp": NOW - 60}, Status.OK),
        ({"exp": NOW - 61}, Status.JWT_EXPIRED),
        ({"exp": NOW}, Status.OK),
        ({"exp": 1}, Status.JWT_EXPIRED),
        ({"nbf": NOW + 61, "exp": NOW - 61}, Status.JWT_NOT_YET_VALID),
        ({"iat": NOW + 10_000}, Status.OK),  # iat is only type-checked
    ],
)
def test_time_constraints_allow_sixty_seconds_of_skew(claims: dict[str, int], status: Status) -> None:
    assert _timed(**claims).time_status(NOW, 60) is status


@pytest.mark.parametrize("claims", [{}, {"exp": 0}, {"nbf": 0, "exp": 0}])
def test_token_without_exp_never_expires(claims: dict[str, int]) -> None:
    assert _timed(**claims).time_status(2**62, 60) is Status.OK


def test_time_check_uses_the_given_skew() -> None:
    assert _timed(exp=NOW - 1).time_status(NOW, 0) is Status.JWT_EXPIRED
    assert _timed(nbf=NOW + 1).time_status(NOW, 0) is Status.JWT_NOT_YET_VALID
    assert _timed(exp=NOW - 299).time_status(NOW, 300) is Status.OK


# --- audiences --------------------------------------------------------------------------


def test_no_configured_audience_allows_every_token_even_without_aud() -> None:
    check = AudienceCheck(())
    assert check.allows(())
    assert check.allows(("anything",))


def test_token_without_aud_fails_when_audiences_are_configured() -> None:
    assert not AudienceCheck(("api",)).allows(())


def test_any_matching_audience_is_enough() -> None:
    check = AudienceCheck(("api", "web"))
    assert check.allows(("other", "web"))
    assert not check.allows(("other", "mobile"))


@pytest.mark.parametrize(
    "token_aud",
    [
        "api.example.com",
        "http://api.example.com",
        "https://api.example.com",
        "api.example.com/",
        "https://api.example.com/",
        "http://api.example.com/",
    ],
)
@pytest.mark.parametrize(
    "configured", ["api.example.com", "https://api.example.com/", "http://api.example.com", "api.example.com/"]
)
def test_audiences_compare_without_http_scheme_and_one_trailing_slash(configured: str, token_aud: str) -> None:
    assert AudienceCheck((configured,)).allows((token_aud,))


@pytest.mark.parametrize(
    "token_aud",
    [
        "api.example.com//",
        "ftp://api.example.com",
        "API.example.com",
        "https://https://api.example.com",
        "api.example.com/v1",
        "HTTPS://api.example.com",
        "xapi.example.com",
    ],
)
def test_audiences_are_otherwise_compared_exactly(token_aud: str) -> None:
    assert not AudienceCheck(("https://api.example.com/",)).allows((token_aud,))


# --- hostile input -------------------------------------------------------------------------


def test_one_megabyte_token_fails_cleanly() -> None:
    seg = "A" * (1 << 20)
    assert parse(f"{seg}.{seg}.{seg}") is Status.JWT_HEADER_BAD_JSON
    assert parse(seg) is Status.JWT_BAD_FORMAT
    big_payload = b64url(json.dumps({"iss": "i", "pad": "x" * (1 << 20)}))
    jwt = ok(parse(f"{b64url(json.dumps(HEADER))}.{big_payload}.c2ln"))
    assert len(jwt.payload["pad"]) == 1 << 20


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deeply_nested_json_is_bad_json_not_recursion_error(depth: int) -> None:
    nested = "[" * depth + "]" * depth
    assert parse(raw_token('{"alg":"RS256","x":' + nested + "}", {})) is Status.JWT_HEADER_BAD_JSON
    assert parse(raw_token(HEADER, '{"x":' + nested + "}")) is Status.JWT_PAYLOAD_BAD_JSON


def _nest(levels: int) -> str:
    """`levels` nested JSON objects, the outermost being the header or payload itself."""
    return '{"a":' * (levels - 1) + "{}" + "}" * (levels - 1)


def test_json_nesting_is_limited_to_100_levels_like_protobuf() -> None:
    assert isinstance(parse(raw_token(HEADER, _nest(100))), Jwt)
    assert parse(raw_token(HEADER, _nest(101))) is Status.JWT_PAYLOAD_BAD_JSON
    lists = "[" * 99 + "]" * 99
    assert isinstance(parse(raw_token(HEADER, '{"a":' + lists + "}")), Jwt)
    assert parse(raw_token(HEADER, '{"a":[' + lists + "]}")) is Status.JWT_PAYLOAD_BAD_JSON
    header = '{"alg":"RS256","a":' + _nest(99) + "}"
    assert isinstance(parse(raw_token(header, {})), Jwt)
    assert parse(raw_token('{"alg":"RS256","a":' + _nest(100) + "}", {})) is Status.JWT_HEADER_BAD_JSON


def test_non_utf8_bytes_are_bad_json() -> None:
    assert parse(raw_token(b'{"alg":"RS256"}\xff', {})) is Status.JWT_HEADER_BAD_JSON
    assert parse(raw_token(HEADER, b'{"sub":"\xed\xa0\x80"}')) is Status.JWT_PAYLOAD_BAD_JSON


@pytest.mark.parametrize("token", ["é.é.é", "\u200b.a.b", "a\x00.b.c", "a!.b.c", " a.b.c", "日本.語.テキスト"])
def test_non_base64_characters_give_a_status(token: str) -> None:
    assert parse(token) is Status.JWT_HEADER_BAD_BASE64


def test_unicode_claims_round_trip() -> None:
    jwt = ok(parsed(payload={"iss": "https://émetteur.example", "sub": "用户", "aud": ["🔑"]}))
    assert (jwt.iss, jwt.sub, jwt.audiences) == ("https://émetteur.example", "用户", ("🔑",))


def test_every_truncation_of_a_token_gives_a_jwt_or_a_status() -> None:
    tok = raw_token(HEADER, {"iss": "https://i", "sub": "s", "exp": NOW, "aud": ["a", "b"]}, b"x" * 64)
    outcomes = {"jwt" if isinstance(r, Jwt) else r for r in (parse(tok[:n]) for n in range(len(tok) + 1))}
    assert Status.JWT_BAD_FORMAT in outcomes
    assert "jwt" in outcomes
    assert outcomes <= {*Status, "jwt"}


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parse_never_raises_on_arbitrary_text(text: str) -> None:
    assert isinstance(parse(text), Jwt | Status)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.binary(max_size=64), st.binary(max_size=64))
def test_parse_never_raises_on_arbitrary_segment_bytes(h: bytes, p: bytes, s: bytes) -> None:
    result = parse(f"{b64url(h)}.{b64url(p)}.{b64url(s)}")
    assert isinstance(result, Jwt | Status)
    if h and p and s:
        assert result not in (Status.JWT_BAD_FORMAT, Status.JWT_HEADER_BAD_BASE64)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**80), 2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec="utf-8"), max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(st.characters(codec="utf-8"), max_size=5), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["iss", "sub", "iat", "nbf", "exp", "jti", "aud", "scope", "x"]), json_values))
def test_any_json_payload_gives_a_jwt_or_a_claim_status(payload: dict[str, object]) -> None:
    result = parse(raw_token({"alg": "ES256"}, payload))
    assert isinstance(result, Jwt | Status)
    if isinstance(result, Status):
        assert result.name.startswith("JWT_") and result.name.split("_")[1] in {
            "ISS",
            "SUB",
            "IAT",
            "NBF",
            "EXP",
            "JTI",
            "AUD",
        }
    else:
        assert result.payload == payload
