"""Malformed and hostile ext_proc streams, sent straight to a running extproc over gRPC: each
request is denied (an ImmediateResponse, never a crash or a hung stream), the server keeps
serving, and each kind of bad input is logged once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.protobuf import struct_pb2

from tests.fixtures.stack import ExtprocProcess

pytestmark = pytest.mark.e2e

ADDRESSES = {"source.address": "10.0.0.1:5000", "destination.address": "10.0.0.2:8080"}


@pytest.fixture(scope="module")
def extproc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExtprocProcess]:
    tmp: Path = tmp_path_factory.mktemp("hostile")
    (tmp / "p").mkdir()
    x = ExtprocProcess([tmp / "p"], tmp)
    x.wait_ready()
    yield x
    x.stop()


def headers_msg(headers: list[tuple[str, bytes]], attrs: dict[str, object] | None = None) -> ep.ProcessingRequest:
    req = ep.ProcessingRequest()
    for k, v in headers:
        req.request_headers.headers.headers.append(base_pb2.HeaderValue(key=k, raw_value=v))
    if attrs is not None:
        s = struct_pb2.Struct()
        s.update(attrs)
        req.attributes["envoy.filters.http.ext_proc"].CopyFrom(s)
    return req


BASE = [(":method", b"GET"), (":path", b"/x"), (":authority", b"h"), (":scheme", b"http")]


def run(x: ExtprocProcess, *msgs: ep.ProcessingRequest) -> list[ep.ProcessingResponse]:
    with grpc.insecure_channel(x.listen) as ch:
        stub = ep_grpc.ExternalProcessorStub(ch)
        return list(stub.Process(iter(msgs), timeout=10))


def test_a_well_formed_request_is_allowed(extproc: ExtprocProcess) -> None:
    (resp,) = run(extproc, headers_msg(BASE, ADDRESSES))
    assert resp.WhichOneof("response") == "request_headers"


@pytest.mark.parametrize(
    ("what", "msg"),
    [
        ("no addresses (request_attributes not configured)", headers_msg(BASE)),
        ("an address that is not an IP", headers_msg(BASE, {**ADDRESSES, "source.address": "evil:1"})),
        ("no method", headers_msg([(":path", b"/x")], ADDRESSES)),
        ("2,000 headers", headers_msg(BASE + [(f"x-h{i}", b"1") for i in range(2000)], ADDRESSES)),
        ("a 200 KB header", headers_msg(BASE + [("x-big", b"v" * 200_000)], ADDRESSES)),
        ("a certificate that is not one", headers_msg(BASE, {**ADDRESSES, "connection.peer_certificate": "junk"})),
    ],
)
def test_a_malformed_request_is_denied_with_a_local_reply(extproc: ExtprocProcess, what: str, msg) -> None:  # type: ignore[no-untyped-def]
    (resp,) = run(extproc, msg)
    assert resp.WhichOneof("response") == "immediate_response", what
    assert resp.immediate_response.status.code == 403
    assert resp.immediate_response.body == b"RBAC: access denied"


def test_messages_out_of_order_or_unexpected_do_not_break_the_server(extproc: ExtprocProcess) -> None:
    odd = ep.ProcessingRequest()
    odd.response_headers.headers.headers.append(base_pb2.HeaderValue(key=":status", raw_value=b"nope"))
    body = ep.ProcessingRequest()
    body.request_body.body = b"\xff" * 1000
    out = run(extproc, body, odd)
    assert [r.WhichOneof("response") for r in out] == ["request_body", "response_headers"]
    bad_utf8 = headers_msg(BASE + [("x-bin", b"\xff\xfe")], ADDRESSES)
    (resp,) = run(extproc, bad_utf8)
    assert resp.WhichOneof("response") in ("request_headers", "immediate_response")
    # Still serving, and the missing attributes were explained once.
    (resp,) = run(extproc, headers_msg(BASE, ADDRESSES))
    assert resp.WhichOneof("response") == "request_headers"
    extproc.proc.check_alive()
    log = extproc.proc.log()
    assert log.count("add them to the filter's request_attributes") == 1
    assert "Traceback" not in log
