"""`extproc analyze`: config that is valid but does not do what it says, as Istio's analyzers
(`istioctl analyze`) report it, over a config directory.

Messages carry Istio's code where Istio has one for the situation, with Istio's level and
wording (istio/istio `pkg/config/analysis/msg/messages.yaml`), and an `EXT` code of our own
otherwise. Each names its resource and `file:line`. The exit status follows istioctl: 79 when
a message is at or above `--failure-threshold` (default Error), 0 otherwise.

What is known about workloads: the `--workload NAMESPACE[:k=v,...]` facts given, and the
`WorkloadEntry` resources (and ServiceEntry endpoints) of the config. The analyzers that ask
"does anything match?" run only when at least one workload is known, as Istio's run against
the cluster's pods; a namespace counts as existing when a workload or a resource is in it.

Analyzers:
* IST0127 NoMatchingWorkloadsFound: an AuthorizationPolicy or RequestAuthentication whose
  selector (or, namespace-wide, whose namespace) matches no known workload;
* IST0101 ReferencedResourceNotFound: a `source.namespaces`/`notNamespaces` entry naming a
  namespace nothing uses; a CUSTOM action naming an extension provider the mesh config lacks;
  a Telemetry selector that selects no workload of its namespace;
* IST0157 InvalidTelemetryProvider: access logging with no provider (and no mesh default);
* IST0160 MultipleTelemetriesWithoutWorkloadSelectors, IST0159
  ConflictingTelemetryWorkloadSelectors: Telemetry resources Istio would pick between
  arbitrarily;
* EXT0001: a principal (`<td>/ns/<ns>/sa/<sa>`) naming a namespace nothing uses;
* EXT0002: `requestPrincipals` whose issuer no RequestAuthentication that could apply accepts,
  so the rule never matches;
* EXT0003: a DENY rule with HTTP-only fields that also applies to TCP, where Istio drops those
  fields and the rule denies more than it says;
* EXT0004: a rule shadowed by an earlier rule of the same policy, which matches every request
  it does (Info when the two are identical).
"""

from __future__ import annotations

import enum
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from extproc.config.errors import Location
from extproc.config.models import Action, AuthorizationPolicy, Rule
from extproc.config.yamlsource import load_documents
from extproc.snapshot.loader import LoadedConfig, LoadedPolicy
from extproc.workload import parse_labels

EXIT_FOUND_ISSUES = 79  # istioctl's ExitAnalyzerFoundIssues
DOCS = "https://istio.io/latest/docs/reference/config/analysis/{}/"


class Level(enum.IntEnum):
    INFO = 0
    WARNING = 1
    ERROR = 2

    @property
    def label(self) -> str:
        return self.name.capitalize()

    @staticmethod
    def parse(text: str) -> Level:
        try:
            return Level[text.strip().upper()]
        except KeyError:
            raise ValueError(f"expected Info, Warning or Error, got {text!r}") from None


@dataclass(frozen=True)
class Message:
    code: str
    level: Level
    origin: str  # "AuthorizationPolicy foo/deny-all"
    reference: str  # "path/to/file.yaml:12"
    message: str

    def render(self) -> str:
        return f"{self.level.label} [{self.code}] ({self.origin} {self.reference}) {self.message}"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["level"] = self.level.label
        if self.code.startswith("IST"):
            d["documentationUrl"] = DOCS.format(self.code.lower())
        return d


@dataclass(frozen=True)
class KnownWorkload:
    namespace: str
    labels: Mapping[str, str] = field(default_factory=dict)
    origin: str = "--workload"
    # What messages call the pod: the WorkloadEntry's name (a ServiceEntry endpoint's is
    # `<serviceentry>-<index>`, as istiod names it), or the labels of a --workload.
    pod: str = ""

    @property
    def name(self) -> str:
        return self.pod or ",".join(f"{k}={v}" for k, v in sorted(self.labels.items()))


def parse_workload(text: str) -> KnownWorkload:
    """`NAMESPACE[:k=v,k=v]`, as `--workload` takes it."""
    ns, _, rest = text.partition(":")
    if not ns.strip():
        raise ValueError(f"--workload: expected NAMESPACE[:k=v,...], got {text!r}")
    return KnownWorkload(ns.strip(), parse_labels(rest, "--workload"))


