"""Parsing a compact JWS the way Envoy's jwt_verify_lib does, so every malformed token gets
the same verdict and the same message as under Envoy's jwt_authn filter.

Parsing is separate from signature checking: a parsed token is cached (see `cache.py`) and
its time and audience checks are redone on every use.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from extproc.authn.status import Status

IMPLEMENTED_ALGS = frozenset(
    {"ES256", "ES384", "ES512", "HS256", "HS384", "HS512", "RS256", "RS384", "RS512"}
    | {"PS256", "PS384", "PS512", "EdDSA"}
)
UINT64_LIMIT = float(2**64)
_B64URL_BODY = re.compile(r"[A-Za-z0-9_-]*")
_B64_PAD = re.compile(r"[=.]*")
_ABSL_SPACE = str.maketrans("", "", " \t\n\v\f\r")


def b64url_decode(s: str) -> bytes | None:
    """absl::WebSafeBase64Unescape, which jwt_verify_lib uses for every token part and JWK
    field: ASCII whitespace anywhere is skipped; data in the URL-safe alphabet, then nothing
    but padding (`=` or `.`), either none or exactly the right amount. None if invalid."""
    if not s.isascii():
        return None
    t = s.translate(_ABSL_SPACE)
    body = _B64URL_BODY.match(t).group()  # type: ignore[union-attr]  # `*` always matches
    pad = t[len(body) :]
    if not _B64_PAD.fullmatch(pad):
        return None
    state = len(body) % 4
    if state == 1:
        return None
    expected = (0, 0, 2, 1)[state]
    if pad and len(pad) != expected:
        return None
    try:
        return base64.urlsafe_b64decode(body + "=" * expected)
    except (binascii.Error, ValueError):
        return None


# --- JSON as protobuf's JsonStringToMessage parses it into a Struct ----------------------
#
# jwt_verify_lib parses the header and payload with protobuf's JSON parser, which runs with
# `allow_legacy_syntax` (google/protobuf/json/internal/lexer.{h,cc}). Unlike Python's json
# module it also accepts single-quoted strings, bare-word keys, trailing commas, raw control
# characters in strings and the \' and \U escapes; and it rejects duplicate keys (at any
# depth), nesting deeper than 100, unpaired UTF-16 surrogates and numbers that overflow a
# double. Valid JSON takes the fast path (the json module plus those checks, only run when
# the text could need them); what the json module refuses is re-parsed by `_LegacyJson`.

MAX_JSON_DEPTH = 100


class _JsonError(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _JsonError(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise _JsonError("duplicate key")
    return d


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
_SURROGATE = re.compile("[\ud800-\udfff]")
_ESCAPED_SURROGATE = re.compile(r"\\[uU][dD][89a-fA-F]")
_EXPONENT = re.compile(r"[0-9][eE]")
_LONG_DIGITS = re.compile(r"[0-9]{309}")  # a longer integer may overflow a double


def _check_tree(value: Any, depth: int, surrogates: bool, numbers: bool) -> None:
    """The limits the json module does not enforce: depth, lone surrogates, overflow."""
    if isinstance(value, dict):
        if depth > MAX_JSON_DEPTH:
            raise _JsonError("too deeply nested")
        for k, v in value.items():
            if surrogates and _SURROGATE.search(k):
                raise _JsonError("unpaired surrogate")
            _check_tree(v, depth + 1, surrogates, numbers)
    elif isinstance(value, list):
        if depth > MAX_JSON_DEPTH:
            raise _JsonError("too deeply nested")
        for v in value:
            _check_tree(v, depth + 1, surrogates, numbers)
    elif isinstance(value, str):
        if surrogates and _SURROGATE.search(value):
            raise _JsonError("unpaired surrogate")
    elif numbers and isinstance(value, int | float) and not isinstance(value, bool):
        try:
            finite = math.isfinite(float(value))
        except OverflowError:
            finite = False
        if not finite:
            raise _JsonError("number out of range")


def _fast(text: str) -> Any:
    value = _DECODER.decode(text)
    deep = text.count("{") + text.count("[") > MAX_JSON_DEPTH
    surrogates = _ESCAPED_SURROGATE.search(text) is not None
    numbers = _EXPONENT.search(text) is not None or (len(text) > 308 and _LONG_DIGITS.search(text) is not None)
    if deep or surrogates or numbers:
        _check_tree(value, 1, surrogates, numbers)
    return value


_SIMPLE_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "'": "'"}
_HEX = frozenset("0123456789abcdefABCDEF")
_JSON_SPACE = " \t\n\r"


class _LegacyJson:
    """protobuf's JsonLexer with allow_legacy_syntax, for what the json module refuses."""

    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0
        self.budget = MAX_JSON_DEPTH

    def fail(self, why: str) -> _JsonError:
        return _JsonError(f"{why} at offset {self.i}")

    def ws(self) -> None:
        s, i, n = self.s, self.i, len(self.s)
        while i < n and s[i] in _JSON_SPACE:
            i += 1
        self.i = i

    def peek(self, lit: str) -> bool:
        self.ws()
        if self.s.startswith(lit, self.i):
            self.i += len(lit)
            return True
        return False

    def expect(self, lit: str) -> None:
        if not self.peek(lit):
            raise self.fail(f"expected {lit!r}")

    def document(self) -> Any:
        value = self.value()
        self.ws()
        if self.i != len(self.s):
            raise self.fail("extraneous characters")
        return value

    def value(self) -> Any:
        self.ws()
        if self.i >= len(self.s):
            raise self.fail("unexpected end")
        c = self.s[self.i]
        if c == "{":
            return self.obj()
        if c == "[":
            return self.arr()
        if c in "\"'":
            return self.string()
        if c == "-" or "0" <= c <= "9":
            return self.number()
        for lit, v in (("true", True), ("false", False), ("null", None)):
            if c == lit[0]:
                self.expect(lit)
                return v
        raise self.fail(f"unexpected character {c!r}")

    def push(self) -> None:
        if self.budget == 0:
            raise self.fail("too deeply nested")
        self.budget -= 1

    def obj(self) -> dict[str, Any]:
        self.expect("{")
        self.push()
        out: dict[str, Any] = {}
        if not self.peek("}"):
            has_comma = True
            while True:
                if not has_comma:
                    raise self.fail("expected ','")
                self.ws()
                key = self.string() if self.s.startswith(('"', "'"), self.i) else self.bare_word()
                self.expect(":")
                v = self.value()
                if key in out:
                    raise self.fail("duplicate key")
                out[key] = v
                has_comma = self.peek(",")
                if self.peek("}"):
                    break
        self.budget += 1
        return out

    def arr(self) -> list[Any]:
        self.expect("[")
        self.push()
        out: list[Any] = []
        if not self.peek("]"):
            has_comma = True
            while True:
                if not has_comma:
                    raise self.fail("expected ','")
                out.append(self.value())
                has_comma = self.peek(",")
                if self.peek("]"):
                    break
        self.budget += 1
        return out

    def bare_word(self) -> str:
        s, i, n = self.s, self.i, len(self.s)
        j = i
        while j < n and (s[j] == "_" or (s[j].isascii() and s[j].isalnum())):
            j += 1
        word = s[i:j]
        if not word or word[0].isdigit() or word in ("null", "true", "false"):
            raise self.fail("expected a key")
        self.i = j
        return word

    def number(self) -> int | float:
        s, n = self.s, len(self.s)
        start = j = self.i
        state, prev = "int", ""
        while j < n:  # the lexer's TakeWhile: it stops at the first character out of place
            c = s[j]
            p, prev = prev, c
            if "0" <= c <= "9":
                j += 1
                continue
            last_was_int = "0" <= p <= "9" if p else False
            if state == "int" and c == "-":
                if last_was_int:
                    break
            elif state == "int" and last_was_int and c == ".":
                state = "fraction"
            elif state != "exponent" and last_was_int and c in "eE":
                state = "exponent"
            elif not (p in ("e", "E") and c in "+-"):
                break
            j += 1
        text = s[start:j]
        self.i = j
        if not text or text == "-":
            raise self.fail("expected a number")
        digits = text[1:] if text[0] == "-" else text
        if len(digits) > 1 and digits[0] == "0" and digits[1].isdigit():
            raise self.fail("leading zero")
        if text.endswith("."):
            raise self.fail("trailing period")
        try:
            f = float(text)
        except ValueError:
            raise self.fail("invalid number") from None
        if not math.isfinite(f):
            raise self.fail("number out of range")
        self.ws()
        if self.i < n and s[self.i] not in ",]}":
            raise self.fail("unexpected character after a number")
        return f if any(c in text for c in ".eE") else int(text)

    def hex4(self) -> int:
        h = self.s[self.i : self.i + 4]
        if len(h) != 4 or not all(c in _HEX for c in h):
            raise self.fail("invalid Unicode escape")
        self.i += 4
        return int(h, 16)

    def string(self) -> str:
        s, n = self.s, len(self.s)
        quote = s[self.i]
        self.i += 1
        out: list[str] = []
        while True:
            if self.i >= n:
                raise self.fail("EOF inside string")
            c = s[self.i]
            self.i += 1
            if c == quote:
                return "".join(out)
            if c != "\\":
                out.append(c)  # raw control characters and the other quote are fine here
                continue
            if self.i >= n:
                raise self.fail("EOF inside string")
            e = s[self.i]
            self.i += 1
            if e in "uU":
                rune = self.hex4()
                if 0xD800 <= rune <= 0xDBFF:
                    if not s.startswith("\\u", self.i):
                        raise self.fail("expected a low surrogate")
                    self.i += 2
                    low = self.hex4()
                    if not 0xDC00 <= low <= 0xDFFF:
                        raise self.fail("invalid low surrogate")
                    rune = 0x10000 + ((rune & 0x3FF) << 10) + (low & 0x3FF)
                elif 0xDC00 <= rune <= 0xDFFF:
                    raise self.fail("unpaired low surrogate")
                out.append(chr(rune))
            elif e in _SIMPLE_ESCAPES:
                out.append(_SIMPLE_ESCAPES[e])
            else:
                raise self.fail(f"invalid escape {e!r}")


