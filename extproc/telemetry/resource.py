"""The Telemetry resource (`telemetry.istio.io` `Telemetry`): its model, validated as
istiod validates it, and its loading with located errors.

Istio validates no tag value, so a value outside the CEL subset of `telemetry/cel.py` (or
naming no attribute) still loads, with a warning naming its field, and reads `unknown`. Tag
names are not validated by Istio either; a name outside Prometheus syntax is exported as
Envoy's Prometheus output spells it (`my-tag` as `my_tag`), with a warning.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from extproc.config.errors import ConfigIssue, Location, format_path, pydantic_issues
from extproc.config.models import ObjectMeta, PolicyTargetReference, StrictModel, WorkloadSelector
from extproc.config.providers import parse_duration
from extproc.config.validation import Problem, metadata_problems, selector_problems, target_ref_ignored
from extproc.config.yamlsource import Document
from extproc.telemetry.cel import ExprError, parse_expression
from extproc.telemetry.celsyntax import parse_problem as cel_parse_problem
from extproc.telemetry.labels import INDEX, METRICS, UNKNOWN, Kind, MetricDef

TELEMETRY_API_GROUP = "telemetry.istio.io"
TELEMETRY_API_VERSIONS = ("telemetry.istio.io/v1", "telemetry.istio.io/v1alpha1")
PROMETHEUS = "prometheus"
DEFAULT_METRICS_PROVIDERS = (PROMETHEUS,)  # Istio's default MeshConfig.defaultProviders.metrics

ALL_METRICS = "ALL_METRICS"
METRIC_BY_TELEMETRY_NAME: dict[str, MetricDef] = {m.telemetry_name: m for m in METRICS}
METRIC_SELECTORS = (ALL_METRICS, *METRIC_BY_TELEMETRY_NAME)
CLIENT, SERVER, CLIENT_AND_SERVER = "CLIENT", "SERVER", "CLIENT_AND_SERVER"
MODES = (CLIENT_AND_SERVER, CLIENT, SERVER)
UPSERT, REMOVE = "UPSERT", "REMOVE"
OPERATIONS = (UPSERT, REMOVE)

LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

Path = tuple[str | int, ...]


# --- the resource ---------------------------------------------------------------------


class ProviderRef(StrictModel):
    name: str = ""


class MetricSelector(StrictModel):
    metric: str | None = None
    custom_metric: str | None = None
    mode: str | None = None


class TagOverride(StrictModel):
    operation: str | None = None  # default UPSERT
    value: str | None = None


class MetricsOverrides(StrictModel):
    match: MetricSelector | None = None
    disabled: bool | None = None
    tag_overrides: dict[str, TagOverride | None] | None = None


class Metrics(StrictModel):
    providers: list[ProviderRef | None] | None = None
    overrides: list[MetricsOverrides | None] | None = None
    reporting_interval: str | None = None


class ModeSelector(StrictModel):
    mode: str | None = None


class LiteralTag(StrictModel):
    value: str = ""


class EnvironmentTag(StrictModel):
    name: str = ""
    default_value: str | None = None


class HeaderTag(StrictModel):
    name: str = ""
    default_value: str | None = None


class FormatterTag(StrictModel):
    value: str = ""


class CustomTag(StrictModel):
    literal: LiteralTag | None = None
    environment: EnvironmentTag | None = None
    header: HeaderTag | None = None
    formatter: FormatterTag | None = None


class Tracing(StrictModel):
    """Validated as Istio does, not applied: extproc's tracing is configured by its own flags."""

    match: ModeSelector | None = None
    providers: list[ProviderRef | None] | None = None
    custom_tags: dict[str, CustomTag | None] | None = None
    disable_span_reporting: bool | None = None
    disable_context_propagation: bool | None = None
    enable_istio_tags: bool | None = None
    use_request_id_for_trace_sampling: bool | None = None
    random_sampling_percentage: float | None = None  # strict: a number (an int is fine), never a string


class AccessLogFilter(StrictModel):
    expression: str = ""


class AccessLogging(StrictModel):
    """Validated as Istio does, not applied: Envoy writes access logs, extproc reads them."""

    match: ModeSelector | None = None
    providers: list[ProviderRef | None] | None = None
    disabled: bool | None = None
    filter: AccessLogFilter | None = None