# Fields Istio's TCP filter chain cannot evaluate (pilot's authz builder).
_HTTP_ONLY_FROM = ("request_principals", "not_request_principals")
_HTTP_ONLY_TO = ("hosts", "not_hosts", "methods", "not_methods", "paths", "not_paths")
_HTTP_ONLY_WHEN = ("request.", "source.principal_", "experimental.envoy.filters.http")


class _Lines:
    """Lines of fields in the source files, read once per file."""

    def __init__(self) -> None:
        self._docs: dict[str, list[Any]] = {}

    def of(self, loc: Location, path: Sequence[str | int]) -> str:
        docs = self._docs.get(loc.file)
        if docs is None:
            try:
                docs = list(load_documents(Path(loc.file).read_text()))
            except (OSError, yaml.YAMLError):
                docs = []
            self._docs[loc.file] = docs
        line = loc.line
        for d in docs:
            if d.index == loc.document:
                line = d.line_of(tuple(path)) or line
        return f"{loc.file}:{line}" if line else loc.file


class Analysis:
    def __init__(
        self, loaded: LoadedConfig, workloads: Iterable[KnownWorkload] = (), root_namespace: str = "istio-system"
    ) -> None:
        self.loaded = loaded
        self.root = root_namespace
        self.workloads: list[KnownWorkload] = list(workloads)
        for lp in loaded.workload_entries:
            we = lp.policy
            self.workloads.append(
                KnownWorkload(we.metadata.namespace or "", dict(we.spec.labels or {}), lp.origin, we.metadata.name)
            )
        for lp in loaded.service_entries:
            se = lp.policy
            for i, ep in enumerate(se.spec.endpoints or ()):
                self.workloads.append(
                    KnownWorkload(
                        se.metadata.namespace or "", dict(ep.labels or {}), lp.origin, f"{se.metadata.name}-{i}"
                    )
                )
        self.namespaces = {w.namespace for w in self.workloads} | {root_namespace}
        for group in (loaded.policies, loaded.request_authentications, loaded.workload_entries, loaded.service_entries):
            self.namespaces |= {lp.policy.metadata.namespace or "" for lp in group}
        self.namespaces |= {t.namespace for t in loaded.telemetries}
        self.lines = _Lines()
        self.messages: list[Message] = []

    def run(self) -> list[Message]:
        for lp in self.loaded.policies:
            self._policy(lp)
        for lp in self.loaded.request_authentications:
            self._selected(lp, "RequestAuthentication", _labels_of(lp.policy.spec.selector))
        self._telemetries()
        self.messages.sort(key=lambda m: (-m.level, m.origin, m.reference, m.code))
        return self.messages

    # --- helpers -----------------------------------------------------------------------

    def _add(
        self, code: str, level: Level, lp: LoadedPolicy | Any, kind: str, path: Sequence[str | int], text: str
    ) -> None:
        md = lp.policy.metadata
        origin = f"{kind} {md.namespace}/{md.name}"
        self.messages.append(Message(code, level, origin, self.lines.of(lp.location, path), text))

    def _matching(self, namespace: str | None, labels: Mapping[str, str]) -> list[KnownWorkload]:
        return [
            w
            for w in self.workloads
            if (namespace is None or w.namespace == namespace) and all(w.labels.get(k) == v for k, v in labels.items())
        ]

    def _selected(self, lp: Any, kind: str, labels: Mapping[str, str] | None) -> None:
        """IST0127, as Istio's AuthorizationPolicy analyzer decides it (the same rule for the
        other selector-bearing kinds): root namespace with a selector matches anywhere;
        namespace-wide needs a workload in the namespace; a selector one in the namespace."""
        if not self.workloads:
            return
        md = lp.policy.metadata if hasattr(lp, "policy") else lp.resource.metadata
        ns = md.namespace or ""
        if ns == self.root:
            if labels and not self._matching(None, labels):
                self._add("IST0127", Level.WARNING, lp, kind, ("spec", "selector"), _no_workloads(labels))
            return
        if not labels:
            if not self._matching(ns, {}):
                self._add("IST0127", Level.WARNING, lp, kind, ("metadata",), _no_workloads({}))
            return
        if not self._matching(ns, labels):
            self._add("IST0127", Level.WARNING, lp, kind, ("spec", "selector"), _no_workloads(labels))

    def _namespace_used(self, pattern: str) -> bool:
        return any(_namespace_match(ns, pattern) for ns in self.namespaces)

    # --- AuthorizationPolicy -----------------------------------------------------------

    def _policy(self, lp: LoadedPolicy) -> None:
        ap: AuthorizationPolicy = lp.policy
        spec = ap.spec
        if spec.target_ref is None and not spec.target_refs:
            self._selected(lp, "AuthorizationPolicy", _labels_of(spec.selector))
        if spec.action is Action.CUSTOM and spec.provider is not None:
            name = spec.provider.name
            if name not in self.loaded.providers and name not in self.loaded.invalid_providers:
                self._add(
                    "IST0101",
                    Level.ERROR,
                    lp,
                    "AuthorizationPolicy",
                    ("spec", "provider", "name"),
                    f'Referenced extension provider not found: "{name}"',
                )
        issuers = self._issuers_for(ap)
        rules = list(spec.rules or ())
        for i, rule in enumerate(rules):
            if rule is None:
                continue
            self._rule_sources(lp, i, rule, issuers)
            if spec.action is Action.DENY:
                self._deny_on_tcp(lp, i, rule)
            if spec.action in (Action.ALLOW, Action.DENY, Action.AUDIT):
                for j in range(i):
                    earlier = rules[j]
                    if earlier is not None and _covers(earlier, rule):
                        self._add(
                            "EXT0004",
                            Level.INFO if earlier == rule else Level.WARNING,
                            lp,
                            "AuthorizationPolicy",
                            ("spec", "rules", i),
                            f"Rule {i} is shadowed by rule {j}: every request it matches, rule {j} matches too, "
                            f"so it adds nothing (is a condition missing from rule {j}?)",
                        )
                        break

    def _rule_sources(self, lp: LoadedPolicy, i: int, rule: Rule, issuers: list[str]) -> None:
        for j, f in enumerate(rule.from_ or ()):
            src = f.source if f is not None else None
            if src is None:
                continue
            for field_name in ("namespaces", "not_namespaces"):
                for k, ns in enumerate(getattr(src, field_name) or ()):
                    if not self._namespace_used(ns):
                        path = ("spec", "rules", i, "from", j, "source", _camel(field_name), k)
                        self._add(
                            "IST0101",
                            Level.ERROR,
                            lp,
                            "AuthorizationPolicy",
                            path,
                            f'Referenced namespace not found: "{ns}"',
                        )
            for field_name in ("principals", "not_principals"):
                for k, principal in enumerate(getattr(src, field_name) or ()):
                    ns = _principal_namespace(principal)
                    if ns and not self._namespace_used(ns):
                        path = ("spec", "rules", i, "from", j, "source", _camel(field_name), k)
                        self._add(
                            "EXT0001",
                            Level.WARNING,
                            lp,
                            "AuthorizationPolicy",
                            path,
                            f'The principal "{principal}" names namespace "{ns}", which no workload or resource '
                            "uses: the rule cannot match a peer from there",
                        )
            for field_name in ("request_principals", "not_request_principals"):
                for k, rp in enumerate(getattr(src, field_name) or ()):
                    if any(_principal_possible(rp, iss) for iss in issuers):
                        continue
                    path = ("spec", "rules", i, "from", j, "source", _camel(field_name), k)
                    self._add(
                        "EXT0002",
                        Level.WARNING,
                        lp,
                        "AuthorizationPolicy",
                        path,
                        "No RequestAuthentication that can apply to this policy accepts tokens from the issuer "
                        f'of "{rp}": no request carries such a principal, so the rule never matches',
                    )

    def _issuers_for(self, ap: AuthorizationPolicy) -> list[str]:
        """Issuers of the RequestAuthentications that can apply to some workload this policy
        selects: those in the root namespace or in the policy's namespace."""
        ns = ap.metadata.namespace or ""
        out: list[str] = []
        for lp in self.loaded.request_authentications:
            ra = lp.policy
            if (ra.metadata.namespace or "") in (ns, self.root) or ns == self.root:
                out.extend(r.issuer for r in ra.spec.jwt_rules or () if r is not None and r.issuer)
        return out

    def _deny_on_tcp(self, lp: LoadedPolicy, i: int, rule: Rule) -> None:
        http_only: list[str] = []
        for f in rule.from_ or ():
            src = f.source if f is not None else None
            http_only += [_camel(n) for n in _HTTP_ONLY_FROM if src is not None and getattr(src, n)]
        ports_only = True
        for t in rule.to or ():
            op = t.operation if t is not None else None
            if op is None:
                ports_only = False
                continue
            http_only += [_camel(n) for n in _HTTP_ONLY_TO if getattr(op, n)]
            if not op.ports:
                ports_only = False
        if not rule.to:
            ports_only = False
        http_only += [c.key for c in rule.when or () if c is not None and c.key.startswith(_HTTP_ONLY_WHEN)]
        if http_only and not ports_only:
            self._add(
                "EXT0003",
                Level.WARNING,
                lp,
                "AuthorizationPolicy",
                ("spec", "rules", i),
                f"DENY rule {i} uses HTTP-only fields ({', '.join(dict.fromkeys(http_only))}); on TCP ports "
                "Istio drops them, so the rule denies every connection its other conditions match. Limit it "
                "with `ports` to the HTTP ports",
            )

    # --- Telemetry ---------------------------------------------------------------------

    def _telemetries(self) -> None:
        """Istio's three Telemetry analyzers: a selector that selects no workload of its own
        namespace (IST0101; the root namespace is not special here, as in Istio), selectors
        that pick one workload twice (IST0159), several selector-less Telemetries in one
        namespace (IST0160); and its provider analyzer, for access logging without a provider
        when the mesh has no default one (IST0157; extproc's mesh defaults name none)."""
        by_ns: dict[str, list[Any]] = defaultdict(list)
        for t in self.loaded.telemetries:
            by_ns[t.namespace].append(t)
            self._telemetry_selector(t)
            for entry in t.resource.spec.access_logging or ():
                if entry is not None and not entry.disabled and not entry.providers:
                    self._add(
                        "IST0157",
                        Level.WARNING,
                        _TelemetryRef(t),
                        "Telemetry",
                        ("spec", "accessLogging"),
                        f'The Telemetry {t.name} in namespace "{t.namespace}" with empty providers will be ignored.',
                    )
                    break
        for ns, items in by_ns.items():
            plain = [t for t in items if not t.selector]
            if len(plain) > 1:
                names = sorted(t.name for t in plain)
                for t in plain:
                    self._add(
                        "IST0160",
                        Level.ERROR,
                        _TelemetryRef(t),
                        "Telemetry",
                        ("metadata",),
                        f'The Telemetries {_golist(names)} in namespace "{ns}" have no workload selector, which can '
                        "lead to undefined behavior.",
                    )
            selecting = [t for t in items if t.selector]
            for w in self.workloads:
                if w.namespace != ns:
                    continue
                hits = [t for t in selecting if all(w.labels.get(k) == v for k, v in t.selector.items())]
                if len(hits) > 1:
                    names = sorted(t.name for t in hits)
                    for t in hits:
                        self._add(
                            "IST0159",
                            Level.ERROR,
                            _TelemetryRef(t),
                            "Telemetry",
                            ("spec", "selector"),
                            f'The Telemetries {_golist(names)} in namespace "{ns}" select the same workload pod '
                            f'"{w.name}", which can lead to undefined behavior.',
                        )

    def _telemetry_selector(self, t: Any) -> None:
        if not self.workloads or not t.selector:
            return
        if self._matching(t.namespace, t.selector):
            return
        selector = ",".join(f"{k}={v}" for k, v in sorted(t.selector.items()))  # a k8s selector's String()
        self._add(
            "IST0101",
            Level.ERROR,
            _TelemetryRef(t),
            "Telemetry",
            ("spec", "selector", "matchLabels", min(t.selector)),
            f'Referenced selector not found: "{selector}"',
        )


