"""Command-line flags for `extproc serve`, each with an EXTPROC_* environment variable.

A flag given on the command line wins over its variable; a variable wins over the
default. Repeated flags take a list in their variable: EXTPROC_CONFIG_DIR is split
on ":" like PATH, EXTPROC_TRUST_DOMAIN_ALIAS and EXTPROC_LABELS on ",".
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from extproc.config.providers import parse_duration
from extproc.workload import LabelsError, parse_labels


class SettingsError(ValueError):
    pass


def _labels(text: str) -> dict[str, str]:
    try:
        return parse_labels(text)
    except LabelsError as e:
        raise SettingsError(str(e)) from None


TRACE_FORMATS = ("w3c", "b3", "b3-single")
# Istio's meshConfig.pathNormalization, spelled as extproc's --path-normalization takes it.
PATH_NORMALIZATIONS = ("none", "base", "merge-slashes", "decode-and-merge-slashes")


@dataclass(frozen=True)
class ListenAddress:
    """HOST:PORT, [V6HOST]:PORT or unix:PATH, in gRPC's own target syntax."""

    text: str

    @property
    def is_unix(self) -> bool:
        return self.text.startswith("unix:")

    @property
    def grpc_target(self) -> str:
        return self.text

    @staticmethod
    def parse(text: str, flag: str, allow_unix: bool = True) -> ListenAddress:
        if text.startswith("unix:"):
            if not allow_unix:
                raise SettingsError(f"{flag}: unix sockets are not supported here, use HOST:PORT")
            if len(text) <= len("unix:"):
                raise SettingsError(f"{flag}: unix: needs a path")
            return ListenAddress(text)
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise SettingsError(f"{flag}: expected HOST:PORT or unix:PATH, got {text!r}")
        return ListenAddress(text)

    def host_port(self) -> tuple[str, int]:
        host, _, port = self.text.rpartition(":")
        return host.strip("[]"), int(port)


@dataclass(frozen=True)
class ServeSettings:
    config_dirs: tuple[str, ...]
    listen: ListenAddress
    admin: ListenAddress
    namespace: str  # "" in central mode: each request names its workload
    labels: Mapping[str, str] = field(default_factory=dict)
    workload: str = ""
    root_namespace: str = "istio-system"
    trust_domain: str = "cluster.local"
    trust_domain_aliases: tuple[str, ...] = ()
    jwt_payload_key: str = "payload"
    xff_num_trusted_hops: int = 0
    max_request_headers_kb: int = 96
    multiple_custom_providers: bool = False
    jwks_refresh_interval_s: float = 1200.0
    jwks_kid_refresh_interval_s: float = 30.0
    jwt_cache_size: int = 10_000
    decision_cache_size: int = 4096
    path_normalization: str = "base"
    direction: str = "inbound"
    cluster: str = "Kubernetes"
    service_account: str = ""
    service_host: str = ""
    node_id: str = ""
    metrics_max_series: int = 50_000
    metrics_idle_expiry_s: float = 3600.0
    trace_formats: tuple[str, ...] = ("w3c", "b3")
    trace_sampling: float = 1.0
    otlp_endpoint: str = ""
    trace_queue_size: int = 2048
    drain_timeout_s: float = 10.0
    config_settle_s: float = 1.0
    max_concurrent_rpcs: int = 0
    log_level: str = "info"
    log_format: str = "text"
    central: bool = False
    http_listen: ListenAddress | None = None  # Envoy's HTTP ext_authz (authz-http); None: not served


