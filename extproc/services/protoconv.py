"""Small, fast conversions between protobuf well-known types and Python values."""

from __future__ import annotations

from typing import Any

from google.protobuf import struct_pb2


def value_to_python(v: struct_pb2.Value) -> Any:
    kind = v.WhichOneof("kind")
    if kind == "string_value":
        return v.string_value
    if kind == "struct_value":
        return struct_to_dict(v.struct_value)
    if kind == "list_value":
        return [value_to_python(x) for x in v.list_value.values]
    if kind == "number_value":
        return v.number_value
    if kind == "bool_value":
        return v.bool_value
    return None


def struct_to_dict(s: struct_pb2.Struct) -> dict[str, Any]:
    return {k: value_to_python(v) for k, v in s.fields.items()}
