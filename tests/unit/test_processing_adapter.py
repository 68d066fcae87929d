"""ext_proc <-> ext_authz translation: the CheckRequest built from an ext_proc message, and the
CheckResponse turned back into header mutations or a local reply."""

from __future__ import annotations

from urllib.parse import unquote

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2
from hypothesis import given
from hypothesis import strategies as st

from extproc.services import processing_adapter as pa
from extproc.services.check_adapter import CheckAdapter

HEADERS = {
    ":method": "POST",
    ":path": "/api/items?x=1",
    ":authority": "httpbin.foo:8000",
    ":scheme": "https",
    "x-forwarded-for": "203.0.113.9",
    "content-type": "application/json",
}


def _attrs(**values: object) -> ep.ProcessingRequest:
    req = ep.ProcessingRequest()
    s = struct_pb2.Struct()
    s.update(values)
    req.attributes[pa.EXT_PROC_ATTRIBUTES].CopyFrom(s)
    return req


def test_attribute_strings_reads_strings_numbers_and_bools() -> None:
    req = _attrs(**{"source.address": "10.0.0.1:5000", "source.port": 5000, "connection.mtls": True})
    assert pa.attribute_strings(req) == {
        "source.address": "10.0.0.1:5000",
        "source.port": "5000",
        "connection.mtls": "true",
    }
    assert pa.attribute_strings(ep.ProcessingRequest()) == {}


def test_the_check_request_gives_the_same_attributes_as_ext_authz_would(pki_pem: str) -> None:
    attrs = {
        "source.address": "10.1.2.3:40000",
        "destination.address": "[2001:db8::1]:8443",
        "connection.peer_certificate": pki_pem,
        "connection.requested_server_name": "httpbin.foo.svc.cluster.local",
        "request.protocol": "HTTP/2",
        "request.id": "rid-1",
    }
    req = pa.check_request(HEADERS, attrs)
    got = CheckAdapter().attributes(req)
    assert str(got.source_ip) == "10.1.2.3" and got.source_port == 40000
    assert str(got.destination_ip) == "2001:db8::1" and got.destination_port == 8443
    assert str(got.remote_ip) == "203.0.113.9"  # x-forwarded-for, as the HCM derives it
    assert got.source_principals[0] == "spiffe://cluster.local/ns/foo/sa/sleep"
    assert got.sni == "httpbin.foo.svc.cluster.local"
    assert got.http is not None
    assert (got.http.method, got.http.path, got.http.host, got.http.scheme) == (
        "POST",
        "/api/items?x=1",
        "httpbin.foo:8000",
        "https",
    )
    assert got.http.headers["content-type"] == "application/json"
    assert (got.http.protocol, got.http.id) == ("HTTP/2", "rid-1")
    # ext_authz sends the certificate URL-encoded; so do we.
    assert unquote(req.attributes.source.certificate) == pki_pem


def test_the_peer_recorded_in_filter_state_is_the_source_not_the_forwarded_client() -> None:
    # An HCM that trusts x-forwarded-for makes source.address the header's last entry.
    attrs = {
        "source.address": "203.0.113.9:0",
        pa.PEER_ADDRESS_ATTRIBUTE: "10.1.2.3:40000",
        "destination.address": "10.1.2.4:80",
    }
    got = CheckAdapter().attributes(pa.check_request(HEADERS, attrs))
    assert (str(got.source_ip), got.source_port) == ("10.1.2.3", 40000)  # ipBlocks: the peer
    assert str(got.remote_ip) == "203.0.113.9"  # remoteIpBlocks: from x-forwarded-for


