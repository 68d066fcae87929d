"""Workload identity and Istio's HTTP metadata exchange codec.

Two sidecars tell each other who they are in the headers `x-envoy-peer-metadata`
(base64 of a deterministically serialized `google.protobuf.Struct`) and
`x-envoy-peer-metadata-id` (the sender's node id). The Struct uses the keys of istio/proxy's
`convertWorkloadMetadataToStruct`: top-level NAME, NAMESPACE, WORKLOAD_NAME, CLUSTER_ID,
IDENTITY, OWNER, and LABELS holding the canonical service/revision, app and version.

Decoding is lenient where Istio is (unpadded base64, unknown keys ignored, the Wasm-era
keys accepted) and strict where it must be: a value that is not base64 of a Struct gives
no peer rather than an error, so a hostile header can only make labels `unknown`.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass

from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError

from extproc.lru import CacheCounters, LruCache

METADATA_HEADER = "x-envoy-peer-metadata"
METADATA_ID_HEADER = "x-envoy-peer-metadata-id"

CANONICAL_NAME_LABEL = "service.istio.io/canonical-name"
CANONICAL_REVISION_LABEL = "service.istio.io/canonical-revision"
APP_LABEL = "app"
APP_QUALIFIED_LABEL = "app.kubernetes.io/name"
VERSION_LABEL = "version"
VERSION_QUALIFIED_LABEL = "app.kubernetes.io/version"

MAX_HEADER_BYTES = 8192  # a larger value is not a sidecar's metadata; ignore it unparsed


@dataclass(frozen=True, slots=True)
class Workload:
    """What one side of a request says about itself. Empty string = not known."""

    workload_name: str = ""
    namespace: str = ""
    canonical_service: str = ""
    canonical_revision: str = ""
    app: str = ""
    version: str = ""
    cluster: str = ""
    identity: str = ""  # SPIFFE id, when the sender knows it
    instance: str = ""  # pod name (NAME)
    owner: str = ""

    @staticmethod
    def from_labels(
        labels: Mapping[str, str],
        *,
        workload_name: str = "",
        namespace: str = "",
        cluster: str = "",
        identity: str = "",
        instance: str = "",
        owner: str = "",
    ) -> Workload:
        """The local workload, from its pod labels the way Istio's injector derives them.

        Canonical service: the `service.istio.io/canonical-name` label, else
        `app.kubernetes.io/name`, else `app`, else the workload name. Canonical revision:
        `service.istio.io/canonical-revision`, else `app.kubernetes.io/version`, else
        `version`, else `latest`. The app and version labels are the plain `app` and
        `version`, which is what Istio's stats filter reads from its own node metadata.
        """
        app = labels.get(APP_LABEL, "")
        version = labels.get(VERSION_LABEL, "")
        return Workload(
            workload_name=workload_name,
            namespace=namespace,
            canonical_service=labels.get(CANONICAL_NAME_LABEL)
            or labels.get(APP_QUALIFIED_LABEL)
            or app
            or workload_name,
            canonical_revision=labels.get(CANONICAL_REVISION_LABEL)
            or labels.get(VERSION_QUALIFIED_LABEL)
            or version
            or "latest",
            app=app,
            version=version,
            cluster=cluster,
            identity=identity,
            instance=instance,
            owner=owner,
        )

    def to_struct(self) -> struct_pb2.Struct:
        s = struct_pb2.Struct()
        for key, value in (
            ("NAME", self.instance),
            ("NAMESPACE", self.namespace),
            ("WORKLOAD_NAME", self.workload_name),
            ("CLUSTER_ID", self.cluster),
            ("IDENTITY", self.identity),
            ("OWNER", self.owner),
        ):
            if value:
                s.fields[key].string_value = value
        labels = s.fields["LABELS"].struct_value
        for key, value in (
            (CANONICAL_NAME_LABEL, self.canonical_service),
            (CANONICAL_REVISION_LABEL, self.canonical_revision),
            (APP_LABEL, self.app),
            (VERSION_LABEL, self.version),
        ):
            if value:
                labels.fields[key].string_value = value
        return s

    @staticmethod
    def from_struct(s: struct_pb2.Struct) -> Workload:
        def text(struct: struct_pb2.Struct, key: str) -> str:
            v = struct.fields.get(key)
            return v.string_value if v is not None and v.WhichOneof("kind") == "string_value" else ""

        labels = s.fields.get("LABELS")
        lbl = labels.struct_value if labels is not None and labels.WhichOneof("kind") == "struct_value" else None
        empty = struct_pb2.Struct()
        lbl = lbl if lbl is not None else empty
        return Workload(
            workload_name=text(s, "WORKLOAD_NAME"),
            namespace=text(s, "NAMESPACE"),
            canonical_service=text(lbl, CANONICAL_NAME_LABEL),
            canonical_revision=text(lbl, CANONICAL_REVISION_LABEL),
            app=text(lbl, APP_QUALIFIED_LABEL) or text(lbl, APP_LABEL),
            version=text(lbl, VERSION_QUALIFIED_LABEL) or text(lbl, VERSION_LABEL),
            cluster=text(s, "CLUSTER_ID"),
            identity=text(s, "IDENTITY"),
            instance=text(s, "NAME"),
            owner=text(s, "OWNER"),
        )


def encode(workload: Workload) -> str:
    """The `x-envoy-peer-metadata` value for a workload (padded base64, as Envoy writes it)."""
    return base64.b64encode(workload.to_struct().SerializeToString(deterministic=True)).decode("ascii")


def decode(value: str) -> Workload | None:
    """The workload in an `x-envoy-peer-metadata` value, or None if it is not one."""
    if not value or len(value) > MAX_HEADER_BYTES:
        return None
    text = value.strip().rstrip("=")
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    s = struct_pb2.Struct()
    try:
        s.ParseFromString(raw)
    except (DecodeError, RuntimeError):
        return None
    return Workload.from_struct(s)


class PeerCache:
    """Decoded peers by header value, bounded (LRU).

    A sidecar sends the same value on every request, so decoding once per distinct
    value makes the exchange nearly free. Invalid values are cached as None too: a
    client repeating a bad header costs one decode.
    """

    def __init__(self, size: int = 1024) -> None:
        self.counters = CacheCounters("peer_metadata")
        self._entries: LruCache[str, Workload | None] = LruCache(size, self.counters)

    def get(self, value: str) -> Workload | None:
        return self._entries.get_or_make(value, decode)

    def __len__(self) -> int:
        return len(self._entries)
