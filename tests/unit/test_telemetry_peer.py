"""The metadata-exchange codec (`x-envoy-peer-metadata`), the decoded-peer cache, and the
canonical service/revision rules of `Workload.from_labels`."""

from __future__ import annotations

import base64
import os

import pytest
from google.protobuf import struct_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.telemetry import peer as P
from extproc.telemetry.peer import PeerCache, Workload, decode, encode

# At most 100 characters per field keeps even a 4-bytes-per-character workload under
# MAX_HEADER_BYTES once base64-encoded (10 fields x 400 bytes x 4/3).
field_text = st.text(max_size=100)
workloads = st.builds(
    Workload,
    workload_name=field_text,
    namespace=field_text,
    canonical_service=field_text,
    canonical_revision=field_text,
    app=field_text,
    version=field_text,
    cluster=field_text,
    identity=field_text,
    instance=field_text,
    owner=field_text,
)

PRODUCTPAGE = Workload(
    workload_name="productpage-v1",
    namespace="bookinfo",
    canonical_service="productpage",
    canonical_revision="v1",
    app="productpage",
    version="v1",
    cluster="Kubernetes",
    identity="spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage",
    instance="productpage-v1-7d9c5b6f8-x2x7q",
    owner="kubernetes://apis/apps/v1/namespaces/bookinfo/deployments/productpage-v1",
)


def b64(s: struct_pb2.Struct, *, padded: bool = True) -> str:
    text = base64.b64encode(s.SerializeToString(deterministic=True)).decode("ascii")
    return text if padded else text.rstrip("=")


# --- round trip and determinism ---------------------------------------------------------------


@settings(max_examples=300)
@given(workloads)
def test_round_trip(w: Workload) -> None:
    value = encode(w)
    assert decode(value) == w
    assert decode(value.rstrip("=")) == w  # Envoy decodes without padding


@given(workloads)
def test_encoding_is_deterministic(w: Workload) -> None:
    # An equal workload built separately gives the same bytes, every time.
    twin = Workload(**{f: getattr(w, f) for f in Workload.__slots__})
    assert encode(w) == encode(w) == encode(twin)


def test_encoding_sorts_map_keys_like_envoy() -> None:
    """Envoy writes `serializeToStringDeterministic`: map entries sorted by key, whatever
    the insertion order. A Struct filled in reverse order must give our bytes."""
    s = struct_pb2.Struct()
    labels = s.fields["LABELS"].struct_value
    for key, value in (
        (P.VERSION_LABEL, "v1"),
        (P.APP_LABEL, "productpage"),
        (P.CANONICAL_REVISION_LABEL, "v1"),
        (P.CANONICAL_NAME_LABEL, "productpage"),
    ):
        labels.fields[key].string_value = value
    for key, value in (
        ("OWNER", PRODUCTPAGE.owner),
        ("IDENTITY", PRODUCTPAGE.identity),
        ("CLUSTER_ID", "Kubernetes"),
        ("WORKLOAD_NAME", "productpage-v1"),
        ("NAMESPACE", "bookinfo"),
        ("NAME", PRODUCTPAGE.instance),
    ):
        s.fields[key].string_value = value
    assert encode(PRODUCTPAGE) == b64(s)


def test_empty_workload_round_trips() -> None:
    assert decode(encode(Workload())) == Workload()


def test_encoded_struct_uses_istio_keys() -> None:
    s = struct_pb2.Struct()
    s.ParseFromString(base64.b64decode(encode(PRODUCTPAGE)))
    assert set(s.fields) == {"NAME", "NAMESPACE", "WORKLOAD_NAME", "CLUSTER_ID", "IDENTITY", "OWNER", "LABELS"}
    labels = s.fields["LABELS"].struct_value.fields
    assert {k: v.string_value for k, v in labels.items()} == {
        "service.istio.io/canonical-name": "productpage",
        "service.istio.io/canonical-revision": "v1",
        "app": "productpage",
        "version": "v1",
    }
    # Empty fields are left out rather than written as "".
    s.ParseFromString(base64.b64decode(encode(Workload(workload_name="w"))))
    assert set(s.fields) == {"WORKLOAD_NAME", "LABELS"}
    assert not s.fields["LABELS"].struct_value.fields