def test_without_a_certificate_the_first_uri_san_is_the_principal() -> None:
    attrs = {
        "source.address": "10.1.2.3:1",
        "destination.address": "10.1.2.4:2",
        "connection.uri_san_peer_certificate": "spiffe://cluster.local/ns/a/sa/b",
    }
    got = CheckAdapter().attributes(pa.check_request(HEADERS, attrs))
    assert got.source_principals == ("spiffe://cluster.local/ns/a/sa/b",)


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {pa.PEER_ADDRESS_ATTRIBUTE: "10.9.9.9:1234", "source.address": "203.0.113.9:0"},
        {"connection.uri_san_peer_certificate": "spiffe://cluster.local/ns/a/sa/b"},
        {"connection.requested_server_name": "sni.example", "request.protocol": "HTTP/2", "request.id": "7"},
        {"destination.address": "[2001:db8::1]:8443"},
    ],
)
def test_ext_proc_builds_the_attributes_ext_authz_builds_for_the_same_request(extra: dict[str, str]) -> None:
    attrs = {"source.address": "10.1.2.3:40000", "destination.address": "10.1.2.4:80", **extra}
    msg = ep.ProcessingRequest()
    msg.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"].update({"payload": {"sub": "alice"}})
    adapter = CheckAdapter(xff_num_trusted_hops=0)
    direct = pa.attributes(adapter, dict(HEADERS), attrs, msg)
    via_ext_authz = adapter.attributes(pa.check_request(HEADERS, attrs, msg))
    assert direct == via_ext_authz
    assert direct.jwt_payload == {"sub": "alice"}


def test_ext_proc_attributes_with_a_certificate_match_ext_authz(pki_pem: str) -> None:
    attrs = {
        "source.address": "10.1.2.3:40000",
        "destination.address": "10.1.2.4:80",
        "connection.peer_certificate": pki_pem,
    }
    adapter = CheckAdapter()
    assert pa.attributes(adapter, dict(HEADERS), attrs) == adapter.attributes(pa.check_request(HEADERS, attrs))


@pytest.mark.parametrize("address", ["", "10.0.0.1", "10.0.0.1:x", "[::1]8080", "[::1", ":80", "host:80"])
def test_an_unusable_address_makes_the_request_malformed_in_both_modes(address: str) -> None:
    from extproc.services.headers import MalformedRequest

    attrs = {"source.address": address, "destination.address": "10.0.0.2:80"}
    adapter = CheckAdapter()
    with pytest.raises(MalformedRequest) as direct:
        pa.attributes(adapter, dict(HEADERS), attrs)
    with pytest.raises(MalformedRequest) as via_ext_authz:
        adapter.attributes(pa.check_request(HEADERS, attrs))
    assert direct.value.kind == via_ext_authz.value.kind


@pytest.mark.parametrize("address", ["", "10.0.0.1", "10.0.0.1:x", "[::1]8080", "[::1", ":80"])
def test_a_missing_or_malformed_address_leaves_the_check_request_without_one(address: str) -> None:
    req = pa.check_request(HEADERS, {"source.address": address, "destination.address": "10.0.0.2:80"})
    assert not req.attributes.source.address.HasField("socket_address")


def test_forwarded_metadata_reaches_the_check_request() -> None:
    msg = ep.ProcessingRequest()
    msg.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"].update({"payload": {"sub": "alice"}})
    req = pa.check_request(HEADERS, {}, msg)
    assert req.attributes.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"]["payload"]["sub"] == "alice"


@pytest.mark.parametrize(
    ("path", "remove", "overwrite", "want"),
    [
        ("/get?access_token=X", {"access_token"}, [], b"/get"),
        ("/get?z=1&access_token=X&a=2&a=1&m", {"access_token"}, [], b"/get?a=2&a=1&m=&z=1"),
        ("/get?access%5Ftoken=X&q=1", {"access%5Ftoken"}, [], b"/get?q=1"),  # names match as spelt
        ("/get?access%5Ftoken=X&q=1", {"access_token"}, [], b"/get?access%5Ftoken=X&q=1"),
        ("/get?&&t=X&a=1", {"t"}, [], b"/get?=&=&a=1"),
        ("/get?a=%20b&t=1", {"t"}, [], b"/get?a=%20b"),  # values are not re-encoded
        ("/get", {"t"}, [("k", "v")], b"/get?k=v"),
        ("/get?k=old&k=older", set(), [("k", "new")], b"/get?k=new"),
    ],
)
def test_query_rewrites_follow_envoys_ext_authz(
    path: str, remove: set[str], overwrite: list[tuple[str, str]], want: bytes
) -> None:
    assert pa.rewrite_query(path, remove, overwrite) == want


@given(st.text(alphabet="abc=&%?/", max_size=40))
def test_query_rewrite_never_raises_and_keeps_the_path(path: str) -> None:
    out = pa.rewrite_query("/p" + path, {"a"}, [])
    base, _, query = out.partition(b"?")
    assert base == ("/p" + path).partition("?")[0].encode()
    assert b"a" not in [p.partition(b"=")[0] for p in query.split(b"&")]


