"""The comments of a generated bootstrap: a header (what the file is, how to run it, its ports,
the choices that matter) and notes on the fields a copy into another Envoy must keep."""

from __future__ import annotations

import textwrap

from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap

from extproc.envoy_config.build import listener_names, tcp_upstream_cluster, upstream_cluster
from extproc.envoy_config.options import Mode, Options, Side, defaults
from extproc.envoy_config.render import Style

SHIPPED = {
    (Mode.AUTHZ, Side.INBOUND): "authz.yaml",
    (Mode.AUTHZ, Side.OUTBOUND): "authz-outbound.yaml",
    (Mode.AUTHZ_HTTP, Side.INBOUND): "authz-http.yaml",
    (Mode.AUTHZ_HTTP, Side.OUTBOUND): "authz-http-outbound.yaml",
    (Mode.EXTPROC, Side.INBOUND): "extproc.yaml",
    (Mode.EXTPROC, Side.OUTBOUND): "extproc-outbound.yaml",
}

# Fields written even at their default value, where the file reads better with them.
SHOWN = {
    "HttpConnectionManager": frozenset({"codec_type", "merge_slashes"}),
    "Cluster": frozenset({"type"}),
    "ExtAuthz": frozenset({"failure_mode_allow"}),
    "ExternalProcessor": frozenset({"failure_mode_allow"}),
    "ProcessingMode": frozenset(
        {
            "request_header_mode",
            "response_header_mode",
            "request_body_mode",
            "response_body_mode",
            "request_trailer_mode",
            "response_trailer_mode",
        }
    ),
    "ConfigKeyValuePair": frozenset({"type"}),
}

# Keys put first, where Envoy's declaration order would bury the main ones.
FIRST = {
    "Bootstrap": ("admin", "static_resources"),
    "HttpConnectionManager": (
        "stat_prefix",
        "codec_type",
        "normalize_path",
        "merge_slashes",
        "path_with_escaped_slashes_action",
        "access_log",
        "route_config",
    ),
    "ExtensionWithMatcher": ("extension_config",),
    "ExtAuthz": ("stat_prefix", "grpc_service", "http_service", "transport_api_version", "failure_mode_allow"),
}

_NORMALIZE = """\
Path normalization, as Istio configures every sidecar's HCM by default
(meshConfig.pathNormalization: BASE): RFC 3986 dot segments resolved before any
filter or route sees the path, so "/ok/../admin" or "/%61dmin" reach extproc,
the policies and the upstream as "/admin". Istio's MERGE_SLASHES adds
merge_slashes: true; DECODE_AND_MERGE_SLASHES also sets
path_with_escaped_slashes_action: UNESCAPE_AND_FORWARD. Keep extproc's
--path-normalization the same as (or stronger than) what is set here."""

_CUSTOM_TAGS = """\
What the labels need and no AccessLogCommon field carries: the upstream
certificate's identities (source_principal, destination_principal), the
cluster's istio.services metadata as istiod writes it (destination_service*),
and the route's cluster, which Envoy logs as upstream_cluster only once an
upstream host was picked. An empty value is left out of the entry."""

_RESPONSE_ATTRIBUTES = """\
What the client side's labels need, known once the upstream connection is:
the certificates' URI SANs (source_principal, destination_principal), the
upstream address (a WorkloadEntry peer), the cluster and the istio.services
metadata istiod writes on it (destination_service*). Keep these exact
expressions: a misspelt one is silently absent."""

_PEER_ADDRESS = """\
The physical peer's address, for ipBlocks: ext_proc's source.address follows
x-forwarded-for when the HCM trusts it. Filter state cannot be forged by clients."""

_STRIP = """\
Removes ?access_token= when, and only when, extproc verified a JWT from a query
parameter (and the rule does not forward it): the check then sets
x-extproc-remove-query, which this filter removes too. Every other request skips
the filter, its query untouched. Add your jwtRules' other fromParams names to
query_parameter_mutations."""

_MTLS = """\
In a mesh: mTLS with this workload's certificate, HTTP/2 between the sidecars.
Add to this cluster:
  transport_socket:
    name: envoy.transport_sockets.tls
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
      common_tls_context:
        tls_certificates:
        - certificate_chain: {filename: /etc/certs/cert-chain.pem}
          private_key: {filename: /etc/certs/key.pem}
        validation_context: {trusted_ca: {filename: /etc/certs/root-cert.pem}}
        alpn_protocols: [h2]"""


