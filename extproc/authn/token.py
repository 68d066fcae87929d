"""Parsing a compact JWS the way Envoy's jwt_verify_lib does, so every malformed token gets
the same verdict and the same message as under Envoy's jwt_authn filter.

Parsing is separate from signature checking: a parsed token is cached (see `cache.py`) and
its time and audience checks are redone on every use.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from extproc.authn.status import Status

IMPLEMENTED_ALGS = frozenset(
    {"ES256", "ES384", "ES512", "HS256", "HS384", "HS512", "RS256", "RS384", "RS512"}
    | {"PS256", "PS384", "PS512", "EdDSA"}
)
UINT64_LIMIT = float(2**64)
_B64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")


def b64url_decode(s: str) -> bytes | None:
    """Strict base64url: only the URL-safe alphabet, optional correct padding. None if invalid."""
    if not _B64URL.fullmatch(s):
        return None
    body = s.rstrip("=")
    pad = len(s) - len(body)
    if len(body) % 4 == 1 or (pad and (len(body) + pad) % 4 != 0):
        return None
    try:
        return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        return None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def parse_json_object(raw: bytes) -> dict[str, Any] | None:
    """A JSON object, or None. NaN/Infinity are not JSON; the top level must be an object."""
    try:
        value = _DECODER.decode(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
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
