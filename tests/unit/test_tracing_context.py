"""The trace-context engine: W3C traceparent/tracestate and B3 (multi, single) parsing and
writing, precedence between formats, sampling, and the headers `Propagator.begin` sends on.

OpenTelemetry's own propagators and `TraceIdRatioBased` sampler are the reference: the
differential tests feed both the same valid and near-valid headers and require the same
trace id, span id and sampling, except where we differ on purpose; each such difference is
asserted (not skipped) and explained where it is asserted. For tracestate, whose rules
OpenTelemetry (1.45) still takes from Trace Context Level 1, the reference is
`reference_tracestate`, the Level 2 rules written out plainly; OpenTelemetry must still agree
wherever Level 1 and Level 2 do.
"""

from __future__ import annotations

import re
import timeit
import uuid
from dataclasses import FrozenInstanceError

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.propagators.b3 import B3MultiFormat, B3SingleFormat
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.span import TraceState

from extproc.tracing import context as context_module
from extproc.tracing.context import (
    ALL_FORMATS,
    DEFAULT_FORMATS,
    FORMAT_HEADERS,
    Extracted,
    Format,
    Outgoing,
    Propagator,
    Sampler,
    TraceContext,
    extract,
    format_headers,
    parse_tracestate,
)

MAX128 = 2**128 - 1
MAX64 = 2**64 - 1
TRACE_HEADERS = tuple(h for f in ALL_FORMATS for h in FORMAT_HEADERS[f])

# The W3C specification's own examples.
TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TP_TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
TP_SPAN = 0x00F067AA0BA902B7
# The B3 README's examples.
B3_TRACE = "80f198ee56343ba864fe8b2a57d3eff7"
B3_SPAN = "e457b5a2e4d86bd1"
B3_PARENT = "05e3ac9a4f6e3b90"

W3C_OTEL = TraceContextTextMapPropagator()
B3_MULTI_OTEL = B3MultiFormat()
B3_SINGLE_OTEL = B3SingleFormat()

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def otel_context(propagator: object, headers: dict[str, str]) -> trace.SpanContext | None:
    """The span context an OpenTelemetry propagator extracts, or None when it finds no valid one."""
    sc = trace.get_current_span(propagator.extract(headers)).get_span_context()  # type: ignore[attr-defined]
    return sc if sc.is_valid else None


def outgoing(
    trace_id: int,
    span_id: int,
    parent: int = 0,
    sampled: bool = True,
    debug: bool = False,
    tracestate: str = "",
    random_trace_id: bool = False,
) -> Outgoing:
    return Outgoing(
        trace_id=trace_id,
        span_id=span_id,
        parent_span_id=parent,
        sampled=sampled,
        debug=debug,
        tracestate=tracestate,
        request_id="r",
        headers=(),
        new_trace=False,
        random_trace_id=random_trace_id,
    )


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------

HEX = "0123456789abcdef"


def hexs(n: int) -> st.SearchStrategy[str]:
    return st.text(HEX, min_size=n, max_size=n)


def hex_ids(n: int) -> st.SearchStrategy[str]:
    """n hex digits, not all zero (hypothesis likes zeros, which are never a valid id)."""
    return st.integers(1, 16**n - 1).map(lambda i: f"{i:0{n}x}")


trace_ids = st.integers(1, MAX128)
# B3 senders may use 64-bit trace ids: draw both widths often.
trace_ids_any_width = st.one_of(st.integers(1, MAX64), st.integers(MAX64 + 1, MAX128))
span_ids = st.integers(1, MAX64)
parents = st.one_of(st.just(0), span_ids)

# tracestate, straight from the spec's ABNF (shorter than the maxima to keep examples small).
LCALPHA = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"
L1_KEY_CHARS = LCALPHA + DIGITS + "_-*/"
# Level 2: key = ( lcalpha / DIGIT ) 0*255( keychar ); keychar adds "@" to Level 1's characters.
KEY_FIRST = LCALPHA + DIGITS
KEY_CHARS = L1_KEY_CHARS + "@"
NBLK_CHARS = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in ",=")
VALUE_CHARS = " " + NBLK_CHARS
# Level 1's two key forms, which OpenTelemetry 1.45 still implements: every one is a Level 2 key.
ts_simple_keys = st.builds(str.__add__, st.sampled_from(LCALPHA), st.text(L1_KEY_CHARS, max_size=15))
ts_tenant_keys = st.builds(
    lambda t, rest, s, srest: f"{t}{rest}@{s}{srest}",
    st.sampled_from(LCALPHA + DIGITS),
    st.text(L1_KEY_CHARS, max_size=10),
    st.sampled_from(LCALPHA),
    st.text(L1_KEY_CHARS, max_size=13),
)
ts_l1_keys = st.one_of(ts_simple_keys, ts_tenant_keys)
# Level 2 keys, "@" made likely (anywhere after the first character, any number of times).
ts_l2_keys = st.builds(
    str.__add__, st.sampled_from(KEY_FIRST), st.text(st.sampled_from(KEY_CHARS + "@@@"), max_size=15)
)
ts_keys = st.one_of(ts_l1_keys, ts_l2_keys)
ts_values = st.builds(str.__add__, st.text(VALUE_CHARS, max_size=15), st.sampled_from(NBLK_CHARS))
ts_lists = st.dictionaries(ts_keys, ts_values, max_size=32).map(lambda d: [f"{k}={v}" for k, v in d.items()])
ts_l1_lists = st.dictionaries(ts_l1_keys, ts_values, max_size=32).map(lambda d: [f"{k}={v}" for k, v in d.items()])
# Separators with the optional whitespace and empty members the spec allows.
ts_separators = st.sampled_from([",", ", ", " ,", ",\t", "\t, ", ",,", ", ,", " , \t,"])
bad_ts_members = st.sampled_from(
    [
        "A=1",  # upper-case key
        "_a=1",  # a key starts with a letter or a digit
        "a=",  # empty value
        "a",  # no "="
        "=1",  # empty key
        "a=b=c",  # "=" in value
        "a b=1",  # space in key
        "a.b=1",  # "." is no key character
        "a=\x7f",  # DEL in value
        "a=\u00e9",  # non-ASCII value
        "@b=1",  # "@" may not come first
        "a@B=1",  # upper case after "@" too
        "k" * 257 + "=1",  # key longer than 256
        "t" * 242 + "@" + "v" * 14 + "=1",  # 257 with an "@"
        "a=" + "v" * 257,  # value longer than 256
        "a=\tb",  # tab inside a value
        "a=b\x00",  # NUL
    ]
)
# Level 1 rejected these; Level 2 accepts them (OpenTelemetry 1.45 still rejects them).
L2_ONLY_MEMBERS = st.sampled_from(
    [
        "1a=1",  # a key may start with a digit
        "a@=1",  # "@" last
        "a@b@c=1",  # several "@"
        "a@@b=1",
        "a@1b=1",  # a digit after "@"
        "a@" + "b" * 15 + "=1",  # Level 1's system id was at most 14
        "t" * 242 + "@b=1",  # Level 1's tenant id was at most 241
    ]
)


@st.composite
def near_valid_tracestate(draw: st.DrawFn) -> str:
    """A valid list (duplicate keys happen), often with one broken member, with any OWS/empties."""
    members = draw(st.lists(st.builds(lambda k, v: f"{k}={v}", ts_keys, ts_values), max_size=34))
    if members and draw(st.integers(0, 3)) == 0:  # a duplicate key, with the same or another value
        key = draw(st.sampled_from(members)).partition("=")[0]
        members.insert(draw(st.integers(0, len(members))), f"{key}={draw(ts_values)}")
    if draw(st.booleans()):
        members.insert(draw(st.integers(0, len(members))), draw(st.one_of(bad_ts_members, L2_ONLY_MEMBERS)))
    edge = draw(st.sampled_from(["", "", " ", "\t", ","]))
    seps = draw(st.lists(ts_separators, min_size=len(members), max_size=len(members)))
    return edge + "".join(m + sep for m, sep in zip(members, seps, strict=True)).rstrip(" \t,") + edge


# Near-valid headers: a valid header with at most one field broken the way a sender might break
# it, so that both the accepting and the rejecting paths are exercised often.


