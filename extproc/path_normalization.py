"""The path an Envoy with Istio's path normalization would hand its filters.

Istio sets the HTTP connection manager's normalization from `meshConfig.pathNormalization`
(istio/istio, pilot/pkg/networking/core/listener_builder.go):

  none                      nothing
  base (Istio's default)    normalize_path: RFC 3986 dot segments, as Envoy's canonicalizer does
  merge-slashes             base, then merge_slashes
  decode-and-merge-slashes  path_with_escaped_slashes_action UNESCAPE_AND_FORWARD (%2F and %5C,
                            either case, decoded first), then base, then merge_slashes

extproc applies the same to the path its policies match, so a DENY holds even behind an
Envoy that was configured without normalization; what the upstream receives is Envoy's
business and is not changed.

Envoy's canonicalizer is its snapshot of Chromium's URL path canonicalizer. What it does
was established against Envoy 1.40 itself (tests/e2e/test_path_normalization.py sends
every spelling below through a real Envoy in each mode and compares):
  * the path ends at the first "?" (the query is never touched);
  * "\\" is a path separator, written "/";
  * "." and ".." segments are resolved, also when a dot is written %2e or %2E; ".." never
    climbs above the root;
  * first, a segment that starts right after a literal "/" with one or two literal dots and
    ";" loses everything from the ";" to the next "/" (so "/a/..;x/b" is "/a/../b": Envoy's
    guard against "..;" path-parameter tricks); "%2e%2e;", or "..;" after a "\\", stay;
  * %XX of an unreserved character (A-Z a-z 0-9 - . _ ~) is decoded; any other valid %XX is
    kept exactly as written (hex case included); "%" not followed by two hex digits is kept,
    unless decoding what follows would make it look like an escape, then it becomes %25;
  * control characters, space, non-ASCII bytes and " < > ^ ` { | } are percent-encoded (upper
    case hex);
  * a NUL, raw or as %00, makes the path invalid: Envoy answers 400.
Merging slashes joins the path part's non-empty segments with one "/", keeping a leading
and a trailing "/" (a path of slashes only becomes "//").

Hand-written: no library implements Envoy's (Chromium's) canonicalization, and Python's
`posixpath.normpath` and `urllib` resolve and decode differently (they would disagree with
Envoy's RBAC on some of the spellings above).
"""

from __future__ import annotations

import re
from enum import StrEnum

__all__ = ["Mode", "normalize"]


class Mode(StrEnum):
    NONE = "none"
    BASE = "base"
    MERGE_SLASHES = "merge-slashes"
    DECODE_AND_MERGE_SLASHES = "decode-and-merge-slashes"


# What current Istio applies to a sidecar when meshConfig.pathNormalization is unset (DEFAULT is
# BASE). Its EDGE connection profile adds merge_slashes and UNESCAPE_AND_REDIRECT on gateways only.
DEFAULT_MODE = Mode.BASE

_SLASH, _BACKSLASH, _DOT, _PERCENT, _SEMICOLON = 0x2F, 0x5C, 0x2E, 0x25, 0x3B

# Bytes written as they are; everything else is special (escaped, a separator, a dot, "%").
_PLAIN = frozenset(b"!$&'()*+,-/0123456789:;=@ABCDEFGHIJKLMNOPQRSTUVWXYZ[]_abcdefghijklmnopqrstuvwxyz~")
# Characters whose %XX spelling is decoded.
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset(b"0123456789abcdefABCDEF")

# The characters the canonicalizer copies as they are, "." included (a dot matters only after "/").
_SAFE = re.compile(r"[!$&'()*+,\-./0-9:;=@A-Z\[\]_a-z~]*")
_ESCAPED_SLASH = re.compile(rb"%(?:2[fF]|5[cC])")
# A segment that starts with one or two literal dots and ";" (right after a literal "/").
_DOT_PARAMS = re.compile(rb"(?<=/)(\.\.?);[^/]*")


def normalize(path: str, mode: Mode) -> str | None:
    """`path` as Envoy normalizes it in `mode`, or None when Envoy would reject it (400).

    Only the part before "?" (or a "#", which Envoy never forwards) changes. A path that does
    not start with "/" (CONNECT's authority, OPTIONS' "*") is returned unchanged."""
    if mode is Mode.NONE or not path.startswith("/"):
        return path
    # The common case in one C-level scan: only characters the canonicalizer copies as they are,
    # up to the end or the query, and no "/." (nor "//" when merging) among them.
    safe = _SAFE.match(path).end()  # type: ignore[union-attr]  # matches the empty string
    merge = mode is not Mode.BASE
    if (
        (safe == len(path) or path[safe] in "?#")
        and path.find("/.", 0, safe) == -1
        and not (merge and path.find("//", 0, safe) != -1)
    ):
        return path
    end = len(path)
    for sep in "?#":
        i = path.find(sep, 0, end)
        if i != -1:
            end = i
    head = path[:end]
    raw = head.encode("utf-8", "surrogateescape")
    if mode is Mode.DECODE_AND_MERGE_SLASHES:
        raw = _ESCAPED_SLASH.sub(lambda m: b"/" if m[0][1] == 0x32 else b"\\", raw)
    if b".;" in raw:
        raw = _DOT_PARAMS.sub(rb"\1", raw)
    out: bytes | bytearray | None = _canonicalize(raw)
    if out is None:
        return None
    if merge:
        out = _merge_slashes(out)
    return out.decode("ascii") + path[end:]