# --- decoding what other senders write ---------------------------------------------------------


def wasm_era_struct() -> struct_pb2.Struct:
    """What a pre-2023 (Wasm-era) sidecar sent: node metadata keys of node_info.fbs."""
    s = struct_pb2.Struct()
    s.update(
        {
            "NAME": "reviews-v2-5b667bcbf8-abcde",
            "NAMESPACE": "bookinfo",
            "OWNER": "kubernetes://apis/apps/v1/namespaces/bookinfo/deployments/reviews-v2",
            "WORKLOAD_NAME": "reviews-v2",
            "ISTIO_VERSION": "1.16.2",
            "MESH_ID": "cluster.local",
            "CLUSTER_ID": "Kubernetes",
            "LABELS": {
                "app": "reviews",
                "version": "v2",
                "pod-template-hash": "5b667bcbf8",
                "security.istio.io/tlsMode": "istio",
                "service.istio.io/canonical-name": "reviews",
                "service.istio.io/canonical-revision": "v2",
            },
            "PLATFORM_METADATA": {"gcp_project": "p", "gcp_location": "us-central1"},
            "APP_CONTAINERS": "reviews,sidecar",
            "INSTANCE_IPS": "10.0.0.12,fe80::1",
        }
    )
    return s


def test_decode_wasm_era_keys_ignored() -> None:
    assert decode(b64(wasm_era_struct())) == Workload(
        workload_name="reviews-v2",
        namespace="bookinfo",
        canonical_service="reviews",
        canonical_revision="v2",
        app="reviews",
        version="v2",
        cluster="Kubernetes",
        identity="",
        instance="reviews-v2-5b667bcbf8-abcde",
        owner="kubernetes://apis/apps/v1/namespaces/bookinfo/deployments/reviews-v2",
    )


def test_decode_unpadded_base64() -> None:
    for w in (PRODUCTPAGE, Workload(app="a"), Workload(namespace="ns1"), Workload(workload_name="xy")):
        padded = encode(w)
        unpadded = padded.rstrip("=")
        assert decode(unpadded) == w
        assert decode(f"  {padded}  ") == w  # header whitespace
    assert any(encode(w).endswith("=") for w in (Workload(app="a"), Workload(app="ab"), Workload(app="abc")))


def test_qualified_app_and_version_labels_preferred() -> None:
    s = struct_pb2.Struct()
    s.update(
        {
            "LABELS": {
                "app": "plain-app",
                "app.kubernetes.io/name": "qualified-app",
                "version": "plain-v",
                "app.kubernetes.io/version": "qualified-v",
            }
        }
    )
    w = decode(b64(s))
    assert w is not None
    assert (w.app, w.version) == ("qualified-app", "qualified-v")
    # Only the plain labels: those are used.
    s = struct_pb2.Struct()
    s.update({"LABELS": {"app": "plain-app", "version": "plain-v"}})
    w = decode(b64(s))
    assert w is not None
    assert (w.app, w.version) == ("plain-app", "plain-v")
    # An empty qualified label does not hide the plain one (istio/proxy keeps the first non-empty).
    s = struct_pb2.Struct()
    s.update({"LABELS": {"app": "plain-app", "app.kubernetes.io/name": ""}})
    w = decode(b64(s))
    assert w is not None
    assert w.app == "plain-app"


def test_decode_non_string_values_are_empty() -> None:
    s = struct_pb2.Struct()
    s.update(
        {
            "NAMESPACE": 7,
            "WORKLOAD_NAME": {"nested": "x"},
            "CLUSTER_ID": ["a", "b"],
            "IDENTITY": True,
            "NAME": None,
            "OWNER": "owner-ok",
            "LABELS": {"app": 1.5, "version": ["v1"], "service.istio.io/canonical-name": {"x": "y"}},
        }
    )
    assert decode(b64(s)) == Workload(owner="owner-ok")
    # LABELS that is not a Struct is ignored as a whole.
    for labels in ("app=x", 3, ["app", "x"], None):
        s = struct_pb2.Struct()
        s.update({"WORKLOAD_NAME": "w", "LABELS": labels})
        assert decode(b64(s)) == Workload(workload_name="w")


