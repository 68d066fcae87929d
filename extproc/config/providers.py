"""Resolve MeshConfig.extensionProviders into the settings a CUSTOM call needs.

Checks follow istio/istio pilot/pkg/security/authz/builder/extauthz.go and
pkg/config/validation/agent/extensionprovider.go. As in istiod, an entry whose settings
are invalid (a port out of range, an unknown statusOnError, a pathPrefix without `/`, a
service that names nothing) does not stop the mesh config from loading: istiod warns,
keeps the entry as unusable, and the CUSTOM rules naming it deny what they match
("-deny-due-to-bad-CUSTOM-action") while every other policy is served. Only what would
not even parse as a MeshConfig (a malformed duration, an unknown field) rejects the load.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from extproc.config.errors import format_path
from extproc.config.models import EnvoyExtAuthzGrpcProvider, EnvoyExtAuthzHttpProvider, ExtensionProvider

Path = tuple[str | int, ...]

DEFAULT_TIMEOUT_S = 600.0  # Istio's timeoutOrDefault

# envoy.type.v3.StatusCode values: the codes Istio accepts for statusOnError.
ENVOY_STATUS_CODES = frozenset(
    (100, 200, 201, 202, 203, 204, 205, 206, 207, 208, 226, 300, 301, 302, 303, 304, 305, 307, 308)
    + (400, 401, 402, 403, 404, 405, 406, 407, 408, 409, 410, 411, 412, 413, 414, 415, 416, 417, 421)
    + (422, 423, 424, 426, 428, 429, 431, 500, 501, 502, 503, 504, 505, 506, 507, 508, 510, 511)
)

_GO_DURATION = re.compile(r"^(?:(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h))+$")
_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds from a protobuf JSON duration ("0.5s") or a Go duration ("1m30s", "250ms")."""
    if not _GO_DURATION.match(text):
        raise ValueError(f"invalid duration {text!r}: use a form such as 0.5s, 250ms or 1m")
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in _GO_DURATION_PART.findall(text))


@dataclass(frozen=True, slots=True)
class HeaderPattern:
    """An ignore-case exact/prefix/suffix header-name matcher (Istio generateHeaders)."""

    kind: str  # exact | prefix | suffix
    value: str  # lower-cased

    def matches(self, name: str) -> bool:
        n = name.lower()
        if self.kind == "exact":
            return n == self.value
        if self.kind == "prefix":
            return n.startswith(self.value)
        return n.endswith(self.value)

    @staticmethod
    def parse(text: str) -> HeaderPattern:
        if text.startswith("*"):
            return HeaderPattern("suffix", text[1:].lower())
        if text.endswith("*"):
            return HeaderPattern("prefix", text[:-1].lower())
        return HeaderPattern("exact", text.lower())


def _patterns(values: list[str] | None) -> tuple[HeaderPattern, ...] | None:
    return None if not values else tuple(HeaderPattern.parse(v) for v in values)


# --- the provider's `service`, as istiod reads it ----------------------------------------

_DNS1123_LABEL = re.compile(r"^[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?$")
_WILDCARD_LABEL = re.compile(r"^(?:\*|(?:\*|\*-)?[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?)$")
_GO_INT = re.compile(r"^[+-]?[0-9]+$")
_INT64_MAX = 2**63 - 1


def _is_label(label: str) -> bool:
    return len(label) <= 63 and _DNS1123_LABEL.match(label) is not None


def _dns_labels_problem(domain: str) -> str | None:
    """Istio's ValidateDNS1123Labels: each label RFC 1123, the last may be empty (`istio.io.`),
    and the top-level label not a number (Go's strconv.Atoi: a sign allowed, int64 range)."""
    parts = domain.split(".")
    tld = parts[-1]
    if _GO_INT.match(tld) and -_INT64_MAX - 1 <= int(tld) <= _INT64_MAX:
        return f"domain name {domain!r} invalid (top level domain {tld!r} cannot be all-numeric)"
    for i, label in enumerate(parts):
        if i == len(parts) - 1 and label == "":
            return None
        if not _is_label(label):
            return f"domain name {domain!r} invalid (label {label!r} invalid)"
    return None


def _fqdn_problem(name: str) -> str | None:
    if len(name) > 255:
        return f"domain name {name!r} too long (max 255)"
    if not name:
        return "empty domain name not allowed"
    return _dns_labels_problem(name)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _namespaced_host_problems(service: str) -> list[str]:
    """Istio's ValidateNamespaceSlashWildcardHostname (sidecar semantics) for `ns/host`."""
    ns, host = service.split("/", 1)
    out: list[str] = []
    if not ns or not host:
        out.append("config namespace and dnsName in host entry cannot be empty")
    bare = ns.removeprefix("~")
    if bare not in ("", "*", ".") and not _is_label(bare):
        out.append(f"invalid namespace value {ns!r} in sidecar")
    if host != "*" and "." not in host:
        out.append("short names (non FQDN) are not allowed")
    if len(host) > 255:
        out.append(f"domain name {host!r} too long (max 255)")
    elif not host:
        out.append("empty domain name not allowed")
    else:
        first, _, rest = host.partition(".")
        if not (len(first) <= 63 and _WILDCARD_LABEL.match(first)):
            out.append(f"domain name {host!r} invalid (label {first!r} invalid)")
        elif "." in host and (msg := _dns_labels_problem(rest)) is not None:
            out.append(msg)
    if "*" in host and len(host) != 1 and not host.startswith("*."):
        out.append(f"partial wildcard {host!r} not allowed")
    return out


