"""Commented YAML from a typed Envoy message.

The message is serialised by betterproto2 (proto3 JSON with snake_case keys, `Any` expanded
with its `@type`); this module only lays that out for people. It walks the JSON next to the
typed message, so it knows each object's message type and can:

* put a comment before a field (a note keyed `<MessageName>.<field>`) or before a named list
  item such as a listener, filter or cluster (a note keyed `<MessageName>:<name>`);
* show a field at its default value where the config is clearer with it spelled out
  (`failure_mode_allow: false`, `type: STATIC`): proto3 JSON leaves defaults out, Envoy reads
  the two forms the same way;
* write small objects on one line (`{address: 127.0.0.1, port_value: 8080}`) and the rest as
  blocks, sequences under their key as Envoy's own examples do.

PyYAML's emitter can do none of the first three, hence this small writer; scalars that need
quoting are written as JSON strings, which YAML reads unchanged.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import betterproto2
import yaml
from envoy_data_plane.google.protobuf import Any as AnyMessage

WIDTH = 100
_PLAIN = re.compile(r"[A-Za-z0-9_/.][A-Za-z0-9_./:+-]*")
_STRUCTURED = frozenset({"Struct", "Value", "ListValue"})  # google.protobuf JSON values: no fields to walk


@dataclass
class _Map:
    entries: list[tuple[str, Any, str | None]] = field(default_factory=list)


@dataclass
class _Seq:
    items: list[tuple[Any, str | None]] = field(default_factory=list)


@dataclass(frozen=True)
class Style:
    """What to say besides the config: `notes` by `<MessageName>.<field>` or `<MessageName>:<name>`;
    `shown` lists, by message name, the fields written even at their default value, and
    `first` the keys to put first (declaration order otherwise)."""

    notes: Mapping[str, str]
    shown: Mapping[str, frozenset[str]]
    first: Mapping[str, tuple[str, ...]]  # by message name: keys written before the others


def render(message: betterproto2.Message, header: str, style: Style) -> str:
    tree = _annotate(message, message.to_dict(casing=betterproto2.Casing.SNAKE), style)
    out = [f"# {line}".rstrip() for line in header.strip("\n").splitlines()]
    _block_map(tree, 0, out, top=True)
    return "\n".join(out) + "\n"


# -- the walk: JSON next to the typed message -------------------------------------------------


def _fields(cls: type[betterproto2.Message]) -> list[tuple[str, str]]:
    """(python attribute, JSON key) in declaration order, as betterproto2's to_dict names them."""
    meta = getattr(cls, "_betterproto")  # noqa: B009 - betterproto2's class property, untyped
    return [(name, betterproto2.Casing.SNAKE(name).rstrip("_")) for name in meta.meta_by_field_name]


@cache
def _defaults(cls: type[betterproto2.Message]) -> dict[str, Any]:
    return cls().to_dict(casing=betterproto2.Casing.SNAKE, include_default_values=True)


def _annotate(message: Any, data: Any, style: Style) -> Any:
    if isinstance(data, dict) and isinstance(message, betterproto2.Message):
        name = type(message).__name__
        if isinstance(message, AnyMessage):
            inner = message.unpack()
            tree = _annotate(inner, {k: v for k, v in data.items() if k != "@type"}, style)
            tree.entries.insert(0, ("@type", data["@type"], None))
            return tree
        if name in _STRUCTURED:
            return _plain(data)
        shown = style.shown.get(name, frozenset())
        tree = _Map()
        for attr, key in _fields(type(message)):
            if key in data:
                value = _annotate(getattr(message, attr), data[key], style)
            elif attr in shown:
                value = _plain(_defaults(type(message))[key])
            else:
                continue
            tree.entries.append((key, value, style.notes.get(f"{name}.{key}")))
        rank = {key: i for i, key in enumerate(style.first.get(name, ()))}
        tree.entries.sort(key=lambda entry: rank.get(entry[0], len(rank)))
        return tree
    if isinstance(data, list) and isinstance(message, list):
        seq = _Seq()
        for m, d in zip(message, data, strict=True):
            item = _annotate(m, d, style)
            note = style.notes.get(f"{type(m).__name__}:{d['name']}") if isinstance(d, dict) and "name" in d else None
            seq.items.append((item, note))
        return seq
    if isinstance(data, dict) and isinstance(message, dict):  # a map field
        tree = _Map()
        for key, value in data.items():
            tree.entries.append((key, _annotate(message[key], value, style), None))
        return tree
    return _plain(data)


