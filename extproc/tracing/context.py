"""Trace context on the wire: read W3C `traceparent`/`tracestate` and B3 (multi and single) headers,
decide sampling, and write the context the upstream must see.

This runs for every request a sidecar handles, so it is plain string work: fixed-length slicing,
precompiled fixed-width patterns (no backtracking, nothing compiled per request) and
`int(x, 16)`; `Propagator.begin` builds no frozen dataclass but its result (each costs about a
microsecond). There is no grpc, asyncio, Envoy proto or OpenTelemetry import here; the span
export lives elsewhere and only needs the ids this module chose.

Everything that comes from a request is untrusted: any malformed, oversized, non-ASCII or
non-string value is ignored (as if absent) and never raises. The size caps are applied before
any parsing so a hostile header costs one `len()`.

Specifications followed:

* W3C Trace Context Level 2, https://www.w3.org/TR/trace-context-2/ (traceparent with the
  random-trace-id flag, tracestate with the Level 2 key grammar);
* B3 propagation, https://github.com/openzipkin/b3-propagation (multi and single header).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from random import getrandbits
from typing import NamedTuple


class Format(StrEnum):
    """A trace header format. The value is the name used in configuration."""

    W3C = "w3c"  # traceparent + tracestate
    B3 = "b3"  # x-b3-traceid, x-b3-spanid, x-b3-parentspanid, x-b3-sampled, x-b3-flags
    B3_SINGLE = "b3-single"  # b3


ALL_FORMATS: tuple[Format, ...] = (Format.W3C, Format.B3, Format.B3_SINGLE)
# What Envoy's tracers (and so Istio's sidecars) send by default: traceparent and multi-header B3.
DEFAULT_FORMATS: tuple[Format, ...] = (Format.W3C, Format.B3)

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
B3_TRACE_ID = "x-b3-traceid"
B3_SPAN_ID = "x-b3-spanid"
B3_PARENT_SPAN_ID = "x-b3-parentspanid"
B3_SAMPLED = "x-b3-sampled"
B3_FLAGS = "x-b3-flags"
B3_SINGLE = "b3"
REQUEST_ID = "x-request-id"

# Every header each format owns: what must not reach the upstream with a stale value.
FORMAT_HEADERS: Mapping[Format, tuple[str, ...]] = {
    Format.W3C: (TRACEPARENT, TRACESTATE),
    Format.B3: (B3_TRACE_ID, B3_SPAN_ID, B3_PARENT_SPAN_ID, B3_SAMPLED, B3_FLAGS),
    Format.B3_SINGLE: (B3_SINGLE,),
}

# Size caps, checked before parsing. A traceparent of a future version may be longer than 55
# characters, so it gets the same 512 OpenTelemetry allows; the longest valid b3 single header is
# 32+1+16+1+1+1+16 = 68 characters, anything longer cannot be valid; 8192 is OpenTelemetry's
# tracestate limit (the spec's 32 members of up to 256+1+256 characters would allow more, but
# no real tracer sends that).
MAX_TRACEPARENT = 512
MAX_B3_SINGLE = 68
MAX_TRACESTATE = 8192
MAX_TRACESTATE_MEMBERS = 32

_LOW64 = (1 << 64) - 1
_TRACEPARENT_V00_LEN = 55

# The four fixed-width fields of a traceparent, lower-case hex only (the spec forbids upper case).
# `match` anchors at the start; the length rules are checked before, with plain `len()`.
_TRACEPARENT_RE = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")

# B3 ids. The B3 spec says lower-hex, but OpenTelemetry's B3 propagator (the reference for this
# codec, `opentelemetry.propagators.b3`) accepts upper and mixed case ids; a sender that
# upper-cases its ids still means the same trace, so we accept them too (and always write lower
# case). Unlike OpenTelemetry's `\d`, which matches any Unicode digit, only ASCII hex counts.
_B3_TRACE_ID_RE = re.compile(r"[0-9a-fA-F]{16}(?:[0-9a-fA-F]{16})?")
_B3_SPAN_ID_RE = re.compile(r"[0-9a-fA-F]{16}")
# `{trace}-{span}[-{sampling}[-{parent}]]`; the sampling-only form is handled before this.
_B3_SINGLE_RE = re.compile(
    r"([0-9a-fA-F]{16}(?:[0-9a-fA-F]{16})?)-([0-9a-fA-F]{16})(?:-([01d])(?:-([0-9a-fA-F]{16}))?)?"
)

# tracestate list members, straight from the Level 2 ABNF:
#   key = ( lcalpha / DIGIT ) 0*255( keychar )
#   keychar = lcalpha / DIGIT / "_" / "-" / "*" / "/" / "@"
#   value = 0*255(chr) nblk-chr ; chr = %x20 / nblk-chr ; nblk-chr = %x21-2B / %x2D-3C / %x3E-7E
# Level 2 dropped Level 1's two key forms (a simple key starting with a letter; a multi-tenant
# `tenant@system` key with a tenant of at most 241 and a system of at most 14 characters): "@" is
# now an ordinary key character after the first, any number of times, and the only length limit
# is 256 characters for the whole key. So `1abc`, `foo@`, `foo@@bar`, `t@` + 15 characters and
# 242 characters + `@v` are all valid keys; `@foo` is not (the first character).
_TS_KEY_RE = re.compile(r"[a-z0-9][a-z0-9_\-*/@]{0,255}")
_TS_VALUE_RE = re.compile(r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")
_OWS = " \t"

# trace-flags bits (W3C Level 2). Every other bit is reserved, and the spec says to write it as 0.
FLAG_SAMPLED = 0x01
FLAG_RANDOM_TRACE_ID = 0x02
# The trace-flags field we write, by (sampled | random << 1): only the two known bits, ever.
_W3C_FLAGS = ("00", "01", "02", "03")

# x-b3-sampled: "1"/"0" per the spec, "true"/"false" from old Zipkin clients; anything else defers.
_B3_SAMPLED_VALUES: dict[str, bool] = {"1": True, "true": True, "0": False, "false": False}


@dataclass(frozen=True, slots=True)
class TraceContext:
    """The trace context a request carried in, from one header format.

    `source` comes fourth (not last) only because dataclass fields without a default must precede
    those with one; construct by keyword.
    """

    trace_id: int  # 128-bit (or < 2**64 from 64-bit B3), non-zero
    span_id: int  # 64-bit, non-zero: the sender's span, the parent of ours
    sampled: bool | None  # None: the sender deferred the decision (B3 only)
    source: Format
    debug: bool = False  # B3 `x-b3-flags: 1` / b3 single `d`; implies sampled
    parent_span_id: int = 0  # the sender's parent; only B3 carries it
    tracestate: str = ""  # W3C only: the valid incoming list, normalised
    # W3C only: the sender's random-trace-id flag (at least the right-most 7 bytes of the trace id
    # are random). B3 has no such flag, so a B3 context never claims it.
    random_trace_id: bool = False


@dataclass(frozen=True, slots=True)
class Extracted:
    """Everything `extract` learnt from a request's headers.

    `sampled`/`debug` are the decision that applies: the context's own when there is one,
    else a sampling-only B3 header (`b3: 0`, `x-b3-sampled: 0` without ids). `present` lists the
    formats whose headers were in the request, valid or not, so that all of them are rewritten.
    """

    context: TraceContext | None
    sampled: bool | None
    debug: bool
    present: frozenset[Format]


class Outgoing(NamedTuple):
    """The context sent on to the upstream, and the facts the span of this hop needs.

    A NamedTuple, not a frozen dataclass: one is made per request, and a tuple is built in a
    third of the time."""

    trace_id: int
    span_id: int  # new: our span (server span inbound, client span outbound)
    parent_span_id: int  # the incoming span id; 0 when we started the trace
    sampled: bool
    debug: bool
    tracestate: str
    request_id: str  # the request's x-request-id, or the new one we set
    headers: tuple[tuple[str, str], ...]  # set on the request, replacing any value it had
    new_trace: bool
    remove: tuple[str, ...] = ()  # trace headers the request had that we do not write: delete them
    # The W3C random-trace-id flag written with `trace_id`: the incoming one on a continued W3C
    # trace, set on a trace we start (see `Propagator`), unset on a continued B3 trace.
    random_trace_id: bool = False


# `present` for every combination of (W3C, B3 multi, B3 single) bits, built once.
_PRESENT: tuple[frozenset[Format], ...] = tuple(
    frozenset(f for bit, f in ((1, Format.W3C), (2, Format.B3), (4, Format.B3_SINGLE)) if mask & bit)
    for mask in range(8)
)
_NOTHING = Extracted(None, None, False, _PRESENT[0])

# Enum members as module globals: class attribute access of an enum member costs ~100 ns.
_W3C = Format.W3C
_B3 = Format.B3
_SINGLE = Format.B3_SINGLE

# A parse result before it becomes public: a plain tuple in `TraceContext`'s field order
# (trace_id, span_id, sampled, source, debug, parent_span_id, tracestate, random_trace_id),
# because building a frozen dataclass costs about a microsecond and `Propagator.begin` needs
# none. A trace_id of 0 means a sampling decision without ids.
_Parsed = tuple[int, int, bool | None, Format, bool, int, str, bool]

# The b3 single sampling field (and the sampling-only header): sampled, debug.
_B3_SINGLE_SAMPLING: dict[str, tuple[bool, bool]] = {"0": (False, False), "1": (True, False), "d": (True, True)}
_B3_SINGLE_DECISIONS: dict[str, _Parsed] = {
    k: (0, 0, sampled, _SINGLE, debug, 0, "", False) for k, (sampled, debug) in _B3_SINGLE_SAMPLING.items()
}


def extract(headers: Mapping[str, str]) -> Extracted:
    """Read the incoming trace context: a valid traceparent wins, then a valid `b3`, then valid
    multi-header B3; without any, the first sampling-only decision (`b3` before `x-b3-sampled`).

    `headers` has lower-case names; a repeated header arrives joined with ",". A format whose
    headers are malformed counts as absent (but is still listed in `present`).
    """
    parsed, mask = _extract(headers)
    if parsed is None:
        return Extracted(None, None, False, _PRESENT[mask]) if mask else _NOTHING
    if parsed[0]:
        ctx = TraceContext(*parsed)
        return Extracted(ctx, ctx.sampled, ctx.debug, _PRESENT[mask])
    return Extracted(None, parsed[2], parsed[4], _PRESENT[mask])


def _extract(headers: Mapping[str, str]) -> tuple[_Parsed | None, int]:
    """`extract` without the public objects: (the winning parse or decision, present-format bits)."""
    get = headers.get
    traceparent = get(TRACEPARENT)
    single = get(B3_SINGLE)
    b3_trace = get(B3_TRACE_ID)
    b3_span = get(B3_SPAN_ID)
    b3_sampled = get(B3_SAMPLED)
    b3_flags = get(B3_FLAGS)
    b3_multi = (
        b3_trace is not None
        or b3_span is not None
        or b3_sampled is not None
        or b3_flags is not None
        or B3_PARENT_SPAN_ID in headers
    )
    mask = (traceparent is not None) | (b3_multi << 1) | ((single is not None) << 2)
    if not mask:
        return None, 0

    if traceparent is not None:
        parsed = _parse_traceparent(traceparent, get(TRACESTATE))
        if parsed is not None:
            return parsed, mask

    decision: _Parsed | None = None
    if single is not None:
        parsed = _parse_b3_single(single)
        if parsed is not None:
            if parsed[0]:
                return parsed, mask
            decision = parsed

    if b3_multi:
        parsed = _parse_b3_multi(b3_trace, b3_span, get(B3_PARENT_SPAN_ID), b3_sampled, b3_flags)
        if parsed is not None and (parsed[0] or decision is None):
            return parsed, mask

    return decision, mask


def _parse_traceparent(value: object, tracestate: object) -> _Parsed | None:
    """`version-traceid-parentid-flags`; None when invalid (and then tracestate is not looked at)."""
    if not isinstance(value, str):
        return None
    n = len(value)
    if n < _TRACEPARENT_V00_LEN or n > MAX_TRACEPARENT or _TRACEPARENT_RE.match(value) is None:
        return None
    version = value[:2]
    if version == "00":
        # Version 00 is exactly 55 characters: anything after (a second joined header, trailing
        # data) makes it invalid.
        if n != _TRACEPARENT_V00_LEN:
            return None
    elif version == "ff":
        return None
    elif n > _TRACEPARENT_V00_LEN and (value[_TRACEPARENT_V00_LEN] != "-" or "," in value):
        # A future version may append fields after a "-"; a "," means two headers were joined,
        # and more than one traceparent is invalid.
        return None
    trace_id = int(value[3:35], 16)
    span_id = int(value[36:52], 16)
    if not trace_id or not span_id:
        return None
    # Only the flags this version knows are read (for a higher version too, as the spec says);
    # the reserved bits are dropped here and so are written as 0.
    flags = int(value[53:55], 16)
    return (
        trace_id,
        span_id,
        bool(flags & FLAG_SAMPLED),
        _W3C,
        False,
        0,
        parse_tracestate(tracestate) if tracestate else "",
        bool(flags & FLAG_RANDOM_TRACE_ID),
    )


def parse_tracestate(value: object) -> str:
    """The tracestate list normalised (non-empty members joined by ","), or "" when invalid.

    What Level 2 allows and what we chose (its processing model, "A traceparent is Received",
    step 3, and "Mutating the tracestate Field"):

    * a duplicate key does not make the list invalid: a vendor "MAY discard duplicate keys that
      were not generated by them", and the list must still be propagated. We keep the leftmost
      member of a key, because the left-most position is the most recent one (a vendor that
      updates its member moves it to the left), and drop the later ones;
    * a list that cannot be parsed "MAY" be discarded whole, and invalid members "MAY" be
      discarded one by one: either is allowed. We discard the whole list, as the W3C test suite
      at its strict level (test/test.py, `test_tracestate_key_illegal_vendor_format`,
      `_value_illegal_characters`, `_key_length_limit`, `_member_count_limit`) requires: a member
      that is not `key=value` per the ABNF, more than 32 members (duplicates included: the list
      as received is over the limit) or more than `MAX_TRACESTATE` characters.

    Optional whitespace around "," and empty members (as two joined headers may produce) are
    allowed and dropped.
    """
    if not isinstance(value, str) or len(value) > MAX_TRACESTATE:
        return ""
    members: list[str] = []
    keys: set[str] = set()
    n = 0
    for raw in value.split(","):
        member = raw.strip(_OWS)
        if not member:
            continue
        key, eq, val = member.partition("=")
        n += 1
        if (
            not eq
            or n > MAX_TRACESTATE_MEMBERS
            or _TS_KEY_RE.fullmatch(key) is None
            or _TS_VALUE_RE.fullmatch(val) is None
        ):
            return ""
        if key not in keys:
            keys.add(key)
            members.append(member)
    return ",".join(members)


def _parse_b3_single(value: object) -> _Parsed | None:
    """`b3: {trace}-{span}[-{sampling}[-{parent}]]`, or the sampling-only `b3: 0|1|d`."""
    if not isinstance(value, str):
        return None
    n = len(value)
    if n == 1:
        return _B3_SINGLE_DECISIONS.get(value)
    if n > MAX_B3_SINGLE:
        return None
    m = _B3_SINGLE_RE.fullmatch(value)
    if m is None:
        return None
    trace_hex, span_hex, sampling, parent_hex = m.groups()
    trace_id = int(trace_hex, 16)
    span_id = int(span_hex, 16)
    if not trace_id or not span_id:
        return None
    sampled, debug = _B3_SINGLE_SAMPLING[sampling] if sampling is not None else (None, False)
    # An all-zero parent is syntactically valid and means "no parent", as 0 does everywhere.
    parent_span_id = int(parent_hex, 16) if parent_hex is not None else 0
    return (trace_id, span_id, sampled, _SINGLE, debug, parent_span_id, "", False)


def _parse_b3_multi(
    trace: object, span: object, parent: object, sampled_value: object, flags: object
) -> _Parsed | None:
    """The x-b3-* headers: a context, a decision without ids, or None.

    A sampling decision alone (no trace or span id header at all) is B3's way to say "do not
    trace this" (or "trace it"); when ids are sent but malformed, the whole set is ignored.
    """
    debug = flags == "1"
    sampled: bool | None = None
    if debug:
        sampled = True
    elif isinstance(sampled_value, str):
        sampled = _B3_SAMPLED_VALUES.get(sampled_value)
    if not trace and not span:
        return (0, 0, sampled, _B3, debug, 0, "", False) if sampled is not None else None
    if (
        not isinstance(trace, str)
        or not isinstance(span, str)
        or _B3_TRACE_ID_RE.fullmatch(trace) is None
        or _B3_SPAN_ID_RE.fullmatch(span) is None
    ):
        return None
    trace_id = int(trace, 16)
    span_id = int(span, 16)
    if not trace_id or not span_id:
        return None
    parent_span_id = 0
    if isinstance(parent, str) and _B3_SPAN_ID_RE.fullmatch(parent) is not None:
        parent_span_id = int(parent, 16)  # a malformed parent is dropped, the context stays
    return (trace_id, span_id, sampled, _B3, debug, parent_span_id, "", False)


class Sampler:
    """Istio's `tracing.sampling` percentage (meshConfig; 0..100, default 1.0), applied to new
    traces and to incoming ones that deferred the decision.

    The decision is a pure function of the trace id, the same as OpenTelemetry's
    `TraceIdRatioBased(percent / 100)`: sample when the low 64 bits of the trace id are below
    `round(rate * 2**64)`. So every hop of a trace that uses this ratio agrees, and the low 64
    bits also work for 64-bit B3 trace ids. The bound is computed once.
    """

    __slots__ = ("_bound", "percent")

    def __init__(self, percent: float) -> None:
        if not 0.0 <= percent <= 100.0:  # also rejects NaN
            raise ValueError(f"sampling percent must be within 0..100, got {percent!r}")
        self.percent = percent
        # The same float expression as OpenTelemetry, so the bound is bit-for-bit equal.
        self._bound: int = round((percent / 100) * (_LOW64 + 1))

    @property
    def bound(self) -> int:
        return self._bound

    def should_sample(self, trace_id: int) -> bool:
        return (trace_id & _LOW64) < self._bound

    def __repr__(self) -> str:
        return f"Sampler({self.percent!r})"


DEFAULT_SAMPLER = Sampler(1.0)


def format_headers(out: Outgoing, formats: Iterable[Format]) -> tuple[tuple[str, str], ...]:
    """The headers carrying `out`'s context (trace id, our span id as the parent of the next hop,
    the sampling decision) in each of `formats`."""
    fs = frozenset(formats)
    return tuple(
        _render(
            out.trace_id,
            out.span_id,
            out.parent_span_id,
            out.sampled,
            out.debug,
            out.tracestate,
            out.random_trace_id,
            _W3C in fs,
            _B3 in fs,
            _SINGLE in fs,
        )
    )


def _render(
    trace_id: int,
    span_id: int,
    parent_span_id: int,
    sampled: bool,
    debug: bool,
    tracestate: str,
    random_trace_id: bool,
    w3c: bool,
    b3: bool,
    single: bool,
) -> list[tuple[str, str]]:
    """Write the context in the chosen formats. B3 keeps a 64-bit trace id 16 hex wide, as the
    sender wrote it; W3C always has 32. Debug means sampled in W3C (it has no debug flag); B3 has
    no random-trace-id flag, so only traceparent carries it."""
    out: list[tuple[str, str]] = []
    span_hex = f"{span_id:016x}"
    trace_hex = f"{trace_id:032x}"
    if w3c:
        flags = _W3C_FLAGS[(sampled or debug) | random_trace_id << 1] if True else ""
        out.append((TRACEPARENT, f"00-{trace_hex}-{span_hex}-{flags}"))
        if tracestate:
            out.append((TRACESTATE, tracestate))
    if b3 or single:
        if trace_id <= _LOW64:
            trace_hex = trace_hex[16:]
        parent_hex = f"{parent_span_id:016x}" if parent_span_id else ""
        if b3:
            out.append((B3_TRACE_ID, trace_hex))
            out.append((B3_SPAN_ID, span_hex))
            if parent_hex:
                out.append((B3_PARENT_SPAN_ID, parent_hex))
            if debug:
                # The spec: "Debug implies an accept decision, so don't also send the X-B3-Sampled header".
                out.append((B3_FLAGS, "1"))
            else:
                out.append((B3_SAMPLED, "1" if sampled else "0"))
        if single:
            sampling = "d" if debug else "1" if sampled else "0"
            value = f"{trace_hex}-{span_hex}-{sampling}"
            out.append((B3_SINGLE, f"{value}-{parent_hex}" if parent_hex else value))
    return out


class Propagator:
    """Continue or start the trace of each request and produce the headers to send on.

    Ids come from `random.getrandbits`, not `secrets`: trace and span ids are identifiers, not
    secrets (every hop sends them in clear), and the Mersenne Twister is several times cheaper
    than the OS random source. The `random` module reseeds itself in a forked child.

    The random-trace-id flag (W3C Level 2): when it is set on a trace we start, the spec requires
    at least the right-most 7 bytes of the trace id to be random or pseudo-random with a uniform
    distribution over [0, 2**56 - 1], and says the flag SHOULD be set whenever they are.
    `getrandbits(n)` draws n uniform pseudo-random bits (the Mersenne Twister is a uniform PRNG),
    and the 56 low bits are among them with either width (`trace_id_bits` 64 or 128). The only
    draw we reject is an all-zero trace id (invalid on the wire), which moves the low 56 bits'
    distribution by at most 2**-64: still uniform for every practical purpose. So every trace
    we start carries the flag. On a continued W3C trace the flag is copied from the incoming
    traceparent, set or unset, as Level 2 requires of every outgoing traceparent with the same
    trace id; a continued B3 trace (B3 has no such flag) gets it unset, since we cannot vouch
    for how the sender drew its id.
    """

    __slots__ = ("_b3", "_formats", "_single", "_trace_id_bits", "_w3c", "sampler")

    def __init__(
        self,
        formats: Iterable[Format] = DEFAULT_FORMATS,
        sampler: Sampler = DEFAULT_SAMPLER,
        trace_id_bits: int = 128,
    ) -> None:
        if trace_id_bits not in (64, 128):
            raise ValueError(f"trace_id_bits must be 64 or 128, got {trace_id_bits!r}")
        self._formats = frozenset(Format(f) for f in formats)
        self._w3c = _W3C in self._formats
        self._b3 = _B3 in self._formats
        self._single = _SINGLE in self._formats
        self._trace_id_bits = trace_id_bits
        self.sampler = sampler

    @property
    def formats(self) -> frozenset[Format]:
        return self._formats

    def begin(self, headers: Mapping[str, str]) -> Outgoing:
        """The context for this hop: the incoming trace continued with a new span of ours (its
        parent the sender's span), or a new trace when the request carried none.

        Sampling: the incoming decision (debug forces it on), else the sampler on the trace id.
        The headers carry the context in every enabled format, and also in every format the
        request used even when it is not enabled, so that no trace header the application might
        read still names the sender's span. Headers of a written format that we do not set
        (a stale parent, flags, tracestate) are listed in `remove`.
        """
        parsed, mask = _extract(headers)
        if parsed is not None and parsed[0]:
            trace_id, parent, incoming_sampled, _, debug, _, tracestate, random_trace_id = parsed
            new_trace = False
        else:
            trace_id = getrandbits(self._trace_id_bits)
            while not trace_id:
                trace_id = getrandbits(self._trace_id_bits)
            parent = 0
            tracestate = ""
            new_trace = True
            random_trace_id = True  # getrandbits: see the class docstring
            incoming_sampled, debug = (parsed[2], parsed[4]) if parsed is not None else (None, False)
        span_id = getrandbits(64)
        while not span_id or span_id == parent:
            span_id = getrandbits(64)

        if debug:
            sampled = True
        elif incoming_sampled is not None:
            sampled = incoming_sampled
        else:
            sampled = self.sampler.should_sample(trace_id)

        w3c = self._w3c or bool(mask & 1)
        b3 = self._b3 or bool(mask & 2)
        single = self._single or bool(mask & 4)
        out = _render(trace_id, span_id, parent, sampled, debug, tracestate, random_trace_id, w3c, b3, single)

        remove: list[str] = []
        if w3c and not tracestate and TRACESTATE in headers:
            remove.append(TRACESTATE)
        if b3:
            if not parent and B3_PARENT_SPAN_ID in headers:
                remove.append(B3_PARENT_SPAN_ID)
            if debug:
                if B3_SAMPLED in headers:
                    remove.append(B3_SAMPLED)
            elif B3_FLAGS in headers:
                remove.append(B3_FLAGS)

        request_id = headers.get(REQUEST_ID)
        if not request_id or not isinstance(request_id, str):
            request_id = str(uuid.uuid4())
            out.append((REQUEST_ID, request_id))

        return Outgoing(
            trace_id,
            span_id,
            parent,
            sampled,
            debug,
            tracestate,
            request_id,
            tuple(out),
            new_trace,
            tuple(remove),
            random_trace_id,
        )