def resolve_service(service: str) -> tuple[str, list[str]]:
    """The host a provider's `service` names, or why istiod could not use it.

    istiod accepts a hostname (`authz.foo.svc.cluster.local`), an IP address, or
    `namespace/hostname` (`foo/authz.foo.svc.cluster.local`), never a port (that is the
    `port` field), and then looks the host up in its service registry (model.LookupCluster):
    `namespace/hostname` must name that hostname in that namespace. extproc has no service
    registry; DNS stands in for it, so a name is dialled as written, with these checks kept:

      * the syntax istiod validates (RFC 1123 labels, FQDN-only after `ns/`, no partial
        wildcards, no `host:port`);
      * `ns/` with a wildcard namespace (`*`, `.`, `~ns`) or a wildcard host can name no
        registry entry, so it resolves to nothing, as it does in istiod;
      * a Kubernetes service name (`<svc>.<ns>.svc.<cluster domain>`) after `ns/` must be in
        that namespace: the registry keeps it under its own namespace only.

    Returns (host, []) or ("", problems).
    """
    if not service:
        return "", ["service must not be empty"]
    if "/" not in service:
        if _fqdn_problem(service) is not None and not _is_ip(service):
            return "", [f"invalid service fmt {service}: {service} is not a valid IP"]
        return service, []
    problems = _namespaced_host_problems(service)
    if problems:
        return "", problems
    ns, host = service.split("/", 1)
    not_found = f"could not find service {service} in Istio service registry"
    if ns in ("*", ".") or ns.startswith("~"):
        return "", [f"{not_found} (namespace {ns!r} is a wildcard, not a namespace)"]
    if "*" in host:
        return "", [f"{not_found} (a wildcard host names no single service)"]
    labels = host.rstrip(".").split(".")
    if len(labels) >= 4 and labels[2] == "svc" and labels[1].lower() != ns.lower():
        return "", [f"{not_found} (that Kubernetes service is in namespace {labels[1]!r}, not {ns!r})"]
    return host, []


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class GrpcProviderSettings:
    name: str
    target: str  # host:port
    timeout_s: float
    fail_open: bool
    status_on_error: int  # 403 unless configured


@dataclass(frozen=True, slots=True)
class HttpProviderSettings:
    name: str
    base_url: str  # http://host:port
    timeout_s: float
    fail_open: bool
    status_on_error: int
    path_prefix: str
    allowed_request_headers: tuple[HeaderPattern, ...] | None
    additional_headers: tuple[tuple[str, str], ...]
    headers_to_upstream_on_allow: tuple[HeaderPattern, ...] | None
    headers_to_downstream_on_deny: tuple[HeaderPattern, ...] | None
    headers_to_downstream_on_allow: tuple[HeaderPattern, ...] | None
    # includeRequestBodyInCheck: forward the body Envoy buffered into the CheckRequest
    # (Envoy's ext_authz filter in front of extproc needs `with_request_body` for that).
    include_request_body: bool = False


ProviderSettings = GrpcProviderSettings | HttpProviderSettings


@dataclass(frozen=True, slots=True)
class InvalidProvider:
    """An ext_authz provider istiod would keep as unusable: its CUSTOM rules deny what they match."""

    name: str
    path: Path  # the entry's place in the mesh config
    issues: tuple[tuple[Path, str], ...]  # (field path in the mesh config, istiod's complaint)

    @property
    def problems(self) -> tuple[str, ...]:
        """The complaints, each led by its field within the entry (`envoyExtAuthzHttp.port: ...`)."""
        return tuple(f"{format_path(p[len(self.path) :]) or 'entry'}: {m}" for p, m in self.issues)

    @property
    def reason(self) -> str:
        return f"provider {self.name!r} is invalid: {'; '.join(self.problems)}"


@dataclass
class ResolvedProviders:
    """The ext_authz providers of a mesh config, sorted by what a CUSTOM policy can do with them."""

    settings: dict[str, ProviderSettings] = field(default_factory=dict)
    invalid: dict[str, InvalidProvider] = field(default_factory=dict)
    # What would not even parse as a MeshConfig: these reject the whole load.
    errors: list[tuple[Path, str]] = field(default_factory=list)


