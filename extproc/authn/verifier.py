"""Walks an AuthnProgram's requirement tree over one request, as Envoy's jwt_authn does.

Envoy's behaviour is reproduced step by step because users compare against it:
  * each provider verifier first removes the headers it may write (payload and claim
    headers), then extracts tokens from its own locations, then checks them last-found
    first, stopping at the first failure (all tokens in a provider's locations must be valid);
  * per token: parse, issuer allowed at that location, exp/nbf with 60 s skew, audiences,
    then the signature; so an expired or wrong-audience token fails before its signature
    is looked at, with Envoy's status;
  * on success the payload header and claim headers are added and, unless
    forwardOriginalToken, a header token is removed (query and cookie tokens stay: Envoy
    never strips them);
  * `requires_any` returns OK at the first child that passes, otherwise the most telling
    failure (a real error beats "issuer not configured", which beats "missing"), and
    `allow_missing` turns a final "missing" into OK;
  * `requires_all` stops at the first failure.
Header changes are made on a copy that later steps read, so a stripped token is really
gone for the next provider, exactly as in Envoy's filter chain.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from extproc.attributes import NO_LINES, HeaderLines
from extproc.authn.cache import TokenCache
from extproc.authn.keys import KeySet
from extproc.authn.program import (
    AuthnProgram,
    Extractor,
    IssuerSet,
    Provider,
    RemoteSource,
    RequireAll,
    Requirement,
    RequireProvider,
)
from extproc.authn.status import Status
from extproc.authn.token import Jwt, parse

CLOCK_SKEW_S = 60
FOREVER = 1 << 62  # a time no token reaches
MAX_URI_LENGTH = 256
_JWT_START = re.compile(r"[A-Za-z0-9_.-]")

# keys(provider) -> the provider's current keys, or None when a remote source has none yet.
KeyLookup = Callable[[Provider], KeySet | None]


class HeaderState:
    """Request headers as the filter chain sees them, with changes recorded for the response."""

    __slots__ = ("_changed", "_lines", "_orig")

    def __init__(self, original: Mapping[str, str], lines: HeaderLines = NO_LINES) -> None:
        self._orig = original
        self._lines = lines
        self._changed: dict[str, list[str]] = {}

    def entries(self, name: str) -> tuple[str, ...] | None:
        """The lines of a header as Envoy holds them (one, unless the transport kept several
        apart), or None when it is absent."""
        if name not in self._changed:
            got = self._lines.get(name)
            if got is not None:
                return got
        value = self.get(name)
        return None if value is None else (value,)

    def cookie(self) -> str | None:
        """The cookie header as Envoy's cookie parser reads it: every cookie line on its own
        (jwt_authn finds `session=` on a second HTTP/1 line, and the first occurrence wins
        across lines). Joining the lines with ";" splits them apart again; joined with ","
        (as the map form has them) the second line would be part of a value."""
        entries = self._lines.get("cookie")
        if entries is not None and "cookie" not in self._changed:
            return ";".join(entries)
        return self.get("cookie")

    def get(self, name: str) -> str | None:
        if name in self._changed:
            vals = self._changed[name]
            return ",".join(vals) if vals else None
        return self._orig.get(name)

    def remove(self, name: str) -> None:
        if self.get(name) is not None or name in self._changed:
            self._changed[name] = []

    def add(self, name: str, value: str) -> None:
        cur = self._changed.get(name)
        if cur is None:
            orig = self._orig.get(name)
            cur = [orig] if orig is not None else []
        self._changed[name] = [*cur, value]

    def changes(self) -> tuple[tuple[str, ...], tuple[tuple[str, tuple[str, ...]], ...]]:
        """(headers to remove, (header, values) to set), only where the result differs."""
        removes: list[str] = []
        sets: list[tuple[str, tuple[str, ...]]] = []
        for name, vals in self._changed.items():
            orig = self._orig.get(name)
            if not vals:
                if orig is not None:
                    removes.append(name)
            elif [orig] != vals:
                sets.append((name, tuple(vals)))
        return tuple(removes), tuple(sets)


@dataclass(frozen=True, slots=True)
class Found:
    token: str
    issuers: IssuerSet
    header: str  # "" for a query parameter or cookie
    where: str  # for explanations: "header authorization", "query access_token", "cookie x"
    param: str = ""  # the query parameter it came from; Envoy strips it like a header


@dataclass
class _Context:
    headers: HeaderState
    path: str
    now: int
    keys: KeyLookup
    cache: TokenCache | None
    payload: dict[str, Any] | None = None
    verified: list[tuple[Provider, Jwt]] = field(default_factory=list)
    failures: list[tuple[str, str, Status]] = field(default_factory=list)  # (provider, where, status)
    missing_keys: set[RemoteSource] = field(default_factory=set)
    unknown_kid: set[RemoteSource] = field(default_factory=set)
    removed_params: list[str] = field(default_factory=list)  # decoded names, in removal order
    # The seconds around `now` in which every time check made gives the same answer.
    valid_from: int = 0
    valid_until: int = FOREVER

    def time_checked(self, jwt: Jwt) -> None:
        """Narrow the window to where this token's exp/nbf check keeps its current outcome."""
        now = self.now
        starts = jwt.nbf - CLOCK_SKEW_S  # valid from here (`now + skew >= nbf`)
        ends = jwt.exp + CLOCK_SKEW_S if jwt.exp else FOREVER  # expired after here
        if now < starts:
            lo, hi = 0, starts - 1
        elif now > ends:
            lo, hi = ends + 1, FOREVER
        else:
            lo, hi = starts, ends
        self.valid_from = max(self.valid_from, lo)
        self.valid_until = min(self.valid_until, hi)

    def remove_param(self, name: str) -> None:
        """jwt_authn's JwtParamLocation::removeJwt: the path is rebuilt without it."""
        if name not in self.removed_params:
            self.removed_params.append(name)
        self.path = path_without_param(self.path, name)


