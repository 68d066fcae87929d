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
from dataclasses import dataclass

from extproc.telemetry import peer as P


@dataclass(frozen=True)
class PeerExchange:
    local: P.Workload
    node_id: str  # our x-envoy-peer-metadata-id

    @property
    def header_value(self) -> str:
        return _encoded(self.local)

    def own_headers(self) -> tuple[tuple[str, str], tuple[str, str]]:
        return ((P.METADATA_HEADER, self.header_value), (P.METADATA_ID_HEADER, self.node_id))


def received(headers: Mapping[str, str]) -> tuple[str, str] | None:
    """The peer's (metadata, id) pair in a header map, or None when it sent no metadata."""
    value = headers.get(P.METADATA_HEADER)
    if not value:
        return None
    return value, headers.get(P.METADATA_ID_HEADER, "")


_CACHE: dict[P.Workload, str] = {}


def _encoded(w: P.Workload) -> str:
    v = _CACHE.get(w)
    if v is None:
        v = _CACHE[w] = P.encode(w)
    return v


METADATA_HEADER = P.METADATA_HEADER
METADATA_ID_HEADER = P.METADATA_ID_HEADER
