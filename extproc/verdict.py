"""The decision as plain data, and the names under which every transport reports it.

A `Verdict` is what extproc decided about one request or connection: allowed or not, which
stage and policy decided and why, the status and body of a denial, the header and query
changes of an allowed request, the headers for the response, and the decision metadata.
It is computed by `extproc.decision.decide` from the snapshot, the request's Attributes
and the outcome of any CUSTOM provider, and every transport renders it in its own message
(ext_authz CheckResponse, ext_proc ProcessingResponse): none builds another's message.

A Verdict depends only on the snapshot and the attributes its policies read, never on
per-request randomness, so it can be cached and reused for every request with the same
referenced values (see `extproc.decision.cache`), and renderers may memoise its encoded
form in `memo`. What does change on every request travels next to it: the trace context
(new span ids) and the peer metadata exchange.

Metadata keys are defined here once. Where Envoy's RBAC filter has a name for a fact we
use it, so access logs and dashboards written for Istio's native filters read the same
keys; the `extproc_*` keys are ours.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

# --- decision metadata keys (Envoy dynamic metadata) -------------------------------------

ENGINE_RESULT = "enforced_engine_result"  # "allowed" | "denied" (Envoy RBAC)
EFFECTIVE_POLICY = "enforced_effective_policy_id"  # the deciding rule (Envoy RBAC)
ACCESS_LOG_HINT = "access_log_hint"  # an AUDIT rule matched (Envoy RBAC)
AUDIT_POLICY = "audit_effective_policy_id"
DRY_RUN_ALLOW_PREFIX = "istio_dry_run_allow_"  # Istio's shadow-rules prefixes
DRY_RUN_DENY_PREFIX = "istio_dry_run_deny_"
SHADOW_RESULT = "shadow_engine_result"  # after a dry-run prefix (Envoy RBAC)
SHADOW_POLICY = "shadow_effective_policy_id"
STAGE = "extproc_stage"  # which stage decided: see `Stage`
REASON = "extproc_reason"  # why, in words
SNAPSHOT = "extproc_snapshot"  # the configuration version that decided
REQUEST_PRINCIPAL = "extproc_request_principal"  # iss/sub of the last verified JWT
CUSTOM_POLICY = "extproc_custom_policy_id"  # the CUSTOM rule whose provider denied
# Span ids handed from the Check to the access log entry (see extproc/tracing/tracer.py).
TRACE = "extproc_trace"  # "<trace 32 hex>-<span 16 hex>-<parent 16 hex>"
TRACESTATE = "extproc_tracestate"
# The peer's metadata exchange pair, handed from an HTTP check (`authz-http`) to the access log
# entry. Over gRPC it travels under the exchange header's own name; over HTTP that name is
# taken by our answer to the client (see extproc/services/http_check_render.py).
PEER_METADATA = "extproc_peer_metadata"
PEER_METADATA_ID = "extproc_peer_metadata_id"
# What a span reports of the decision.
SPAN_DECISION_KEYS = (ENGINE_RESULT, STAGE, EFFECTIVE_POLICY)

ALLOWED = "allowed"
DENIED = "denied"
DENIED_BODY = "RBAC: access denied"  # Envoy RBAC's local reply


class Stage(enum.StrEnum):
    """What decided, in Istio's filter order."""

    CUSTOM = "custom"  # a CUSTOM provider denied, failed, or cannot be used
    JWT = "jwt"  # RequestAuthentication rejected a token
    DENY = "deny"  # a DENY policy matched
    ALLOW = "allow"  # an ALLOW policy matched
    NO_MATCH = "no-match"  # ALLOW policies apply and none matched
    NO_POLICY = "no-policy"  # no ALLOW policy applies: allowed
    OUTBOUND = "outbound"  # a client-side check: policies apply inbound only
    MALFORMED = "malformed"  # a request extproc refuses to evaluate (counted under this stage)
    ERROR = "error"  # internal error or unusable request: denied (its metadata says "error")


class Append(enum.IntEnum):
    """Envoy's HeaderValueOption.HeaderAppendAction, numbered as on the wire."""

    APPEND_IF_EXISTS_OR_ADD = 0
    ADD_IF_ABSENT = 1
    OVERWRITE_IF_EXISTS_OR_ADD = 2
    OVERWRITE_IF_EXISTS = 3


class HeaderOp(NamedTuple):
    """One header to write, and how it combines with a value already there."""

    name: str
    value: str
    action: Append = Append.OVERWRITE_IF_EXISTS_OR_ADD


@dataclass(frozen=True, slots=True)
class Shadow:
    """A dry-run evaluation, as Envoy's RBAC shadow engine reports it."""

    action: str  # "ALLOW" | "DENY"
    allowed: bool
    policy_id: str | None


EMPTY: Mapping[str, Any] = {}


@dataclass(frozen=True, slots=True, eq=False)
class Verdict:
    allowed: bool
    stage: Stage
    http: bool = True  # False for a TCP connection: a denial closes it, nothing is sent
    policy_id: str | None = None  # the deciding rule, Istio's Envoy policy name
    reason: str = ""
    # A denial: the HTTP status and body of the local reply, and the ext_authz status (a
    # google.rpc code and message) Envoy's ext_authz filter is given.
    status: int = 200
    grpc_code: int = 0
    message: str = ""
    body: str = ""
    # An allowed request: changes to the request the upstream sees.
    headers: tuple[HeaderOp, ...] = ()
    remove_headers: tuple[str, ...] = ()
    remove_query: tuple[str, ...] = ()  # parameter names as spelt in the request
    set_query: tuple[tuple[str, str], ...] = ()
    # Allowed: headers added to the upstream's response. Denied: headers of the local reply.
    response_headers: tuple[HeaderOp, ...] = ()
    # Envoy dynamic metadata: the decision under the keys above, and any a CUSTOM provider set.
    metadata: Mapping[str, Any] = field(default_factory=lambda: EMPTY)
    # Facts the counters need, kept apart from the rendered metadata.
    audit_policy_id: str | None = None
    shadow: tuple[Shadow, ...] = ()
    # %RESPONSE_CODE_DETAILS% of a denial, named like the native filter that would have denied.
    details: str = ""
    # Renderers keep the encoded form of this verdict here, per transport, so a cached verdict
    # is encoded once however many requests it answers.
    memo: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def engine_result(self) -> str:
        return ALLOWED if self.allowed else DENIED