@dataclass(frozen=True, slots=True)
class AuthnResult:
    status: Status
    payload: Mapping[str, Any] | None = None  # the normalised payload the authz engine reads
    remove_headers: tuple[str, ...] = ()
    set_headers: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Query parameters to drop, as spelled in the request (ext_authz query_parameters_to_remove).
    remove_query_params: tuple[str, ...] = ()
    verified: tuple[tuple[str, str], ...] = ()  # (provider origin, iss/sub)
    failures: tuple[tuple[str, str, Status], ...] = ()
    cors_preflight: bool = False
    missing_keys: frozenset[RemoteSource] = frozenset()
    unknown_kid: frozenset[RemoteSource] = frozenset()
    # Unix seconds between which the same request gets the same result: the exp/nbf checks
    # of the tokens it carried do not change their outcome (what a decision cache may rely on).
    valid_from: int = 0
    valid_until: int = FOREVER

    @property
    def ok(self) -> bool:
        return self.status is Status.OK

    @property
    def http_code(self) -> int:
        return self.status.http_code

    @property
    def refresh_wanted(self) -> frozenset[RemoteSource]:
        """Sources whose keys a refetch might fix: never fetched, or an unknown `kid`."""
        return self.missing_keys | self.unknown_kid


SKIPPED = AuthnResult(Status.OK)


def is_cors_preflight(method: str, headers: Mapping[str, str]) -> bool:
    return method == "OPTIONS" and bool(headers.get("origin")) and bool(headers.get("access-control-request-method"))


def www_authenticate(status: Status, headers: Mapping[str, str], scheme: str) -> str:
    """Envoy's challenge: realm is the original URI (path cut to 256 chars)."""
    path = headers.get("x-envoy-original-path") or headers.get(":path", "")
    proto = headers.get("x-forwarded-proto") or scheme
    uri = f"{proto}://{headers.get(':authority', '')}{path[:MAX_URI_LENGTH]}" if path else ""
    value = f'Bearer realm="{uri}"'
    if status is not Status.JWT_MISSED:
        value += ', error="invalid_token"'
    return value


