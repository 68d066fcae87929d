"""Typed models of the resources extproc reads, with Istio's field names.

These models only check shape (types, unknown fields, enums). The semantic rules
Istio's validation webhook enforces live in `validation.py`, so each can report the
exact field it concerns.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

SECURITY_API_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")
NETWORKING_API_VERSIONS = ("networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3")
EXTPROC_API_VERSION = "extproc.io/v1alpha1"


class StrictModel(BaseModel):
    """The base of every resource model: unknown fields, wrong types and mutation refused;
    camelCase in YAML, snake_case in Python."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        frozen=True,
        alias_generator=to_camel,
        populate_by_name=True,
    )


StrList = list[str]


class ObjectMeta(BaseModel):
    """Kubernetes metadata; fields extproc does not use are accepted and ignored."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    name: Annotated[str, Field(min_length=1)]
    namespace: str | None = None
    annotations: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)


class WorkloadSelector(StrictModel):
    match_labels: dict[str, str] | None = None


class PolicyTargetReference(StrictModel):
    group: str = ""
    kind: str
    name: str
    namespace: str = ""


class Source(StrictModel):
    principals: StrList | None = None
    not_principals: StrList | None = None
    request_principals: StrList | None = None
    not_request_principals: StrList | None = None
    namespaces: StrList | None = None
    not_namespaces: StrList | None = None
    service_accounts: StrList | None = None
    not_service_accounts: StrList | None = None
    ip_blocks: StrList | None = None
    not_ip_blocks: StrList | None = None
    remote_ip_blocks: StrList | None = None
    not_remote_ip_blocks: StrList | None = None
    trust_domains: StrList | None = None
    not_trust_domains: StrList | None = None


class Operation(StrictModel):
    hosts: StrList | None = None
    not_hosts: StrList | None = None
    ports: StrList | None = None
    not_ports: StrList | None = None
    methods: StrList | None = None
    not_methods: StrList | None = None
    paths: StrList | None = None
    not_paths: StrList | None = None


class From(StrictModel):
    source: Source | None = None


class To(StrictModel):
    operation: Operation | None = None


class Condition(StrictModel):
    key: str = ""
    values: StrList | None = None
    not_values: StrList | None = None


class Rule(StrictModel):
    from_: Annotated[list[From | None] | None, Field(alias="from")] = None
    to: list[To | None] | None = None
    when: list[Condition | None] | None = None


class Action(StrEnum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"
    CUSTOM = "CUSTOM"


class ExtensionProviderRef(StrictModel):
    name: str = ""


class AuthorizationPolicySpec(StrictModel):
    selector: WorkloadSelector | None = None
    target_ref: PolicyTargetReference | None = None
    target_refs: Annotated[list[PolicyTargetReference] | None, Field(max_length=16)] = None
    rules: Annotated[list[Rule | None] | None, Field(max_length=512)] = None
    action: Annotated[Action, Field(strict=False)] = Action.ALLOW
    provider: ExtensionProviderRef | None = None

    @field_validator("action", mode="before")
    @classmethod
    def _action_is_enum_name(cls, v: Any) -> Any:
        # Kubernetes accepts the enum's name only; give a clear message for anything else.
        if isinstance(v, str) and v not in Action.__members__:
            raise ValueError(f"must be one of {', '.join(Action.__members__)}, got {v!r}")
        return v


class AuthorizationPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)

    api_version: Annotated[str, Field(alias="apiVersion")]
    kind: str
    metadata: ObjectMeta
    spec: AuthorizationPolicySpec = Field(default_factory=AuthorizationPolicySpec)
    status: Any = None  # present in `kubectl get -o yaml` output; ignored


# --- RequestAuthentication (security.istio.io) ---------------------------------------


class JwtHeader(StrictModel):
    name: str = ""
    prefix: str = ""


class ClaimToHeader(StrictModel):
    header: str = ""
    claim: str = ""


class JwtRule(StrictModel):
    issuer: str = ""
    audiences: StrList | None = None
    jwks_uri: str = ""
    jwks: str = ""
    from_headers: list[JwtHeader | None] | None = None
    from_params: StrList | None = None
    from_cookies: StrList | None = None
    output_payload_to_header: str = ""
    forward_original_token: bool = False
    output_claim_to_headers: list[ClaimToHeader | None] | None = None
    timeout: str | None = None
    space_delimited_claims: Annotated[StrList | None, Field(max_length=64)] = None
    # OPTIONAL (the default) or REQUIRED: a REQUIRED rule's token must be present and valid.
    presence: str | None = None


class RequestAuthenticationSpec(StrictModel):
    selector: WorkloadSelector | None = None
    target_ref: PolicyTargetReference | None = None
    target_refs: Annotated[list[PolicyTargetReference] | None, Field(max_length=16)] = None
    jwt_rules: Annotated[list[JwtRule | None] | None, Field(max_length=4096)] = None


class RequestAuthentication(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)

    api_version: Annotated[str, Field(alias="apiVersion")]
    kind: str
    metadata: ObjectMeta
    spec: RequestAuthenticationSpec = Field(default_factory=RequestAuthenticationSpec)
    status: Any = None


# --- WorkloadEntry and ServiceEntry (networking.istio.io) ------------------------------
#
# Istio's numbers are uint32: YAML/JSON numbers only, a quoted "8080" is an error. Their
# ranges (ports 1..65535, weight 0..2^32-1) are checked in validation.py, which names the field.


def _enum_name(enum: type[StrEnum], v: Any) -> Any:
    # Kubernetes accepts the enum's name only; give a clear message for anything else.
    if isinstance(v, str) and v not in enum.__members__:
        raise ValueError(f"must be one of {', '.join(enum.__members__)}, got {v!r}")
    return v


class WorkloadEntrySpec(StrictModel):
    """Istio's WorkloadEntry; also the type of a ServiceEntry's `endpoints`."""

    address: str = ""
    ports: dict[str, int] | None = None  # service port name -> this endpoint's port
    labels: dict[str, str] | None = None
    network: str = ""
    locality: str = ""
    weight: int = 0
    service_account: str = ""


class WorkloadEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)

    api_version: Annotated[str, Field(alias="apiVersion")]
    kind: str
    metadata: ObjectMeta
    spec: WorkloadEntrySpec = Field(default_factory=WorkloadEntrySpec)
    status: Any = None


class ServicePort(StrictModel):
    number: int
    protocol: str = ""
    name: str = ""  # required by the CRD; validation.py reports it missing, naming the port
    target_port: int = 0


class Location(StrEnum):
    MESH_EXTERNAL = "MESH_EXTERNAL"
    MESH_INTERNAL = "MESH_INTERNAL"


class Resolution(StrEnum):
    NONE = "NONE"
    STATIC = "STATIC"
    DNS = "DNS"
    DNS_ROUND_ROBIN = "DNS_ROUND_ROBIN"
    DYNAMIC_DNS = "DYNAMIC_DNS"  # in Istio's CRD at HEAD: wildcard hosts resolved per request


class NetworkingWorkloadSelector(StrictModel):
    """networking.istio.io's WorkloadSelector: `labels`, where security.istio.io's has `matchLabels`."""

    labels: dict[str, str] | None = None


class ServiceEntrySpec(StrictModel):
    hosts: list[str]
    addresses: list[str] | None = None
    ports: list[ServicePort] | None = None
    location: Annotated[Location, Field(strict=False)] = Location.MESH_EXTERNAL
    resolution: Annotated[Resolution, Field(strict=False)] = Resolution.NONE
    endpoints: list[WorkloadEntrySpec] | None = None
    workload_selector: NetworkingWorkloadSelector | None = None
    export_to: list[str] | None = None
    subject_alt_names: list[str] | None = None

    @field_validator("location", mode="before")
    @classmethod
    def _location_is_enum_name(cls, v: Any) -> Any:
        return _enum_name(Location, v)

    @field_validator("resolution", mode="before")
    @classmethod
    def _resolution_is_enum_name(cls, v: Any) -> Any:
        return _enum_name(Resolution, v)


class ServiceEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)

    api_version: Annotated[str, Field(alias="apiVersion")]
    kind: str
    metadata: ObjectMeta
    spec: ServiceEntrySpec
    status: Any = None


# --- extension providers (Istio MeshConfig.extensionProviders) -----------------------


class RequestBody(StrictModel):
    max_request_bytes: int = 0
    allow_partial_message: bool = False
    pack_as_bytes: bool = False


class EnvoyExtAuthzGrpcProvider(StrictModel):
    service: Annotated[str, Field(min_length=1)]
    port: int
    timeout: str | None = None
    fail_open: bool = False
    clear_route_cache: bool = False
    status_on_error: str = ""
    include_request_body_in_check: RequestBody | None = None


class EnvoyExtAuthzHttpProvider(StrictModel):
    service: Annotated[str, Field(min_length=1)]
    port: int
    timeout: str | None = None
    path_prefix: str = ""
    fail_open: bool = False
    clear_route_cache: bool = False
    status_on_error: str = ""
    include_headers_in_check: StrList | None = None  # deprecated alias of includeRequestHeadersInCheck
    include_request_headers_in_check: StrList | None = None
    include_additional_headers_in_check: dict[str, str] | None = None
    include_request_body_in_check: RequestBody | None = None
    headers_to_upstream_on_allow: StrList | None = None
    headers_to_downstream_on_deny: StrList | None = None
    headers_to_downstream_on_allow: StrList | None = None


class ExtensionProvider(BaseModel):
    """One entry of `extensionProviders`. Only the ext_authz kinds matter to CUSTOM; other
    provider kinds (tracing, access logging) are accepted so a real mesh config loads."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True, populate_by_name=True)

    name: str
    envoy_ext_authz_grpc: Annotated[EnvoyExtAuthzGrpcProvider | None, Field(alias="envoyExtAuthzGrpc")] = None
    envoy_ext_authz_http: Annotated[EnvoyExtAuthzHttpProvider | None, Field(alias="envoyExtAuthzHttp")] = None


class MeshConfigSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)

    extension_providers: Annotated[list[ExtensionProvider], Field(alias="extensionProviders")] = Field(
        default_factory=list
    )


class MeshConfig(BaseModel):
    """extproc's own wrapper of the parts of Istio's MeshConfig it honours."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)

    api_version: Annotated[str, Field(alias="apiVersion")]
    kind: str
    metadata: ObjectMeta | None = None
    spec: MeshConfigSpec = Field(default_factory=MeshConfigSpec)