def style(opts: Options) -> Style:
    notes = {
        "HttpConnectionManager.normalize_path": _NORMALIZE,
        "CommonGrpcAccessLogConfig.custom_tags": _CUSTOM_TAGS,
        "ExternalProcessor.response_attributes": _RESPONSE_ATTRIBUTES,
        "HttpFilter:envoy.filters.http.set_filter_state": _PEER_ADDRESS,
        "HttpFilter:strip_verified_access_token": _STRIP,
    }
    if not opts.inbound:
        notes["Cluster:upstream"] = _MTLS
    return Style(notes=notes, shown=SHOWN, first=FIRST)


# -- the header -------------------------------------------------------------------------------

_TITLE = {
    (Mode.AUTHZ, Side.INBOUND): """\
Envoy bootstrap, mode `authz+als` (inbound): AuthorizationPolicy and RequestAuthentication
enforced by extproc over ext_authz, and Istio's standard metrics from the gRPC access log
service, for HTTP and TCP.""",
    (Mode.AUTHZ_HTTP, Side.INBOUND): """\
Envoy bootstrap, mode `authz-http` (inbound), the fast path: AuthorizationPolicy and
RequestAuthentication enforced by extproc over ext_authz's HTTP service (a plain HTTP/1.1
check, no gRPC), and Istio's standard metrics from the gRPC access log service, for HTTP
and TCP. Same decisions, metadata, metrics and spans as mode `authz+als`.""",
    (Mode.EXTPROC, Side.INBOUND): """\
Envoy bootstrap, mode `extproc` (inbound): one ext_proc filter does everything for HTTP —
RequestAuthentication (JWT), AuthorizationPolicy, the peer metadata exchange, trace
propagation, Istio's standard metrics and spans. TCP keeps the network ext_authz filter and
the TCP access log, as in mode `authz+als` (ext_proc is an HTTP filter).""",
    (Mode.AUTHZ, Side.OUTBOUND): """\
Envoy bootstrap, mode `authz+als`, client side (outbound): the sidecar of a workload that
calls others. No policies apply on this side (Istio enforces at the destination); extproc
adds this workload's peer metadata and the trace context to each request, and reports
Istio's metrics with reporter="source" and one client span per request.""",
    (Mode.AUTHZ_HTTP, Side.OUTBOUND): """\
Envoy bootstrap, mode `authz-http`, client side (outbound): the sidecar of a workload that
calls others, with extproc's HTTP checks. No policies apply on this side (Istio enforces at
the destination); extproc adds this workload's peer metadata and the trace context to each
request, and reports Istio's metrics with reporter="source" and one client span per request.""",
    (Mode.EXTPROC, Side.OUTBOUND): """\
Envoy bootstrap, mode `extproc`, client side (outbound): the sidecar of a workload that
calls others, with one ext_proc filter for HTTP. No policies apply on this side (Istio
enforces at the destination); on the request extproc adds this workload's peer metadata
and the trace context, on the response it takes the server's metadata off (the
application never sees it) and reports Istio's metrics with reporter="source" and one
client span per request. TCP is reported by the TCP access log.""",
}

_SKIP_ENVOY_HEADERS = """\
* skip_envoy_headers on every gRPC call to extproc: Envoy adds none of its x-envoy-* and
  x-forwarded-for headers to them (extproc reads none), so each call carries and
  parses less."""

_AUTHZ_INBOUND = """\
* failure_mode_allow: false — if extproc cannot answer, requests get 403 and
  connections are closed (fail closed, like Istio's RBAC).
* include_peer_certificate / include_tls_session — extproc sees every SAN of the
  client certificate and the SNI, which principals and connection.sni need. Add a
  tls_inspector listener filter on TLS listeners, as Istio does.
* metadata_context_namespaces — the verified JWT claims written by jwt_authn, for
  requestPrincipals and request.auth.* conditions; add any filter whose metadata an
  experimental.envoy.filters.* condition reads.
* no allowed_headers — ext_authz sends every request header; request.headers[...]
  conditions need them."""

_ALS = """\
* the gRPC access logs (HTTP and TCP) feed istio_* metrics. Batched (flushed every
  second or 16 KiB), they cost about one Python message per batch, not per request.
  content-type and grpc-status are logged so gRPC is recognised; grpc_stats hands its
  message counts to the log as filter state; TCP connections report every 5s
  (Istio's tcp_reporting_duration) and at close."""

