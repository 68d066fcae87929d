"""Envoy bootstraps for each mode, built from the configs users run.

The sidecars of `authz+als`, `noop` and `mixer` are `envoy/authz.yaml`, those of `authz-http`
and `noop-http` are `envoy/authz-http.yaml`, and the sidecars of
`extproc` and `noop-extproc` are `envoy/extproc.yaml`, exactly as shipped except for what a benchmark has to
change: addresses and ports, no TCP listener (the load is HTTP), and no stdout access log
(Istio's default is off, and writing a line per request would be measured in every mode).
The empty baselines `noop` and `noop-extproc` keep only their transport's filters (`noop`:
ext_authz; `noop-extproc`: set_filter_state and ext_proc) and no access log, so they cost the
bare hop; `noop-http` is the whole `authz-http` sidecar, access log included, in front of an
empty server (the floor the fast path is measured against).
`none` and `native` start from the same file with the extension filters removed; `native`
then gets Envoy's jwt_authn and RBAC filters translated from the very policies extproc
enforces (``reference/envoy_jwt.py``, ``reference/envoy_rbac.py``, both checked
against extproc by the differential tests).

`mixer` adds what Istio 1.0-1.4 put between a sidecar and Mixer: every sidecar's ext_authz
and access log go to a second Envoy (the central server's own proxy, as istio-policy and
istio-telemetry pods had), which injects the network round trip with Envoy's fault filter
and forwards to one central extproc.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.harness import scenario as sc
from extproc.config.models import AuthorizationPolicy
from reference.envoy_jwt import jwt_authn_filter
from reference.envoy_rbac import rbac_filters

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "envoy"
T = "type.googleapis.com/"
HCM = "envoy.filters.network.http_connection_manager"
HCM_TYPE = T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
EXT_AUTHZ = "envoy.filters.http.ext_authz"
EXT_PROC = "envoy.filters.http.ext_proc"
STRIP_QUERY_TOKEN = "strip_verified_access_token"  # envoy/authz-http.yaml, after ext_authz
# Feeds the ext_proc filter's filter_state["extproc.peer_address"] request attribute.
SET_FILTER_STATE = "envoy.filters.http.set_filter_state"
ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": T + "envoy.extensions.filters.http.router.v3.Router"},
}
CHECK_CACHE_RUNTIME_KEY = "bench.mixer.check_fraction"


@dataclass(frozen=True)
class MixerOptions:
    rtt_ms: float = 0.5
    sidecars: int = 2
    check_cache_hit_percent: int = 0
    report_batching: bool = False


def shipped(name: str) -> dict[str, Any]:
    return yaml.safe_load((SHIPPED / f"{name}.yaml").read_text())


def _listener(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    return next(ln for ln in cfg["static_resources"]["listeners"] if ln["name"] == name)


def _hcm(listener: dict[str, Any]) -> dict[str, Any]:
    f = next(f for f in listener["filter_chains"][0]["filters"] if f["name"] == HCM)
    return f["typed_config"]


def _cluster(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in cfg["static_resources"]["clusters"] if c["name"] == name)


# Where a Python server listens: a port on 127.0.0.1, or "unix:PATH" (`--unix-sockets`).
Address = int | str


def _point(cfg: dict[str, Any], cluster: str, port: Address) -> None:
    ep = _cluster(cfg, cluster)["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    if isinstance(port, str):
        ep["address"] = {"pipe": {"path": port.removeprefix("unix:")}}
    else:
        ep["address"] = {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def _drop_cluster(cfg: dict[str, Any], name: str) -> None:
    cfg["static_resources"]["clusters"] = [c for c in cfg["static_resources"]["clusters"] if c["name"] != name]


def _base(shipped_name: str, *, admin_port: int, listen_port: int, upstream_port: int) -> dict[str, Any]:
    cfg = copy.deepcopy(shipped(shipped_name))
    cfg["admin"] = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}}
    http = _listener(cfg, "http")
    http["address"] = {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}}
    cfg["static_resources"]["listeners"] = [http]
    hcm = _hcm(http)
    hcm["access_log"] = [a for a in hcm.get("access_log", []) if a["name"] != "envoy.access_loggers.stdout"]
    _point(cfg, "app", upstream_port)
    return cfg


def _without_extensions(cfg: dict[str, Any]) -> dict[str, Any]:
    hcm = _hcm(_listener(cfg, "http"))
    hcm["http_filters"] = [ROUTER]
    hcm.pop("access_log", None)
    _drop_cluster(cfg, "extproc")
    return cfg


def none_sidecar(*, admin_port: int, listen_port: int, upstream_port: int) -> dict[str, Any]:
    return _without_extensions(
        _base("authz", admin_port=admin_port, listen_port=listen_port, upstream_port=upstream_port)
    )


def native_filters(scenario: sc.Scenario) -> list[dict[str, Any]]:
    """jwt_authn + RBAC for the scenario's workload: every policy of the scenario applies to it."""
    policies = [AuthorizationPolicy.model_validate(d) for d in scenario.authorization_policies()]
    return [jwt_authn_filter(scenario.request_authentications()), *rbac_filters(policies, for_tcp=False)]


