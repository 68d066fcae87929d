"""Request headers as every adapter reads them, and what makes a request malformed.

Envoy hands headers over in two shapes: a string map (ext_authz by default, values already
joined with "," for repeated names) or a list of raw entries (ext_proc always, ext_authz with
`encode_raw_headers`), whose values are bytes. `decode_header_map` is the one place raw
entries become text, so both modes treat the same bytes the same way: names lower-cased,
repeated names joined with "," as Envoy joins them, and a value that is not UTF-8 makes the
request malformed (denied, never guessed at).
"""

from __future__ import annotations

from collections.abc import Mapping

from envoy.config.core.v3 import base_pb2

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
) -> dict[str, str]:
    """Raw header entries as a map: lower-case names, repeated names joined with ",". With
    `max_bytes`, a block larger than that is malformed too (checked in the same pass)."""
    entries = hm.headers
    if len(entries) > max_headers:
        raise MalformedRequest("too-many-headers", f"{len(entries)} headers")
    out: dict[str, str] = {}
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
        out[key] = value if prev is None else f"{prev},{value}"
    if max_bytes is not None and size > max_bytes:
        raise MalformedRequest("headers-too-large", f"{size} bytes of headers (limit {max_bytes})")
    return out


def check_size(headers: Mapping[str, str], max_bytes: int) -> None:
    """Denies header blocks larger than `max_bytes` (names and values), like Envoy's own limit."""
    size = 0
    for k, v in headers.items():
        size += len(k) + len(v)
    if size > max_bytes:
        raise MalformedRequest("headers-too-large", f"{size} bytes of headers (limit {max_bytes})")
