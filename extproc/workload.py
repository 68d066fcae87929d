"""Facts about a workload that the single-workload server (its flags) and central mode (each
request's context) both build: its labels as `k=v,k=v` text, its SPIFFE identity and the node
id its peer metadata carries. One definition each, below every other layer."""

from __future__ import annotations


class LabelsError(ValueError):
    """Labels text that is not `k=v[,k=v...]`; the message names the flag or key it came from."""


def parse_labels(text: str, flag: str = "--labels") -> dict[str, str]:
    """`k=v,k=v` (spaces around items, keys and values ignored; empty items skipped)."""
    labels: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LabelsError(f"{flag}: expected k=v[,k=v...], got {item!r}")
        labels[key.strip()] = value.strip()
    return labels


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    """Istio's identity of a service account, `spiffe://<td>/ns/<ns>/sa/<sa>`; "" without one."""
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}" if service_account else ""


def node_id(workload_name: str, namespace: str) -> str:
    """The Envoy node id a sidecar of this workload sends as x-envoy-peer-metadata-id (the
    `sidecar~<workload>.<namespace>` part of Istio's; there is no pod IP to put in it)."""
    return f"sidecar~{workload_name or 'unknown'}.{namespace}"