# (flag, env var, help) for every serve option; the single place that names them.
SERVE_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--config-dir", "EXTPROC_CONFIG_DIR", "directory of policy YAML, repeatable (env: ':'-separated)"),
    ("--listen", "EXTPROC_LISTEN", "gRPC address for Envoy: HOST:PORT or unix:PATH"),
    (
        "--http-listen",
        "EXTPROC_HTTP_LISTEN",
        "address for Envoy's HTTP ext_authz checks (http_service, the authz-http mode): HOST:PORT or unix:PATH; "
        "gRPC stays on --listen for access logs and TCP checks",
    ),
    ("--admin", "EXTPROC_ADMIN", "admin HTTP address (/healthz, /readyz, /metrics, /debug): HOST:PORT"),
    (
        "--central",
        "EXTPROC_CENTRAL",
        "one server for many sidecars (Mixer-style): each Check names its workload in the ext_authz context "
        "extensions destination.*, each access log stream in its Envoy node metadata; ext_proc is not served",
    ),
    ("--namespace", "EXTPROC_NAMESPACE", "namespace of the workload this sidecar serves"),
    ("--labels", "EXTPROC_LABELS", "workload labels k=v[,k=v...], matched by policy selectors"),
    ("--workload", "EXTPROC_WORKLOAD", "workload name (for logs and debug output)"),
    ("--root-namespace", "EXTPROC_ROOT_NAMESPACE", "mesh root namespace whose policies apply everywhere"),
    ("--trust-domain", "EXTPROC_TRUST_DOMAIN", "mesh trust domain"),
    ("--trust-domain-alias", "EXTPROC_TRUST_DOMAIN_ALIAS", "trust domain alias, repeatable (env: ','-separated)"),
    ("--jwt-payload-key", "EXTPROC_JWT_PAYLOAD_KEY", "jwt_authn payload_in_metadata key holding verified claims"),
    ("--xff-num-trusted-hops", "EXTPROC_XFF_NUM_TRUSTED_HOPS", "the HCM's xff_num_trusted_hops, for remote.ip"),
    ("--max-request-headers-kb", "EXTPROC_MAX_REQUEST_HEADERS_KB", "deny checks whose headers exceed this size"),
    (
        "--multiple-custom-providers",
        "EXTPROC_MULTIPLE_CUSTOM_PROVIDERS",
        "allow CUSTOM policies of several providers on one workload (Istio's "
        "PILOT_ENABLE_MULTIPLE_CUSTOM_AUTHZ_PROVIDERS)",
    ),
    ("--jwks-refresh-interval", "EXTPROC_JWKS_REFRESH_INTERVAL", "how often jwksUri keys are refetched"),
    (
        "--jwks-kid-refresh-interval",
        "EXTPROC_JWKS_KID_REFRESH_INTERVAL",
        "least time between refetches triggered by tokens with an unknown kid, per key source",
    ),
    ("--jwt-cache-size", "EXTPROC_JWT_CACHE_SIZE", "verified tokens kept in memory (0 disables the cache)"),
    (
        "--decision-cache-size",
        "EXTPROC_DECISION_CACHE_SIZE",
        "HTTP decisions remembered by the values the policies read (0 disables the cache)",
    ),
    (
        "--path-normalization",
        "EXTPROC_PATH_NORMALIZATION",
        "normalization of the path policies match, by Istio's meshConfig.pathNormalization names: none, base "
        "(Istio's default: RFC 3986 dot segments), merge-slashes, decode-and-merge-slashes; a path the Envoy in "
        "front should already have normalized is counted in extproc_unnormalized_paths_total",
    ),
    (
        "--direction",
        "EXTPROC_DIRECTION",
        "inbound (server sidecar, reporter=destination) or outbound (client sidecar, reporter=source); "
        "an Envoy filter can override it with the gRPC initial metadata x-extproc-direction",
    ),
    ("--cluster", "EXTPROC_CLUSTER", "cluster id of this workload (Istio's CLUSTER_ID) for *_cluster labels"),
    (
        "--service-account",
        "EXTPROC_SERVICE_ACCOUNT",
        "service account; makes IDENTITY spiffe://<trust-domain>/ns/<ns>/sa/<sa> in the peer metadata we send",
    ),
    (
        "--service-host",
        "EXTPROC_SERVICE_HOST",
        "FQDN of the service this workload serves (inbound destination_service; default: the Host header)",
    ),
    ("--node-id", "EXTPROC_NODE_ID", "x-envoy-peer-metadata-id we send (default sidecar~<workload>.<namespace>)"),
    (
        "--metrics-max-series",
        "EXTPROC_METRICS_MAX_SERIES",
        "most standard-metric series kept; beyond it, new label sets go to each metric's overflow series",
    ),
    (
        "--metrics-idle-expiry",
        "EXTPROC_METRICS_IDLE_EXPIRY",
        "drop standard-metric series not updated for this long (0 keeps them forever)",
    ),
    (
        "--trace-formats",
        "EXTPROC_TRACE_FORMATS",
        "trace context formats written on every request: w3c, b3 (multi-header), b3-single, ','-separated; "
        "none turns tracing off",
    ),
    (
        "--trace-sampling",
        "EXTPROC_TRACE_SAMPLING",
        "percent of new traces sampled (Istio's tracing.sampling); an incoming decision is always honoured",
    ),
    (
        "--otlp-endpoint",
        "EXTPROC_OTLP_ENDPOINT",
        "OTLP/gRPC collector for spans: HOST:PORT or http(s)://HOST:PORT; unset exports no spans",
    ),
    ("--trace-queue-size", "EXTPROC_TRACE_QUEUE_SIZE", "spans waiting for export; beyond it they are dropped"),
    ("--drain-timeout", "EXTPROC_DRAIN_TIMEOUT", "seconds to finish in-flight calls after SIGTERM"),
    (
        "--config-settle",
        "EXTPROC_CONFIG_SETTLE",
        "a config file written in place (or new) is read once unchanged this long; until then what it held "
        "stays in force, so a file caught mid-write never drops policies (0 reads every change at once)",
    ),
    (
        "--max-concurrent-rpcs",
        "EXTPROC_MAX_CONCURRENT_RPCS",
        "gRPC calls served at once (checks, ext_proc and access log streams); beyond it a call is refused "
        "with RESOURCE_EXHAUSTED at once and Envoy applies its failure mode (0: no limit)",
    ),
    ("--log-level", "EXTPROC_LOG_LEVEL", "debug, info, warning or error"),
    ("--log-format", "EXTPROC_LOG_FORMAT", "text or json"),
)