@st.composite
def near_valid_traceparents(draw: st.DrawFn) -> str:
    version = draw(st.sampled_from(["00", "00", "00", "01", "cc", "fe"]))
    fields = {
        "prefix": "",
        "version": version,
        "trace": draw(hex_ids(32)),
        "span": draw(hex_ids(16)),
        "flags": draw(hexs(2)),
        "suffix": "" if version == "00" else draw(st.sampled_from(["", "-", "-what-the-future-will-be-like"])),
    }
    broken = {
        "prefix": st.sampled_from([" ", "\t", "-"]),
        "version": st.sampled_from(["ff", "0A", "g0", "0", "000"]),
        "trace": st.one_of(st.just("0" * 32), hexs(32).map(str.upper), hexs(31), hexs(33)),
        "span": st.one_of(st.just("0" * 16), hexs(16).map(str.upper), hexs(15), hexs(17)),
        "flags": st.sampled_from(["0", "001", "0x", "FF", "0-", "\u0661\u0662"]),
        "suffix": st.sampled_from(["-", "-abc", "-a,b", "x", "xyz", " ", "\t", ",", "," + TP, "\t-x"]),
    }
    which = draw(st.sampled_from([*broken, None, None, None]))
    if which is not None:
        fields[which] = draw(broken[which])
    f = fields
    return f"{f['prefix']}{f['version']}-{f['trace']}-{f['span']}-{f['flags']}{f['suffix']}"


# B3 ids: lower, upper and mixed case, 64-bit trace ids; broken: zeros, wrong lengths, non-hex,
# joined repeats, and non-ASCII digits (which Python's `\d` and `int(x, 16)` would accept).
ARABIC_INDIC_16 = "\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669\u0660\u0661\u0662\u0663\u0664\u0665\u0666"
b3_trace_ids = st.one_of(
    hex_ids(32), hex_ids(16), hex_ids(32).map(str.upper), hex_ids(16).map(lambda s: s[:8] + s[8:].upper())
)
b3_span_ids = st.one_of(hex_ids(16), hex_ids(16).map(str.upper))
bad_b3_trace_ids = st.one_of(
    st.sampled_from(["0" * 32, "0" * 16, "abc", "", "x" * 16, ARABIC_INDIC_16, B3_TRACE + ",", "0x" + "1" * 14]),
    hexs(24),
    hexs(15),
)
bad_b3_span_ids = st.one_of(
    st.sampled_from(["0" * 16, "abc", "", "z" * 16, ARABIC_INDIC_16, B3_SPAN + "," + B3_SPAN, " " + B3_SPAN[1:]]),
    hexs(32),
)


@st.composite
def near_valid_b3_multi(draw: st.DrawFn) -> dict[str, str]:
    headers = {"x-b3-traceid": draw(b3_trace_ids), "x-b3-spanid": draw(b3_span_ids)}
    if draw(st.booleans()):
        headers["x-b3-parentspanid"] = draw(b3_span_ids)
    if draw(st.booleans()):
        headers["x-b3-sampled"] = draw(st.sampled_from(["1", "0", "true", "false"]))
    if draw(st.integers(0, 3)) == 0:
        headers["x-b3-flags"] = draw(st.sampled_from(["1", "0"]))
    which = draw(st.sampled_from(["trace", "span", "parent", "sampled", "flags", "no-trace", "no-ids", None, None]))
    if which == "trace":
        headers["x-b3-traceid"] = draw(bad_b3_trace_ids)
    elif which == "span":
        headers["x-b3-spanid"] = draw(bad_b3_span_ids)
    elif which == "parent":
        headers["x-b3-parentspanid"] = draw(bad_b3_span_ids)
    elif which == "sampled":
        headers["x-b3-sampled"] = draw(st.sampled_from(["True", "False", "d", "", "2", " 1", "1,1"]))
    elif which == "flags":
        headers["x-b3-flags"] = draw(st.sampled_from(["", "2", "1,1", "true"]))
    elif which == "no-trace":
        del headers["x-b3-traceid"]
    elif which == "no-ids":  # what is left is a sampling decision (or nothing)
        del headers["x-b3-traceid"], headers["x-b3-spanid"]
        headers.pop("x-b3-parentspanid", None)
    return headers


@st.composite
def near_valid_b3_single(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 5)) == 0:
        return draw(st.sampled_from(["0", "1", "d", "D", "2", "", "-", "true"]))
    parts = [draw(b3_trace_ids), draw(b3_span_ids)]
    more = draw(st.integers(0, 2))
    if more >= 1:
        parts.append(draw(st.sampled_from(["0", "1", "d"])))
    if more >= 2:
        parts.append(draw(b3_span_ids))
    which = draw(st.sampled_from(["trace", "span", "sampling", "parent", "extra", None, None, None]))
    if which == "trace":
        parts[0] = draw(bad_b3_trace_ids)
    elif which == "span":
        parts[1] = draw(bad_b3_span_ids)
    elif which == "sampling":
        parts[2:3] = [draw(st.sampled_from(["D", "2", "true", "", "01"]))]
    elif which == "parent":
        parts[2:] = [parts[2] if len(parts) > 2 else "1", draw(st.sampled_from(["", "0" * 16, "xyz", "1", "Z" * 16]))]
    elif which == "extra":
        parts.extend(["1", B3_PARENT, draw(st.sampled_from(["", "x", "1"]))][len(parts) - 2 :])
    return "-".join(parts)


junk_text = st.one_of(
    st.text(max_size=80),
    st.binary(max_size=80).map(lambda b: b.decode("latin-1")),
    st.text(alphabet="0123456789abcdefABCDEF-,=@ \t", max_size=120),
    st.sampled_from(["", ",", "-", "0", "1", "d", " ", "\x00", "00-", "ff"]),
)
junk_headers = st.dictionaries(st.sampled_from((*TRACE_HEADERS, "x-request-id")), junk_text)


# ---------------------------------------------------------------------------------------------
# Round trips: whatever we write, we read back the same
# ---------------------------------------------------------------------------------------------


@given(trace_ids, span_ids, parents, st.booleans(), st.booleans(), ts_lists)
def test_w3c_round_trip_keeps_ids_sampling_and_tracestate(
    trace_id: int, span_id: int, parent: int, sampled: bool, debug: bool, members: list[str]
) -> None:
    tracestate = ",".join(members)
    headers = dict(format_headers(outgoing(trace_id, span_id, parent, sampled, debug, tracestate), [Format.W3C]))
    assert set(headers) == ({"traceparent", "tracestate"} if tracestate else {"traceparent"})
    ctx = extract(headers).context
    assert ctx is not None
    assert (ctx.trace_id, ctx.span_id, ctx.source) == (trace_id, span_id, Format.W3C)
    assert ctx.sampled is (sampled or debug)  # W3C has no debug flag: debug travels as sampled
    assert ctx.tracestate == tracestate
    assert ctx.parent_span_id == 0  # W3C does not carry the grandparent


@given(trace_ids_any_width, span_ids, parents, st.booleans(), st.booleans())
def test_b3_multi_round_trip_keeps_ids_parent_sampling_and_debug(
    trace_id: int, span_id: int, parent: int, sampled: bool, debug: bool
) -> None:
    headers = dict(format_headers(outgoing(trace_id, span_id, parent, sampled, debug), [Format.B3]))
    assert len(headers["x-b3-traceid"]) == (16 if trace_id <= MAX64 else 32)
    assert ("x-b3-parentspanid" in headers) is (parent != 0)
    ex = extract(headers)
    ctx = ex.context
    assert ctx is not None
    assert (ctx.trace_id, ctx.span_id, ctx.parent_span_id, ctx.source) == (trace_id, span_id, parent, Format.B3)
    assert (ctx.sampled, ctx.debug) == (sampled or debug, debug)
    assert (ex.sampled, ex.debug) == (ctx.sampled, ctx.debug)


@given(trace_ids_any_width, span_ids, parents, st.booleans(), st.booleans())
def test_b3_single_round_trip_keeps_ids_parent_sampling_and_debug(
    trace_id: int, span_id: int, parent: int, sampled: bool, debug: bool
) -> None:
    headers = dict(format_headers(outgoing(trace_id, span_id, parent, sampled, debug), [Format.B3_SINGLE]))
    assert list(headers) == ["b3"]
    ctx = extract(headers).context
    assert ctx is not None
    assert (ctx.trace_id, ctx.span_id, ctx.parent_span_id, ctx.source) == (trace_id, span_id, parent, Format.B3_SINGLE)
    assert (ctx.sampled, ctx.debug) == (sampled or debug, debug)


@given(
    st.lists(st.sets(st.sampled_from(ALL_FORMATS), min_size=1), min_size=1, max_size=5),
    st.booleans(),
    st.integers(0, 1),
)
def test_a_chain_of_hops_keeps_one_trace_and_links_each_span_to_the_previous(
    hop_formats: list[set[Format]], with_request_id: bool, percent: int
) -> None:
    headers: dict[str, str] = {"x-request-id": "abc"} if with_request_id else {}
    first = None
    previous = None
    for formats in hop_formats:
        out = Propagator(formats, Sampler(percent * 100.0)).begin(headers)
        if previous is None:
            first = out
            assert out.new_trace and out.parent_span_id == 0
        else:
            assert not out.new_trace
            assert out.trace_id == first.trace_id
            assert out.parent_span_id == previous.span_id
            assert out.sampled is first.sampled  # the first hop decided for the whole trace
            assert out.request_id == previous.request_id
        headers = dict(headers)
        headers.update(out.headers)
        for name in out.remove:
            del headers[name]
        previous = out