def _provider_name_problem(name: str) -> str | None:
    if not name:
        return "extension provider name must not be empty"
    if len(name) > 63:
        return f"provider name too long (max 63 characters): {len(name)}"
    for i, c in enumerate(name):
        if "a" <= c <= "z" or "0" <= c <= "9" or c == "-":
            continue
        return f"invalid character {c!r} at position {i} (only lowercase letters, digits, and hyphens allowed)"
    if name[0] == "-" or name[-1] == "-":
        return "provider name cannot start or end with hyphen"
    return None


def _common(
    path: Path,
    p: EnvoyExtAuthzGrpcProvider | EnvoyExtAuthzHttpProvider,
    problems: list[tuple[Path, str]],
    errors: list[tuple[Path, str]],
) -> tuple[str, float, int]:
    """(host, timeout, status); istiod's per-provider problems into `problems`, parse errors into `errors`."""
    host, service_problems = resolve_service(p.service)
    problems.extend(((*path, "service"), m) for m in service_problems)
    if not 1 <= p.port <= 65535:
        problems.append(((*path, "port"), f"port must be in the range [1, 65535], found: {p.port}"))
    timeout = DEFAULT_TIMEOUT_S
    if p.timeout is not None:
        try:
            timeout = parse_duration(p.timeout)
        except ValueError as e:
            errors.append(((*path, "timeout"), str(e)))
    status = 403
    if p.status_on_error:
        if not p.status_on_error.isdigit() or int(p.status_on_error) not in ENVOY_STATUS_CODES:
            problems.append(((*path, "statusOnError"), f"unsupported statusOnError {p.status_on_error!r}"))
        else:
            status = int(p.status_on_error)
    return host, timeout, status


def resolve_providers(providers: Iterable[ExtensionProvider], base: Path) -> ResolvedProviders:
    """Each ext_authz entry as settings, or as an InvalidProvider with istiod's reasons.

    As in istiod's processExtensionProvider, a name that is empty, malformed or already
    used by an ext_authz entry makes that entry unusable; a second entry of one name
    replaces the first, so the name is unusable too. Entries of other kinds (tracing,
    logging) are skipped, names included.
    """
    out = ResolvedProviders()
    seen: set[str] = set()
    for i, prov in enumerate(providers):
        path: Path = (*base, i)
        if prov.envoy_ext_authz_grpc is None and prov.envoy_ext_authz_http is None:
            continue  # istiod's authz builder never sees other kinds, nor their names
        problems: list[tuple[Path, str]] = []
        if (msg := _provider_name_problem(prov.name)) is not None:
            problems.append(((*path, "name"), msg))
        elif prov.name in seen:
            problems.append(((*path, "name"), f"extension provider name must be unique, found duplicate: {prov.name}"))
        seen.add(prov.name)
        if prov.envoy_ext_authz_grpc is not None and prov.envoy_ext_authz_http is not None:
            out.errors.append((path, "only one provider kind may be set"))
            continue
        settings: ProviderSettings
        if (g := prov.envoy_ext_authz_grpc) is not None:
            gp: Path = (*path, "envoyExtAuthzGrpc")
            host, timeout, status = _common(gp, g, problems, out.errors)
            settings = GrpcProviderSettings(prov.name, _host_port(host, g.port), timeout, g.fail_open, status)
        elif (h := prov.envoy_ext_authz_http) is not None:
            hp: Path = (*path, "envoyExtAuthzHttp")
            host, timeout, status = _common(hp, h, problems, out.errors)
            if h.path_prefix and not h.path_prefix.startswith("/"):
                problems.append(((*hp, "pathPrefix"), f"pathPrefix must begin with `/`, found: {h.path_prefix!r}"))
            for fld in (
                "include_request_headers_in_check",
                "include_headers_in_check",
                "headers_to_downstream_on_deny",
                "headers_to_downstream_on_allow",
                "headers_to_upstream_on_allow",
            ):
                for j, val in enumerate(getattr(h, fld) or ()):
                    if val == "*":
                        problems.append(
                            (
                                (*hp, _camel(fld), j),
                                'a single wildcard ("*") is not supported, change it to either prefix or suffix match',
                            )
                        )
            allowed = h.include_request_headers_in_check or h.include_headers_in_check
            settings = HttpProviderSettings(
                name=prov.name,
                base_url=f"http://{_host_port(host, h.port)}",
                timeout_s=timeout,
                fail_open=h.fail_open,
                status_on_error=status,
                path_prefix=h.path_prefix,
                allowed_request_headers=_patterns(allowed),
                additional_headers=tuple(sorted((h.include_additional_headers_in_check or {}).items())),
                headers_to_upstream_on_allow=_patterns(h.headers_to_upstream_on_allow),
                headers_to_downstream_on_deny=_patterns(h.headers_to_downstream_on_deny),
                headers_to_downstream_on_allow=_patterns(h.headers_to_downstream_on_allow),
                include_request_body=h.include_request_body_in_check is not None,
            )
        else:
            continue
        if problems:
            out.settings.pop(prov.name, None)
            out.invalid[prov.name] = InvalidProvider(prov.name, path, tuple(problems))
        else:
            out.settings[prov.name] = settings
    return out


def _camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(w.capitalize() for w in rest)