_BREAKERS = """\
* explicit circuit breakers on the extproc cluster: the default of 1024 requests
  overflows under load and fails requests."""

_AUTHZ_TRACING = """\
* the stdout access log prints extproc's decision from the ext_authz dynamic metadata.
* tracing: an allowed request's OK response carries the trace context for the
  application (traceparent, x-b3-*, as extproc's --trace-formats says), and the span ids
  go to the HTTP access log entry in the ext_authz dynamic metadata, where extproc
  reports the span with Envoy's start time and duration (--otlp-endpoint)."""

_HTTP_CHECK = """\
Why a second transport: an HTTP check served by extproc's raw HTTP/1.1 listener costs a
small fraction of the CPU of a Python gRPC call (see the README's benchmark section).
What an HTTP check can carry was established against Envoy 1.40; the settings below are the
ones a copy of this filter into your own Envoy must keep:

* headers_to_add x-extproc-connection: the connection facts a gRPC CheckRequest carries
  (physical peer, local address, SNI, peer certificate URI SANs, DNS SANs, subject), as
  six space-separated fields. Keep the formatters and their order. The peer address is
  never empty, so Envoy always writes this header and overwrites any client's; a check
  without it is denied as malformed. x-extproc-direction names this side of the mesh.
* headers_to_add x-extproc-md-<namespace>: "=%DYNAMIC_METADATA(<namespace>)%": what the
  gRPC filter's metadata_context_namespaces sends: jwt_authn's verified claims, if a
  jwt_authn filter runs before (requestPrincipals, request.auth.*), and any namespace an
  experimental.envoy.filters.* condition reads. Keep the "=": it makes the value never
  empty, so Envoy always overwrites a client's header of that name.
* disallowed_headers x-extproc-*: no client header of ours reaches extproc at all.
* allowed_headers ".*" (prefix "" is rejected by Envoy): every request header is sent,
  as request.headers[...] conditions and JWT locations need; encode_raw_headers: repeated
  header lines arrive one by one, so header conditions match them line by line exactly
  as Envoy's RBAC does, and non-UTF-8 values are denied instead of mangled.
* allowed_upstream_headers: what an allowed check may set on the upstream request: the
  trace context (traceparent, tracestate, b3, x-b3-*, x-request-id) and every x- header
  except Envoy's own x-envoy-* (JWT outputClaimToHeaders / outputPayloadToHeader and
  CUSTOM headersToUpstreamOnAllow; add patterns for other names you use). Never use a
  catch-all: it copies the check response's content-length into the upstream request.
* allowed_client_headers (denied) and allowed_client_headers_on_success (allowed): our
  peer metadata pair for the client (Istio's metadata exchange); on a denial also every
  x- header (CUSTOM headersToDownstreamOnDeny). www-authenticate always passes. List the
  names a CUSTOM provider's headersToDownstreamOnAllow uses in _on_success. Explicit
  lists keep the decision metadata headers away from clients.
* dynamic_metadata_from_headers: the decision metadata (enforced_*, extproc_*,
  istio_dry_run_*, access_log_hint, audit_*, shadow_*) lands in the
  envoy.filters.http.ext_authz namespace under the same keys as in authz+als, so access
  logs, metrics and spans read it the same way.
* strip_verified_access_token after ext_authz: ext_authz over HTTP cannot remove a
  query parameter, so when extproc verified a JWT sent as ?access_token= (Istio's default
  query location) and the rule does not forward it, the check sets
  x-extproc-remove-query and this filter removes the parameter and that header, as
  jwt_authn would. It runs for no other request. List your jwtRules' other fromParams
  names in its query_parameter_mutations (a name the client percent-encoded, such as
  access%5Ftoken, is removed too).
* the extproc_http cluster: HTTP/1.1 (one connection per check in flight, no
  pipelining), explicit circuit breakers (the defaults, 1024, would fail checks under
  load), failure_mode_allow: false (extproc down: 403, fail closed).
* TCP checks and the access logs stay on gRPC (the extproc cluster, HTTP/2)."""