class TelemetrySpec(StrictModel):
    selector: WorkloadSelector | None = None
    target_ref: PolicyTargetReference | None = None
    target_refs: Annotated[list[PolicyTargetReference] | None, Field(max_length=16)] = None
    metrics: list[Metrics | None] | None = None
    tracing: list[Tracing | None] | None = None
    access_logging: list[AccessLogging | None] | None = None


class TelemetryMeta(ObjectMeta):
    creation_timestamp: Annotated[datetime | None, Field(alias="creationTimestamp", strict=False)] = None


class TelemetryResource(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)

    api_version: Annotated[str, Field(alias="apiVersion")]
    kind: str
    metadata: TelemetryMeta
    spec: TelemetrySpec = Field(default_factory=TelemetrySpec)
    status: Any = None


# --- validation -----------------------------------------------------------------------

_METRIC_SAMPLE_NAMES = frozenset(
    name
    for m in METRICS
    for name in (
        (m.name, m.name + "_total")
        if m.kind is Kind.COUNTER
        else (m.name, m.name + "_bucket", m.name + "_sum", m.name + "_count")
    )
)


def prometheus_label(name: str) -> str:
    """The label name Envoy's Prometheus output gives a tag (PrometheusStatsFormatter::
    sanitizeName): every character outside [a-zA-Z0-9_] becomes `_`, and a leading digit
    gets a `_` in front. Istio accepts any tag name; this is what a scrape then shows."""
    out = re.sub(r"[^a-zA-Z0-9_]", "_", name)
    return "_" + out if out[:1].isdigit() else out


def tag_name_problem(name: str) -> str | None:
    """Why a (sanitised) label name cannot be exported, or None. Istio accepts these names;
    extproc refuses them because they would make its whole /metrics page unreadable or
    collide with the names Prometheus gives histogram series."""
    if name.startswith("__"):
        return f"invalid label name {name!r}: names starting with __ are reserved by Prometheus"
    return None


def _new_tag_problem(name: str) -> str | None:
    if name == "le":
        return "label name 'le' is reserved for histogram buckets"
    if name in _METRIC_SAMPLE_NAMES:
        return f"label name {name!r} is the name of a standard metric; pick another name"
    return None


def is_all(sel: MetricSelector | None) -> bool:
    return sel is None or (sel.custom_metric is None and sel.metric in (None, ALL_METRICS))


def targets_workloads(spec: TelemetrySpec) -> bool:
    return spec.target_ref is None and spec.target_refs is None


def _providers_problem(path: Path, providers: Sequence[ProviderRef | None] | None) -> Iterable[Problem]:
    """Istio's validateTelemetryProviders (and the CRD's `name` minLength 1)."""
    for j, p in enumerate(providers or ()):
        if p is None or not p.name:
            yield Problem((*path, "providers", j, "name"), "providers.name may not be empty")


def _mode_problem(path: Path, match: ModeSelector | MetricSelector | None) -> Iterable[Problem]:
    if match is not None and match.mode is not None and match.mode not in MODES:
        yield Problem((*path, "match", "mode"), f"unknown mode {match.mode!r}; one of {', '.join(MODES)}")


def _tracing_problems(tracing: Sequence[Tracing | None]) -> Iterable[Problem]:
    """Istio's validateTelemetryTracing plus the CRD's rules; extproc applies none of it."""
    if len(tracing) > 1:
        yield Problem(("spec", "tracing"), "multiple tracing is not currently supported", warning=True)
    for i, t in enumerate(tracing):
        tp: Path = ("spec", "tracing", i)
        if t is None:
            yield Problem(tp, "tracing entries may not be null")  # the CRD: items must be objects
            continue
        yield from _mode_problem(tp, t.match)
        yield from _providers_problem(tp, t.providers)
        if len(t.providers or ()) > 1:
            yield Problem((*tp, "providers"), "multiple providers is not currently supported", warning=True)
        pct = t.random_sampling_percentage
        if pct is not None and not 0 <= pct <= 100:
            yield Problem((*tp, "randomSamplingPercentage"), "randomSamplingPercentage must be in range [0.0, 100.0]")
        for name, tag in (t.custom_tags or {}).items():
            cp: Path = (*tp, "customTags", name)
            if name == "":
                yield Problem((*tp, "customTags"), "tag name may not be empty")
            if tag is None:
                yield Problem(cp, f"tag '{name}' may not have a nil value")
                continue
            kinds = [k for k in ("literal", "environment", "header", "formatter") if getattr(tag, k) is not None]
            if len(kinds) > 1:
                yield Problem(cp, f"only one of literal, environment, header or formatter may be set, found {kinds}")
            if tag.literal is not None and not tag.literal.value:
                yield Problem((*cp, "literal", "value"), "literal tag value may not be empty")
            if tag.header is not None and not tag.header.name:
                yield Problem((*cp, "header", "name"), "header tag name may not be empty")
            if tag.environment is not None and not tag.environment.name:
                yield Problem((*cp, "environment", "name"), "environment tag name may not be empty")
            if tag.formatter is not None and not tag.formatter.value:
                yield Problem((*cp, "formatter", "value"), "formatter tag value may not be empty")