# ---------------------------------------------------------------------------------------------
# Junk never raises
# ---------------------------------------------------------------------------------------------

_REF_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(-[^,]*)?")


def reference_traceparent_ok(value: str) -> bool:
    """The spec's rules for traceparent, written independently of the module under test."""
    m = _REF_TRACEPARENT.fullmatch(value)
    if m is None or len(value) > 512:
        return False
    version, trace_hex, span_hex, rest = m.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return False
    return int(trace_hex, 16) != 0 and int(span_hex, 16) != 0


@settings(max_examples=200)
@given(junk_headers)
def test_junk_in_any_trace_header_never_raises_and_gives_no_context_unless_valid(headers: dict[str, str]) -> None:
    ex = extract(headers)
    if ex.context is not None:
        source = ex.context.source
        if source is Format.W3C:
            assert reference_traceparent_ok(headers["traceparent"])
        elif source is Format.B3_SINGLE:
            assert re.fullmatch(
                r"[0-9a-fA-F]{16}([0-9a-fA-F]{16})?-[0-9a-fA-F]{16}(-[01d](-[0-9a-fA-F]{16})?)?", headers["b3"]
            )
        else:
            assert re.fullmatch(r"[0-9a-fA-F]{16}([0-9a-fA-F]{16})?", headers["x-b3-traceid"])
            assert re.fullmatch(r"[0-9a-fA-F]{16}", headers["x-b3-spanid"])
    out = Propagator(ALL_FORMATS).begin(headers)
    # What we send on is always a valid context, in every format.
    sent = dict(out.headers)
    for f in ALL_FORMATS:
        ctx = extract({k: v for k, v in sent.items() if k in FORMAT_HEADERS[f]}).context
        assert ctx is not None and (ctx.trace_id, ctx.span_id) == (out.trace_id, out.span_id)


@given(
    st.dictionaries(
        st.sampled_from((*TRACE_HEADERS, "x-request-id")),
        st.one_of(st.none(), st.binary(max_size=40), st.integers(), st.lists(st.text(max_size=5), max_size=3)),
    )
)
def test_values_that_are_not_strings_are_ignored_without_raising(headers: dict[str, object]) -> None:
    ex = extract(headers)  # type: ignore[arg-type]
    assert ex.context is None
    out = Propagator(ALL_FORMATS).begin(headers)  # type: ignore[arg-type]
    assert UUID_RE.fullmatch(out.request_id)


def test_huge_values_are_rejected_by_length_before_parsing() -> None:
    huge = {
        "traceparent": TP + "-" + "a" * 1_000_000,
        "tracestate": "a=b," * 1_000_000,
        "b3": B3_TRACE + "-" + B3_SPAN + "-1" + "0" * 1_000_000,
    }
    seconds = min(timeit.repeat(lambda: extract(huge), number=10, repeat=3)) / 10
    assert extract(huge).context is None
    assert seconds < 0.001  # a length check, not a scan of a megabyte
    # 32 valid members of 260 characters: 8351 in all, over the 8192 cap (OpenTelemetry's too).
    members = [f"k{i:02d}=" + "v" * 256 for i in range(32)]
    ctx = extract({"traceparent": TP, "tracestate": ",".join(members)}).context
    assert ctx is not None and ctx.tracestate == ""
    assert otel_context(W3C_OTEL, {"traceparent": TP, "tracestate": ",".join(members)}).trace_state.to_header() == ""
    ctx = extract({"traceparent": TP, "tracestate": ",".join(members[:31])}).context  # 8090: kept
    assert ctx is not None and ctx.tracestate == ",".join(members[:31])


# ---------------------------------------------------------------------------------------------
# Differential tests against OpenTelemetry's propagators
# ---------------------------------------------------------------------------------------------


def reference_tracestate(header: str) -> str:
    """Trace Context Level 2's tracestate rules, written out plainly (no regex) as the oracle.

    A list of at most 32 members (empty ones and the whitespace around "," do not count), each
    `key=value`: a key of 1..256 characters, the first a lower-case letter or a digit, the rest
    those or `_ - * / @`; a value of 1..256 printable ASCII characters but "," and "=", not
    ending in a space. A list that breaks any of that is discarded whole (the W3C suite's strict
    level); a duplicate key is not an error: the first (left-most) member of it is kept.
    """
    if len(header) > context_module.MAX_TRACESTATE:
        return ""
    members = [m for m in (raw.strip(" \t") for raw in header.split(",")) if m]
    if len(members) > 32:
        return ""
    kept: dict[str, str] = {}
    for m in members:
        key, eq, value = m.partition("=")
        if not (
            eq
            and 1 <= len(key) <= 256
            and key[0] in KEY_FIRST
            and all(c in KEY_CHARS for c in key)
            and 1 <= len(value) <= 256
            and all(c in VALUE_CHARS for c in value)
            and value[-1] != " "
        ):
            return ""
        kept.setdefault(key, m)
    return ",".join(kept.values())


_L1_SIMPLE = re.compile(r"[a-z][a-z0-9_\-*/]{0,255}")
_L1_TENANT = re.compile(r"[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13}")


def level_1_agrees(header: str) -> bool:
    """Whether Level 1 (OpenTelemetry's rules) must give the same result as Level 2 for this
    list: no key repeats (Level 1 discards such a list whole) and every key that has "=" after
    it is also a Level 1 key (Level 1 discards a list with a Level 2-only key)."""
    keys = [m.partition("=")[0] for m in (raw.strip(" \t") for raw in header.split(",")) if "=" in m]
    if len(keys) != len(set(keys)):
        return False
    return all(
        (_L1_TENANT if "@" in k else _L1_SIMPLE).fullmatch(k) is not None
        for k in keys
        if k and all(c in KEY_CHARS for c in k) and k[0] in KEY_FIRST and len(k) <= 256
    )


def otel_accepts_only_because_lenient_w3c(tp: str) -> bool:
    """Where OpenTelemetry accepts a traceparent we reject, on purpose:

    * whitespace around the value (its regex allows `[ \\t]*` at both ends): the HTTP layer
      (Envoy) already strips a field value's surrounding whitespace, so a value that still has
      some is not what the spec's ABNF allows;
    * a future version whose trailing part contains ",": that is two traceparent headers joined,
      and the spec makes more than one traceparent invalid.
    """
    return tp != tp.strip(" \t") or (tp[:2] != "00" and "," in tp)