def _plain(data: Any) -> Any:
    if isinstance(data, dict):
        return _Map([(k, _plain(v), None) for k, v in data.items()])
    if isinstance(data, list):
        return _Seq([(_plain(v), None) for v in data])
    return data


# -- the writer -------------------------------------------------------------------------------


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return json.dumps(int(value))  # a Struct number: JSON has one number type
    if isinstance(value, int | float):
        return json.dumps(value)
    if value is None:
        return "null"
    text = str(value)
    if _PLAIN.fullmatch(text) and yaml.safe_load(text) == text:
        return text
    return json.dumps(text)


def _flow(node: Any) -> str | None:
    """The node on one line, or None when a comment inside it needs lines of its own."""
    if isinstance(node, _Map):
        parts = []
        for key, value, note in node.entries:
            inner = _flow(value)
            if note or inner is None:
                return None
            parts.append(f"{_scalar(key)}: {inner}")
        return "{" + ", ".join(parts) + "}"
    if isinstance(node, _Seq):
        parts = []
        for value, note in node.items:
            inner = _flow(value)
            if note or inner is None:
                return None
            parts.append(inner)
        return "[" + ", ".join(parts) + "]"
    return _scalar(node)


def _comment(note: str | None, indent: int, out: list[str]) -> None:
    if note:
        out.extend(f"{' ' * indent}# {line}".rstrip() for line in note.strip("\n").splitlines())


def _fits(prefix: str, node: Any) -> str | None:
    text = _flow(node)
    if text is None or len(prefix) + len(text) > WIDTH:
        return None
    if isinstance(node, _Map | _Seq) and _depth(node) > 3:
        return None
    return text


def _depth(node: Any) -> int:
    if isinstance(node, _Map):
        return 1 + max((_depth(v) for _, v, _ in node.entries), default=0)
    if isinstance(node, _Seq):
        return 1 + max((_depth(v) for v, _ in node.items), default=0)
    return 0


def _block_map(node: _Map, indent: int, out: list[str], *, top: bool = False) -> None:
    """Entries under each other; a blank line after a long entry near the top of the file."""
    multiline = False
    pad = " " * indent
    for i, (key, value, note) in enumerate(node.entries):
        start = len(out)
        if (top and i) or (indent <= 2 and i and multiline):
            out.append("")
        _comment(note, indent, out)
        _entry(f"{pad}{_scalar(key)}:", value, indent, out)
        multiline = len(out) - start > 1


def _entry(prefix: str, value: Any, indent: int, out: list[str]) -> None:
    """`prefix` is `key:` or `- key:`; the value goes after it or, for blocks, below it."""
    inline = _fits(prefix + " ", value)
    if inline is not None:
        out.append(f"{prefix} {inline}")
    elif isinstance(value, _Map):
        out.append(prefix)
        _block_map(value, indent + 2, out)
    elif isinstance(value, _Seq):
        out.append(prefix)
        _block_seq(value, indent, out)
    else:
        out.append(f"{prefix} {_scalar(value)}")


def _block_seq(node: _Seq, indent: int, out: list[str]) -> None:
    """Items at the key's own indentation, as in Envoy's examples; a blank line between the
    large ones (listeners, clusters) at the top of the file."""
    pad = " " * indent
    for i, (value, note) in enumerate(node.items):
        inline = _fits(pad + "- ", value)
        if i and indent <= 2 and inline is None:
            out.append("")
        _comment(note, indent, out)
        if inline is not None:
            out.append(f"{pad}- {inline}")
        elif isinstance(value, _Map) and value.entries:
            key, first, first_note = value.entries[0]
            _comment(first_note, indent + 2, out)
            _entry(f"{pad}- {_scalar(key)}:", first, indent + 2, out)
            _block_map(_Map(value.entries[1:]), indent + 2, out)
        elif isinstance(value, _Seq):
            out.append(f"{pad}-")
            _block_seq(value, indent + 2, out)
        else:
            out.append(f"{pad}- {_scalar(value)}")