_EXTPROC_INBOUND = """\
* One side stream per request: request headers and response headers (and response
  trailers, for gRPC status) are sent; bodies are not. extproc ends the stream itself
  after the last message it needs.
* Failure semantics:
    - failure_mode_allow: false — if extproc is down or the stream fails, Envoy answers
      500 (fail closed, like Istio's RBAC); true lets requests through unchecked.
    - message_timeout: 1s — a slower answer fails the request with 504 (with
      failure_mode_allow: false); JWKS fetches and CUSTOM providers run inside it, so
      keep it above their timeouts. Envoy's default is 200ms.
* request_attributes — what ext_proc does not send by default and policies need: the
  addresses (remote.ip, destination.port), the physical peer recorded in filter state
  by set_filter_state (ipBlocks), the client certificate (every SAN, for principals)
  and its first URI SAN (metrics), our own URI SAN (mutual_tls in
  connection_security_policy), the SNI. Without the addresses extproc denies the
  request as malformed (fail closed).
* mutation_rules.allow_envoy — the peer metadata exchange headers are x-envoy-*, which
  ext_proc may not touch by default.
* metadata_options — jwt_authn's verified claims are forwarded (only needed if you
  also run jwt_authn); extproc's decision comes back as dynamic metadata in the
  namespace `extproc`, which the stdout access log prints.
* A denial is a local reply with Istio's status and body (403 `RBAC: access denied`,
  401 with WWW-Authenticate) and response code details named as the native filters
  name them (rbac_access_denied_matched_policy[...], jwt_authn_access_denied{...}).
* explicit circuit breakers on the extproc cluster: one stream per request, and the
  default of 1024 overflows under load.
* TCP: the network ext_authz filter and the TCP access log, as in mode authz+als."""

_OUTBOUND_COMMON = """\
* failure_mode_allow: true on the client side: if extproc is down, requests go out
  without our metadata or trace headers instead of failing; the server still enforces.
* In a mesh the upstream connection is mTLS with this workload's certificate: see the
  comment on the upstream cluster."""

_OUTBOUND = {
    Mode.AUTHZ: """\
* x-extproc-direction: outbound on every filter: the Check only adds headers (our
  x-envoy-peer-metadata pair and the trace context) and never denies.
* header_to_metadata takes the server's metadata pair off the response into the
  dynamic metadata namespace extproc.peer, where the access log entry carries it to
  extproc, and removes it before the application sees the response (what istio/proxy's
  peer_metadata filter does).""",
    Mode.AUTHZ_HTTP: """\
* x-extproc-direction: outbound: the check only adds headers (our x-envoy-peer-metadata
  pair and the trace context) and never denies, so it needs no connection facts.
* allowed_headers: only the trace context is sent to extproc, the one thing an outbound
  check reads; a smaller check costs less on both sides.
* allowed_upstream_headers: our metadata pair and the trace context reach the upstream.
* allowed_client_headers: nothing of a check's answer reaches the application.
* dynamic_metadata_from_headers extproc_*: the client span's ids, for the access log.
* header_to_metadata takes the server's metadata pair off the response into the
  dynamic metadata namespace extproc.peer, where the access log entry carries it to
  extproc, and removes it before the application sees the response.""",
    Mode.EXTPROC: """\
* x-extproc-direction: outbound: extproc never denies here; if it is slower than
  message_timeout, the request goes out without our headers.
* mutation_rules.allow_envoy: the exchange headers are x-envoy-*.
* response_trailer_mode: SEND, so gRPC calls are reported with their grpc-status.""",
}


def _command(opts: Options) -> str:
    words = ["extproc envoy-config", f"--mode {opts.mode.value}", f"--direction {opts.side.value}"]
    base = defaults(opts.side)
    for name, default in base.items():
        value = getattr(opts, name)
        if name == "tcp_listen" and value is None:
            words.append("--no-tcp")
        elif name == "tcp_upstream" and default is None:
            if value != opts.upstream:
                words.append(f"--tcp-upstream {value}")
        elif name == "extproc_http" and opts.mode is not Mode.AUTHZ_HTTP:
            continue  # only authz-http has HTTP checks
        elif value is not None and str(value) != default:
            words.append(f"--{name.replace('_', '-')} {value}")
    return " ".join(words)


def _shell_lines(command: str, width: int = 90) -> list[str]:
    """The command as shell lines joined by backslashes, each short enough for the header."""
    lines: list[str] = []
    words = command.replace("extproc envoy-config", "extproc\0envoy-config").split(" --")
    current = "  " + words[0].replace("\0", " ")
    for word in words[1:]:
        if len(current) + len(word) + 3 > width:
            lines.append(current + " \\")
            current = "    --" + word
        else:
            current += " --" + word
    return [*lines, current]