# Flags that describe the one workload of a sidecar's server: meaningless for a central one.
CENTRAL_CONFLICTS: tuple[tuple[str, str, str], ...] = (
    ("--namespace", "namespace", "EXTPROC_NAMESPACE"),
    ("--labels", "labels", "EXTPROC_LABELS"),
    ("--workload", "workload", "EXTPROC_WORKLOAD"),
    ("--service-account", "service_account", "EXTPROC_SERVICE_ACCOUNT"),
    ("--node-id", "node_id", "EXTPROC_NODE_ID"),
)


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    helps = {flag: f"{text} [env {env}]" for flag, env, text in SERVE_FLAGS}
    p.add_argument("--config-dir", action="append", dest="config_dirs", metavar="DIR", help=helps["--config-dir"])
    p.add_argument("--listen", metavar="HOST:PORT|unix:PATH", help=helps["--listen"] + " (default 127.0.0.1:9001)")
    p.add_argument("--http-listen", metavar="HOST:PORT|unix:PATH", help=helps["--http-listen"] + " (default off)")
    p.add_argument("--admin", metavar="HOST:PORT", help=helps["--admin"] + " (default 127.0.0.1:9902)")
    p.add_argument("--central", action="store_const", const="true", help=helps["--central"])
    p.add_argument("--namespace", metavar="NS", help=helps["--namespace"])
    p.add_argument("--labels", metavar="k=v[,k=v...]", help=helps["--labels"])
    p.add_argument("--workload", metavar="NAME", help=helps["--workload"])
    p.add_argument("--root-namespace", metavar="NS", help=helps["--root-namespace"] + " (default istio-system)")
    p.add_argument("--trust-domain", metavar="TD", help=helps["--trust-domain"] + " (default cluster.local)")
    p.add_argument(
        "--trust-domain-alias",
        action="append",
        dest="trust_domain_aliases",
        metavar="TD",
        help=helps["--trust-domain-alias"],
    )
    p.add_argument("--jwt-payload-key", metavar="KEY", help=helps["--jwt-payload-key"] + " (default payload)")
    p.add_argument(
        "--xff-num-trusted-hops", type=int, metavar="N", help=helps["--xff-num-trusted-hops"] + " (default 0)"
    )
    p.add_argument(
        "--max-request-headers-kb", type=int, metavar="KB", help=helps["--max-request-headers-kb"] + " (default 96)"
    )
    p.add_argument(
        "--multiple-custom-providers", action="store_const", const="true", help=helps["--multiple-custom-providers"]
    )
    p.add_argument(
        "--jwks-refresh-interval", metavar="DURATION", help=helps["--jwks-refresh-interval"] + " (default 20m)"
    )
    p.add_argument(
        "--jwks-kid-refresh-interval",
        metavar="DURATION",
        help=helps["--jwks-kid-refresh-interval"] + " (default 30s)",
    )
    p.add_argument("--jwt-cache-size", type=int, metavar="N", help=helps["--jwt-cache-size"] + " (default 10000)")
    p.add_argument(
        "--decision-cache-size", type=int, metavar="N", help=helps["--decision-cache-size"] + " (default 4096)"
    )
    p.add_argument("--path-normalization", metavar="MODE", help=helps["--path-normalization"] + " (default base)")
    p.add_argument("--direction", metavar="DIR", help=helps["--direction"] + " (default inbound)")
    p.add_argument("--cluster", metavar="ID", help=helps["--cluster"] + " (default Kubernetes)")
    p.add_argument("--service-account", metavar="SA", help=helps["--service-account"])
    p.add_argument("--service-host", metavar="FQDN", help=helps["--service-host"])
    p.add_argument("--node-id", metavar="ID", help=helps["--node-id"])
    p.add_argument(
        "--metrics-max-series", type=int, metavar="N", help=helps["--metrics-max-series"] + " (default 50000)"
    )
    p.add_argument("--metrics-idle-expiry", metavar="DURATION", help=helps["--metrics-idle-expiry"] + " (default 1h)")
    p.add_argument("--trace-formats", metavar="F[,F...]", help=helps["--trace-formats"] + " (default w3c,b3)")
    p.add_argument("--trace-sampling", metavar="PERCENT", help=helps["--trace-sampling"] + " (default 1)")
    p.add_argument("--otlp-endpoint", metavar="ADDRESS", help=helps["--otlp-endpoint"])
    p.add_argument("--trace-queue-size", type=int, metavar="N", help=helps["--trace-queue-size"] + " (default 2048)")
    p.add_argument("--drain-timeout", type=float, metavar="SECONDS", help=helps["--drain-timeout"] + " (default 10)")
    p.add_argument("--config-settle", metavar="DURATION", help=helps["--config-settle"] + " (default 1s)")
    p.add_argument("--max-concurrent-rpcs", type=int, metavar="N", help=helps["--max-concurrent-rpcs"] + " (default 0)")
    p.add_argument("--log-level", metavar="LEVEL", help=helps["--log-level"] + " (default info)")
    p.add_argument("--log-format", metavar="FORMAT", help=helps["--log-format"] + " (default text)")