def _merge_slashes(p: bytes | bytearray) -> bytes | bytearray:
    """Envoy's merge_slashes: the non-empty segments joined by "/", with the leading and the
    trailing "/" kept (so a path of only slashes becomes "//")."""
    if b"//" not in p:
        return p
    lead = b"/" if p.startswith(b"/") else b""
    trail = b"/" if p.endswith(b"/") else b""
    return lead + b"/".join(s for s in p.split(b"/") if s) + trail


def _dot_len(p: bytes, i: int, n: int) -> int:
    """1 for ".", 3 for "%2e"/"%2E" at `i`, else 0."""
    c = p[i]
    if c == _DOT:
        return 1
    if c == _PERCENT and i + 2 < n and p[i + 1] == 0x32 and p[i + 2] in b"eE":
        return 3
    return 0


def _hex_value(p: bytes | bytearray, i: int, n: int) -> int:
    """The byte `%XX` at `i` stands for, or -1 when it is not a valid escape."""
    if i + 2 < n and p[i + 1] in _HEX and p[i + 2] in _HEX:
        return int(p[i + 1 : i + 3], 16)
    return -1


def _back_up(out: bytearray) -> None:
    """Drop the last segment of `out` (which ends with "/"), never the leading "/"."""
    i = len(out) - 1
    if i == 0:
        return
    i -= 1
    while i > 0 and out[i] != _SLASH:
        i -= 1
    del out[i + 1 :]


def _after_dots(p: bytes, i: int, n: int) -> tuple[int, int]:
    """Classify the segment whose first dot ends just before `i`: (kind, input consumed after
    that dot), kind 0 = an ordinary name, 1 = ".", 2 = ".."."""
    if i == n:
        return 1, 0
    c = p[i]
    if c in (_SLASH, _BACKSLASH):
        return 1, 1
    second = _dot_len(p, i, n)
    if second:
        j = i + second
        if j == n:
            return 2, second
        c = p[j]
        if c in (_SLASH, _BACKSLASH):
            return 2, second + 1
    return 0, 0


def _canonicalize(p: bytes) -> bytearray | None:
    n = len(p)
    out = bytearray()
    ok = True
    bad_percent = -10  # where in `out` the last "%" that began no valid escape was written
    i = 0
    while i < n:
        c = p[i]
        if c in _PLAIN:
            out.append(c)
            i += 1
            continue
        dots = _dot_len(p, i, n)
        if dots:
            if out and out[-1] == _SLASH:
                kind, used = _after_dots(p, i + dots, n)
                if kind == 0:
                    out.append(_DOT)
                    i += dots
                    continue
                if kind == 2:
                    _back_up(out)
                i += dots + used
                continue
            out.append(_DOT)
            i += dots
            continue
        if c == _BACKSLASH:
            out.append(_SLASH)
        elif c == _PERCENT:
            value = _hex_value(p, i, n)
            if value < 0:
                bad_percent = len(out)
                out.append(_PERCENT)
            elif value in _UNRESERVED:
                out.append(value)
                i += 2
                if bad_percent >= len(out) - 3:
                    _guard_nested_escape(p, i + 1, n, bad_percent, out)
            else:
                out += p[i : i + 3]
                i += 2
                if value == 0:
                    ok = False
        elif c == 0:
            out += b"%00"
            ok = False
        else:
            out += b"%%%02X" % c
        i += 1
    return out if ok else None


def _guard_nested_escape(p: bytes, nxt: int, n: int, bad: int, out: bytearray) -> None:
    """A decoded character just landed within two bytes of a "%" that began no escape: if the
    two now read as an escape ("%%30%30" -> "%00"), write that "%" as "%25" so the result
    cannot be decoded into something the input did not say."""
    length = len(out)
    last = out[-1]
    append_next = bad == length - 2
    if append_next:
        if nxt == n or p[nxt] >= 0x80:
            return
        out.append(p[nxt])
    if _hex_value(out, bad, len(out)) >= 0:
        if not append_next:
            out.append(out[bad + 1])
        out[bad + 1] = 0x32
        out[bad + 2] = 0x35
        out.append(last)
    elif append_next:
        del out[length:]