def _parts(*parts: bytes) -> ep.ProcessingResponse:
    """What Envoy reads from a reply sent as concatenated parts."""
    return ep.ProcessingResponse.FromString(b"".join(parts))


OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
APPEND = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD


def test_an_allowed_verdict_becomes_header_mutations_in_pipeline_order() -> None:
    from extproc.services import processor_render as render
    from extproc.telemetry.exchange import PeerExchange
    from extproc.telemetry.peer import Workload
    from extproc.verdict import Append, HeaderOp, Stage, Verdict

    v = Verdict(
        allowed=True,
        stage=Stage.ALLOW,
        headers=(HeaderOp("x-jwt-sub", "alice"), HeaderOp("x-multi", "a", Append.APPEND_IF_EXISTS_OR_ADD)),
        remove_headers=("authorization",),
        remove_query=("access_token",),
        metadata={"enforced_engine_result": "allowed", "extproc_snapshot": 3},
    )
    parts = render.ExchangeParts(PeerExchange(Workload(workload_name="w", namespace="ns"), "node-1"))
    resp = _parts(
        render.encoded_request_reply(v),
        parts.inbound_request,
        render.trace_part((("traceparent", "00-ab-cd-01"),), ("x-b3-flags",)),
        render.path_part(v, "/x?access_token=t&b=2"),
    )
    mut = resp.request_headers.response.header_mutation
    assert [(h.header.key, h.header.raw_value, h.append_action) for h in mut.set_headers] == [
        ("x-jwt-sub", b"alice", OVERWRITE),
        ("x-multi", b"a", APPEND),
        ("traceparent", b"00-ab-cd-01", OVERWRITE),
        (":path", b"/x?b=2", OVERWRITE),
    ]
    assert list(mut.remove_headers) == [
        "authorization",
        "x-envoy-peer-metadata",
        "x-envoy-peer-metadata-id",
        "x-b3-flags",
    ]
    # The decision metadata lives under our namespace, in one part only.
    assert resp.dynamic_metadata["extproc"]["enforced_engine_result"] == "allowed"
    assert resp.dynamic_metadata["extproc"]["extproc_snapshot"] == 3
    # Encoded once per verdict.
    assert render.encoded_request_reply(v) is render.encoded_request_reply(v)


def test_a_denial_becomes_the_local_reply_the_native_filter_sends() -> None:
    from extproc.decision.decide import error
    from extproc.services import processor_render as render
    from extproc.telemetry.exchange import PeerExchange
    from extproc.telemetry.peer import Workload
    from extproc.verdict import HeaderOp, Stage, Verdict

    v = Verdict(
        allowed=False,
        stage=Stage.JWT,
        status=401,
        body="Jwt is expired",
        response_headers=(HeaderOp("www-authenticate", 'Bearer realm="http://h/"'),),
        details="jwt_authn_access_denied{Jwt_is_expired}",
        metadata={"extproc_stage": "jwt"},
    )
    parts = render.ExchangeParts(PeerExchange(Workload(workload_name="w", namespace="ns"), "node-1"))
    imm = _parts(render.encoded_request_reply(v), parts.denied).immediate_response
    assert imm.status.code == 401 and imm.body == b"Jwt is expired"
    assert imm.details == "jwt_authn_access_denied{Jwt_is_expired}"
    assert [h.header.key for h in imm.headers.set_headers] == [
        "www-authenticate",
        "x-envoy-peer-metadata",
        "x-envoy-peer-metadata-id",
    ]
    assert imm.headers.set_headers[0].header.raw_value == b'Bearer realm="http://h/"'
    # A denial without a status of its own is a 403, with RBAC's body.
    plain = _parts(render.encoded_request_reply(error("internal error", http=True))).immediate_response
    assert plain.status.code == 403 and plain.body == b"RBAC: access denied"


@pytest.fixture(scope="module")
def pki_pem(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.fixtures.pki import TestCA

    ca = TestCA(tmp_path_factory.mktemp("pki"))
    return ca.workload("foo", "sleep").cert_path.read_text()