@settings(max_examples=200)
@given(near_valid_traceparents(), st.one_of(st.none(), near_valid_tracestate()))
@example(TP, "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
@example(" " + TP, None)
@example("cc" + TP[2:] + "-a,b", None)
def test_w3c_agrees_with_opentelemetry(tp: str, tracestate: str | None) -> None:
    headers = {"traceparent": tp}
    if tracestate is not None:
        headers["tracestate"] = tracestate
    ours = extract(headers).context
    theirs = otel_context(W3C_OTEL, headers)
    if ours is None:
        assert theirs is None or otel_accepts_only_because_lenient_w3c(tp)
        return
    assert theirs is not None
    assert (ours.trace_id, ours.span_id, ours.sampled) == (theirs.trace_id, theirs.span_id, theirs.trace_flags.sampled)
    assert ours.random_trace_id is theirs.trace_flags.random_trace_id
    # The tracestate as the Level 2 rules say; OpenTelemetry agrees where Level 1 does.
    assert ours.tracestate == reference_tracestate(tracestate or "")
    if level_1_agrees(tracestate or ""):
        assert ours.tracestate == (theirs.trace_state.to_header() if theirs.trace_state is not None else "")


@settings(max_examples=150)
@given(near_valid_tracestate())
@example("a=1," * 32)
@example(
    "a1=1,a2=2,a3=3,a4=4,a5=5,a6=6,a7=7,a8=8,a9=9,b1=1,b2=2,b3=3,b4=4,b5=5,b6=6,b7=7,b8=8,b9=9,c1=1,c2=2,c3=3,c4=4,c5=5,c6=6,c7=7,c8=8,c9=9,d1=1,d2=2,d3=3,d4=4,d5=5,d6=6"
)
@example("foo=1,foo=1")
@example("foo=1,bar=2,foo=3")
@example("a=b ,c=d")
@example("foo@@bar=1,bar=2")
def test_tracestate_follows_the_level_2_rules_and_agrees_with_opentelemetry_where_level_1_does(header: str) -> None:
    assert parse_tracestate(header) == reference_tracestate(header)
    joined = header + "," + header[::-1]  # two headers joined with "," (how a repeated header reaches us)
    assert parse_tracestate(joined) == reference_tracestate(joined)
    if level_1_agrees(header):
        assert parse_tracestate(header) == TraceState.from_header([header]).to_header()
    if level_1_agrees(joined):
        assert parse_tracestate(joined) == TraceState.from_header([header, header[::-1]]).to_header()


def otel_b3_sampled(value: str | None) -> bool:
    return value in {"1", "True", "true", "d"}


@settings(max_examples=200)
@given(near_valid_b3_multi())
@example({"x-b3-traceid": B3_TRACE, "x-b3-spanid": B3_SPAN, "x-b3-parentspanid": B3_PARENT, "x-b3-sampled": "1"})
@example({"x-b3-traceid": ARABIC_INDIC_16, "x-b3-spanid": B3_SPAN})
@example({"x-b3-traceid": B3_TRACE, "x-b3-spanid": B3_SPAN, "x-b3-sampled": "True"})
@example({"x-b3-sampled": "0"})
def test_b3_multi_agrees_with_opentelemetry(headers: dict[str, str]) -> None:
    ex = extract(headers)
    ours = ex.context
    theirs = otel_context(B3_MULTI_OTEL, headers)
    if ours is None:
        # OTel's id pattern uses `\d`, which matches any Unicode digit (and int(x, 16) takes them):
        # we accept ASCII hex only. Otherwise, if OTel found a context, so must we.
        assert theirs is None or not (headers.get("x-b3-traceid", "") + headers.get("x-b3-spanid", "")).isascii()
        if theirs is None and "x-b3-traceid" not in headers and "x-b3-spanid" not in headers:
            # Intentional: a sampling decision without ids is kept (OTel drops it, having no span
            # context to put it in). `x-b3-sampled: 0` alone is B3's "do not trace".
            flags, sampled = headers.get("x-b3-flags"), headers.get("x-b3-sampled")
            expected = True if flags == "1" else {"1": True, "true": True, "0": False, "false": False}.get(sampled)
            assert ex.sampled is expected
        elif theirs is None:
            assert ex.sampled is None  # ids sent but malformed or incomplete: no decision from them
        return
    assert theirs is not None
    assert ours.source is Format.B3
    assert (ours.trace_id, ours.span_id) == (theirs.trace_id, theirs.span_id)
    if ours.sampled is None:
        # Intentional: OTel reads "True" and "d" in x-b3-sampled as sampled; the spec has only
        # "1"/"0" (plus the legacy "true"/"false"), so we treat other values as deferred and let our
        # sampler decide. OTel has no "deferred" and reports every other value as not sampled.
        assert theirs.trace_flags.sampled is otel_b3_sampled(headers.get("x-b3-sampled"))
    else:
        assert ours.sampled is theirs.trace_flags.sampled
    assert ours.debug is (headers.get("x-b3-flags") == "1")


def otel_accepts_only_because_lenient_b3_single(value: str) -> bool:
    """Where OpenTelemetry accepts a `b3` header we reject, on purpose: OTel does not validate the
    sampling field (any text: sampled if it is 1/true/True/d) nor the fourth field (the parent span
    id, which it ignores), and takes non-ASCII digits in ids. The B3 spec allows only 0/1/d and
    a 16-hex parent; "anything else is invalid"."""
    fields = value.split("-")
    if not value.isascii():
        return True
    if len(fields) >= 3 and fields[2] not in ("0", "1", "d"):
        return True
    return len(fields) == 4 and re.fullmatch(r"[0-9a-fA-F]{16}", fields[3]) is None


@settings(max_examples=200)
@given(near_valid_b3_single())
@example(f"{B3_TRACE}-{B3_SPAN}-1-{B3_PARENT}")
@example(f"{B3_TRACE}-{B3_SPAN}")
@example(f"{B3_TRACE}-{B3_SPAN}-true")
@example(f"{B3_TRACE}-{B3_SPAN}-1-xyz")
@example("0")
@example("d")
def test_b3_single_agrees_with_opentelemetry(value: str) -> None:
    ex = extract({"b3": value})
    ours = ex.context
    theirs = otel_context(B3_SINGLE_OTEL, {"b3": value})
    if ours is None:
        assert theirs is None or otel_accepts_only_because_lenient_b3_single(value)
        if value in ("0", "1", "d"):
            # Intentional: the sampling-only forms are a decision we keep; OTel drops them.
            assert theirs is None
            assert (ex.sampled, ex.debug) == {"0": (False, False), "1": (True, False), "d": (True, True)}[value]
        return
    assert theirs is not None
    assert (ours.trace_id, ours.span_id) == (theirs.trace_id, theirs.span_id)
    if ours.sampled is None:
        # Intentional: `{trace}-{span}` defers the decision; OTel has no deferred state and reports
        # it as sampled ("we set it as recorded"). We let our sampler decide.
        assert value.count("-") == 1 and theirs.trace_flags.sampled
    else:
        assert ours.sampled is theirs.trace_flags.sampled


def test_precedence_differs_from_opentelemetry_b3_when_the_single_header_is_invalid() -> None:
    """OTel's B3 propagators read only `b3` when it is present, even if it is invalid; we fall back
    to a valid multi-header context (every valid context in the request is better than none)."""
    headers = {"b3": "garbage", "x-b3-traceid": B3_TRACE, "x-b3-spanid": B3_SPAN, "x-b3-sampled": "1"}
    assert otel_context(B3_MULTI_OTEL, headers) is None
    ctx = extract(headers).context
    assert ctx is not None and ctx.source is Format.B3 and ctx.trace_id == int(B3_TRACE, 16)


@given(trace_ids_any_width, span_ids, parents, st.booleans(), st.booleans(), st.booleans(), ts_l1_lists)
def test_opentelemetry_reads_what_we_write_in_every_format(
    trace_id: int, span_id: int, parent: int, sampled: bool, debug: bool, random_id: bool, members: list[str]
) -> None:
    tracestate = ",".join(members)
    out = outgoing(trace_id, span_id, parent, sampled, debug, tracestate, random_id)
    for propagator, fmt in ((W3C_OTEL, Format.W3C), (B3_MULTI_OTEL, Format.B3), (B3_SINGLE_OTEL, Format.B3_SINGLE)):
        theirs = otel_context(propagator, dict(format_headers(out, [fmt])))
        assert theirs is not None
        assert (theirs.trace_id, theirs.span_id, theirs.trace_flags.sampled) == (trace_id, span_id, sampled or debug)
        if fmt is Format.W3C:
            assert theirs.trace_state.to_header() == tracestate
            assert theirs.trace_flags.random_trace_id is random_id
        else:
            assert not theirs.trace_flags.random_trace_id  # B3 has no such flag


@given(trace_ids, span_ids, st.booleans(), st.booleans())
def test_our_traceparent_is_byte_for_byte_what_opentelemetry_injects(
    trace_id: int, span_id: int, sampled: bool, random_id: bool
) -> None:
    flags = trace.TraceFlags(int(sampled) | int(random_id) << 1)
    sc = trace.SpanContext(trace_id, span_id, is_remote=False, trace_flags=flags)
    carrier: dict[str, str] = {}
    W3C_OTEL.inject(carrier, trace.set_span_in_context(trace.NonRecordingSpan(sc)))
    out = outgoing(trace_id, span_id, sampled=sampled, random_trace_id=random_id)
    assert dict(format_headers(out, [Format.W3C])) == carrier


# ---------------------------------------------------------------------------------------------
# Table tests: the specifications' examples and edge cases
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("traceparent", "expected"),
    [
        (TP, (TP_TRACE, TP_SPAN, True)),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", (TP_TRACE, TP_SPAN, False)),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09", (TP_TRACE, TP_SPAN, True)),  # unknown flag bits
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-fe", (TP_TRACE, TP_SPAN, False)),
        ("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", (TP_TRACE, TP_SPAN, True)),  # future version
        (
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-will-be-like",
            (TP_TRACE, TP_SPAN, True),
        ),
        ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None),  # version ff is invalid
        ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", None),  # upper-case hex
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01", None),
        ("0A-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0A", None),
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", None),  # all-zero trace id
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", None),  # all-zero span id
        (TP + "-extra", None),  # version 00 is exactly 55 characters
        (TP + " ", None),
        (" " + TP, None),
        ("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x", None),  # after 55: "-" or nothing
        (TP + "," + TP, None),  # two traceparent headers joined
        ("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-a," + TP, None),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7", None),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1", None),
        ("00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01", None),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-\u0661\u0662", None),
        ("", None),
    ],
)
def test_traceparent_examples(traceparent: str, expected: tuple[int, int, bool] | None) -> None:
    ctx = extract({"traceparent": traceparent}).context
    if expected is None:
        assert ctx is None
    else:
        assert ctx is not None and (ctx.trace_id, ctx.span_id, ctx.sampled) == expected
        assert ctx.source is Format.W3C and not ctx.debug