@dataclass(frozen=True)
class _TelemetryRef:
    """A LoadedTelemetry seen through the same attributes as a LoadedPolicy."""

    t: Any

    @property
    def policy(self) -> Any:
        return self.t.resource

    @property
    def location(self) -> Location:
        location: Location = self.t.location
        return location


def _values_cover(wide: Sequence[str] | None, narrow: Sequence[str] | None) -> bool:
    """A positive field: `wide` accepts everything `narrow` does. An absent field accepts all;
    `*` accepts any value. Other wildcards are compared as written (conservative)."""
    if wide is None:
        return True
    if "*" in wide:
        return True
    return narrow is not None and set(narrow) <= set(wide)


def _not_values_cover(wide: Sequence[str] | None, narrow: Sequence[str] | None) -> bool:
    """A negative field: `wide` excludes no more than `narrow` does."""
    return not wide or (narrow is not None and set(wide) <= set(narrow))


def _part_covers(wide: Any, narrow: Any, fields: Iterable[str]) -> bool:
    for name in fields:
        w, n = getattr(wide, name), getattr(narrow, name) if narrow is not None else None
        ok = _not_values_cover(w, n) if name.startswith("not_") else _values_cover(w, n)
        if not ok:
            return False
    return True


_SOURCE_FIELDS = (
    "principals", "not_principals", "request_principals", "not_request_principals", "namespaces",
    "not_namespaces", "service_accounts", "not_service_accounts", "ip_blocks", "not_ip_blocks",
    "remote_ip_blocks", "not_remote_ip_blocks", "trust_domains", "not_trust_domains",
)  # fmt: skip
_OPERATION_FIELDS = ("hosts", "not_hosts", "ports", "not_ports", "methods", "not_methods", "paths", "not_paths")