def parse_json_object(raw: bytes) -> dict[str, Any] | None:
    """A JSON object as protobuf's JsonStringToMessage accepts it into a Struct, or None.
    The bytes must be valid UTF-8: protobuf validates string fields strictly."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    try:
        value = _fast(text)
    except RecursionError:
        return None  # far deeper than the 100 levels protobuf allows
    except ValueError:
        try:
            value = _LegacyJson(text).document()
        except (_JsonError, RecursionError):
            return None
    return value if isinstance(value, dict) else None


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


@dataclass(frozen=True, slots=True)
class Jwt:
    """A syntactically valid token. Claims the library types (iss, sub, iat, nbf, exp, jti, aud)
    are already checked; everything else is in `payload` as decoded JSON."""

    token: str
    alg: str
    kid: str
    header: dict[str, Any]
    payload: dict[str, Any]
    header_b64: str
    payload_b64: str
    signature: bytes
    iss: str
    sub: str
    iat: int
    nbf: int
    exp: int
    audiences: tuple[str, ...]

    @property
    def signed_data(self) -> bytes:
        return f"{self.header_b64}.{self.payload_b64}".encode("ascii")

    def time_status(self, now: int, clock_skew: int) -> Status:
        """exp/nbf with clock skew. A token without exp never expires (istio#37294)."""
        if now + clock_skew < self.nbf:
            return Status.JWT_NOT_YET_VALID
        if self.exp and now > self.exp + clock_skew:
            return Status.JWT_EXPIRED
        return Status.OK


def _uint64(payload: dict[str, Any], name: str, not_int: Status, out_of_range: Status) -> int | Status:
    if name not in payload:
        return 0
    v = payload[name]
    if not _is_number(v):
        return not_int
    try:
        f = float(v)
    except OverflowError:
        return out_of_range
    if f < 0 or f >= UINT64_LIMIT:
        return out_of_range
    return int(f)


def _optional_str(obj: dict[str, Any], name: str) -> str | None:
    """'' when absent, the value when a string, None when present with another type."""
    if name not in obj:
        return ""
    v = obj[name]
    return v if isinstance(v, str) else None


def parse(token: str) -> Jwt | Status:
    """The token, or the Status jwt_verify_lib reports for it, checked in the library's order."""
    parts = [p for p in token.split(".") if p]
    if len(parts) != 3:
        return Status.JWT_BAD_FORMAT
    header_b64, payload_b64, sig_b64 = parts

    raw = b64url_decode(header_b64)
    if raw is None:
        return Status.JWT_HEADER_BAD_BASE64
    header = parse_json_object(raw)
    if header is None:
        return Status.JWT_HEADER_BAD_JSON
    alg = header.get("alg")
    if not isinstance(alg, str):
        return Status.JWT_HEADER_BAD_ALG
    if alg not in IMPLEMENTED_ALGS:  # `none` among others: never accepted
        return Status.JWT_HEADER_NOT_IMPLEMENTED_ALG
    kid = _optional_str(header, "kid")
    if kid is None:
        return Status.JWT_HEADER_BAD_KID

    raw = b64url_decode(payload_b64)
    if raw is None:
        return Status.JWT_PAYLOAD_BAD_BASE64
    payload = parse_json_object(raw)
    if payload is None:
        return Status.JWT_PAYLOAD_BAD_JSON
    iss = _optional_str(payload, "iss")
    if iss is None:
        return Status.JWT_ISS_NOT_STRING
    sub = _optional_str(payload, "sub")
    if sub is None:
        return Status.JWT_SUB_NOT_STRING
    iat = _uint64(payload, "iat", Status.JWT_IAT_NOT_INTEGER, Status.JWT_IAT_OUT_OF_RANGE)
    if isinstance(iat, Status):
        return iat
    nbf = _uint64(payload, "nbf", Status.JWT_NBF_NOT_INTEGER, Status.JWT_NBF_OUT_OF_RANGE)
    if isinstance(nbf, Status):
        return nbf
    exp = _uint64(payload, "exp", Status.JWT_EXP_NOT_INTEGER, Status.JWT_EXP_OUT_OF_RANGE)
    if isinstance(exp, Status):
        return exp
    if _optional_str(payload, "jti") is None:
        return Status.JWT_JTI_NOT_STRING
    aud = payload.get("aud", [])
    if isinstance(aud, str):
        audiences: tuple[str, ...] = (aud,)
    elif isinstance(aud, list) and all(isinstance(a, str) for a in aud):
        audiences = tuple(aud)
    else:
        return Status.JWT_AUD_NOT_STRING

    signature = b64url_decode(sig_b64)
    if signature is None:
        return Status.JWT_SIGNATURE_BAD_BASE64
    return Jwt(
        token=token,
        alg=alg,
        kid=kid,
        header=header,
        payload=payload,
        header_b64=header_b64,
        payload_b64=payload_b64,
        signature=signature,
        iss=iss,
        sub=sub,
        iat=iat,
        nbf=nbf,
        exp=exp,
        audiences=audiences,
    )


def _sanitize_audience(aud: str) -> str:
    """jwt_verify_lib compares audiences without an http(s):// scheme and one trailing slash."""
    if not aud:
        return aud
    out = aud
    if out.startswith("http://"):
        out = out[7:]
    elif out.startswith("https://"):
        out = out[8:]
    if aud.endswith("/"):
        out = out[:-1]
    return out


class AudienceCheck:
    """A token passes if any of its audiences is configured; no configured audience = no check."""

    __slots__ = ("_allowed",)

    def __init__(self, audiences: tuple[str, ...]) -> None:
        self._allowed = frozenset(_sanitize_audience(a) for a in audiences)

    def allows(self, token_audiences: tuple[str, ...]) -> bool:
        if not self._allowed:
            return True
        return any(_sanitize_audience(a) in self._allowed for a in token_audiences)
