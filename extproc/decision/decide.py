"""From the outcomes of the engines to a `Verdict`: pure functions, no I/O, no protobuf.

Stages run in Istio's filter order: CUSTOM (ext_authz, consulted by the caller because it
needs the network), then RequestAuthentication (what Envoy's jwt_authn would do), then
AUDIT/DENY/ALLOW (what Envoy's RBAC would do). Each function here turns one way a request
can end into the Verdict users of Istio's native filters expect:

* a JWT failure: 401 (403 for a disallowed audience) with jwt_authn's body and
  `WWW-Authenticate`, even where the policies would allow;
* a policy denial: 403 `RBAC: access denied` (TCP: the connection is closed);
* an allowed request: header changes only from a CUSTOM provider and from JWT verification
  (token stripped, claim and payload headers set);
* either way, decision metadata under Envoy RBAC's own key names (extproc.verdict).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from extproc.attributes import Attributes
from extproc.authn.verifier import AuthnResult, www_authenticate
from extproc.authz import engine
from extproc.authz.compiler import CompiledRule
from extproc.verdict import (
    ACCESS_LOG_HINT,
    AUDIT_POLICY,
    CUSTOM_POLICY,
    DENIED,
    DENIED_BODY,
    DRY_RUN_ALLOW_PREFIX,
    DRY_RUN_DENY_PREFIX,
    EFFECTIVE_POLICY,
    EMPTY,
    ENGINE_RESULT,
    REASON,
    REQUEST_PRINCIPAL,
    SHADOW_POLICY,
    SHADOW_RESULT,
    SNAPSHOT,
    STAGE,
    Append,
    HeaderOp,
    Shadow,
    Stage,
    Verdict,
)

if TYPE_CHECKING:
    from extproc.snapshot.compiled import Snapshot

# google.rpc.Code values an ext_authz status carries (the protos are the renderer's business).
GRPC_OK = 0
GRPC_PERMISSION_DENIED = 7
GRPC_UNAVAILABLE = 14
GRPC_UNAUTHENTICATED = 16


@dataclass(frozen=True, slots=True)
class Changes:
    """Request changes an allowed stage asks for (a CUSTOM provider's OK, a verified JWT)."""

    headers: tuple[HeaderOp, ...] = ()
    remove_headers: tuple[str, ...] = ()
    remove_query: tuple[str, ...] = ()
    set_query: tuple[tuple[str, str], ...] = ()
    response_headers: tuple[HeaderOp, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=lambda: EMPTY)

    def then(self, other: Changes | None) -> Changes:
        """These changes followed by `other`'s, as Envoy applies two OK responses in turn."""
        if other is None:
            return self
        return Changes(
            self.headers + other.headers,
            self.remove_headers + other.remove_headers,
            self.remove_query + other.remove_query,
            self.set_query + other.set_query,
            self.response_headers + other.response_headers,
            {**self.metadata, **other.metadata},
        )


NO_CHANGES = Changes()


@dataclass(frozen=True, slots=True)
class CustomDenial:
    """A CUSTOM provider's denial (or failure), as its CheckResponse or HTTP answer said it."""

    grpc_code: int
    message: str = ""
    status: int = 0  # 0: the provider sent no HTTP status (Envoy then answers 403)
    body: str = ""
    headers: tuple[HeaderOp, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=lambda: EMPTY)


def jwt_changes(authn: AuthnResult) -> Changes | None:
    """The header changes of a successful verification, as jwt_authn would make them."""
    if not authn.remove_headers and not authn.set_headers and not authn.remove_query_params:
        return None
    # jwt_authn adds one entry per verified token; the upstream sees them joined with ",".
    return Changes(
        headers=tuple(HeaderOp(name, ",".join(values)) for name, values in authn.set_headers),
        remove_headers=authn.remove_headers,
        remove_query=authn.remove_query_params,
    )


def decision_metadata(d: engine.Decision, version: int) -> dict[str, Any]:
    md: dict[str, Any] = {ENGINE_RESULT: d.engine_result, STAGE: d.stage, REASON: d.reason, SNAPSHOT: version}
    if d.policy_id is not None:
        md[EFFECTIVE_POLICY] = d.policy_id
    if d.audit_policy_id is not None:
        md[ACCESS_LOG_HINT] = True
        md[AUDIT_POLICY] = d.audit_policy_id
    for s in d.shadow:
        prefix = DRY_RUN_ALLOW_PREFIX if s.action == "ALLOW" else DRY_RUN_DENY_PREFIX
        md[prefix + SHADOW_RESULT] = s.engine_result
        if s.policy_id is not None:
            md[prefix + SHADOW_POLICY] = s.policy_id
    return md


def from_decision(
    d: engine.Decision,
    version: int,
    *,
    http: bool,
    changes: Changes | None = None,
    request_principal: str | None = None,
) -> Verdict:
    """The DENY/ALLOW outcome; an allowed request carries the earlier stages' changes."""
    md = decision_metadata(d, version)
    shadow = tuple(Shadow(str(s.action), s.allowed, s.policy_id) for s in d.shadow)
    stage = Stage(d.stage)
    if not d.allowed:
        return Verdict(
            allowed=False,
            stage=stage,
            http=http,
            policy_id=d.policy_id,
            reason=d.reason,
            status=403,
            grpc_code=GRPC_PERMISSION_DENIED,
            message=DENIED_BODY,
            body=DENIED_BODY,
            metadata=md,
            audit_policy_id=d.audit_policy_id,
            shadow=shadow,
            # A CUSTOM policy Istio cannot enforce is denied by the ext_authz filter's stand-in.
            details="ext_authz_denied" if stage is Stage.CUSTOM else _rbac_details(d.policy_id),
        )
    c = changes or NO_CHANGES
    if c.metadata:
        md = {**c.metadata, **md}
    if request_principal is not None:
        md[REQUEST_PRINCIPAL] = request_principal
    return Verdict(
        allowed=True,
        stage=stage,
        http=http,
        policy_id=d.policy_id,
        reason=d.reason,
        headers=c.headers,
        remove_headers=c.remove_headers,
        remove_query=c.remove_query,
        set_query=c.set_query,
        response_headers=c.response_headers,
        metadata=md,
        audit_policy_id=d.audit_policy_id,
        shadow=shadow,
    )


def _rbac_details(policy_id: str | None) -> str:
    """%RESPONSE_CODE_DETAILS% as Envoy's RBAC filter writes it (`none` when no rule matched)."""
    return f"rbac_access_denied_matched_policy[{policy_id or 'none'}]"


def jwt_denied(authn: AuthnResult, attrs: Attributes, version: int) -> Verdict:
    """jwt_authn's local reply: its status, its message as the body, and its challenge."""
    http = attrs.http
    assert http is not None
    where = authn.failures[-1] if authn.failures else None
    message = authn.status.message
    reason = message + (f" (token in {where[1]}, RequestAuthentication {where[0]})" if where else "")
    code = authn.http_code
    return Verdict(
        allowed=False,
        stage=Stage.JWT,
        reason=reason,
        status=code,
        grpc_code=GRPC_UNAUTHENTICATED if code == 401 else GRPC_PERMISSION_DENIED,
        message=message,
        body=message,
        response_headers=(HeaderOp("www-authenticate", www_authenticate(authn.status, http.headers, http.scheme)),),
        metadata={ENGINE_RESULT: DENIED, STAGE: Stage.JWT.value, REASON: reason, SNAPSHOT: version},
        details="jwt_authn_access_denied{" + message.replace(" ", "_") + "}",
    )


def bad_custom(program: engine.AuthzProgram, rule: CompiledRule, version: int, *, http: bool) -> Verdict:
    """Istio's deny for a CUSTOM policy it cannot enforce ("-deny-due-to-bad-CUSTOM-action")."""
    return from_decision(engine.bad_custom_decision(program, rule), version, http=http)


def custom_denied(denial: CustomDenial, reason: str, rule_id: str, version: int, *, http: bool) -> Verdict:
    """A CUSTOM provider said no (or failed closed): its answer, with our metadata added."""
    md = {
        **denial.metadata,
        ENGINE_RESULT: DENIED,
        STAGE: Stage.CUSTOM.value,
        REASON: reason,
        SNAPSHOT: version,
        CUSTOM_POLICY: rule_id,
    }
    return Verdict(
        allowed=False,
        stage=Stage.CUSTOM,
        http=http,
        policy_id=rule_id,
        reason=reason,
        status=denial.status,
        grpc_code=denial.grpc_code,
        message=denial.message,
        body=denial.body,
        response_headers=denial.headers,
        metadata=md,
        details="ext_authz_denied",
    )


def error(reason: str, *, http: bool, stage: Stage = Stage.ERROR, message: str = DENIED_BODY) -> Verdict:
    """A request denied without a policy decision: malformed, an internal error, no workload.

    It fails closed with RBAC's reply, and its metadata says `error` whatever the cause.
    """
    return Verdict(
        allowed=False,
        stage=stage,
        http=http,
        reason=reason,
        status=403,
        grpc_code=GRPC_PERMISSION_DENIED,
        message=message,
        body=DENIED_BODY,
        metadata={ENGINE_RESULT: DENIED, STAGE: Stage.ERROR.value, REASON: reason},
        details="extproc_denied",
    )


def malformed(kind: str, *, http: bool) -> Verdict:
    return error(f"malformed request: {kind}", http=http, stage=Stage.MALFORMED)


OUTBOUND_HTTP = Verdict(allowed=True, stage=Stage.OUTBOUND, reason="client side: policies apply inbound")
OUTBOUND_TCP = Verdict(allowed=True, stage=Stage.OUTBOUND, http=False, reason="client side: policies apply inbound")


def header_op(name: str, value: str, append: bool | None, action: int) -> HeaderOp:
    """An Envoy HeaderValueOption as data: the deprecated `append` flag, when set, wins."""
    if append is not None:
        return HeaderOp(name, value, Append.APPEND_IF_EXISTS_OR_ADD if append else Append.OVERWRITE_IF_EXISTS_OR_ADD)
    return HeaderOp(name, value, Append(action))


def custom_stage(snap: Snapshot, attrs: Attributes) -> Verdict | list[tuple[str, str]]:
    """The CUSTOM stage without its network calls: the providers to ask, as (provider, rule id)
    in Envoy's filter order, or the Verdict when a CUSTOM policy cannot be enforced."""
    http = attrs.http is not None
    program = snap.http if http else snap.tcp
    if not program.custom.by_provider and not program.custom.bad:
        return []
    hits, bad = engine.custom_providers(program, attrs)
    if bad is not None:
        return bad_custom(program, bad, snap.version, http=http)
    return hits


def decide(snap: Snapshot, attrs: Attributes, authn: AuthnResult | None, custom: Changes | None = None) -> Verdict:
    """The Verdict once CUSTOM has allowed (with `custom`'s changes) or did not apply.

    `authn` is the RequestAuthentication stage's result for an HTTP request (None when no
    RequestAuthentication applies, or for TCP). A failure ends the request with jwt_authn's
    reply; otherwise the verified claims are what `request.auth.*` conditions see (never the
    client's input), and the JWT's header changes follow CUSTOM's.
    """
    http = attrs.http is not None
    program = snap.http if http else snap.tcp
    principal = None
    changes = custom
    if authn is not None:
        if not authn.ok:
            return jwt_denied(authn, attrs, snap.version)
        attrs = dataclasses.replace(attrs, jwt_payload=authn.payload)
        jwt = jwt_changes(authn)
        changes = jwt if changes is None else changes.then(jwt)
        if authn.verified:
            principal = authn.verified[-1][1]
    return from_decision(
        engine.evaluate(program, attrs), snap.version, http=http, changes=changes, request_principal=principal
    )