def _filter_names(boot: Bootstrap, listener: int) -> list[str]:
    chain = boot.static_resources.listeners[listener].filter_chains[0]  # type: ignore[union-attr]
    names = []
    for f in chain.filters:
        if f.name == "envoy.filters.network.http_connection_manager":
            hcm = f.typed_config.unpack()  # type: ignore[union-attr]
            return [h.name.rsplit(".", 1)[-1] for h in hcm.http_filters]  # type: ignore[union-attr]
        names.append(f.name.rsplit(".", 1)[-1])
    return names


def header(opts: Options, boot: Bootstrap) -> str:
    http, tcp = listener_names(opts)
    serve = f"extproc serve --listen {opts.extproc}"
    if opts.mode is Mode.AUTHZ_HTTP:
        serve += f" --http-listen {opts.extproc_http}"
    if not opts.inbound:
        serve += " --direction outbound"
    run = "envoy -c <this file>" + ("" if opts.inbound else "   (--base-id 1 next to an inbound Envoy)")
    lines = [
        _TITLE[(opts.mode, opts.side)],
        "",
        "Generated by:",
        *_shell_lines(_command(opts)),
        f"With the default addresses this command prints envoy/{SHIPPED[(opts.mode, opts.side)]}.",
        "",
        f"  {serve} ...",
        f"  {run}",
        "",
        "Addresses (each is an option of `extproc envoy-config`):",
        f"  {opts.listen!s:<22} HTTP listener {http!r} -> cluster {upstream_cluster(opts)!r}"
        f" (HTTP filters: {', '.join(_filter_names(boot, 0))})",
    ]
    if opts.tcp_listen is not None:
        lines.append(
            f"  {opts.tcp_listen!s:<22} TCP listener {tcp!r} -> cluster {tcp_upstream_cluster(opts)!r}"
            f" (network filters: {', '.join(_filter_names(boot, 1))})"
        )
    upstream = "the application" if opts.inbound else "the server's sidecar"
    lines += [
        f"  {opts.upstream!s:<22} {upstream}" + ("" if opts.shared_upstream else " (HTTP)"),
    ]
    if opts.tcp_listen is not None and not opts.shared_upstream:
        lines.append(f"  {opts.tcp_upstream!s:<22} {upstream} (TCP)")
    grpc_use = "access logs, TCP checks" if opts.mode is Mode.AUTHZ_HTTP else "checks, access logs"
    lines.append(f"  {opts.extproc!s:<22} extproc gRPC, --listen ({grpc_use}; cluster 'extproc', HTTP/2)")
    if opts.mode is Mode.AUTHZ_HTTP:
        lines.append(
            f"  {opts.extproc_http!s:<22} extproc HTTP checks, --http-listen (cluster 'extproc_http', HTTP/1.1)"
        )
    lines.append(f"  {opts.admin!s:<22} Envoy admin")
    lines += ["", *(_HTTP_CHECK.splitlines() if opts.mode is Mode.AUTHZ_HTTP and opts.inbound else [])]
    lines.append("Choices that matter:" if not (opts.mode is Mode.AUTHZ_HTTP and opts.inbound) else "And:")
    for part in _choices(opts):
        lines += part.splitlines()
    lines.append("* The HTTP listener's path normalization: see the comment on normalize_path.")
    return "\n".join(wrapped for line in "\n".join(lines).splitlines() for wrapped in _wrap(line))


def _wrap(line: str, width: int = 96) -> list[str]:
    """A generated line too long for the file, wrapped under its own text."""
    if len(line) <= width:
        return [line]
    body = line.lstrip(" ")
    indent = len(line) - len(body)
    hang = indent + (2 if body.startswith("* ") else 25 if indent == 2 else 0)
    return textwrap.wrap(body, width, initial_indent=" " * indent, subsequent_indent=" " * hang)


def _choices(opts: Options) -> list[str]:
    if not opts.inbound:
        parts = [_OUTBOUND[opts.mode], _OUTBOUND_COMMON]
        if opts.mode is not Mode.EXTPROC:
            parts.append(_ALS)
    elif opts.mode is Mode.EXTPROC:
        parts = [_EXTPROC_INBOUND]
    elif opts.mode is Mode.AUTHZ:
        parts = [_AUTHZ_INBOUND, _BREAKERS, _AUTHZ_TRACING, _ALS]
    else:
        parts = [_ALS]
    direction = "* x-extproc-direction tells extproc which side of the mesh this listener is " + (
        "(inbound: reporter=destination)." if opts.inbound else "(outbound: reporter=source)."
    )
    return [*parts, direction, _SKIP_ENVOY_HEADERS]