def _access_logging_problems(logging: Sequence[AccessLogging | None]) -> Iterable[Problem]:
    """Istio's validateTelemetryAccessLogging: the filter must parse as CEL (cel-go's Parse);
    extproc does not apply access-log settings (Envoy writes the logs)."""
    for i, a in enumerate(logging):
        ap: Path = ("spec", "accessLogging", i)
        if a is None:
            yield Problem(ap, "accessLogging entries may not be null")  # the CRD: items must be objects
            continue
        yield from _mode_problem(ap, a.match)
        if a.filter is not None and (msg := cel_parse_problem(a.filter.expression)) is not None:
            yield Problem((*ap, "filter", "expression"), f"must be a valid CEL expression: {msg}")
        yield from _providers_problem(ap, a.providers)


def validate_telemetry(t: TelemetryResource) -> list[Problem]:
    """Istio's ValidateTelemetry (and the CRD's rules) for every part of the resource, with
    warnings for what extproc accepts but does not act on."""
    spec = t.spec
    out: list[Problem] = list(metadata_problems(t.metadata.annotations, None))
    add = out.append
    out.extend(selector_problems(spec))
    out.extend(target_ref_ignored(spec, out))
    if spec.tracing:
        out.extend(_tracing_problems(spec.tracing))
        add(Problem(("spec", "tracing"), "ignored: extproc applies only spec.metrics", warning=True))
    if spec.access_logging:
        out.extend(_access_logging_problems(spec.access_logging))
        add(Problem(("spec", "accessLogging"), "ignored: extproc applies only spec.metrics", warning=True))
    for i, m in enumerate(spec.metrics or ()):
        mp: Path = ("spec", "metrics", i)
        if m is None:
            add(Problem(mp, "metrics entries may not be null"))  # the CRD: items must be objects
            continue
        out.extend(_providers_problem(mp, m.providers))
        for j, p in enumerate(m.providers or ()):
            if p is not None and p.name and p.name.lower() != PROMETHEUS:
                add(
                    Problem(
                        (*mp, "providers", j, "name"),
                        f"provider {p.name!r} is not served by extproc; only entries for {PROMETHEUS!r} apply",
                        warning=True,
                    )
                )
        if m.reporting_interval is not None:
            try:
                ok = parse_duration(m.reporting_interval) >= 0.001
                msg = "must be a valid duration greater than 1ms"
            except ValueError as e:
                ok, msg = False, str(e)
            if not ok:
                add(Problem((*mp, "reportingInterval"), msg))
            else:
                add(
                    Problem(
                        (*mp, "reportingInterval"),
                        "ignored: extproc reports TCP metrics when Envoy's access log flushes",
                        warning=True,
                    )
                )
        for k, o in enumerate(m.overrides or ()):
            out.extend(_override_problems((*mp, "overrides", k), o))
    return out