def native_sidecar(scenario: sc.Scenario, *, admin_port: int, listen_port: int, upstream_port: int) -> dict[str, Any]:
    cfg = none_sidecar(admin_port=admin_port, listen_port=listen_port, upstream_port=upstream_port)
    _hcm(_listener(cfg, "http"))["http_filters"] = [*native_filters(scenario), ROUTER]
    return cfg


def noop_sidecar(*, admin_port: int, listen_port: int, upstream_port: int, ext_port: Address) -> dict[str, Any]:
    """The shipped ext_authz filter alone, pointed at the empty server; no access log."""
    cfg = _base("authz", admin_port=admin_port, listen_port=listen_port, upstream_port=upstream_port)
    hcm = _hcm(_listener(cfg, "http"))
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] in (EXT_AUTHZ, ROUTER["name"])]
    hcm.pop("access_log", None)
    _point(cfg, "extproc", ext_port)
    return cfg


def noop_http_sidecar(
    *, admin_port: int, listen_port: int, upstream_port: int, ext_port: Address, als_port: Address
) -> dict[str, Any]:
    """envoy/authz-http.yaml as shipped, the `authz-http` mode's sidecar, pointed at the empty
    server: its checks on `ext_port`, its access logs on `als_port` (read and dropped). Unlike
    the other empty baselines it keeps the access log, so the sidecar does all of the mode's
    work and the mode's ratio to it is extproc's own work."""
    return extproc_sidecar(
        "authz-http",
        admin_port=admin_port,
        listen_port=listen_port,
        upstream_port=upstream_port,
        ext_port=als_port,
        http_port=ext_port,
    )


def noop_extproc_sidecar(*, admin_port: int, listen_port: int, upstream_port: int, ext_port: Address) -> dict[str, Any]:
    """envoy/extproc.yaml's ext_proc filter as shipped, pointed at the empty server; no access log.

    The set_filter_state filter stays: it feeds one of the filter's request_attributes, and
    Envoy's work to build and send them is part of the hop's floor cost.
    """
    cfg = _base("extproc", admin_port=admin_port, listen_port=listen_port, upstream_port=upstream_port)
    hcm = _hcm(_listener(cfg, "http"))
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] in (SET_FILTER_STATE, EXT_PROC, ROUTER["name"])]
    hcm.pop("access_log", None)
    _point(cfg, "extproc", ext_port)
    return cfg


SHIPPED_OF = {"authz+als": "authz", "authz-http": "authz-http", "extproc": "extproc"}


def extproc_sidecar(
    mode: str,
    *,
    admin_port: int,
    listen_port: int,
    upstream_port: int,
    ext_port: Address,
    http_port: Address | None = None,
) -> dict[str, Any]:
    """`authz+als` (envoy/authz.yaml), `authz-http` (envoy/authz-http.yaml: HTTP checks on
    `http_port`, access logs over gRPC on `ext_port`) or `extproc` (envoy/extproc.yaml), as shipped."""
    cfg = _base(SHIPPED_OF[mode], admin_port=admin_port, listen_port=listen_port, upstream_port=upstream_port)
    _point(cfg, "extproc", ext_port)
    if mode == "authz-http":
        assert http_port is not None
        _point(cfg, "extproc_http", http_port)
    return cfg


def mixer_node(index: int) -> dict[str, Any]:
    """The sidecar's Envoy node, with the metadata Istio's injector sets (read by central ALS)."""
    return {
        "id": f"sidecar~127.0.0.{index + 1}~{sc.WORKLOAD}-{index}.{sc.NAMESPACE}~{sc.NAMESPACE}.svc.cluster.local",
        "cluster": f"{sc.LABELS['app']}.{sc.NAMESPACE}",
        "metadata": {
            "NAMESPACE": sc.NAMESPACE,
            "WORKLOAD_NAME": sc.WORKLOAD,
            "LABELS": dict(sc.LABELS),
            "SERVICE_ACCOUNT": sc.SERVICE_ACCOUNT,
            "CLUSTER_ID": "Kubernetes",
        },
    }


def mixer_context_extensions() -> dict[str, str]:
    """What a sidecar tells the central server about itself on every Check (Mixer's destination.*)."""
    return {
        "destination.namespace": sc.NAMESPACE,
        "destination.labels": ",".join(f"{k}={v}" for k, v in sc.LABELS.items()),
        "destination.workload.name": sc.WORKLOAD,
        "destination.service_account": sc.SERVICE_ACCOUNT,
    }


