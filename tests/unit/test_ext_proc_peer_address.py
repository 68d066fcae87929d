"""An ext_proc request without the physical peer's address (`filter_state["extproc.peer_address"]`).

ext_proc's `source.address` is the client x-forwarded-for names whenever the HCM trusts the
header, so without the peer any client could choose its `ipBlocks` / `source.ip`. Such a
request is denied as malformed while a policy reads them, decided with `source.address`
otherwise, and counted either way; the log says once what to add.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2

from extproc.services import processing_adapter as pa
from extproc.services.enforcer import Enforcer
from extproc.services.processor import ExternalProcessorService
from extproc.telemetry.peer import Workload
from extproc.telemetry.recorder import Telemetry
from tests.unit.helpers import snapshot_from_yaml


def policy(rule: str, action: str = "ALLOW", name: str = "p") -> str:
    return f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: foo}}
spec:
  action: {action}
  rules:
  - {rule}
"""


# The client 10.0.0.1 claims to be 203.0.113.7; an HCM trusting x-forwarded-for makes that
# ext_proc's source.address (port 0).
FORWARDED = {"source.address": "203.0.113.7:0", "destination.address": "10.0.0.2:8000"}
PEER = {**FORWARDED, pa.PEER_ADDRESS_ATTRIBUTE: "10.0.0.1:40000"}


def message(attrs: dict[str, str]) -> ep.ProcessingRequest:
    msg = ep.ProcessingRequest()
    for k, v in (
        (":method", "GET"),
        (":path", "/"),
        (":authority", "httpbin.foo"),
        ("x-forwarded-for", "203.0.113.7"),
    ):
        msg.request_headers.headers.headers.append(base_pb2.HeaderValue(key=k, raw_value=v.encode()))
    s = struct_pb2.Struct()
    s.update(attrs)
    msg.attributes[pa.EXT_PROC_ATTRIBUTES].CopyFrom(s)
    return msg


def processor(tmp_path: Path, text: str) -> ExternalProcessorService:
    snap = snapshot_from_yaml(tmp_path, text)
    t = Telemetry.create(Workload(workload_name="httpbin", namespace="foo"))
    return ExternalProcessorService(t.recorder, t.peers, None, enforcer=Enforcer(), snapshot=lambda: snap)


def status(svc: ExternalProcessorService, attrs: dict[str, str]) -> int:
    """200 when the request may go on, else the local reply's status."""

    async def run() -> bytes:
        async def one():  # type: ignore[no-untyped-def]
            yield message(attrs)

        out = [r async for r in svc.Process(one(), None)]  # type: ignore[arg-type]
        return out[0]

    reply = ep.ProcessingResponse.FromString(asyncio.run(run()))
    return reply.immediate_response.status.code if reply.HasField("immediate_response") else 200


def counts(svc: ExternalProcessorService) -> tuple[int, int]:
    assert svc.enforcer is not None
    s = svc.enforcer.stats
    return s.misconfigured.get(pa.MISSING_PEER_ADDRESS, 0), s.malformed.get(pa.MISSING_PEER_ADDRESS, 0)


@pytest.mark.parametrize(
    "text",
    [
        policy("from: [{source: {ipBlocks: ['203.0.113.7']}}]"),
        policy("when: [{key: source.ip, values: ['203.0.113.0/24']}]"),
        policy("from: [{source: {notIpBlocks: ['203.0.113.0/24']}}]", action="DENY") + "---" + policy("{}", name="all"),
    ],
    ids=["ipBlocks", "source.ip", "DENY notIpBlocks"],
)
def test_without_the_peer_a_policy_on_the_peer_fails_closed(tmp_path: Path, text: str) -> None:
    svc = processor(tmp_path, text)
    # With the peer recorded, the policy sees 10.0.0.1, never the forwarded claim.
    assert status(svc, PEER) == 403
    # Had the forwarded address been taken for the peer, the claim would have been let in.
    assert status(svc, {**FORWARDED, pa.PEER_ADDRESS_ATTRIBUTE: FORWARDED["source.address"]}) == 200
    assert counts(svc) == (0, 0)
    # Without the peer, it is not taken: the request is denied as malformed.
    assert status(svc, FORWARDED) == 403
    assert counts(svc) == (1, 1)


def test_without_the_peer_other_policies_are_decided_and_counted(tmp_path: Path) -> None:
    svc = processor(tmp_path, policy("from: [{source: {remoteIpBlocks: ['203.0.113.7']}}]"))
    assert status(svc, FORWARDED) == 200  # remote.ip comes from x-forwarded-for either way
    assert status(svc, FORWARDED) == 200
    assert counts(svc) == (2, 0)
    assert status(svc, PEER) == 200
    assert counts(svc) == (2, 0)


def test_the_missing_setting_is_logged_once_with_what_to_add(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    svc = processor(tmp_path, policy("from: [{source: {ipBlocks: ['10.0.0.1']}}]"))
    with caplog.at_level(logging.WARNING, logger="extproc.processor"):
        for _ in range(3):
            status(svc, FORWARDED)
    said = [r.getMessage() for r in caplog.records if "set_filter_state" in r.getMessage()]
    assert len(said) == 1  # (the malformed denial is logged once too, as every kind is)
    for needed in ("set_filter_state", "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS%", "request_attributes", "ipBlocks"):
        assert needed in said[0]
