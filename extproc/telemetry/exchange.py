"""Istio's HTTP metadata exchange, as header changes.

* outbound (client sidecar): add our `x-envoy-peer-metadata` and `-id` to the request;
* inbound (server sidecar): read the peer's pair, remove it before the application sees
  it, and echo ours in the response, but only to a peer that sent its own, as istio/proxy's
  peer_metadata filter does;
* outbound again, on the response: read and remove the server's pair.

What was read is handed to the access log path as dynamic metadata under the header
names, because Envoy logs the request after the headers are gone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from extproc.telemetry.peer import METADATA_HEADER, METADATA_ID_HEADER, Workload, encode


@dataclass(frozen=True)
class PeerExchange:
    local: Workload
    node_id: str  # our x-envoy-peer-metadata-id
    # Our pair, encoded once: every exchanging request sends the same two headers.
    headers: tuple[tuple[str, str], tuple[str, str]] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "headers", ((METADATA_HEADER, encode(self.local)), (METADATA_ID_HEADER, self.node_id)))


def received(headers: Mapping[str, str]) -> tuple[str, str] | None:
    """The peer's (metadata, id) pair in a header map, or None when it sent no metadata."""
    value = headers.get(METADATA_HEADER)
    if not value:
        return None
    return value, headers.get(METADATA_ID_HEADER, "")


__all__ = ["METADATA_HEADER", "METADATA_ID_HEADER", "PeerExchange", "received"]
