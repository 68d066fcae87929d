"""The hand-written wire encoding of trace headers parses into the message protobuf would build."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from hypothesis import given
from hypothesis import strategies as st

from extproc.services import authz_render, processor_render, wire

OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-0123456789", min_size=1, max_size=200)
values = st.text(max_size=300)  # any text, lengths past one varint byte included
pairs = st.lists(st.tuples(names, values), max_size=6).map(tuple)
removes = st.lists(names, max_size=4).map(tuple)


@given(st.integers(min_value=0, max_value=2**31 - 1))
def test_varint_is_protobufs(n: int) -> None:
    m = external_auth_pb2.CheckResponse()
    m.status.code = n
    assert m.SerializeToString().endswith(wire.varint(n))


@given(st.integers(min_value=0, max_value=5000))
def test_a_length_delimited_field_parses(n: int) -> None:
    status = wire.tag_of(external_auth_pb2.CheckResponse, "status")
    message = wire.tag_of(type(external_auth_pb2.CheckResponse().status), "message")
    parsed = external_auth_pb2.CheckResponse.FromString(wire.field(status, wire.field(message, b"x" * n)))
    assert parsed.status.message == "x" * n


@given(pairs, removes, st.booleans())
def test_ext_authz_trace_part_is_what_protobuf_builds(headers, remove, allowed) -> None:  # type: ignore[no-untyped-def]
    encoded = authz_render.trace_part(headers, remove, allowed, None)
    # The same shape again comes from the cached template, with other values of the same lengths.
    again = tuple((k, "z" * len(v.encode())) for k, v in headers)
    assert external_auth_pb2.CheckResponse.FromString(authz_render.trace_part(again, remove, allowed, None)) == (
        _authz(again, remove, allowed)
    )
    assert external_auth_pb2.CheckResponse.FromString(encoded) == _authz(headers, remove, allowed)


def _authz(headers, remove, allowed) -> external_auth_pb2.CheckResponse:  # type: ignore[no-untyped-def]
    want = external_auth_pb2.CheckResponse()
    if allowed and (headers or remove):
        ok = want.ok_response
        for k, v in headers:
            ok.headers.add(header=base_pb2.HeaderValue(key=k, value=v), append_action=OVERWRITE)
        ok.headers_to_remove.extend(remove)
    return want


@given(pairs, removes)
def test_ext_proc_trace_part_is_what_protobuf_builds(headers, remove) -> None:  # type: ignore[no-untyped-def]
    got = ep.ProcessingResponse.FromString(processor_render.trace_part(headers, remove))
    want = ep.ProcessingResponse()
    mut = want.request_headers.response.header_mutation
    mut.SetInParent()
    for k, v in headers:
        mut.set_headers.add(header=base_pb2.HeaderValue(key=k, raw_value=v.encode()), append_action=OVERWRITE)
    mut.remove_headers.extend(remove)
    assert got == want


def test_trace_metadata_rides_along_for_sampled_spans() -> None:
    got = external_auth_pb2.CheckResponse.FromString(
        authz_render.trace_part((("traceparent", "00-a-b-01"),), (), True, {"extproc_trace": "ids"})
    )
    assert got.dynamic_metadata["extproc_trace"] == "ids"
    assert got.ok_response.headers[0].header.value == "00-a-b-01"