# --- hostile input ------------------------------------------------------------------------------


def assert_harmless(value: str) -> None:
    result = decode(value)
    assert result is None or isinstance(result, Workload)


@settings(max_examples=300)
@given(st.text())
def test_decode_arbitrary_text_never_raises(value: str) -> None:
    assert_harmless(value)


@settings(max_examples=300)
@given(st.binary(max_size=2048))
def test_decode_base64_of_garbage_never_raises(raw: bytes) -> None:
    value = base64.b64encode(raw).decode("ascii")
    assert_harmless(value)
    assert_harmless(value.rstrip("="))
    assert_harmless(base64.urlsafe_b64encode(raw).decode("ascii"))


json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=30,
)


@given(st.dictionaries(st.sampled_from(["NAMESPACE", "LABELS", "WORKLOAD_NAME", "x", ""]), json_values))
def test_decode_any_struct_gives_a_workload(fields: dict[str, object]) -> None:
    s = struct_pb2.Struct()
    s.update(fields)
    value = b64(s)
    if not value or len(value) > P.MAX_HEADER_BYTES:  # an empty Struct serializes to no bytes at all
        assert decode(value) is None
    else:
        assert isinstance(decode(value), Workload)


def test_decode_hostile_values() -> None:
    for value in (
        "",
        "=",
        "====",
        "a",
        "!!!!",
        "not base64 at all",
        "é" * 10,
        "\x00\x01\x02",
        "YQ",  # base64 of b"a": not a Struct
        "////",
        base64.b64encode(b"\xff" * 64).decode(),
        base64.b64encode(os.urandom(512)).decode(),
    ):
        assert_harmless(value)
    assert decode("") is None
    assert decode("not base64 at all") is None
    assert decode("!!!!") is None
    assert decode("é" * 10) is None


def test_decode_random_bytes() -> None:
    rnd = __import__("random").Random(1234)
    for _ in range(2000):
        raw = bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(0, 200)))
        assert_harmless(base64.b64encode(raw).decode("ascii"))
        assert_harmless(raw.decode("latin-1"))


def test_decode_deeply_nested_struct() -> None:
    s = struct_pb2.Struct()
    cur = s
    for _ in range(500):
        cur = cur.fields["x"].struct_value
    value = b64(s)
    assert len(value) <= P.MAX_HEADER_BYTES
    assert_harmless(value)

    # Nesting through lists, built by hand so no Python recursion limit is involved on our side.
    raw = b""
    for _ in range(2000):
        # Value{list_value: ListValue{values: [<raw Value>]}}: field 6 (list), field 1 (values)
        inner = b"\x0a" + _varint(len(raw)) + raw
        raw = b"\x32" + _varint(len(inner)) + inner
    struct = b"\x0a" + _varint(len(b"\x0a\x01x\x12" + _varint(len(raw)) + raw))
    struct += b"\x0a\x01x\x12" + _varint(len(raw)) + raw
    value = base64.b64encode(struct).decode()
    assert_harmless(value)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def test_decode_oversized_value_is_ignored() -> None:
    big = Workload(workload_name="w" * 1_000_000)
    value = encode(big)
    assert len(value) > 1_000_000
    assert decode(value) is None
    assert decode("A" * 1_048_576) is None


# --- PeerCache ----------------------------------------------------------------------------------


def test_peer_cache_counts_hits_and_misses() -> None:
    cache = PeerCache(size=4)
    value = encode(PRODUCTPAGE)
    assert cache.get(value) == PRODUCTPAGE
    assert (cache.counters.hits, cache.counters.misses) == (0, 1)
    for _ in range(5):
        assert cache.get(value) == PRODUCTPAGE
    assert (cache.counters.hits, cache.counters.misses) == (5, 1)
    assert len(cache) == 1


def test_peer_cache_caches_invalid_values_as_none() -> None:
    cache = PeerCache(size=4)
    assert cache.get("!!!") is None
    assert cache.get("!!!") is None
    assert (cache.counters.hits, cache.counters.misses) == (1, 1)
    assert len(cache) == 1


