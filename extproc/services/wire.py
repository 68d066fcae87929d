"""The one response piece built on every request, written in protobuf's wire format directly.

Every other part of a reply is encoded by the protobuf library, once per verdict or per
server (authz_render.py, processor_render.py). The trace headers cannot be: their values
(new span ids) differ on every request. Building the four default trace headers as messages
and serialising them costs 4.5 µs per request (upb); a byte template per header *shape* costs
2.3 µs (both measured with `python -m bench.engine_micro`, "trace headers" rows). A trace
header's value has a fixed length for a given format (traceparent 55 characters, a B3 span
id 16...), so every byte of the encoding except the values themselves is the same from one
request to the next: the template holds those bytes, and a request only splices its values in.

What is written is small and fixed:

    <enclosing fields> { repeated HeaderValueOption {
        header: HeaderValue { key, value | raw_value }, append_action: OVERWRITE_IF_EXISTS_OR_ADD } }

plus, rarely (a stale incoming B3 parent or flags), repeated strings of headers to remove, for
which the bytes are built in full. tests/unit/test_wire.py checks, for arbitrary names and
values, that the library parses these bytes into the message it would have built. Field
numbers come from the generated descriptors, never typed in by hand.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2

from extproc.verdict import Append


def _number(message: type, name: str) -> int:
    return int(message.DESCRIPTOR.fields_by_name[name].number)  # type: ignore[attr-defined]


def tag_of(message: type, name: str) -> bytes:
    """The tag of a length-delimited field (wire type 2); every field used here is numbered < 16."""
    number = _number(message, name)
    assert number < 16
    return bytes((number << 3 | 2,))


_HVO_HEADER = tag_of(base_pb2.HeaderValueOption, "header")
_HV_KEY = tag_of(base_pb2.HeaderValue, "key")
_HV_VALUE = tag_of(base_pb2.HeaderValue, "value")
_HV_RAW = tag_of(base_pb2.HeaderValue, "raw_value")
# append_action = OVERWRITE_IF_EXISTS_OR_ADD: a varint field (wire type 0).
_OVERWRITE = bytes((_number(base_pb2.HeaderValueOption, "append_action") << 3, Append.OVERWRITE_IF_EXISTS_OR_ADD))
_SMALL = tuple(bytes((i,)) for i in range(0x80))  # one-byte varints, the usual case


def varint(n: int) -> bytes:
    if n < 0x80:
        return _SMALL[n]
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def field(tag: bytes, payload: bytes) -> bytes:
    """One length-delimited field: its tag, the payload's length, the payload."""
    return tag + varint(len(payload)) + payload


def _option_parts(tag: bytes, name: str, n: int, raw: bool) -> tuple[bytes, bytes]:
    """The bytes of one overwriting HeaderValueOption entry before and after a value of n bytes."""
    k = name.encode()
    hv_before = _HV_KEY + varint(len(k)) + k + (_HV_RAW if raw else _HV_VALUE) + varint(n)
    hv_len = len(hv_before) + n
    hvo_len = len(_HVO_HEADER) + len(varint(hv_len)) + hv_len + len(_OVERWRITE)
    return tag + varint(hvo_len) + _HVO_HEADER + varint(hv_len) + hv_before, _OVERWRITE


def _template(path: tuple[bytes, ...], tag: bytes, shape: tuple[tuple[str, int], ...], raw: bool) -> tuple[bytes, ...]:
    """The constant bytes around the values of headers of this shape: len(shape) + 1 pieces."""
    parts = [_option_parts(tag, name, n, raw) for name, n in shape]
    size = sum(len(before) + n + len(after) for (before, after), (_, n) in zip(parts, shape, strict=True))
    prefix = b""
    for t in reversed(path):  # innermost container first: each wraps everything inside it
        prefix = t + varint(size + len(prefix)) + prefix
    if not parts:
        return (prefix,)
    pieces = [prefix + parts[0][0]]
    for i in range(1, len(parts)):
        pieces.append(parts[i - 1][1] + parts[i][0])
    pieces.append(parts[-1][1])
    return tuple(pieces)


_TEMPLATES: dict[tuple[object, ...], tuple[bytes, ...]] = {}
MAX_TEMPLATES = 256  # shapes are few (format combinations x id widths); past this, no new ones are kept


def set_headers(
    path: tuple[bytes, ...],
    tag: bytes,
    pairs: tuple[tuple[str, str], ...],
    raw: bool,
    remove_tag: bytes = b"",
    remove: tuple[str, ...] = (),
) -> bytes:
    """`pairs` as overwriting HeaderValueOptions under field `tag` (and `remove` as repeated
    strings under `remove_tag`) of the message nested in the fields `path`, outermost first.
    The value goes in `raw_value` (ext_proc) or `value` (ext_authz)."""
    values = [v.encode() for _, v in pairs]
    if not remove:
        key = (path, tag, raw, *[p[0] for p in pairs], *map(len, values))
        pieces = _TEMPLATES.get(key)
        if pieces is None:
            shape = tuple((name, len(v)) for (name, _), v in zip(pairs, values, strict=True))
            pieces = _template(path, tag, shape, raw)
            if len(_TEMPLATES) < MAX_TEMPLATES:
                _TEMPLATES[key] = pieces
        # Interleave the constant pieces with the values: p0 v0 p1 v1 ... pn.
        out: list[bytes] = [b""] * (2 * len(values) + 1)
        out[0::2] = pieces
        out[1::2] = values
        return b"".join(out)
    body = []
    for (name, _), v in zip(pairs, values, strict=True):
        before, after = _option_parts(tag, name, len(v), raw)
        body.append(before + v + after)
    for s in remove:
        body.append(field(remove_tag, s.encode()))
    payload = b"".join(body)
    for t in reversed(path):
        payload = field(t, payload)
    return payload