def _covers(wide: Rule, narrow: Rule) -> bool:
    """Whether rule `wide` matches every request rule `narrow` matches (a sufficient check:
    single `from` and `to` entries compared field by field; anything else is not claimed)."""
    wf, nf = list(wide.from_ or ()), list(narrow.from_ or ())
    wt, nt = list(wide.to or ()), list(narrow.to or ())
    if len(wf) > 1 or len(nf) > 1 or len(wt) > 1 or len(nt) > 1:
        return False
    if wf:
        ws = wf[0].source if wf[0] is not None else None
        ns = nf[0].source if nf and nf[0] is not None else None
        if ws is not None and not _part_covers(ws, ns, _SOURCE_FIELDS):
            return False
    if wt:
        wo = wt[0].operation if wt[0] is not None else None
        no = nt[0].operation if nt and nt[0] is not None else None
        if wo is not None and not _part_covers(wo, no, _OPERATION_FIELDS):
            return False
    narrow_when = {c.key: c for c in narrow.when or () if c is not None}
    for c in wide.when or ():
        if c is None:
            continue
        other = narrow_when.get(c.key)
        if other is None:
            return False
        if not (_values_cover(c.values, other.values) and _not_values_cover(c.not_values, other.not_values)):
            return False
    return True


def _labels_of(selector: Any) -> dict[str, str] | None:
    return dict(selector.match_labels) if selector is not None and selector.match_labels else None