def _bool(text: str, name: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off", ""):
        return False
    raise SettingsError(f"{name}: expected true or false, got {text!r}")


def _int(text: str, name: str, minimum: int = 0) -> int:
    try:
        value = int(text)
    except ValueError:
        raise SettingsError(f"{name}: expected an integer, got {text!r}") from None
    if value < minimum:
        raise SettingsError(f"{name}: must be at least {minimum}")
    return value


def _duration(text: str, name: str, allow_zero: bool = False) -> float:
    try:
        value = parse_duration(text)
    except ValueError as e:
        raise SettingsError(f"{name}: {e}") from None
    if value < 0 or (value == 0 and not allow_zero):
        raise SettingsError(f"{name}: must be positive")
    return value


def serve_settings(ns: argparse.Namespace, env: Mapping[str, str] | None = None) -> ServeSettings:
    env = os.environ if env is None else env

    def pick(attr: str, var: str, default: str | None = None) -> str | None:
        value = getattr(ns, attr, None)
        if value is not None:
            return str(value)
        return env.get(var, default)

    config_dirs = ns.config_dirs or [d for d in env.get("EXTPROC_CONFIG_DIR", "").split(os.pathsep) if d]
    if not config_dirs:
        raise SettingsError("--config-dir is required (or EXTPROC_CONFIG_DIR)")
    central = _bool(pick("central", "EXTPROC_CENTRAL", "false") or "false", "--central")
    namespace = pick("namespace", "EXTPROC_NAMESPACE")
    if central:
        per_workload = [
            f"{flag} ({var})" if getattr(ns, attr, None) is None else flag
            for flag, attr, var in CENTRAL_CONFLICTS
            if pick(attr, var)
        ]
        if per_workload:
            raise SettingsError(
                f"--central cannot be combined with {', '.join(per_workload)}: in central mode each request names "
                "its own workload (ext_authz context extensions destination.*, access log node metadata)"
            )
    elif not namespace:
        raise SettingsError("--namespace is required (or EXTPROC_NAMESPACE), unless --central")
    http_listen_text = pick("http_listen", "EXTPROC_HTTP_LISTEN", "") or ""
    http_listen = ListenAddress.parse(http_listen_text, "--http-listen") if http_listen_text else None
    if http_listen is not None and central:
        raise SettingsError(
            "--http-listen cannot be combined with --central: a central server learns each check's workload from "
            "the gRPC filter's context extensions, which ext_authz over HTTP does not send"
        )
    aliases = ns.trust_domain_aliases or [
        a.strip() for a in env.get("EXTPROC_TRUST_DOMAIN_ALIAS", "").split(",") if a.strip()
    ]
    log_level = (pick("log_level", "EXTPROC_LOG_LEVEL", "info") or "info").lower()
    if log_level not in ("debug", "info", "warning", "error"):
        raise SettingsError(f"--log-level: expected debug, info, warning or error, got {log_level!r}")
    log_format = (pick("log_format", "EXTPROC_LOG_FORMAT", "text") or "text").lower()
    if log_format not in ("text", "json"):
        raise SettingsError(f"--log-format: expected text or json, got {log_format!r}")
    path_normalization = (pick("path_normalization", "EXTPROC_PATH_NORMALIZATION", "base") or "base").lower()
    if path_normalization not in PATH_NORMALIZATIONS:
        raise SettingsError(
            f"--path-normalization: expected one of {', '.join(PATH_NORMALIZATIONS)}, got {path_normalization!r}"
        )
    direction = (pick("direction", "EXTPROC_DIRECTION", "inbound") or "inbound").lower()
    if direction not in ("inbound", "outbound"):
        raise SettingsError(f"--direction: expected inbound or outbound, got {direction!r}")
    formats_text = (pick("trace_formats", "EXTPROC_TRACE_FORMATS", "w3c,b3") or "").strip().lower()
    trace_formats = tuple(dict.fromkeys(f.strip() for f in formats_text.split(",") if f.strip()))
    if trace_formats == ("none",):
        trace_formats = ()
    bad = [f for f in trace_formats if f not in TRACE_FORMATS]
    if bad or not formats_text:
        raise SettingsError(
            f"--trace-formats: expected some of {', '.join(TRACE_FORMATS)} or none, got {formats_text!r}"
        )
    sampling_text = pick("trace_sampling", "EXTPROC_TRACE_SAMPLING", "1") or "1"
    try:
        trace_sampling = float(sampling_text)
    except ValueError:
        raise SettingsError(f"--trace-sampling: expected a percentage, got {sampling_text!r}") from None
    if not 0.0 <= trace_sampling <= 100.0:
        raise SettingsError(f"--trace-sampling: must be between 0 and 100, got {sampling_text}")
    otlp = (pick("otlp_endpoint", "EXTPROC_OTLP_ENDPOINT", "") or "").strip()
    if otlp:
        bare = otlp.split("://", 1)[1] if otlp.startswith(("http://", "https://")) else otlp
        ListenAddress.parse(bare.rstrip("/"), "--otlp-endpoint", allow_unix=False)
    drain = pick("drain_timeout", "EXTPROC_DRAIN_TIMEOUT", "10") or "10"
    try:
        drain_s = float(drain)
    except ValueError:
        raise SettingsError(f"--drain-timeout: expected seconds, got {drain!r}") from None
    return ServeSettings(
        jwks_refresh_interval_s=_duration(
            pick("jwks_refresh_interval", "EXTPROC_JWKS_REFRESH_INTERVAL", "20m") or "20m", "--jwks-refresh-interval"
        ),
        jwks_kid_refresh_interval_s=_duration(
            pick("jwks_kid_refresh_interval", "EXTPROC_JWKS_KID_REFRESH_INTERVAL", "30s") or "30s",
            "--jwks-kid-refresh-interval",
            allow_zero=True,
        ),
        jwt_cache_size=_int(pick("jwt_cache_size", "EXTPROC_JWT_CACHE_SIZE", "10000") or "10000", "--jwt-cache-size"),
        decision_cache_size=_int(
            pick("decision_cache_size", "EXTPROC_DECISION_CACHE_SIZE", "4096") or "4096", "--decision-cache-size"
        ),
        config_dirs=tuple(config_dirs),
        listen=ListenAddress.parse(pick("listen", "EXTPROC_LISTEN", "127.0.0.1:9001") or "", "--listen"),
        http_listen=http_listen,
        admin=ListenAddress.parse(pick("admin", "EXTPROC_ADMIN", "127.0.0.1:9902") or "", "--admin", allow_unix=False),
        namespace=namespace or "",
        labels=_labels(pick("labels", "EXTPROC_LABELS", "") or ""),
        workload=pick("workload", "EXTPROC_WORKLOAD", "") or "",
        root_namespace=pick("root_namespace", "EXTPROC_ROOT_NAMESPACE", "istio-system") or "istio-system",
        trust_domain=pick("trust_domain", "EXTPROC_TRUST_DOMAIN", "cluster.local") or "cluster.local",
        trust_domain_aliases=tuple(aliases),
        jwt_payload_key=pick("jwt_payload_key", "EXTPROC_JWT_PAYLOAD_KEY", "payload") or "payload",
        xff_num_trusted_hops=_int(
            pick("xff_num_trusted_hops", "EXTPROC_XFF_NUM_TRUSTED_HOPS", "0") or "0", "--xff-num-trusted-hops"
        ),
        max_request_headers_kb=_int(
            pick("max_request_headers_kb", "EXTPROC_MAX_REQUEST_HEADERS_KB", "96") or "96",
            "--max-request-headers-kb",
            1,
        ),
        multiple_custom_providers=_bool(
            pick("multiple_custom_providers", "EXTPROC_MULTIPLE_CUSTOM_PROVIDERS", "false") or "false",
            "--multiple-custom-providers",
        ),
        direction=direction,
        path_normalization=path_normalization,
        cluster=pick("cluster", "EXTPROC_CLUSTER", "Kubernetes") or "",
        service_account=pick("service_account", "EXTPROC_SERVICE_ACCOUNT", "") or "",
        service_host=pick("service_host", "EXTPROC_SERVICE_HOST", "") or "",
        node_id=pick("node_id", "EXTPROC_NODE_ID", "") or "",
        metrics_max_series=_int(
            pick("metrics_max_series", "EXTPROC_METRICS_MAX_SERIES", "50000") or "50000", "--metrics-max-series", 1
        ),
        metrics_idle_expiry_s=_duration(
            pick("metrics_idle_expiry", "EXTPROC_METRICS_IDLE_EXPIRY", "1h") or "1h",
            "--metrics-idle-expiry",
            allow_zero=True,
        ),
        trace_formats=trace_formats,
        trace_sampling=trace_sampling,
        otlp_endpoint=otlp,
        trace_queue_size=_int(
            pick("trace_queue_size", "EXTPROC_TRACE_QUEUE_SIZE", "2048") or "2048", "--trace-queue-size", 1
        ),
        drain_timeout_s=drain_s,
        config_settle_s=_duration(
            pick("config_settle", "EXTPROC_CONFIG_SETTLE", "1s") or "1s", "--config-settle", allow_zero=True
        ),
        max_concurrent_rpcs=_int(
            pick("max_concurrent_rpcs", "EXTPROC_MAX_CONCURRENT_RPCS", "0") or "0", "--max-concurrent-rpcs"
        ),
        log_level=log_level,
        log_format=log_format,
        central=central,
    )