def _override_problems(op: Path, o: MetricsOverrides | None) -> Iterable[Problem]:
    if o is None:
        yield Problem(op, "tagOverrides may not be null")
        return
    sel = o.match
    if sel is not None:
        if sel.custom_metric is not None and sel.metric is not None:
            yield Problem((*op, "match"), "only one of metric or customMetric may be set")
        if sel.custom_metric is not None:
            if not sel.custom_metric:
                yield Problem((*op, "match", "customMetric"), "customMetric may not be empty")
            else:
                yield Problem(
                    (*op, "match", "customMetric"),
                    f"ignored: extproc serves only Istio's standard metrics, so custom metric {sel.custom_metric!r} "
                    "matches nothing here",
                    warning=True,
                )
        if sel.metric is not None and sel.metric not in METRIC_SELECTORS:
            yield Problem(
                (*op, "match", "metric"), f"unknown metric {sel.metric!r}; one of {', '.join(METRIC_SELECTORS)}"
            )
        yield from _mode_problem(op, sel)
    if o.disabled is True and is_all(sel) and o.tag_overrides:
        yield Problem(
            (*op, "tagOverrides"), "ignored: an override disabling all metrics applies no tag overrides", warning=True
        )
    for name, to in (o.tag_overrides or {}).items():
        tp: Path = (*op, "tagOverrides", name)
        if to is None:
            yield Problem(tp, "tagOverrides may not be null")
            continue
        operation = to.operation if to.operation is not None else UPSERT
        if operation not in OPERATIONS:
            yield Problem((*tp, "operation"), f"unknown operation {operation!r}; one of {', '.join(OPERATIONS)}")
            continue
        if operation == REMOVE and to.value is not None:
            yield Problem((*tp, "value"), "value must not be set when operation is REMOVE")
            continue
        if operation == UPSERT and not to.value:
            yield Problem((*tp, "value") if to.value is not None else tp, "value must be set when operation is UPSERT")
            continue
        if name == "":
            yield Problem(tp, "ignored: tagOverrides.name may not be empty", warning=True)
            continue
        label = prometheus_label(name)
        if (msg := tag_name_problem(label)) is not None:
            yield Problem(tp, msg)
            continue
        if label != name:
            yield Problem(
                tp,
                f"exported as label {label!r}: Prometheus label names allow only [a-zA-Z0-9_] "
                "(Envoy's Prometheus output makes the same substitution)",
                warning=True,
            )
        if operation == REMOVE:
            continue
        if label not in INDEX and (msg := _new_tag_problem(label)) is not None:
            yield Problem(tp, msg)
        try:
            parse_expression(to.value or "")
        except ExprError as e:
            yield Problem(
                (*tp, "value"),
                f"extproc cannot evaluate {to.value!r} ({e}); the label reads {UNKNOWN!r}, as the proxy reports "
                "an expression it cannot evaluate",
                warning=True,
            )


# --- loading --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadedTelemetry:
    """A validated Telemetry resource and where it was defined."""

    resource: TelemetryResource
    location: Location

    @property
    def namespace(self) -> str:
        return self.resource.metadata.namespace or ""

    @property
    def name(self) -> str:
        return self.resource.metadata.name

    @property
    def ident(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def origin(self) -> str:
        return self.location.render()

    @property
    def selector(self) -> Mapping[str, str]:
        sel = self.resource.spec.selector
        return (sel.match_labels or {}) if sel is not None else {}


def is_telemetry(data: Any) -> bool:
    """Whether a document is a Telemetry of the telemetry.istio.io group (any version)."""
    return (
        isinstance(data, dict)
        and data.get("kind") == "Telemetry"
        and isinstance(data.get("apiVersion"), str)
        and data["apiVersion"].startswith(TELEMETRY_API_GROUP + "/")
    )


def parse_telemetry(doc: Document, file: str, prefix: Path = ()) -> tuple[LoadedTelemetry | None, list[ConfigIssue]]:
    """Parse and validate one Telemetry document: (the resource or None if it has errors, issues).

    `doc` is the document as the loader has it (a `List` item already re-based), `prefix`
    the item's path in the file (`("items", 3)`), used in field names only.
    """
    data = doc.data
    md = data.get("metadata") if isinstance(data, dict) else None
    label = "Telemetry"
    if isinstance(md, dict) and isinstance(md.get("name"), str):
        ns = md.get("namespace")
        label = f"Telemetry {ns}/{md['name']}" if isinstance(ns, str) else f"Telemetry {md['name']}"

    def issue(path: Path, message: str, warning: bool = False) -> ConfigIssue:
        return ConfigIssue(
            Location(file, doc.index, doc.line_of(path), label), format_path((*prefix, *path)), message, warning
        )

    api = data.get("apiVersion") if isinstance(data, dict) else None
    if api not in TELEMETRY_API_VERSIONS:
        return None, [
            issue(("apiVersion",), f"unsupported version {api}; use one of {', '.join(TELEMETRY_API_VERSIONS)}")
        ]
    try:
        resource = TelemetryResource.model_validate(data)
    except ValidationError as e:
        return None, pydantic_issues(e, doc, file, label, prefix)
    if not resource.metadata.namespace:
        return None, [
            issue(("metadata", "namespace"), "required: extproc has no kubectl context to default the namespace from")
        ]
    issues = [issue(p.path, p.message, p.warning) for p in validate_telemetry(resource)]
    if any(not i.warning for i in issues):
        return None, issues
    return LoadedTelemetry(resource, Location(file, doc.index, doc.line_of(()), label)), issues