@pytest.mark.parametrize(
    ("tracestate", "expected"),
    [
        ("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE", "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
        ("congo=ucfJifl5GOE,rojo=00f067aa0ba902b7", "congo=ucfJifl5GOE,rojo=00f067aa0ba902b7"),
        ("rojo=00f067aa0ba902b7 , \tcongo=t61rcWkgMzE", "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),  # OWS
        ("rojo=1,,congo=2,", "rojo=1,congo=2"),  # empty members dropped
        ("rojo=1,congo=2,rojo=3", "rojo=1,congo=2"),  # duplicate key: the left-most is kept
        ("fw529a3039@dt=00f067aa0ba902b7", "fw529a3039@dt=00f067aa0ba902b7"),  # multi-tenant key
        ("1fw@dt=x", "1fw@dt=x"),
        ("1fw=x", "1fw=x"),  # Level 2: any key may start with a digit
        ("rojo=a b", "rojo=a b"),  # inner space in a value
        ("rojo= b", "rojo= b"),  # leading space in a value is part of it
        ("rojo=", ""),  # empty value
        ("Rojo=1", ""),
        ("rojo=1,congo", ""),  # one bad member discards all
        (",".join(f"k{i}=v" for i in range(32)), ",".join(f"k{i}=v" for i in range(32))),
        (",".join(f"k{i}=v" for i in range(33)), ""),  # more than 32 members
        ("", ""),
        (" , ,", ""),
    ],
)
def test_tracestate_examples(tracestate: str, expected: str) -> None:
    assert parse_tracestate(tracestate) == expected
    ctx = extract({"traceparent": TP, "tracestate": tracestate}).context
    assert ctx is not None and ctx.tracestate == expected  # a bad tracestate never drops the context


def test_tracestate_is_ignored_when_traceparent_is_invalid() -> None:
    ex = extract({"traceparent": "ff" + TP[2:], "tracestate": "rojo=1"})
    assert ex.context is None


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        # The B3 README's multi-header example.
        (
            {"x-b3-traceid": B3_TRACE, "x-b3-parentspanid": B3_PARENT, "x-b3-spanid": B3_SPAN, "x-b3-sampled": "1"},
            (int(B3_TRACE, 16), int(B3_SPAN, 16), int(B3_PARENT, 16), True, False),
        ),
        ({"x-b3-traceid": B3_TRACE, "x-b3-spanid": B3_SPAN}, (int(B3_TRACE, 16), int(B3_SPAN, 16), 0, None, False)),
        (
            {"x-b3-traceid": B3_TRACE, "x-b3-spanid": B3_SPAN, "x-b3-sampled": "0"},
            (int(B3_TRACE, 16), int(B3_SPAN, 16), 0, False, False),
        ),
        (
            {"x-b3-traceid": B3_TRACE, "x-b3-spanid": B3_SPAN, "x-b3-sampled": "true"},
            (int(B3_TRACE, 16), int(B3_SPAN, 16), 0, True, False),
        ),
        (
            {"x-b3-traceid": B3_TRACE, "x-b3-spanid": B3_SPAN, "x-b3-sampled": "false"},
            (int(B3_TRACE, 16), int(B3_SPAN, 16), 0, False, False),
        ),
        (
            {"x-b3-traceid": B3_TRACE, "x-b3-spanid": B3_SPAN, "x-b3-sampled": "yes"},
            (int(B3_TRACE, 16), int(B3_SPAN, 16), 0, None, False),
        ),
        # Debug: sampled even against x-b3-sampled: 0.
        (
            {"x-b3-traceid": B3_TRACE, "x-b3-spanid": B3_SPAN, "x-b3-flags": "1", "x-b3-sampled": "0"},
            (int(B3_TRACE, 16), int(B3_SPAN, 16), 0, True, True),
        ),
        # A 64-bit trace id stays a 64-bit int.
        (
            {"x-b3-traceid": B3_TRACE[16:], "x-b3-spanid": B3_SPAN},
            (int(B3_TRACE[16:], 16), int(B3_SPAN, 16), 0, None, False),
        ),
        # Upper case is accepted, as OpenTelemetry's B3 propagator does.
        (
            {"x-b3-traceid": B3_TRACE.upper(), "x-b3-spanid": B3_SPAN.upper()},
            (int(B3_TRACE, 16), int(B3_SPAN, 16), 0, None, False),
        ),
        # A malformed parent is dropped; the context stays.
        (
            {"x-b3-traceid": B3_TRACE, "x-b3-spanid": B3_SPAN, "x-b3-parentspanid": "nope"},
            (int(B3_TRACE, 16), int(B3_SPAN, 16), 0, None, False),
        ),
        ({"x-b3-traceid": "0" * 32, "x-b3-spanid": B3_SPAN}, None),
        ({"x-b3-traceid": B3_TRACE, "x-b3-spanid": "0" * 16}, None),
        ({"x-b3-traceid": B3_TRACE[:20], "x-b3-spanid": B3_SPAN}, None),
        ({"x-b3-traceid": B3_TRACE, "x-b3-spanid": B3_SPAN + "," + B3_SPAN}, None),  # repeated header
        ({"x-b3-traceid": B3_TRACE}, None),
    ],
)
def test_b3_multi_examples(headers: dict[str, str], expected: tuple[int, int, int, bool | None, bool] | None) -> None:
    ex = extract(headers)
    assert Format.B3 in ex.present
    if expected is None:
        assert ex.context is None
        assert ex.sampled is None  # ids were sent but are malformed: no decision taken from them
    else:
        ctx = ex.context
        assert ctx is not None
        assert (ctx.trace_id, ctx.span_id, ctx.parent_span_id, ctx.sampled, ctx.debug) == expected


@pytest.mark.parametrize(
    ("headers", "sampled", "debug"),
    [
        ({"x-b3-sampled": "0"}, False, False),
        ({"x-b3-sampled": "1"}, True, False),
        ({"x-b3-flags": "1"}, True, True),
        ({"x-b3-sampled": "maybe"}, None, False),
        ({"b3": "0"}, False, False),
        ({"b3": "1"}, True, False),
        ({"b3": "d"}, True, True),
        ({"b3": "D"}, None, False),
        ({"b3": "0", "x-b3-sampled": "1"}, False, False),  # b3 single's decision comes first
        ({"b3": "bad", "x-b3-sampled": "1"}, True, False),
    ],
)
def test_sampling_decisions_without_ids(headers: dict[str, str], sampled: bool | None, debug: bool) -> None:
    ex = extract(headers)
    assert ex.context is None
    assert (ex.sampled, ex.debug) == (sampled, debug)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"{B3_TRACE}-{B3_SPAN}-1-{B3_PARENT}", (int(B3_TRACE, 16), int(B3_SPAN, 16), int(B3_PARENT, 16), True, False)),
        (f"{B3_TRACE}-{B3_SPAN}-d-{B3_PARENT}", (int(B3_TRACE, 16), int(B3_SPAN, 16), int(B3_PARENT, 16), True, True)),
        (f"{B3_TRACE}-{B3_SPAN}-0", (int(B3_TRACE, 16), int(B3_SPAN, 16), 0, False, False)),
        (f"{B3_TRACE}-{B3_SPAN}", (int(B3_TRACE, 16), int(B3_SPAN, 16), 0, None, False)),
        (f"{B3_TRACE[16:]}-{B3_SPAN}-1", (int(B3_TRACE[16:], 16), int(B3_SPAN, 16), 0, True, False)),  # 64-bit trace id
        (f"{B3_TRACE.upper()}-{B3_SPAN}-1", (int(B3_TRACE, 16), int(B3_SPAN, 16), 0, True, False)),
        (f"{B3_TRACE}-{B3_SPAN}-1-{'0' * 16}", (int(B3_TRACE, 16), int(B3_SPAN, 16), 0, True, False)),
        (f"{B3_TRACE}-{B3_SPAN}-2", None),
        (f"{B3_TRACE}-{B3_SPAN}-true", None),
        (f"{B3_TRACE}-{B3_SPAN}-1-", None),
        (f"{B3_TRACE}-{B3_SPAN}-1-xyz", None),
        (f"{B3_TRACE}-{B3_SPAN}-1-{B3_PARENT}-x", None),
        (f"{B3_TRACE}-{B3_SPAN}-", None),
        (f"{B3_TRACE}", None),
        (f"{'0' * 32}-{B3_SPAN}-1", None),
        (f"{B3_TRACE}-{'0' * 16}-1", None),
        (f"{B3_TRACE},{B3_TRACE}-{B3_SPAN}", None),
        (f"{B3_TRACE}-{B3_SPAN}-1,{B3_TRACE}-{B3_SPAN}-1", None),
    ],
)
def test_b3_single_examples(value: str, expected: tuple[int, int, int, bool | None, bool] | None) -> None:
    ex = extract({"b3": value})
    assert ex.present == frozenset({Format.B3_SINGLE})
    if expected is None:
        assert ex.context is None and ex.sampled is None
    else:
        ctx = ex.context
        assert ctx is not None and ctx.source is Format.B3_SINGLE
        assert (ctx.trace_id, ctx.span_id, ctx.parent_span_id, ctx.sampled, ctx.debug) == expected