def authenticate(
    program: AuthnProgram,
    method: str,
    headers: Mapping[str, str],
    now: int,
    keys: KeyLookup,
    cache: TokenCache | None = None,
    lines: HeaderLines = NO_LINES,
) -> AuthnResult:
    """`lines`: the entries of repeated header names, when the transport kept them apart."""
    if program.root is None:
        return SKIPPED
    hs = HeaderState(headers, lines)
    # Envoy 1.40 first removes every provider's payload and claim headers, whatever the
    # requirement and even for a CORS preflight, so no output header can be forged.
    if program.all_extractor is not None:
        for name in program.all_extractor.sanitize:
            hs.remove(name)
    if is_cors_preflight(method, headers):
        removes, _ = hs.changes()
        return AuthnResult(Status.OK, remove_headers=removes, cors_preflight=True)
    path = headers.get(":path", "")
    ctx = _Context(hs, path, now, keys, cache)
    status = _run(program.root, ctx)
    ok = status is Status.OK
    removes, sets = ctx.headers.changes() if ok else ((), ())
    return AuthnResult(
        status=status,
        payload=ctx.payload if ok else None,
        remove_headers=removes,
        set_headers=sets,
        remove_query_params=raw_param_names(path, ctx.removed_params) if ok and ctx.removed_params else (),
        verified=tuple((p.origin, f"{j.iss}/{j.sub}") for p, j in ctx.verified),
        failures=tuple(ctx.failures),
        missing_keys=frozenset(ctx.missing_keys),
        unknown_kid=frozenset(ctx.unknown_kid),
        valid_from=ctx.valid_from,
        valid_until=ctx.valid_until,
    )


def _run(node: Requirement, ctx: _Context) -> Status:
    if isinstance(node, RequireProvider):
        return _provider(node.provider, ctx)
    if isinstance(node, RequireAll):
        for child in node.children:
            s = _run(child, ctx)
            if s is not Status.OK:
                return s
        return Status.OK
    statuses: list[Status] = []
    for child in node.children:
        s = _run(child, ctx)
        if s is Status.OK:
            return s
        statuses.append(s)
    final = Status.JWT_MISSED
    for s in statuses:
        if s not in (Status.JWT_MISSED, Status.JWT_UNKNOWN_ISSUER) or final is Status.JWT_MISSED:
            final = s
    if node.allow_missing_or_failed or (node.allow_missing and final is Status.JWT_MISSED):
        return Status.OK
    return final


def _provider(p: Provider, ctx: _Context) -> Status:
    hs = ctx.headers
    for name in p.extractor.sanitize:
        hs.remove(name)
    tokens = extract(p.extractor, hs, ctx.path)
    if not tokens:
        return Status.JWT_MISSED
    for found in reversed(tokens):
        s = _verify(p, found, ctx)
        if s is not Status.OK:
            ctx.failures.append((p.origin, found.where, s))
            return s
    return Status.OK


def _verify(p: Provider, found: Found, ctx: _Context) -> Status:
    if ctx.cache is not None:
        parsed, entry = ctx.cache.parse(found.token, ctx.now)
    else:
        parsed, entry = parse(found.token), None
    if isinstance(parsed, Status):
        return parsed
    jwt = parsed
    if not found.issuers.allows(jwt.iss):
        return Status.JWT_UNKNOWN_ISSUER
    s = jwt.time_status(ctx.now, CLOCK_SKEW_S)
    ctx.time_checked(jwt)
    if s is not Status.OK:
        return s
    if not p.audiences.allows(jwt.audiences):
        return Status.JWT_AUDIENCE_NOT_ALLOWED
    keyset = ctx.keys(p)
    if keyset is None:
        if p.remote is not None:
            ctx.missing_keys.add(p.remote)
        return Status.JWT_VERIFICATION_FAIL  # Istio's fail-closed stand-in key verifies nothing
    verdict = ctx.cache.verdict(entry, keyset.version) if entry is not None and ctx.cache is not None else None
    if verdict is None:
        verdict = keyset.verify(jwt)
        if entry is not None:
            TokenCache.record(entry, keyset.version, verdict)
    if verdict is not Status.OK:
        if verdict is Status.JWKS_KID_ALG_MISMATCH and jwt.kid and p.remote is not None:
            ctx.unknown_kid.add(p.remote)
        return verdict
    # Keyed by what shapes the outputs, not by the provider's name: the cache outlives
    # reloads, after which `origins-0` can be another rule writing other headers.
    outputs = entry.outputs.get(p.outputs_key) if entry is not None else None
    if outputs is None:
        outputs = _outputs(p, jwt)
        if entry is not None:
            entry.outputs[p.outputs_key] = outputs
    hs = ctx.headers
    for header, value in outputs[0]:
        hs.add(header, value)
    if not p.forward:
        if found.header:
            hs.remove(found.header)
        elif found.param:
            ctx.remove_param(found.param)
    ctx.payload = outputs[1]
    ctx.verified.append((p, jwt))
    return Status.OK


