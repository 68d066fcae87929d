"""Resolve MeshConfig.extensionProviders into the settings a CUSTOM call needs.

Checks follow istio/istio pilot/pkg/security/authz/builder/extauthz.go. A provider
that fails them is a configuration error here: the mesh config is extproc's own
file, and loading it half-valid would leave CUSTOM policies in an unclear state.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

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
    path: Path, p: EnvoyExtAuthzGrpcProvider | EnvoyExtAuthzHttpProvider, problems: list[tuple[Path, str]]
) -> tuple[float, int]:
    if not 1 <= p.port <= 65535:
        problems.append(((*path, "port"), f"port must be in the range [1, 65535], found: {p.port}"))
    timeout = DEFAULT_TIMEOUT_S
    if p.timeout is not None:
        try:
            timeout = parse_duration(p.timeout)
        except ValueError as e:
            problems.append(((*path, "timeout"), str(e)))
    status = 403
    if p.status_on_error:
        if not p.status_on_error.isdigit() or int(p.status_on_error) not in ENVOY_STATUS_CODES:
            problems.append(((*path, "statusOnError"), f"unsupported statusOnError {p.status_on_error!r}"))
        else:
            status = int(p.status_on_error)
    return timeout, status


def resolve_providers(
    providers: Iterable[ExtensionProvider], base: Path
) -> tuple[dict[str, ProviderSettings], list[tuple[Path, str]]]:
    """(settings by name, problems as (path, message))."""
    out: dict[str, ProviderSettings] = {}
    seen: set[str] = set()
    problems: list[tuple[Path, str]] = []
    for i, prov in enumerate(providers):
        path: Path = (*base, i)
        if (msg := _provider_name_problem(prov.name)) is not None:
            problems.append(((*path, "name"), msg))
        elif prov.name in seen:
            problems.append(((*path, "name"), f"extension provider name must be unique, found duplicate: {prov.name}"))
        seen.add(prov.name)
        if prov.envoy_ext_authz_grpc is not None and prov.envoy_ext_authz_http is not None:
            problems.append((path, "only one provider kind may be set"))
            continue
        if (g := prov.envoy_ext_authz_grpc) is not None:
            gp: Path = (*path, "envoyExtAuthzGrpc")
            timeout, status = _common(gp, g, problems)
            out[prov.name] = GrpcProviderSettings(prov.name, f"{g.service}:{g.port}", timeout, g.fail_open, status)
        elif (h := prov.envoy_ext_authz_http) is not None:
            hp: Path = (*path, "envoyExtAuthzHttp")
            timeout, status = _common(hp, h, problems)
            if h.path_prefix and not h.path_prefix.startswith("/"):
                problems.append(((*hp, "pathPrefix"), f"pathPrefix must begin with `/`, found: {h.path_prefix!r}"))
            for field in (
                "include_request_headers_in_check",
                "include_headers_in_check",
                "headers_to_downstream_on_deny",
                "headers_to_downstream_on_allow",
                "headers_to_upstream_on_allow",
            ):
                for j, val in enumerate(getattr(h, field) or ()):
                    if val == "*":
                        problems.append(
                            (
                                (*hp, _camel(field), j),
                                'a single wildcard ("*") is not supported, change it to either prefix or suffix match',
                            )
                        )
            allowed = h.include_request_headers_in_check or h.include_headers_in_check
            host = h.service if ":" not in h.service else f"[{h.service}]"
            out[prov.name] = HttpProviderSettings(
                name=prov.name,
                base_url=f"http://{host}:{h.port}",
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
    return out, problems


def _camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(w.capitalize() for w in rest)
