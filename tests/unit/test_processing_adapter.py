"""ext_proc <-> ext_authz translation: the CheckRequest built from an ext_proc message, and the
CheckResponse turned back into header mutations or a local reply."""

from __future__ import annotations

from urllib.parse import unquote

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2, wrappers_pb2
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


def _header(name: str, value: str, action: int = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD):
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=name, value=value), append_action=action)


def test_an_ok_response_becomes_header_mutations() -> None:
    ok = external_auth_pb2.OkHttpResponse()
    ok.headers.append(_header("x-jwt-sub", "alice"))
    ok.headers.append(_header("x-multi", "a", base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD))
    legacy = base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key="x-legacy", value="1"))
    legacy.append.CopyFrom(wrappers_pb2.BoolValue(value=True))
    ok.headers.append(legacy)
    ok.headers_to_remove.append("authorization")
    ok.query_parameters_to_remove.append("access_token")
    resp = pa.request_mutation(
        ok, "/x?access_token=t&b=2", extra=(("traceparent", "00-ab-cd-01"),), remove=("x-b3-flags",)
    )
    mut = resp.response.header_mutation
    got = {h.header.key: (h.header.raw_value, h.append_action) for h in mut.set_headers}
    overwrite = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    assert got == {
        "x-jwt-sub": (b"alice", overwrite),
        "x-multi": (b"a", base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD),
        "x-legacy": (b"1", base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD),
        "traceparent": (b"00-ab-cd-01", overwrite),
        ":path": (b"/x?b=2", overwrite),
    }
    assert list(mut.remove_headers) == ["authorization", "x-b3-flags"]


def test_a_denial_becomes_the_same_local_reply() -> None:
    resp = external_auth_pb2.CheckResponse()
    resp.denied_response.status.code = 401
    resp.denied_response.body = "Jwt is expired"
    resp.denied_response.headers.append(_header("www-authenticate", 'Bearer realm="http://h/"'))
    imm = pa.immediate_response(resp, "jwt_authn_access_denied{Jwt_is_expired}")
    assert imm.status.code == 401 and imm.body == b"Jwt is expired"
    assert imm.details == "jwt_authn_access_denied{Jwt_is_expired}"
    (h,) = imm.headers.set_headers
    assert (h.header.key, h.header.raw_value) == ("www-authenticate", b'Bearer realm="http://h/"')
    # No denied_response at all (a TCP-style denial): still a 403.
    assert pa.immediate_response(external_auth_pb2.CheckResponse(), "x").status.code == 403


def test_decision_metadata_is_namespaced_for_ext_proc() -> None:
    md = struct_pb2.Struct()
    md.update({"enforced_engine_result": "denied"})
    out = pa.namespaced(md)
    assert out["extproc"]["enforced_engine_result"] == "denied"
    assert not pa.namespaced(struct_pb2.Struct()).fields


@pytest.fixture(scope="module")
def pki_pem(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.fixtures.pki import TestCA

    ca = TestCA(tmp_path_factory.mktemp("pki"))
    return ca.workload("foo", "sleep").cert_path.read_text()