def mixer_sidecar(
    index: int, options: MixerOptions, *, admin_port: int, listen_port: int, upstream_port: int, hop_port: int
) -> dict[str, Any]:
    """envoy/authz.yaml with its ext_authz and access log sent through the hop to the central server.

    Report: the access log is unbatched (``buffer_size_bytes: 0`` sends every entry at once),
    as with Mixer's ``disable_report_batch``; with ``report_batching`` it keeps the shipped 1 s
    flush, close to mixerclient's default batch of 100 entries or 1000 ms.

    Check cache: a share of requests skips the Check, as a client-side cache hit would. The
    share is the runtime key ``CHECK_CACHE_RUNTIME_KEY`` (percent of requests checked), 100
    at start so the probes are all checked, lowered through the admin API for the load.
    """
    cfg = _base("authz", admin_port=admin_port, listen_port=listen_port, upstream_port=upstream_port)
    cfg["node"] = mixer_node(index)
    hcm = _hcm(_listener(cfg, "http"))
    for vh in hcm["route_config"]["virtual_hosts"]:
        vh["typed_per_filter_config"] = {
            EXT_AUTHZ: {
                "@type": T + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
                "check_settings": {"context_extensions": mixer_context_extensions()},
            }
        }
    for log in hcm.get("access_log", []):
        common = log["typed_config"].get("common_config")
        if common is not None and not options.report_batching:
            common["buffer_size_bytes"] = 0
    if options.check_cache_hit_percent > 0:
        ext_authz = next(f for f in hcm["http_filters"] if f["name"] == EXT_AUTHZ)
        ext_authz["typed_config"]["filter_enabled"] = {
            "default_value": {"numerator": 100, "denominator": "HUNDRED"},
            "runtime_key": CHECK_CACHE_RUNTIME_KEY,
        }
        cfg["layered_runtime"]["layers"].append({"name": "admin", "admin_layer": {}})
    _point(cfg, "extproc", hop_port)
    return cfg


def fault_delays(rtt_ms: float) -> list[tuple[int, float]]:
    """(whole milliseconds, percent of streams) pairs whose mean is ``rtt_ms``.

    Envoy's fault filter delays in whole milliseconds, so a fractional round trip is the
    whole part on every stream plus one more millisecond on the fractional share of them.
    """
    if rtt_ms < 0:
        raise ValueError("the round trip cannot be negative")
    whole = math.floor(rtt_ms)
    fraction = round((rtt_ms - whole) * 100, 4)
    delays: list[tuple[int, float]] = []
    if whole:
        delays.append((whole, 100.0))
    if fraction:
        delays.append((1, fraction))
    return delays


def _fault(name: str, ms: int, percent: float) -> dict[str, Any]:
    if percent == 100.0:
        pct = {"numerator": 100, "denominator": "HUNDRED"}
    else:
        pct = {"numerator": round(percent * 10000), "denominator": "MILLION"}
    return {
        "name": name,
        "typed_config": {
            "@type": T + "envoy.extensions.filters.http.fault.v3.HTTPFault",
            "delay": {"fixed_delay": f"{ms / 1000:.3f}s", "percentage": pct},
        },
    }


def _h2_cluster(name: str, port: int) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "circuit_breakers": {
            "thresholds": [{"max_connections": 1024, "max_pending_requests": 100000, "max_requests": 100000}]
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
                    ]
                }
            ],
        },
    }


def _runtime() -> dict[str, Any]:
    return {
        "layers": [
            {"name": "static", "static_layer": {"overload.global_downstream_max_connections": 50000}},
            {"name": "admin", "admin_layer": {}},
        ]
    }


def _listener_hcm(name: str, port: int, hcm: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{"name": HCM, "typed_config": {"@type": HCM_TYPE, **hcm}}]}],
    }


def hop(rtt_ms: float, *, admin_port: int, listen_port: int, central_port: int) -> dict[str, Any]:
    """The central server's proxy: gRPC in over HTTP/2, the round trip injected, out to the server."""
    filters = [
        _fault(f"envoy.filters.http.fault.delay{i}", ms, pct) for i, (ms, pct) in enumerate(fault_delays(rtt_ms))
    ]
    hcm = {
        "stat_prefix": "hop",
        "codec_type": "HTTP2",
        "http2_protocol_options": {},
        "route_config": {
            "name": "central",
            "virtual_hosts": [
                {
                    "name": "central",
                    "domains": ["*"],
                    # No route timeout: access-log streams stay open for the whole run.
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "central", "timeout": "0s"}}],
                }
            ],
        },
        "http_filters": [*filters, ROUTER],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [_listener_hcm("hop", listen_port, hcm)],
            "clusters": [_h2_cluster("central", central_port)],
        },
        "layered_runtime": _runtime(),
    }


def upstream(payload_bytes: int, *, admin_port: int, listen_port: int) -> dict[str, Any]:
    """The application: Envoy answering 200 with ``payload_bytes`` of body, as fast as Envoy can."""
    hcm = {
        "stat_prefix": "upstream",
        "codec_type": "AUTO",
        "route_config": {
            "name": "app",
            "virtual_hosts": [
                {
                    "name": "app",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "direct_response": {"status": 200, "body": {"inline_string": "x" * payload_bytes}},
                        }
                    ],
                }
            ],
        },
        "http_filters": [ROUTER],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": [_listener_hcm("app", listen_port, hcm)]},
        "layered_runtime": _runtime(),
    }