def _outputs(p: Provider, jwt: Jwt) -> tuple[tuple[tuple[str, str], ...], dict[str, Any]]:
    """What a verified token adds for one provider: headers, in Envoy's order, and the
    normalised payload. Pure, so the cache keeps it with the token."""
    added: list[tuple[str, str]] = []
    if p.payload_header:
        added.append((p.payload_header, jwt.payload_b64))
    for header, claim in p.claim_headers:
        value = claim_header_value(jwt.payload, claim)
        if value:
            added.append((header, value))
    return tuple(added), normalize_payload(jwt.payload, p.space_delimited)


# --- token locations -----------------------------------------------------------------


def _jwt_after(value: str, start: int) -> str:
    """Envoy 1.40's extractJWT: skip to the first base64url-or-dot character after the
    prefix and take the rest of the value (trailing text stays part of the token; the
    base64 decoder skips whitespace in it); with no such character, the whole value."""
    m = _JWT_START.search(value, start)
    return value[m.start() :] if m else value


def _percent_decode(s: str) -> str:
    if "%" not in s:
        return s
    out = bytearray()
    raw = s.encode()
    i = 0
    while i < len(raw):
        c = raw[i]
        if c == 0x25 and i + 2 < len(raw) and _is_hex(raw[i + 1]) and _is_hex(raw[i + 2]):
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(c)
            i += 1
    return out.decode("utf-8", errors="replace")


def _is_hex(c: int) -> bool:
    return 0x30 <= c <= 0x39 or 0x41 <= c <= 0x46 or 0x61 <= c <= 0x66


def query_params(path: str) -> dict[str, str]:
    """Envoy's parseAndDecodeQueryString: first occurrence wins, %XX decoded, '+' kept."""
    q = path.find("?")
    if q == -1:
        return {}
    params: dict[str, str] = {}
    data, start = path, q + 1
    while start < len(data):
        end = data.find("&", start)
        if end == -1:
            end = len(data)
        part = data[start:end]
        eq = part.find("=")
        if eq == -1:
            params.setdefault(_percent_decode(part), "")
        else:
            params.setdefault(_percent_decode(part[:eq]), _percent_decode(part[eq + 1 :]))
        start = end + 1
    return params


def _query_parts(path: str) -> list[tuple[str, str]]:
    """The raw (key, value) pairs of the query string, in order; a part without `=` has an empty value."""
    q = path.find("?")
    if q == -1:
        return []
    out = []
    data, start = path, q + 1
    while start < len(data):
        end = data.find("&", start)
        if end == -1:
            end = len(data)
        key, _, value = data[start:end].partition("=")
        out.append((key, value))
        start = end + 1
    return out


def path_without_param(path: str, name: str) -> str:
    """Envoy's QueryParamsMulti::parseAndDecodeQueryString + remove + replaceQueryString:
    what is left is percent-decoded and ordered by key (a btree map), values in order."""
    grouped: dict[str, list[str]] = {}
    for key, value in _query_parts(path):
        k = _percent_decode(key)
        if k != name:
            grouped.setdefault(k, []).append(_percent_decode(value))
    base = path.split("?", 1)[0]
    query = "&".join(f"{k}={v}" for k in sorted(grouped, key=lambda k: k.encode()) for v in grouped[k])
    return f"{base}?{query}" if query else base


def raw_param_names(path: str, names: list[str]) -> tuple[str, ...]:
    """The spellings in `path` of the (decoded) parameter names, for ext_authz to remove."""
    wanted = set(names)
    out: list[str] = []
    for key, _ in _query_parts(path):
        if key not in out and _percent_decode(key) in wanted:
            out.append(key)
    return tuple(out)


def cookies(value: str | None, wanted: frozenset[str] | set[str]) -> dict[str, str]:
    """Envoy's parseCookies: `k=v` pairs split on ';', first occurrence wins, quotes removed."""
    out: dict[str, str] = {}
    if not value:
        return out
    for part in value.split(";"):
        part = part.lstrip(" ")
        eq = part.find("=")
        if eq == -1:
            continue
        k, v = part[:eq], part[eq + 1 :]
        if k not in wanted or k in out:
            continue
        if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
            v = v[1:-1]
        out[k] = v
    return out