def test_peer_cache_is_lru_bounded() -> None:
    cache = PeerCache(size=3)
    values = [encode(Workload(workload_name=f"w{i}")) for i in range(5)]
    a, b, c, d, e = values
    for v in (a, b, c):
        cache.get(v)
    assert len(cache) == 3
    cache.get(a)  # a becomes the most recent; b is now the least recent
    cache.get(d)  # evicts b
    assert len(cache) == 3
    hits = cache.counters.hits
    cache.get(a)
    cache.get(c)
    cache.get(d)
    assert cache.counters.hits == hits + 3
    misses = cache.counters.misses
    assert cache.get(b) == Workload(workload_name="w1")  # decoded again
    assert cache.counters.misses == misses + 1
    for v in values * 10:
        cache.get(v)
    assert len(cache) == 3
    assert cache.get(e) == Workload(workload_name="w4")


@given(st.lists(st.integers(0, 20), max_size=200), st.integers(1, 8))
def test_peer_cache_never_exceeds_its_size(keys: list[int], size: int) -> None:
    cache = PeerCache(size=size)
    for k in keys:
        assert cache.get(encode(Workload(app=str(k)))) == Workload(app=str(k))
        assert len(cache) <= size
    assert cache.counters.hits + cache.counters.misses == len(keys)


# --- Workload.from_labels -----------------------------------------------------------------------

CANON = "service.istio.io/canonical-name"
REV = "service.istio.io/canonical-revision"


@pytest.mark.parametrize(
    ("labels", "service", "revision"),
    [
        (
            {
                CANON: "canon",
                "app.kubernetes.io/name": "qualified",
                "app": "plain",
                REV: "r-canon",
                "app.kubernetes.io/version": "r-qualified",
                "version": "r-plain",
            },
            "canon",
            "r-canon",
        ),
        (
            {"app.kubernetes.io/name": "qualified", "app": "plain", "app.kubernetes.io/version": "rq", "version": "rp"},
            "qualified",
            "rq",
        ),
        ({"app": "plain", "version": "rp"}, "plain", "rp"),
        ({"app": "plain"}, "plain", "latest"),
        ({"version": "v3"}, "reviews-v2", "v3"),
        ({}, "reviews-v2", "latest"),
        ({"unrelated": "x", "pod-template-hash": "abc"}, "reviews-v2", "latest"),
    ],
)
def test_from_labels_canonical_rules(labels: dict[str, str], service: str, revision: str) -> None:
    w = Workload.from_labels(labels, workload_name="reviews-v2", namespace="bookinfo")
    assert (w.canonical_service, w.canonical_revision) == (service, revision)
    assert w.workload_name == "reviews-v2"
    assert w.namespace == "bookinfo"


def test_from_labels_app_and_version_are_the_plain_labels_as_istio_reads_its_own() -> None:
    w = Workload.from_labels({"app": "plain", "app.kubernetes.io/name": "qualified", "version": "v1"})
    assert (w.app, w.version, w.canonical_service) == ("plain", "v1", "qualified")
    w = Workload.from_labels({"app": "plain", "app.kubernetes.io/version": "2.0", "version": "v1"})
    assert (w.app, w.version, w.canonical_revision) == ("plain", "v1", "2.0")
    # No workload name and no labels: an empty canonical service, revision `latest`.
    w = Workload.from_labels({})
    assert (w.canonical_service, w.canonical_revision, w.app, w.version) == ("", "latest", "", "")


def test_from_labels_keeps_the_other_fields_and_round_trips() -> None:
    w = Workload.from_labels(
        {"app": "reviews", "version": "v2"},
        workload_name="reviews-v2",
        namespace="bookinfo",
        cluster="Kubernetes",
        identity="spiffe://cluster.local/ns/bookinfo/sa/reviews",
        instance="reviews-v2-abc",
        owner="kubernetes://apis/apps/v1/namespaces/bookinfo/deployments/reviews-v2",
    )
    assert w.cluster == "Kubernetes"
    assert w.identity.endswith("/sa/reviews")
    assert w.instance == "reviews-v2-abc"
    assert w.owner.endswith("/reviews-v2")
    assert decode(encode(w)) == w