OTHER_TRACE = "11111111111111111111111111111111"
OTHER_SPAN = "2222222222222222"
VALID_SINGLE = f"{OTHER_TRACE}-{OTHER_SPAN}-0"
VALID_MULTI = {"x-b3-traceid": B3_TRACE, "x-b3-spanid": B3_SPAN, "x-b3-sampled": "1"}


@pytest.mark.parametrize(
    ("headers", "source", "trace_hex", "sampled"),
    [
        ({"traceparent": TP, "b3": VALID_SINGLE, **VALID_MULTI}, Format.W3C, TP[3:35], True),
        ({"traceparent": TP[:-2] + "00", "b3": f"{OTHER_TRACE}-{OTHER_SPAN}-d"}, Format.W3C, TP[3:35], False),
        ({"traceparent": "ff" + TP[2:], "b3": VALID_SINGLE, **VALID_MULTI}, Format.B3_SINGLE, OTHER_TRACE, False),
        ({"traceparent": "garbage", "b3": "garbage", **VALID_MULTI}, Format.B3, B3_TRACE, True),
        # A sampling-only b3 does not override the context that multi B3 carries.
        ({"b3": "0", **VALID_MULTI}, Format.B3, B3_TRACE, True),
        ({"traceparent": TP, "b3": "0"}, Format.W3C, TP[3:35], True),
    ],
)
def test_precedence_when_formats_disagree(
    headers: dict[str, str], source: Format, trace_hex: str, sampled: bool
) -> None:
    ex = extract(headers)
    assert ex.context is not None
    assert (ex.context.source, ex.context.trace_id, ex.sampled) == (source, int(trace_hex, 16), sampled)


def test_present_lists_every_format_seen_valid_or_not() -> None:
    assert extract({}).present == frozenset()
    assert extract({"traceparent": "junk"}).present == {Format.W3C}
    assert extract({"x-b3-parentspanid": B3_PARENT}).present == {Format.B3}
    assert extract({"traceparent": TP, "b3": "x", "x-b3-flags": "0"}).present == set(ALL_FORMATS)
    assert extract({"tracestate": "a=b"}).present == frozenset()  # tracestate alone carries no ids


def test_extracted_and_contexts_are_frozen() -> None:
    ex = extract({"traceparent": TP})
    assert isinstance(ex, Extracted) and isinstance(ex.context, TraceContext)
    with pytest.raises(FrozenInstanceError):
        ex.context.trace_id = 1  # type: ignore[misc]
    with pytest.raises(AttributeError):  # a NamedTuple: immutable too
        Propagator().begin({}).sampled = True  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# Writing headers
# ---------------------------------------------------------------------------------------------


def test_format_headers_writes_each_format_as_specified() -> None:
    out = outgoing(int(B3_TRACE, 16), 0xA, parent=0xB, sampled=True, tracestate="rojo=1")
    assert format_headers(out, ALL_FORMATS) == (
        ("traceparent", f"00-{B3_TRACE}-000000000000000a-01"),
        ("tracestate", "rojo=1"),
        ("x-b3-traceid", B3_TRACE),
        ("x-b3-spanid", "000000000000000a"),
        ("x-b3-parentspanid", "000000000000000b"),
        ("x-b3-sampled", "1"),
        ("b3", f"{B3_TRACE}-000000000000000a-1-000000000000000b"),
    )
    root64 = outgoing(0xC, 0xA, sampled=False)
    assert format_headers(root64, ALL_FORMATS) == (
        ("traceparent", "00-0000000000000000000000000000000c-000000000000000a-00"),
        ("x-b3-traceid", "000000000000000c"),
        ("x-b3-spanid", "000000000000000a"),
        ("x-b3-sampled", "0"),
        ("b3", "000000000000000c-000000000000000a-0"),
    )


def test_debug_is_written_as_b3_flags_without_sampled_and_as_d_in_b3_single() -> None:
    headers = dict(format_headers(outgoing(int(B3_TRACE, 16), 0xA, sampled=True, debug=True), ALL_FORMATS))
    assert headers["x-b3-flags"] == "1"
    assert "x-b3-sampled" not in headers  # B3: debug implies accept, so no x-b3-sampled
    assert headers["b3"].endswith("-d")
    assert headers["traceparent"].endswith("-01")


# ---------------------------------------------------------------------------------------------
# Propagator.begin
# ---------------------------------------------------------------------------------------------


def test_begin_continues_an_incoming_trace_with_a_new_span_whose_parent_is_the_sender() -> None:
    out = Propagator().begin({"traceparent": TP, "tracestate": "rojo=1", "x-request-id": "rid"})
    assert (out.trace_id, out.parent_span_id, out.new_trace) == (TP_TRACE, TP_SPAN, False)
    assert out.span_id not in (0, TP_SPAN)
    assert out.sampled and out.tracestate == "rojo=1" and out.request_id == "rid"
    headers = dict(out.headers)
    assert headers == {
        "traceparent": f"00-{TP_TRACE:032x}-{out.span_id:016x}-01",
        "tracestate": "rojo=1",
        "x-b3-traceid": f"{TP_TRACE:032x}",
        "x-b3-spanid": f"{out.span_id:016x}",
        "x-b3-parentspanid": f"{TP_SPAN:016x}",
        "x-b3-sampled": "1",
    }
    assert out.remove == ()


@pytest.mark.parametrize("bits", [128, 64])
def test_begin_starts_a_trace_when_the_request_has_none(bits: int) -> None:
    out = Propagator(trace_id_bits=bits).begin({"x-request-id": "rid"})
    assert out.new_trace and out.parent_span_id == 0 and out.trace_id != 0 and out.span_id != 0
    assert out.trace_id < 2**bits
    headers = dict(out.headers)
    assert len(headers["x-b3-traceid"]) == bits // 4
    assert "x-b3-parentspanid" not in headers and "tracestate" not in headers
    assert len({Propagator(trace_id_bits=bits).begin({}).trace_id for _ in range(50)}) == 50


def test_begin_never_uses_zero_or_the_incoming_span_id(monkeypatch: pytest.MonkeyPatch) -> None:
    # A 1-in-2**64 event, so the random source is forced to produce it.
    draws = iter([TP_SPAN, 0, 7])
    monkeypatch.setattr(context_module, "getrandbits", lambda bits: next(draws))
    out = Propagator().begin({"traceparent": TP})
    assert (out.span_id, out.parent_span_id) == (7, TP_SPAN)
    draws = iter([0, 5, 0, 9])  # trace id 0 redrawn, then span id 0 redrawn
    out = Propagator().begin({})
    assert (out.trace_id, out.span_id) == (5, 9)