def extract(ex: Extractor, hs: HeaderState, path: str) -> list[Found]:
    found: list[Found] = []
    for loc in ex.headers:
        entries = hs.entries(loc.header)
        if entries is None:
            continue
        for value in entries:  # jwt_authn takes a token from each line of the header
            if loc.prefix:
                pos = value.find(loc.prefix)
                if pos == -1:
                    continue  # the prefix is nowhere in the value: no token at this location
                value = _jwt_after(value, pos + len(loc.prefix))
            found.append(Found(value, loc.issuers, loc.header, f"header {loc.header}"))
    if ex.params and path:
        params = query_params(path)
        for name, issuers in ex.params:
            if name in params:
                found.append(Found(params[name], issuers, "", f"query parameter {name}", name))
    if ex.cookies:
        jar = cookies(hs.cookie(), {n for n, _ in ex.cookies})
        for name, issuers in ex.cookies:
            if name in jar:
                found.append(Found(jar[name], issuers, "", f"cookie {name}"))
    return found


# --- outputs ---------------------------------------------------------------------------


def _lookup(payload: Mapping[str, Any], dotted: str) -> Any:
    """jwt_verify_lib StructUtils::GetValue: nested names separated by dots."""
    cur: Any = payload
    parts = dotted.split(".")
    for i, name in enumerate(parts):
        if not isinstance(cur, dict) or name not in cur:
            return None
        cur = cur[name]
        if i < len(parts) - 1 and not isinstance(cur, dict):
            return None
    return cur


def _number_text(v: float) -> str:
    """Envoy's convertClaimDoubleToString: integers as integers, otherwise std::to_string."""
    f = float(v)
    if f < 0 or f >= 2.0**64 or not math.isfinite(f) or f != math.floor(f):
        return f"{f:f}"
    return str(int(f))


# protobuf's JSON writer (json/internal/writer.cc MustEscape): the JSON escapes, plus
# characters escaped as \uXXXX for JavaScript safety; `/` is not escaped.
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", '"': '\\"', "\f": "\\f", "\b": "\\b", "\\": "\\\\"}
_PROTO_ESCAPED = re.compile(
    '[\x00-\x1f"\\\\<>\x7f-\x9f\u00ad\u0600-\u0603\u06dd\u070f\u17b4\u17b5\u200b-\u200f\u2028-\u202e'
    "\u2060-\u2064\u206a-\u206f\ufeff\ufff9-\ufffb\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f]"
)


def _escape_char(m: re.Match[str]) -> str:
    ch = m.group()
    short = _SHORT_ESCAPES.get(ch)
    if short is not None:
        return short
    cp = ord(ch)
    if cp < 0x10000:
        return f"\\u{cp:04x}"
    cp -= 0x10000
    return f"\\u{0xD800 + (cp >> 10):04x}\\u{0xDC00 + (cp & 0x3FF):04x}"


def _proto_string(s: str) -> str:
    return '"' + _PROTO_ESCAPED.sub(_escape_char, s) + '"'


def _proto_number(v: float) -> str:
    """protobuf's SimpleDtoa: the %.15g form if it reads back exactly, else %.17g."""
    text = f"{v:.15g}"
    return text if float(text) == v else f"{v:.17g}"


def _proto_json(value: Any) -> str:
    """Compact JSON as protobuf's MessageToJsonString prints a Struct or ListValue (numbers
    are doubles). Object members come out in payload order; Envoy's order is its map's."""
    if isinstance(value, str):
        return _proto_string(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return _proto_number(float(value))
    if isinstance(value, dict):
        return "{" + ",".join(f"{_proto_string(k)}:{_proto_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_proto_json(v) for v in value) + "]"
    return "null"


def claim_header_value(payload: Mapping[str, Any], claim: str) -> str:
    v = _lookup(payload, claim)
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return _number_text(v)
    if isinstance(v, dict | list):
        return base64.b64encode(_proto_json(v).encode()).decode()
    return ""


def normalize_payload(payload: dict[str, Any], space_delimited: tuple[str, ...]) -> dict[str, Any]:
    """The payload as Envoy stores it in metadata: listed top-level string claims split on spaces."""
    out: dict[str, Any] | None = None
    for claim in space_delimited:
        v = payload.get(claim)
        if isinstance(v, str):
            parts = [x for x in v.split(" ") if x]
            if parts:
                if out is None:
                    out = dict(payload)
                out[claim] = parts
    return out if out is not None else payload
