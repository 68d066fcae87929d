"""Request headers as every adapter reads them, and what makes a request malformed.

Envoy hands headers over in two shapes: a string map (ext_authz by default, values already
joined with "," for repeated names) or a list of raw entries (ext_proc always, ext_authz with
`encode_raw_headers`), whose values are bytes. `decode_header_map` is the one place raw
entries become text, so both modes treat the same bytes the same way: names lower-cased, a
value that is not UTF-8 makes the request malformed (denied, never guessed at).

Repeated entries are kept apart as well as joined. Envoy's RBAC header matcher tests each
entry of a name on its own (any entry matching is a match; checked against Envoy 1.40), so
`x-abc: abc1` and `x-abc: other` on two lines match `abc1`, while one line `abc1,other`
does not. The raw entries are exactly what Envoy's header map holds: headers Envoy keeps
as one entry (its inline headers such as `x-forwarded-for`, `user-agent`, `authorization`,
`:authority`, and HTTP/2 cookies, which the codec joins with "; ") already arrive as one
entry, so following the entries follows Envoy without knowing its list. The map form
cannot tell the two apart; see the README.
"""

from __future__ import annotations

from collections.abc import Mapping

from envoy.config.core.v3 import base_pb2

from extproc.attributes import NO_LINES, HeaderLines

MAX_HEADERS = 512
DEFAULT_MAX_HEADER_BYTES = 96 * 1024


class MalformedRequest(Exception):
    """A request extproc refuses to evaluate; it is denied, never crashes the server."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


def decode_header_map(
    hm: base_pb2.HeaderMap, max_headers: int = MAX_HEADERS, max_bytes: int | None = None
) -> tuple[dict[str, str], HeaderLines]:
    """Raw header entries as a map (lower-case names, repeated names joined with ","), and the
    entries of every repeated name one by one (`NO_LINES`, shared, when no name repeats: the
    common case allocates nothing more). With `max_bytes`, a block larger than that is
    malformed too (checked in the same pass)."""
    entries = hm.headers
    if len(entries) > max_headers:
        raise MalformedRequest("too-many-headers", f"{len(entries)} headers")
    out: dict[str, str] = {}
    lines: dict[str, tuple[str, ...]] | None = None
    size = 0
    for hv in entries:
        raw = hv.raw_value
        try:
            value = raw.decode() if raw else hv.value
        except UnicodeDecodeError:
            raise MalformedRequest("bad-header-encoding", f"header {hv.key!r} is not UTF-8") from None
        key = hv.key.lower()
        size += len(key) + len(value)
        prev = out.get(key)
        if prev is None:
            out[key] = value
        else:
            out[key] = f"{prev},{value}"
            if lines is None:
                lines = {}
            seen = lines.get(key)
            # Before its second entry a name's joined value is its first entry.
            lines[key] = (prev, value) if seen is None else (*seen, value)
    if max_bytes is not None and size > max_bytes:
        raise MalformedRequest("headers-too-large", f"{size} bytes of headers (limit {max_bytes})")
    return out, (lines if lines is not None else NO_LINES)


def check_size(headers: Mapping[str, str], max_bytes: int) -> None:
    """Denies header blocks larger than `max_bytes` (names and values), like Envoy's own limit."""
    size = 0
    for k, v in headers.items():
        size += len(k) + len(v)
    if size > max_bytes:
        raise MalformedRequest("headers-too-large", f"{size} bytes of headers (limit {max_bytes})")