def test_begin_writes_formats_the_request_used_even_when_not_enabled() -> None:
    """So the application never reads the sender's span id from a header we left alone."""
    out = Propagator([Format.W3C]).begin({"b3": VALID_SINGLE, "x-b3-sampled": "1"})
    assert {name for name, _ in out.headers} >= {"traceparent", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-sampled"}
    # The b3 context continued (traceparent absent), and every written format says the same.
    assert out.trace_id == int(OTHER_TRACE, 16) and out.parent_span_id == int(OTHER_SPAN, 16)
    for f in ALL_FORMATS:
        ctx = extract({k: v for k, v in out.headers if k in FORMAT_HEADERS[f]}).context
        assert ctx is not None and (ctx.trace_id, ctx.span_id, ctx.sampled) == (out.trace_id, out.span_id, False)
    only_w3c = Propagator([Format.W3C]).begin({"x-request-id": "r"})
    assert [name for name, _ in only_w3c.headers] == ["traceparent"]
    assert Propagator([]).begin({"x-request-id": "r"}).headers == ()


@pytest.mark.parametrize(
    ("headers", "formats", "remove"),
    [
        # A new trace has no parent: the stale x-b3-parentspanid and non-debug flags must go.
        (
            {"x-b3-traceid": "bad", "x-b3-parentspanid": B3_PARENT, "x-b3-flags": "0"},
            [Format.W3C],
            ("x-b3-parentspanid", "x-b3-flags"),
        ),
        # Debug: we write x-b3-flags and no x-b3-sampled.
        (
            {"x-b3-traceid": B3_TRACE, "x-b3-spanid": B3_SPAN, "x-b3-flags": "1", "x-b3-sampled": "1"},
            DEFAULT_FORMATS,
            ("x-b3-sampled",),
        ),
        # An invalid traceparent: its tracestate must not travel with our new context.
        ({"traceparent": "garbage", "tracestate": "rojo=1"}, DEFAULT_FORMATS, ("tracestate",)),
        # A valid traceparent with an invalid tracestate: the tracestate is discarded.
        ({"traceparent": TP, "tracestate": "Rojo=1"}, [Format.W3C], ("tracestate",)),
        ({"traceparent": TP, "tracestate": "rojo=1"}, [Format.W3C], ()),
        # Without W3C enabled or a traceparent in the request, a lone tracestate is not ours to touch.
        ({"tracestate": "rojo=1"}, [Format.B3], ()),
    ],
)
def test_stale_trace_headers_we_do_not_write_are_listed_in_remove(
    headers: dict[str, str], formats: list[Format], remove: tuple[str, ...]
) -> None:
    out = Propagator(formats).begin(headers)
    assert out.remove == remove
    assert not set(out.remove) & {name for name, _ in out.headers}


@settings(max_examples=120)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "traceparent": near_valid_traceparents(),
            "tracestate": near_valid_tracestate(),
            "b3": near_valid_b3_single(),
        },
    ),
    near_valid_b3_multi(),
    st.sets(st.sampled_from(ALL_FORMATS)),
)
def test_no_stale_header_of_a_written_format_survives(
    w3c_and_single: dict[str, str], multi: dict[str, str], formats: set[Format]
) -> None:
    headers = {**w3c_and_single, **multi}
    out = Propagator(formats).begin(headers)
    written = {name for name, _ in out.headers}
    assert not written & set(out.remove)
    for fmt in ALL_FORMATS:
        if FORMAT_HEADERS[fmt][0] in written:
            for name in FORMAT_HEADERS[fmt]:
                if name in headers:
                    assert name in written or name in out.remove
    assert formats | extract(headers).present <= {f for f in ALL_FORMATS if FORMAT_HEADERS[f][0] in written}


@pytest.mark.parametrize("request_id", [None, ""])
def test_begin_creates_an_x_request_id_only_when_the_request_has_none(request_id: str | None) -> None:
    headers = {} if request_id is None else {"x-request-id": request_id}
    out = Propagator().begin(headers)
    assert UUID_RE.fullmatch(out.request_id)
    assert uuid.UUID(out.request_id).version == 4
    assert ("x-request-id", out.request_id) in out.headers
    kept = Propagator().begin({"x-request-id": "abc-123"})
    assert kept.request_id == "abc-123" and "x-request-id" not in dict(kept.headers)


@pytest.mark.parametrize(
    ("headers", "percent", "sampled", "debug"),
    [
        ({"traceparent": TP}, 0.0, True, False),  # incoming "sampled" beats a 0 % sampler
        ({"traceparent": TP[:-2] + "00"}, 100.0, False, False),  # incoming "not sampled" beats 100 %
        ({"b3": "0"}, 100.0, False, False),  # a decision without ids, for a new trace
        ({"x-b3-sampled": "0"}, 100.0, False, False),
        ({"x-b3-flags": "1"}, 0.0, True, True),  # debug forces sampling
        ({"b3": f"{B3_TRACE}-{B3_SPAN}-d"}, 0.0, True, True),
        ({"b3": f"{B3_TRACE}-{B3_SPAN}"}, 0.0, False, False),  # deferred: the sampler decides
        ({"b3": f"{B3_TRACE}-{B3_SPAN}"}, 100.0, True, False),
        ({}, 0.0, False, False),
        ({}, 100.0, True, False),
    ],
)
def test_begin_honours_incoming_decisions_and_samples_the_rest(
    headers: dict[str, str], percent: float, sampled: bool, debug: bool
) -> None:
    out = Propagator(ALL_FORMATS, Sampler(percent)).begin(headers)
    assert (out.sampled, out.debug) == (sampled, debug)


def test_deferred_and_new_traces_use_the_sampler_on_the_trace_id() -> None:
    sampler = Sampler(37.5)
    propagator = Propagator(sampler=sampler)
    for _ in range(300):
        out = propagator.begin({})
        assert out.sampled is sampler.should_sample(out.trace_id)
    deferred = propagator.begin({"x-b3-traceid": B3_TRACE, "x-b3-spanid": B3_SPAN})
    assert deferred.sampled is sampler.should_sample(int(B3_TRACE, 16))


def test_propagator_rejects_bad_configuration() -> None:
    with pytest.raises(ValueError):
        Propagator(trace_id_bits=96)
    with pytest.raises(ValueError):
        Propagator(["jaeger"])  # type: ignore[list-item]
    assert Propagator(["w3c", "b3-single"]).formats == {Format.W3C, Format.B3_SINGLE}  # type: ignore[list-item]


# ---------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------


@given(
    st.one_of(st.floats(0.0, 100.0), st.sampled_from([0.0, 1.0, 0.01, 50.0, 99.99, 100.0, 5e-324])),
    st.lists(st.one_of(trace_ids, st.integers(0, MAX64)), max_size=30),
)
def test_sampler_decides_exactly_as_opentelemetry_trace_id_ratio_based(percent: float, ids: list[int]) -> None:
    ours = Sampler(percent)
    theirs = TraceIdRatioBased(percent / 100)
    assert ours.bound == theirs.bound
    # Around the bound, and with high bits set (only the low 64 bits count).
    edges = [theirs.bound - 1, theirs.bound, theirs.bound + 1, (1 << 100) | max(theirs.bound - 1, 0)]
    for trace_id in [*ids, *(e for e in edges if 0 <= e <= MAX128)]:
        assert ours.should_sample(trace_id) is theirs.should_sample(None, trace_id, "span").decision.is_sampled()


def test_sampler_zero_never_and_hundred_always() -> None:
    never, always = Sampler(0), Sampler(100)
    for trace_id in (1, MAX64, MAX128, 1 << 64, 12345):
        assert not never.should_sample(trace_id)
        assert always.should_sample(trace_id)


def test_sampler_default_one_percent_samples_about_one_percent() -> None:
    sampler = Sampler(1.0)
    propagator = Propagator(sampler=sampler)
    ids = [propagator.begin({"x-request-id": "r"}).trace_id for _ in range(20_000)]
    rate = sum(map(sampler.should_sample, ids)) / len(ids)
    assert 0.005 < rate < 0.015


@pytest.mark.parametrize("percent", [-0.1, 100.01, float("nan"), float("inf")])
def test_sampler_rejects_percent_outside_0_to_100(percent: float) -> None:
    with pytest.raises(ValueError):
        Sampler(percent)


# ---------------------------------------------------------------------------------------------
# W3C Trace Context Level 2, rule by rule. Each table is generated from the rule it checks
# (every character, every flags byte, the lengths either side of each limit), not from findings.
# ---------------------------------------------------------------------------------------------

TP_TRACE_HEX = f"{TP_TRACE:032x}"
TP_SPAN_HEX = f"{TP_SPAN:016x}"
# Characters that are list syntax in a tracestate (separator, optional whitespace, key/value
# split) mean something else wherever they stand, so they get their own rows below.
TS_SYNTAX = ",= \t"
KEY_TEST_CHARS = [chr(c) for c in range(0x20, 0x7F) if chr(c) not in TS_SYNTAX] + ["\x00", "\x7f", "\u00e9"]


def _kept_with_a_neighbour(member: str) -> tuple[str, str]:
    """The header (the member between two valid ones) and what must come out if it is valid."""
    return f"aa=1,{member},zz=2", f"aa=1,{member},zz=2"


@pytest.mark.parametrize("ch", KEY_TEST_CHARS)
@pytest.mark.parametrize("where", ["first", "middle", "last", "only"])
def test_l2_key_characters(ch: str, where: str) -> None:
    """key = ( lcalpha / DIGIT ) 0*255( lcalpha / DIGIT / "_" / "-" / "*" / "/" / "@" )"""
    key = {"first": f"{ch}k", "middle": f"k{ch}k", "last": f"k{ch}", "only": ch}[where]
    valid = ch in KEY_FIRST if where in ("first", "only") else ch in KEY_CHARS
    header, kept = _kept_with_a_neighbour(f"{key}=v")
    # An invalid member makes the list unparseable: discarded whole (the W3C suite's strict level).
    assert parse_tracestate(header) == (kept if valid else "")