def _no_workloads(labels: Mapping[str, str]) -> str:
    text = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    return f"No matching workloads for this resource with the following labels: {text}"


def _golist(names: Sequence[str]) -> str:
    return "[" + " ".join(names) + "]"  # Go's %v of a string slice, as Istio's messages print it


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.capitalize() for p in rest)


def _principal_namespace(principal: str) -> str:
    """The namespace in `<td>/ns/<ns>/sa/<sa>` (no wildcard in it), or ""."""
    parts = principal.split("/")
    if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa" and "*" not in parts[2]:
        return parts[2]
    return ""


def _namespace_match(ns: str, pattern: str) -> bool:
    """Istio's analyzer's namespace match: `*`, a `*` prefix or suffix, else equal."""
    if pattern == "*":
        return True
    if pattern.startswith("*"):
        return ns.endswith(pattern[1:])
    if pattern.endswith("*"):
        return ns.startswith(pattern[:-1])
    return ns.lower() == pattern.lower()


def _principal_possible(pattern: str, issuer: str) -> bool:
    """Whether some token of `issuer` (request principal `<issuer>/<subject>`, any subject)
    can match a requestPrincipals value, with Istio's `*` prefix or suffix wildcard."""
    head = issuer + "/"
    if pattern.startswith("*"):
        return True  # a suffix: any issuer's subject may end with it
    if pattern.endswith("*"):
        prefix = pattern[:-1]
        return head.startswith(prefix) or prefix.startswith(head)
    return pattern.startswith(head)


def render(messages: Sequence[Message], output: str) -> str:
    if output == "json":
        return json.dumps([m.as_dict() for m in messages], indent=2) + "\n"
    if output == "yaml":
        return yaml.safe_dump([m.as_dict() for m in messages], sort_keys=False)
    if not messages:
        return "\u2714 No validation issues found when analyzing the config.\n"
    return "".join(m.render() + "\n" for m in messages)


def exit_status(messages: Sequence[Message], failure_threshold: Level) -> int:
    return EXIT_FOUND_ISSUES if any(m.level >= failure_threshold for m in messages) else 0