@pytest.mark.parametrize(
    "ch", [chr(c) for c in range(0x20, 0x7F) if chr(c) not in ",="] + ["\t", "\x00", "\x7f", "\u00e9"]
)
@pytest.mark.parametrize("where", ["first", "middle", "last", "only"])
def test_l2_value_characters(ch: str, where: str) -> None:
    """value = 0*255(chr) nblk-chr; chr = %x20 / nblk-chr; nblk-chr = %x21-2B / %x2D-3C / %x3E-7E"""
    value = {"first": f"{ch}v", "middle": f"v{ch}v", "last": f"v{ch}", "only": ch}[where]
    header, kept = _kept_with_a_neighbour(f"k={value}")
    if ch in " \t" and where in ("last", "only"):
        # Trailing whitespace is optional whitespace around ",", not part of the value.
        stripped = value.rstrip(" \t")
        assert parse_tracestate(header) == (f"aa=1,k={stripped},zz=2" if stripped else "")
        return
    valid = ch in NBLK_CHARS or (ch == " " and where in ("first", "middle"))  # leading spaces are kept
    assert parse_tracestate(header) == (kept if valid else "")


@pytest.mark.parametrize(
    ("key", "valid"),
    [
        # The only length rule of Level 2: a key of 1 to 256 characters, "@" or not.
        *((c * n, n <= 256) for c in "z7" for n in (1, 255, 256, 257)),
        *(("a" + "@" * (n - 1), n <= 256) for n in (2, 256, 257)),
        # Level 1's multi-tenant limits (tenant <= 241, system <= 14) are gone.
        ("t" * 241 + "@" + "v" * 14, True),  # 256
        ("t" * 242 + "@v", True),
        ("t@" + "v" * 15, True),
        ("t" * 241 + "@" + "v" * 15, False),  # 257
        ("t" * 255 + "@", True),
        ("t" * 256 + "@", False),
        ("foo@", True),
        ("foo@@bar", True),
        ("foo@bar@baz", True),
        ("1@2", True),
        ("@foo", False),
        ("@", False),
    ],
)
def test_l2_key_length_and_at_sign_rules(key: str, valid: bool) -> None:
    header, kept = _kept_with_a_neighbour(f"{key}=1")
    assert parse_tracestate(header) == (kept if valid else "")


@pytest.mark.parametrize(("n", "valid"), [(1, True), (255, True), (256, True), (257, False)])
def test_l2_value_length_rule(n: int, valid: bool) -> None:
    header, kept = _kept_with_a_neighbour("k=" + "v" * n)
    assert parse_tracestate(header) == (kept if valid else "")


def _members(n: int) -> list[str]:
    return [f"k{i:02d}={i}" for i in range(n)]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        # At most 32 members; more and the list is discarded whole (the W3C suite's strict level).
        (",".join(_members(32)), ",".join(_members(32))),
        (",".join(_members(33)), ""),
        # Empty members and whitespace around "," are allowed and not members.
        (",,".join(_members(32)) + ", \t,", ",".join(_members(32))),
        # Duplicates: the list stays; the left-most member of a key wins, the order is kept.
        ("foo=1,foo=1", "foo=1"),
        ("foo=1,foo=2", "foo=1"),
        ("foo=2,bar=1,foo=1", "foo=2,bar=1"),
        ("a=1,b=2,a=3,c=4,b=5", "a=1,b=2,c=4"),
        ("x@y=1,x@y=2", "x@y=1"),
        # Duplicates count towards the 32 the list was sent with.
        (",".join([*_members(31), "k00=dup"]), ",".join(_members(31))),
        (",".join([*_members(32), "k00=dup"]), ""),
        # One invalid member anywhere discards the list, valid members and all.
        *((",".join(_members(3)[:i] + ["BAD=1"] + _members(3)[i:]), "") for i in range(4)),
        ("foo=1,foo=", ""),  # a duplicate that is also invalid is still invalid
        ("@foo=1,bar=2", ""),
        ("foo=,bar=3", ""),
        ("foo=bar=baz", ""),
    ],
)
def test_l2_list_rules(header: str, expected: str) -> None:
    assert parse_tracestate(header) == expected
    ctx = extract({"traceparent": TP, "tracestate": header}).context
    assert ctx is not None and ctx.tracestate == expected  # never affects the traceparent


@pytest.mark.parametrize("version", ["00", "cc", "cc-future"])
@pytest.mark.parametrize("sampler", [0.0, 100.0])
def test_l2_every_flags_byte_continues_with_its_sampled_and_random_bits_and_no_other(
    version: str, sampler: float
) -> None:
    """Sampled and random-trace-id are honoured and copied; every other (reserved) bit is
    written as 0, for the version we know and for a higher one alike. The sampler does not
    override an incoming decision."""
    propagator = Propagator(sampler=Sampler(sampler))
    for flags in range(256):
        tp = f"{version[:2]}-{TP_TRACE_HEX}-{TP_SPAN_HEX}-{flags:02x}" + ("-extra" if "future" in version else "")
        out = propagator.begin({"traceparent": tp, "tracestate": "a@b=1"})
        got = dict(out.headers)
        assert got["traceparent"] == f"00-{TP_TRACE_HEX}-{out.span_id:016x}-{flags & 0x03:02x}", tp
        assert (out.random_trace_id, out.sampled, out.new_trace) == (bool(flags & 2), bool(flags & 1), False)
        assert got["tracestate"] == "a@b=1"
        assert got["x-b3-sampled"] == ("1" if flags & 1 else "0")  # B3 only sees the sampled bit
        assert extract({"traceparent": tp}).context.random_trace_id is bool(flags & 2)  # type: ignore[union-attr]


STARTS = {
    "no headers": {},
    "tracestate without traceparent": {"tracestate": "rojo=1"},
    "invalid traceparent": {"traceparent": "00-xyz-00f067aa0ba902b7-03", "tracestate": "rojo=1"},
    "version ff": {"traceparent": "ff" + TP[2:-2] + "03", "tracestate": "rojo=1"},
    "all-zero trace id": {"traceparent": f"00-{'0' * 32}-{TP_SPAN_HEX}-03"},
    "b3 sampling decision only": {"b3": "1"},
    "x-b3-sampled only": {"x-b3-sampled": "0"},
}


@pytest.mark.parametrize("bits", [128, 64])
@pytest.mark.parametrize("sampler", [0.0, 100.0])
@pytest.mark.parametrize("start", list(STARTS))
def test_l2_a_trace_we_start_has_the_random_flag(start: str, sampler: float, bits: int) -> None:
    out = Propagator(sampler=Sampler(sampler), trace_id_bits=bits).begin(STARTS[start])
    got = dict(out.headers)
    assert out.new_trace and out.random_trace_id
    sampled = out.sampled
    assert got["traceparent"] == f"00-{out.trace_id:032x}-{out.span_id:016x}-0{3 if sampled else 2}"
    assert "tracestate" not in got  # a restarted or new trace carries no incoming tracestate


def test_l2_the_ids_behind_the_random_flag_are_uniform_in_their_low_56_bits() -> None:
    """What the flag promises: every one of the right-most 56 bits is a fair coin (2000 draws;
    a bit stuck at 0 or 1, or a counter or a clock in those bytes, is 45 standard deviations
    away from the bounds)."""
    for bits in (128, 64):
        p = Propagator(trace_id_bits=bits)
        ids = [p.begin({}).trace_id for _ in range(2000)]
        assert len(set(ids)) == 2000
        for bit in range(56):
            ones = sum(i >> bit & 1 for i in ids)
            assert 800 < ones < 1200, (bits, bit, ones)


@pytest.mark.parametrize(
    "headers",
    [
        {"x-b3-traceid": B3_TRACE, "x-b3-spanid": B3_SPAN, "x-b3-sampled": "1"},
        {"x-b3-traceid": B3_TRACE[16:], "x-b3-spanid": B3_SPAN, "x-b3-sampled": "1"},
        {"b3": f"{B3_TRACE}-{B3_SPAN}-1"},
        # An invalid traceparent does not make a valid B3 context a new trace.
        {"traceparent": "00-xyz-zzz-03", "b3": f"{B3_TRACE}-{B3_SPAN}-1"},
    ],
)
def test_l2_a_continued_b3_trace_never_claims_the_random_flag(headers: dict[str, str]) -> None:
    """B3 has no random-trace-id flag: we did not draw the id and cannot vouch for it."""
    out = Propagator(ALL_FORMATS).begin(headers)
    got = dict(out.headers)
    assert not out.new_trace and not out.random_trace_id
    assert got["traceparent"].endswith("-01")
    assert got["x-b3-sampled"] == "1" and got["b3"].split("-")[2] == "1"


def test_l2_a_valid_traceparent_wins_over_b3_and_brings_its_random_flag() -> None:
    out = Propagator(ALL_FORMATS).begin({"traceparent": TP[:-2] + "02", "b3": f"{B3_TRACE}-{B3_SPAN}-1"})
    got = dict(out.headers)
    assert (out.trace_id, out.random_trace_id, out.sampled) == (TP_TRACE, True, False)
    assert got["traceparent"].endswith("-02")
    assert got["b3"] == f"{TP_TRACE_HEX}-{out.span_id:016x}-0-{TP_SPAN_HEX}"
