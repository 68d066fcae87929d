"""Istio's Telemetry API (`telemetry.istio.io` `Telemetry`, `spec.metrics`) compiled to metric plans.

What a workload gets, as istio/istio `pilot/pkg/model/telemetry.go` computes it:

* **Which resources apply.** At most one per level: the root namespace's namespace-wide
  resource (no `selector.matchLabels`), the workload namespace's namespace-wide resource,
  and the first resource in the workload's namespace whose `selector.matchLabels` are a
  subset of the workload's labels. Within a level Istio takes the oldest resource
  (`metadata.creationTimestamp`), ties and resources without a timestamp ordered by
  `name.namespace`; every other resource is listed in `TelemetryPlans.ignored` with why.
  A resource with `targetRef`/`targetRefs` is validated as Istio does and then applies to
  no workload: it selects Gateways and waypoints, never a sidecar (listed in `ignored`).
* **How levels combine.** Not by replacement: the `metrics` entries of root, namespace
  and workload are concatenated in that order and every override is applied on top of the
  ones before it ("They will be applied on top of inherited overrides from other resources
  in the hierarchy", Telemetry API reference; `mergeMetrics`). So a mesh-wide REMOVE of
  `response_code` survives a namespace resource that only adds `request_host`, and a
  workload can undo it with an UPSERT or re-enable a metric with `disabled: false`.
  Per (mode, metric) the tag overrides form a map: a later entry for the same tag replaces
  the earlier one; `disabled` is changed only where it is set.
* **Providers.** An entry without `providers` inherits the previous entry's (the first
  inherits the mesh default, `prometheus`). Entries not naming `prometheus` do not apply
  here. As in Istio, the last non-empty `providers` list decides which providers are
  configured at all: if it omits `prometheus`, this workload gets no Prometheus metrics.
* **ALL_METRICS disabled.** `disabled: true` matching all metrics (ALL_METRICS or no
  metric) switches the mode off entirely and ignores that override's `tagOverrides`; any
  later override for the same mode switches it back on (Istio's "root disables all,
  namespace enables them").
* **Tags** (istio/proxy `istio_stats.cc` `MetricOverrides`): REMOVE drops a standard
  label the metric carries; UPSERT of a standard label the metric carries replaces its
  value; UPSERT of a standard label the metric does not carry (`response_code` on a TCP
  metric) does nothing; UPSERT of any other name adds a label, after the standard ones,
  sorted by name. The metric name never changes (istio/istio#45775).

Modes: CLIENT is the outbound sidecar (reporter="source"), SERVER the inbound one
(reporter="destination"), so plans come per direction: `TelemetryPlans.inbound` and
`.outbound`, equal when no override names a mode.

Tag values are a CEL subset, parsed and type-checked when the file is loaded and compiled
once into closures over the record (`HttpRecord` for HTTP and gRPC metrics, `TcpRecord`
for TCP): string, int and bool literals; attributes (`ATTRIBUTES`, plus
`request.headers['name']`, looked up in lower case as Envoy does); `==`, `!=`, `<`, `<=`,
`>`, `>=`, `in` (a list literal or `request.headers`), `!`, `&&`, `||`, `+` (strings or
ints), `cond ? a : b`, `has(attr)` (also `has(request.headers['x'])`, which real CEL
spells `'x' in request.headers`), `string(x)` and the `startsWith`, `endsWith` and
`contains` methods. A value that is absent (empty string, no response code, a missing
header) is an evaluation error, which Istio reports as `unknown`; `has()` tests for it.
Istio validates no tag value, so a value outside this subset (or naming no attribute) still
loads, with a warning naming its field, and reads `unknown`. Tag names are not validated by
Istio either; a name outside Prometheus syntax is exported as Envoy's Prometheus output
spells it (`my-tag` as `my_tag`), with a warning.
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from extproc.config.errors import ConfigIssue, Location, format_path
from extproc.config.models import ObjectMeta, PolicyTargetReference, WorkloadSelector
from extproc.config.providers import parse_duration
from extproc.config.validation import Problem, metadata_problems, selector_problems, target_ref_ignored
from extproc.config.yamlsource import Document
from extproc.telemetry.celsyntax import parse_problem as cel_parse_problem
from extproc.telemetry.labels import INDEX, LABELS, METRICS, UNKNOWN, Family, Kind, MetricDef
from extproc.telemetry.record import Direction, HttpRecord, TcpRecord
from extproc.telemetry.store import Key, MetricPlan

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
MODE_OF_DIRECTION = {Direction.INBOUND: SERVER, Direction.OUTBOUND: CLIENT}

LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
MAX_EXPRESSION_CHARS = 4096
MAX_EXPRESSION_DEPTH = 32

Path = tuple[str | int, ...]


# --- the resource ---------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, alias_generator=to_camel, populate_by_name=True)


class ProviderRef(_Strict):
    name: str = ""


class MetricSelector(_Strict):
    metric: str | None = None
    custom_metric: str | None = None
    mode: str | None = None


class TagOverride(_Strict):
    operation: str | None = None  # default UPSERT
    value: str | None = None


class MetricsOverrides(_Strict):
    match: MetricSelector | None = None
    disabled: bool | None = None
    tag_overrides: dict[str, TagOverride | None] | None = None


class Metrics(_Strict):
    providers: list[ProviderRef | None] | None = None
    overrides: list[MetricsOverrides | None] | None = None
    reporting_interval: str | None = None


class ModeSelector(_Strict):
    mode: str | None = None


class LiteralTag(_Strict):
    value: str = ""


class EnvironmentTag(_Strict):
    name: str = ""
    default_value: str | None = None


class HeaderTag(_Strict):
    name: str = ""
    default_value: str | None = None


class FormatterTag(_Strict):
    value: str = ""


class CustomTag(_Strict):
    literal: LiteralTag | None = None
    environment: EnvironmentTag | None = None
    header: HeaderTag | None = None
    formatter: FormatterTag | None = None


class Tracing(_Strict):
    """Validated as Istio does, not applied: extproc's tracing is configured by its own flags."""

    match: ModeSelector | None = None
    providers: list[ProviderRef | None] | None = None
    custom_tags: dict[str, CustomTag | None] | None = None
    disable_span_reporting: bool | None = None
    disable_context_propagation: bool | None = None
    enable_istio_tags: bool | None = None
    use_request_id_for_trace_sampling: bool | None = None
    random_sampling_percentage: float | None = None  # strict: a number (an int is fine), never a string


class AccessLogFilter(_Strict):
    expression: str = ""


class AccessLogging(_Strict):
    """Validated as Istio does, not applied: Envoy writes access logs, extproc reads them."""

    match: ModeSelector | None = None
    providers: list[ProviderRef | None] | None = None
    disabled: bool | None = None
    filter: AccessLogFilter | None = None


class TelemetrySpec(_Strict):
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


# --- expressions ----------------------------------------------------------------------


class ExprError(ValueError):
    def __init__(self, message: str, column: int | None = None) -> None:
        super().__init__(message if column is None else f"{message} (column {column})")


class _Missing:
    """An absent value: CEL's evaluation error, printed as `unknown`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()

STR, INT, BOOL, MAP, LIST, DYN = "string", "int", "bool", "map", "list", "dyn"
HTTP, TCP = "http", "tcp"  # the record a metric family receives: HttpRecord or TcpRecord


# Envoy's CoreResponseFlag order: `response.flags` is the bit vector of these.
_RESPONSE_FLAG_BITS = {
    code: 1 << i
    for i, code in enumerate(
        ("LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE", "DC")
        + ("URX", "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM", "DF", "DO", "DR", "UDO")
    )
}


@functools.lru_cache(maxsize=512)
def response_flag_bits(flags: str) -> int:
    """`UH,UF` -> 0x22, as Envoy's `response.flags` attribute (unknown codes count 0)."""
    return sum(_RESPONSE_FLAG_BITS.get(f, 0) for f in flags.split(",")) if flags and flags != "-" else 0


# Attribute getters are built for a given "absent" value: MISSING inside expressions,
# "unknown" when the attribute is the whole tag value (saves a wrapper call per record).
Getter = Callable[[Any], Any]


def _src_principal(m: Any) -> Getter:
    def get(r: Any) -> Any:
        p = r.peer
        return (p.peer_principal if p.direction is Direction.INBOUND else p.local_principal) or m

    return get


def _dst_principal(m: Any) -> Getter:
    def get(r: Any) -> Any:
        p = r.peer
        if p.direction is Direction.INBOUND:
            return p.local_principal or m
        return p.peer_principal or m  # only a certificate names a principal, as in the labels

    return get


def _downstream_san(local: bool) -> Callable[[Any], Getter]:
    """connection.uri_san_*: the downstream connection's; outbound, that is the app, in plain text."""

    def factory(m: Any) -> Getter:
        def get(r: Any) -> Any:
            p = r.peer
            if p.direction is not Direction.INBOUND:
                return m
            return (p.local_principal if local else p.peer_principal) or m

        return get

    return factory


def _url_path(m: Any) -> Getter:
    return lambda r: r.path.partition("?")[0] if r.path else m


def _query(m: Any) -> Getter:
    return lambda r: r.path.partition("?")[2] if r.path else m


def _port_of(field: str) -> Callable[[Any], Getter]:
    def factory(m: Any) -> Getter:
        def get(r: Any) -> Any:
            _, sep, port = getattr(r, field).rpartition(":")
            return int(port) if sep and port.isdigit() else m

        return get

    return factory


@dataclass(frozen=True, slots=True)
class Attribute:
    type: str
    getter: Callable[[Any], Getter]  # factory: absent value -> getter
    http_only: bool  # never present on TCP records
    doc: str


_A = Attribute
ATTRIBUTES: dict[str, Attribute] = {
    "request.host": _A(STR, lambda m: lambda r: r.peer.host or m, True, "Host / :authority"),
    "request.method": _A(STR, lambda m: lambda r: r.method or m, True, ":method"),
    "request.path": _A(STR, lambda m: lambda r: r.path or m, True, ":path, with the query"),
    "request.url_path": _A(STR, _url_path, True, ":path without the query"),
    "request.query": _A(STR, _query, True, "the query string"),
    "request.scheme": _A(STR, lambda m: lambda r: r.scheme or m, True, ":scheme"),
    "request.useragent": _A(STR, lambda m: lambda r: r.user_agent or m, True, "User-Agent"),
    "request.id": _A(STR, lambda m: lambda r: r.request_id or m, True, "x-request-id"),
    "request.referer": _A(STR, lambda m: lambda r: r.request_headers.get("referer", m), True, "Referer"),
    "response.code": _A(INT, lambda m: lambda r: r.response_code or m, True, "HTTP status"),
    "response.grpc_status": _A(
        INT, lambda m: lambda r: int(r.grpc_status) if r.grpc_status.isdigit() else m, True, "gRPC status"
    ),
    "response.flags": _A(
        INT, lambda m: lambda r: response_flag_bits(r.response_flags), False, "Envoy's response flag bit vector"
    ),
    "source.address": _A(STR, lambda m: lambda r: r.source_address or m, False, "downstream ip:port"),
    "source.port": _A(INT, _port_of("source_address"), False, "downstream port"),
    "destination.address": _A(STR, lambda m: lambda r: r.destination_address or m, False, "local ip:port"),
    "destination.port": _A(INT, _port_of("destination_address"), False, "local port"),
    "source.principal": _A(STR, _src_principal, False, "client URI SAN"),
    "destination.principal": _A(STR, _dst_principal, False, "server URI SAN"),
    "connection.mtls": _A(
        BOOL,
        lambda m: lambda r: r.peer.direction is Direction.INBOUND and bool(r.peer.peer_principal),
        False,
        "the downstream presented a client certificate",
    ),
    "connection.uri_san_peer_certificate": _A(STR, _downstream_san(False), False, "downstream peer URI SAN"),
    "connection.uri_san_local_certificate": _A(STR, _downstream_san(True), False, "downstream local URI SAN"),
    "upstream.cluster": _A(STR, lambda m: lambda r: r.peer.upstream_cluster or m, False, "upstream cluster"),
    "xds.cluster_name": _A(STR, lambda m: lambda r: r.peer.upstream_cluster or m, False, "upstream cluster"),
    "xds.route_name": _A(STR, lambda m: lambda r: r.peer.route_name or m, False, "route name"),
}
HEADERS = "request.headers"
FUNCTIONS = ("has", "string")
METHODS = ("startsWith", "endsWith", "contains")


# AST: small frozen nodes, each with its static type.
@dataclass(frozen=True, slots=True)
class Lit:
    value: Any
    type: str


@dataclass(frozen=True, slots=True)
class Attr:
    name: str
    type: str


@dataclass(frozen=True, slots=True)
class Header:
    name: str  # lower case
    type: str = STR


@dataclass(frozen=True, slots=True)
class Headers:
    type: str = MAP


@dataclass(frozen=True, slots=True)
class ListLit:
    items: tuple[Any, ...]
    type: str = LIST


@dataclass(frozen=True, slots=True)
class Call:
    fn: str  # has, string, not, neg, startsWith, endsWith, contains
    args: tuple[Any, ...]
    type: str


@dataclass(frozen=True, slots=True)
class Bin:
    op: str
    a: Any
    b: Any
    type: str


@dataclass(frozen=True, slots=True)
class Cond:
    c: Any
    a: Any
    b: Any
    type: str


@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str  # str, int, ident, op, end
    value: Any
    col: int  # 1-based


_OPERATORS = ("==", "!=", "<=", ">=", "&&", "||", "<", ">", "!", "?", ":", "+", "-", "(", ")", "[", "]", ".", ",")
_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "`": "`", "?": "?", "n": "\n", "r": "\r", "t": "\t", "a": "\a"}
_ESCAPES.update({"b": "\b", "f": "\f", "v": "\v"})
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}


def _tokens(text: str) -> list[_Tok]:
    out: list[_Tok] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
            continue
        col = i + 1
        raw = False
        if ch in "rR" and i + 1 < n and text[i + 1] in "'\"":
            raw, i, ch = True, i + 1, text[i + 1]
        elif ch in "bB" and i + 1 < n and text[i + 1] in "'\"":
            raise ExprError("bytes literals are not supported", col)
        if ch in "'\"":
            if text.startswith(ch * 3, i):
                raise ExprError("triple-quoted strings are not supported", col)
            i += 1
            buf: list[str] = []
            while True:
                if i >= n or text[i] in "\r\n":
                    raise ExprError("unterminated string literal", col)
                c = text[i]
                if c == ch:
                    i += 1
                    break
                if c == "\\" and not raw:
                    if i + 1 >= n:
                        raise ExprError("unterminated string literal", col)
                    e = text[i + 1]
                    if e in _ESCAPES:
                        buf.append(_ESCAPES[e])
                        i += 2
                        continue
                    if e in _HEX_ESCAPES:
                        digits = text[i + 2 : i + 2 + _HEX_ESCAPES[e]]
                        if len(digits) != _HEX_ESCAPES[e] or any(d not in "0123456789abcdefABCDEF" for d in digits):
                            raise ExprError(f"invalid \\{e} escape", i + 1)
                        code = int(digits, 16)
                        if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
                            raise ExprError(f"invalid \\{e} escape", i + 1)
                        buf.append(chr(code))
                        i += 2 + len(digits)
                        continue
                    raise ExprError(f"invalid escape sequence \\{e}", i + 1)
                buf.append(c)
                i += 1
            out.append(_Tok("str", "".join(buf), col))
            continue
        if ch.isdigit():
            j = i
            if text.startswith(("0x", "0X"), i):
                j = i + 2
                while j < n and text[j] in "0123456789abcdefABCDEF":
                    j += 1
                if j == i + 2:
                    raise ExprError("invalid hex literal", col)
                value = int(text[i + 2 : j], 16)
            else:
                while j < n and text[j].isdigit():
                    j += 1
                if j < n and (text[j] in "eE" or (text[j] == "." and j + 1 < n and text[j + 1].isdigit())):
                    raise ExprError("floating-point literals are not supported", col)
                value = int(text[i:j])
            if j < n and text[j] in "uU":
                raise ExprError("unsigned literals are not supported", col)
            if j < n and (text[j].isalnum() or text[j] == "_"):
                raise ExprError(f"invalid number {text[i : j + 1]!r}", col)
            if value >= 1 << 63:
                raise ExprError("integer literal out of range", col)
            out.append(_Tok("int", value, col))
            i = j
            continue
        if ch.isalpha() or ch == "_":
            j = i + 1
            while j < n and (text[j].isalnum() or text[j] == "_"):
                j += 1
            out.append(_Tok("ident", text[i:j], col))
            i = j
            continue
        for op in _OPERATORS:
            if text.startswith(op, i):
                out.append(_Tok("op", op, col))
                i += len(op)
                break
        else:
            raise ExprError(f"unexpected character {ch!r}", col)
    out.append(_Tok("end", None, n + 1))
    return out


def _describe(t: _Tok) -> str:
    return "end of expression" if t.kind == "end" else repr(t.value)


class _Parser:
    """Recursive descent over CEL's grammar, limited to the subset in the module docstring."""

    def __init__(self, text: str) -> None:
        self.toks = _tokens(text)
        self.i = 0
        self.depth = 0

    def peek(self, ahead: int = 0) -> _Tok:
        return self.toks[min(self.i + ahead, len(self.toks) - 1)]

    def next(self) -> _Tok:
        t = self.peek()
        self.i += 1
        return t

    def at(self, op: str) -> bool:
        t = self.peek()
        return t.kind == "op" and t.value == op

    def expect(self, op: str) -> _Tok:
        t = self.next()
        if t.kind != "op" or t.value != op:
            raise ExprError(f"expected {op!r}, found {_describe(t)}", t.col)
        return t

    def parse(self) -> Any:
        node = self.expr()
        t = self.peek()
        if t.kind != "end":
            raise ExprError(f"unexpected {_describe(t)}", t.col)
        if node.type in (MAP, LIST):
            raise ExprError(f"the value must be a string, int or bool, not a {node.type}")
        return node

    def enter(self, col: int) -> None:
        self.depth += 1
        if self.depth > MAX_EXPRESSION_DEPTH:
            raise ExprError(f"expression nested deeper than {MAX_EXPRESSION_DEPTH}", col)

    def expr(self) -> Any:
        col = self.peek().col
        self.enter(col)
        node = self.or_()
        if self.at("?"):
            self.next()
            a = self.or_()
            self.expect(":")
            b = self.expr()
            _want(node, (BOOL,), "the condition of ?:", col)
            for branch in (a, b):
                _want(branch, (STR, INT, BOOL, DYN), "a branch of ?:", col)
            node = Cond(node, a, b, a.type if a.type == b.type else DYN)
        self.depth -= 1
        return node

    def or_(self) -> Any:
        node = self.and_()
        while self.at("||"):
            col = self.next().col
            rhs = self.and_()
            _want(node, (BOOL,), "'||'", col)
            _want(rhs, (BOOL,), "'||'", col)
            node = Bin("||", node, rhs, BOOL)
        return node

    def and_(self) -> Any:
        node = self.relation()
        while self.at("&&"):
            col = self.next().col
            rhs = self.relation()
            _want(node, (BOOL,), "'&&'", col)
            _want(rhs, (BOOL,), "'&&'", col)
            node = Bin("&&", node, rhs, BOOL)
        return node

    def relation(self) -> Any:
        node = self.addition()
        while True:
            t = self.peek()
            if t.kind == "op" and t.value in ("==", "!=", "<", "<=", ">", ">="):
                self.next()
                rhs = self.addition()
                node = _compare(t.value, node, rhs, t.col)
            elif t.kind == "ident" and t.value == "in":
                self.next()
                rhs = self.addition()
                _want(node, (STR, INT, BOOL, DYN), "the left side of 'in'", t.col)
                if isinstance(rhs, ListLit):
                    for item in rhs.items:
                        _same_type(node, item, "'in'", t.col)
                elif not isinstance(rhs, Headers):
                    raise ExprError("'in' needs a list literal or request.headers on its right", t.col)
                else:
                    _want(node, (STR, DYN), "a header name", t.col)
                node = Bin("in", node, rhs, BOOL)
            else:
                return node

    def addition(self) -> Any:
        node = self.unary()
        while self.at("+") or self.at("-"):
            t = self.next()
            rhs = self.unary()
            if t.value == "-":
                _want(node, (INT,), "'-'", t.col)
                _want(rhs, (INT,), "'-'", t.col)
                node = Bin("-", node, rhs, INT)
                continue
            _want(node, (STR, INT, DYN), "'+'", t.col)
            _want(rhs, (STR, INT, DYN), "'+'", t.col)
            _same_type(node, rhs, "'+'", t.col)
            node = Bin("+", node, rhs, node.type if node.type == rhs.type else DYN)
        return node

    def unary(self) -> Any:
        if self.at("!") or self.at("-"):
            t = self.next()
            self.enter(t.col)
            arg = self.unary()
            self.depth -= 1
            if t.value == "!":
                _want(arg, (BOOL,), "'!'", t.col)
                return Call("not", (arg,), BOOL)
            _want(arg, (INT,), "unary '-'", t.col)
            return Call("neg", (arg,), INT)
        return self.member()

    def member(self) -> Any:
        node = self.primary()
        while self.at("."):
            self.next()
            name = self.next()
            if name.kind != "ident":
                raise ExprError(f"expected a name after '.', found {_describe(name)}", name.col)
            if not self.at("("):
                raise ExprError(f"field selection .{name.value} is not supported on this value", name.col)
            if name.value not in METHODS:
                raise ExprError(f"unsupported function {name.value}(); supported: {', '.join(METHODS)}", name.col)
            args = self.arguments()
            if len(args) != 1:
                raise ExprError(f"{name.value}() takes one argument", name.col)
            _want(node, (STR, DYN), f"{name.value}()", name.col)
            _want(args[0], (STR, DYN), f"{name.value}()", name.col)
            node = Call(name.value, (node, args[0]), BOOL)
        if self.at("["):
            raise ExprError("indexing is only supported on request.headers", self.peek().col)
        return node

    def arguments(self) -> list[Any]:
        self.expect("(")
        args: list[Any] = []
        if not self.at(")"):
            args.append(self.expr())
            while self.at(","):
                self.next()
                args.append(self.expr())
        self.expect(")")
        return args

    def primary(self) -> Any:
        t = self.next()
        if t.kind == "str":
            return Lit(t.value, STR)
        if t.kind == "int":
            return Lit(t.value, INT)
        if t.kind == "op" and t.value == "(":
            node = self.expr()
            self.expect(")")
            return node
        if t.kind == "op" and t.value == "[":
            items: list[Any] = []
            if not self.at("]"):
                items.append(self.expr())
                while self.at(","):
                    self.next()
                    items.append(self.expr())
            self.expect("]")
            for item in items:
                _want(item, (STR, INT, BOOL, DYN), "a list item", t.col)
            return ListLit(tuple(items))
        if t.kind != "ident":
            raise ExprError(f"unexpected {_describe(t)}", t.col)
        if t.value in ("true", "false"):
            return Lit(t.value == "true", BOOL)
        if t.value == "null":
            raise ExprError("null is not supported", t.col)
        if self.at("("):
            return self.call(t)
        return self.path(t)

    def call(self, t: _Tok) -> Any:
        if t.value not in FUNCTIONS:
            raise ExprError(f"unsupported function {t.value}(); supported: {', '.join(FUNCTIONS)}", t.col)
        args = self.arguments()
        if len(args) != 1:
            raise ExprError(f"{t.value}() takes one argument", t.col)
        (arg,) = args
        if t.value == "has":
            if not isinstance(arg, Attr | Header):
                raise ExprError("has() needs an attribute such as request.headers['x'] or request.host", t.col)
            return Call("has", (arg,), BOOL)
        _want(arg, (STR, INT, BOOL, DYN), "string()", t.col)
        return Call("string", (arg,), STR)

    def path(self, first: _Tok) -> Any:
        names = [first.value]
        while (
            self.at(".")
            and self.peek(1).kind == "ident"
            and not (self.peek(2).kind == "op" and self.peek(2).value == "(")
        ):
            self.next()
            names.append(self.next().value)
        dotted = ".".join(names)
        if self.at("["):
            col = self.next().col
            index = self.expr()
            self.expect("]")
            if dotted != HEADERS:
                raise ExprError(f"indexing is only supported on request.headers, not {dotted}", col)
            if not isinstance(index, Lit) or index.type != STR or not index.value:
                raise ExprError("request.headers[...] needs a non-empty string literal", col)
            return Header(index.value.lower())
        if dotted == HEADERS:
            return Headers()
        attr = ATTRIBUTES.get(dotted)
        if attr is None:
            raise ExprError(f"unknown or unsupported attribute {dotted}", first.col)
        return Attr(dotted, attr.type)


def _want(node: Any, types: tuple[str, ...], what: str, col: int) -> None:
    if node.type not in types and node.type != DYN:
        raise ExprError(f"{what} needs {' or '.join(types)}, got {node.type}", col)


def _same_type(a: Any, b: Any, what: str, col: int) -> None:
    if DYN not in (a.type, b.type) and a.type != b.type:
        raise ExprError(f"{what} between {a.type} and {b.type}", col)


def _compare(op: str, a: Any, b: Any, col: int) -> Bin:
    for side in (a, b):
        _want(side, (STR, INT, BOOL, DYN) if op in ("==", "!=") else (STR, INT, DYN), f"'{op}'", col)
    if DYN not in (a.type, b.type) and a.type != b.type:
        hint = " (compare with 200, not '200')" if INT in (a.type, b.type) and STR in (a.type, b.type) else ""
        raise ExprError(f"'{op}' between {a.type} and {b.type}{hint}", col)
    return Bin(op, a, b, BOOL)


@functools.lru_cache(maxsize=1024)
def parse_expression(text: str) -> Any:
    """The typed AST of a tag value; ExprError says what is wrong and where."""
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ExprError(f"longer than {MAX_EXPRESSION_CHARS} characters")
    if not text.strip():
        raise ExprError("empty expression")
    return _Parser(text).parse()


Fn = Callable[[Any], Any]
_CMP = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


def _lower(node: Any, kind: str) -> tuple[Fn, bool]:
    """(closure over the record returning a value or MISSING, whether it is constant)."""
    if isinstance(node, Lit):
        v = node.value
        return (lambda _r: v), True
    if isinstance(node, Attr):
        attr = ATTRIBUTES[node.name]
        if attr.http_only and kind != HTTP:
            return (lambda _r: MISSING), True
        return attr.getter(MISSING), False
    if isinstance(node, Header):
        if kind != HTTP:
            return (lambda _r: MISSING), True
        name = node.name
        return (lambda r: r.request_headers.get(name, MISSING)), False
    if isinstance(node, ListLit):
        parts = [_lower(i, kind) for i in node.items]
        fns = [f for f, _ in parts]
        return (lambda r: [f(r) for f in fns]), all(c for _, c in parts)
    if isinstance(node, Cond):
        (c, cc), (a, ac), (b, bc) = _lower(node.c, kind), _lower(node.a, kind), _lower(node.b, kind)

        def cond(r: Any) -> Any:
            x = c(r)
            if x is MISSING:
                return MISSING
            return a(r) if x else b(r)

        return cond, cc and ac and bc
    if isinstance(node, Call):
        return _lower_call(node, kind)
    assert isinstance(node, Bin)
    if node.op == "in" and isinstance(node.b, Headers):
        k, _ = _lower(node.a, kind)
        if kind != HTTP:
            return (lambda _r: MISSING), True

        def has_header(r: Any) -> Any:
            key = k(r)
            return MISSING if key is MISSING else key.lower() in r.request_headers

        return has_header, False
    (a, ac), (b, bc) = _lower(node.a, kind), _lower(node.b, kind)
    const = ac and bc
    if node.op == "||":

        def or_(r: Any) -> Any:
            x = a(r)
            if x is True:
                return True
            y = b(r)
            if y is True:
                return True
            return MISSING if x is MISSING or y is MISSING else False

        return or_, const
    if node.op == "&&":

        def and_(r: Any) -> Any:
            x = a(r)
            if x is False:
                return False
            y = b(r)
            if y is False:
                return False
            return MISSING if x is MISSING or y is MISSING else True

        return and_, const
    if node.op == "in":

        def in_list(r: Any) -> Any:
            x, items = a(r), b(r)
            if x is MISSING:
                return MISSING
            if x in items:
                return True
            return MISSING if MISSING in items else False

        return in_list, const
    fn: Callable[[Any, Any], Any] = _CMP.get(node.op) or (operator.add if node.op == "+" else operator.sub)

    def binary(r: Any) -> Any:
        x, y = a(r), b(r)
        if x is MISSING or y is MISSING:
            return MISSING
        try:
            return fn(x, y)
        except TypeError:  # mixed types behind a ?: (dyn)
            return MISSING

    return binary, const


def _lower_call(node: Call, kind: str) -> tuple[Fn, bool]:
    parts = [_lower(a, kind) for a in node.args]
    const = all(c for _, c in parts)
    f = parts[0][0]
    if node.fn == "has":
        return (lambda r: f(r) is not MISSING), const
    if node.fn == "not":
        return (lambda r: MISSING if (x := f(r)) is MISSING else not x), const
    if node.fn == "neg":
        return (lambda r: MISSING if (x := f(r)) is MISSING else -x), const
    if node.fn == "string":
        return (lambda r: MISSING if (x := f(r)) is MISSING else _text(x)), const
    g = parts[1][0]
    method = {"startsWith": str.startswith, "endsWith": str.endswith, "contains": str.__contains__}[node.fn]

    def call(r: Any) -> Any:
        x, y = f(r), g(r)
        if x.__class__ is not str or y.__class__ is not str:
            return MISSING
        return method(x, y)

    return call, const


def _text(v: Any) -> str:
    """A CEL value as Envoy prints it into a tag."""
    if v.__class__ is str:
        return v
    if v is MISSING:
        return UNKNOWN
    if v is True or v is False:
        return "true" if v else "false"
    return str(v)


@dataclass(frozen=True, slots=True)
class CompiledValue:
    """A tag value: a constant string, or a function of the record."""

    text: str  # the source, which also identifies it
    const: str | None
    fn: Callable[[Any], str] | None


@functools.lru_cache(maxsize=1024)
def compile_value(text: str, kind: str) -> CompiledValue:
    """Compile a tag value for HTTP (HttpRecord) or TCP (TcpRecord) records.

    A value outside the supported subset (Istio does not validate tag values; the proxy
    reports an expression it cannot evaluate as `unknown`) is the constant `unknown`:
    validation has already warned about it."""
    try:
        node = parse_expression(text)
        fn, const = _lower(node, kind)
    except ExprError:
        return CompiledValue(text, UNKNOWN, None)
    if const:
        return CompiledValue(text, _text(fn(None)), None)
    if isinstance(node, Header):  # the common cases, without a wrapper
        name = node.name
        return CompiledValue(text, None, lambda r: r.request_headers.get(name, UNKNOWN))
    if isinstance(node, Attr) and node.type == STR:
        return CompiledValue(text, None, ATTRIBUTES[node.name].getter(UNKNOWN))
    if node.type == STR:
        return CompiledValue(text, None, lambda r: v if (v := fn(r)).__class__ is str else UNKNOWN)
    return CompiledValue(text, None, lambda r: _text(fn(r)))


def expression_headers(text: str) -> frozenset[str]:
    """The request headers (lower case) a tag value reads, so the adapters can be told to
    capture them (ALS `additional_request_headers_to_log` sends only those). A header name
    computed at run time (`request.host in request.headers`) is not listed."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, Header):
            found.add(node.name)
        elif isinstance(node, Attr) and node.name == "request.referer":
            found.add("referer")
        elif isinstance(node, Bin) and isinstance(node.b, Headers) and isinstance(node.a, Lit):
            found.add(str(node.a.value).lower())
        for child in (getattr(node, f) for f in getattr(node, "__slots__", ())):
            for c in child if isinstance(child, tuple) else (child,):
                if hasattr(c, "type"):
                    walk(c)

    try:
        walk(parse_expression(text))
    except ExprError:  # evaluated as `unknown`: it reads nothing
        return frozenset()
    return frozenset(found)


def evaluate(text: str, record: HttpRecord | TcpRecord) -> str:
    """A tag value for one record (tests, /debug); the hot path uses compiled plans."""
    cv = compile_value(text, TCP if isinstance(record, TcpRecord) else HTTP)
    return cv.const if cv.fn is None else cv.fn(record)  # type: ignore[return-value]


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


def _is_all(sel: MetricSelector | None) -> bool:
    return sel is None or (sel.custom_metric is None and sel.metric in (None, ALL_METRICS))


def _targets_workloads(spec: TelemetrySpec) -> bool:
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
    if o.disabled is True and _is_all(sel) and o.tag_overrides:
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


def _model_issues(err: ValidationError, doc: Document, file: str, label: str, prefix: Path) -> list[ConfigIssue]:
    issues = []
    for e in err.errors(include_url=False):
        loc = tuple(p for p in e["loc"] if isinstance(p, int | str))
        msg, typ = e["msg"], e["type"]
        if typ == "extra_forbidden":
            msg = "unknown field"
        elif typ == "missing":
            msg = "required field is missing"
        elif typ == "string_type":
            got = type(e.get("input")).__name__
            msg = f"must be a string, got {got}" + (
                " (quote the value in YAML)" if got in ("int", "float", "bool") else ""
            )
        issues.append(
            ConfigIssue(Location(file, doc.index, doc.line_of(loc), label), format_path((*prefix, *loc)), msg)
        )
    return issues


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
        return None, _model_issues(e, doc, file, label, prefix)
    if not resource.metadata.namespace:
        return None, [
            issue(("metadata", "namespace"), "required: extproc has no kubectl context to default the namespace from")
        ]
    issues = [issue(p.path, p.message, p.warning) for p in validate_telemetry(resource)]
    if any(not i.warning for i in issues):
        return None, issues
    return LoadedTelemetry(resource, Location(file, doc.index, doc.line_of(()), label)), issues


# --- plans ----------------------------------------------------------------------------


def _runs(idx: Sequence[int]) -> list[tuple[int, int]]:
    """[0, 1, 2, 5, 6] -> [(0, 3), (5, 7)]: contiguous runs as slice bounds."""
    runs: list[tuple[int, int]] = []
    for i in idx:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _slicer(idx: Sequence[int]) -> Callable[[Key], Key]:
    """The standard labels at `idx`, as slices of the standard tuple (cheaper than picking)."""
    runs = _runs(idx)
    if not runs:
        return lambda _base: ()
    if len(runs) == 1:
        a, b = runs[0]
        return (lambda base: base) if (a, b) == (0, len(LABELS)) else (lambda base: base[a:b])
    if len(runs) == 2:
        (a, b), (c, d) = runs
        return lambda base: base[a:b] + base[c:d]
    if len(runs) == 3:
        (a, b), (c, d), (e, f) = runs
        return lambda base: base[a:b] + base[c:d] + base[e:f]
    return operator.itemgetter(*idx)  # >= 4 indexes: returns a tuple


def _constant(value: str) -> Callable[[object], str]:
    return lambda _r: value


@functools.lru_cache(maxsize=4096)
def projection(kind: str, spec: tuple[int | str, ...]) -> Callable[[Key, Any], Key]:
    """A metric's label values from the standard 25-value tuple and the record.

    `spec` has, per output label, an index into the standard tuple or a tag value
    expression. Plain closures (an object with `__call__` costs ~200ns more per record),
    cached by spec: the same overrides give the same function, so plans compare equal
    across reloads and MetricStore.set_plans keeps their tables.
    """

    def value(text: str) -> Callable[[object], str]:
        v = compile_value(text, kind)
        return v.fn if v.fn is not None else _constant(v.const or "")

    exprs = [i for i, s in enumerate(spec) if isinstance(s, str)]
    if not exprs:
        get = _slicer(spec)  # type: ignore[arg-type]
        runs = _runs(spec)  # type: ignore[arg-type]
        if len(runs) == 2:
            (a, b), (c, d) = runs
            return lambda base, _r: base[a:b] + base[c:d]
        return lambda base, _r: get(base)
    if exprs == [len(spec) - 1]:
        f = value(spec[-1])  # type: ignore[arg-type]
        runs = _runs(spec[:-1])  # type: ignore[arg-type]
        if runs == [(0, len(LABELS))]:
            return lambda base, r: (*base, f(r))
        if len(runs) == 1:
            a, b = runs[0]
            return lambda base, r: (*base[a:b], f(r))
        get = _slicer(spec[:-1])  # type: ignore[arg-type]
        return lambda base, r: (*get(base), f(r))
    segments: list[tuple[int, int, Callable[[object], str] | None]] = []
    run: list[int] = []
    for s in (*spec, None):
        if isinstance(s, int):
            if run and run[-1] + 1 != s:
                segments.append((run[0], run[-1] + 1, None))
                run = []
            run.append(s)
            continue
        if run:
            segments.append((run[0], run[-1] + 1, None))
            run = []
        if s is not None:
            segments.append((0, 0, value(s)))
    parts = tuple(segments)

    def compose(base: Key, r: object) -> Key:
        out: Key = ()
        for start, stop, f in parts:
            out += base[start:stop] if f is None else (f(r),)
        return out

    return compose


@dataclass
class _MetricOverride:
    disabled: bool | None = None
    tags: dict[str, TagOverride] = field(default_factory=dict)


def build_plan(metric: MetricDef, tags: Mapping[str, TagOverride], disabled: bool = False) -> MetricPlan:
    """One metric's plan after its merged tag overrides (istio_stats.cc MetricOverrides)."""
    standard = MetricPlan.standard(metric)
    if disabled:
        return MetricPlan(metric, standard.label_names, None, True)
    carried = set(standard.label_names)
    removed: set[str] = set()
    replaced: dict[str, str] = {}
    added: dict[str, str] = {}
    for name in sorted(tags):
        to = tags[name]
        if (to.operation or UPSERT) == REMOVE:
            if name in carried:
                removed.add(name)
        elif name in INDEX:
            if name in carried:
                replaced[name] = to.value or ""
        else:
            added[name] = to.value or ""
    if not (removed or replaced or added):
        return standard
    names: list[str] = []
    spec: list[int | str] = []
    for i in metric.labels:
        name = LABELS[i]
        if name in removed:
            continue
        names.append(name)
        spec.append(replaced.get(name, i))
    for name in sorted(added):
        names.append(name)
        spec.append(added[name])
    return MetricPlan(metric, tuple(names), projection(TCP if metric.family is Family.TCP else HTTP, tuple(spec)))


class WorkloadLike(Protocol):
    @property
    def namespace(self) -> str: ...
    @property
    def labels(self) -> Mapping[str, str]: ...
    @property
    def root_namespace(self) -> str: ...


@dataclass(frozen=True, slots=True)
class AppliedTelemetry:
    level: str  # root, namespace, workload
    ident: str  # namespace/name
    origin: str  # file: document n

    def __str__(self) -> str:
        return f"{self.level}: {self.ident} ({self.origin})"


@dataclass(frozen=True)
class TelemetryPlans:
    """The metric plans of one workload, per direction, and what produced them."""

    inbound: tuple[MetricPlan, ...]  # SERVER mode, reporter="destination"
    outbound: tuple[MetricPlan, ...]  # CLIENT mode, reporter="source"
    sources: tuple[AppliedTelemetry, ...] = ()
    ignored: tuple[tuple[str, str], ...] = ()  # (namespace/name, why)
    notes: tuple[str, ...] = ()
    request_headers: frozenset[str] = frozenset()  # read by tag values: capture them in Envoy

    def plans_for(self, direction: Direction) -> tuple[MetricPlan, ...]:
        return self.inbound if direction is Direction.INBOUND else self.outbound

    @property
    def symmetric(self) -> bool:
        return self.inbound == self.outbound

    @staticmethod
    def standard() -> TelemetryPlans:
        plans = tuple(MetricPlan.standard(m) for m in METRICS)
        return TelemetryPlans(plans, plans)


def _age_key(t: LoadedTelemetry) -> tuple[datetime, str]:
    """Istio's sortConfigByCreationTime: oldest first, then by name.namespace."""
    ts = t.resource.metadata.creation_timestamp
    if ts is None:
        ts = datetime.min.replace(tzinfo=UTC)
    elif ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts, f"{t.name}.{t.namespace}"


def select_telemetries(
    resources: Iterable[LoadedTelemetry], workload: WorkloadLike
) -> tuple[list[tuple[str, LoadedTelemetry]], list[tuple[str, str]]]:
    """([(level, resource)] root first, [(namespace/name, why not)]) as Istio's applicableTelemetries."""
    ns, root = workload.namespace, workload.root_namespace
    chosen: list[tuple[str, LoadedTelemetry]] = []
    ignored: list[tuple[str, str]] = []
    by_ns: dict[str, list[LoadedTelemetry]] = {}
    for t in sorted(resources, key=_age_key):
        if not _targets_workloads(t.resource.spec):
            ignored.append((t.ident, "uses targetRef(s), which select Gateways and waypoints, not a sidecar workload"))
        elif t.namespace in (ns, root):
            by_ns.setdefault(t.namespace, []).append(t)
        else:
            ignored.append((t.ident, f"namespace {t.namespace} is neither the workload's ({ns}) nor the root ({root})"))

    def namespace_wide(namespace: str, level: str) -> None:
        first = None
        for t in by_ns.get(namespace, ()):
            if t.selector:
                continue
            if first is None:
                first = t
                chosen.append((level, t))
            else:
                ignored.append(
                    (t.ident, f"{first.ident} is the namespace-wide Telemetry of {namespace} (older, or first by name)")
                )

    if root:
        namespace_wide(root, "root")
    if ns != root:
        namespace_wide(ns, "namespace")
    first = None
    for t in by_ns.get(ns, ()):
        sel = t.selector
        if not sel:
            continue
        misses = [f"{k}={v}" for k, v in sel.items() if workload.labels.get(k) != v]
        if misses:
            ignored.append((t.ident, f"selector {', '.join(misses)} does not match the workload labels"))
        elif first is None:
            first = t
            chosen.append(("workload", t))
        else:
            ignored.append(
                (t.ident, f"{first.ident} also selects this workload and comes first (older, or first by name)")
            )
    if ns != root:
        for t in by_ns.get(root, ()):
            if t.selector:
                ignored.append((t.ident, f"a selector in the root namespace selects only workloads in {root}"))
    order = {"root": 0, "namespace": 1, "workload": 2}
    chosen.sort(key=lambda lt: order[lt[0]])
    return chosen, ignored


def compile_telemetry(
    resources: Iterable[LoadedTelemetry],
    workload: WorkloadLike,
    *,
    default_providers: Sequence[str] = DEFAULT_METRICS_PROVIDERS,
) -> TelemetryPlans:
    """The inbound and outbound plans for the workload (mergeMetrics, for the prometheus provider)."""
    chosen, ignored = select_telemetries(resources, workload)
    entries: list[tuple[LoadedTelemetry, Metrics]] = [
        (t, m) for _, t in chosen for m in t.resource.spec.metrics or () if m is not None
    ]

    def names(m: Metrics) -> list[str]:
        return [p.name.lower() for p in m.providers or () if p is not None and p.name]

    in_scope = [p.lower() for p in default_providers]
    scope_from = "the mesh default providers"
    for t, m in entries:
        if n := names(m):
            in_scope, scope_from = n, f"{t.ident}"
    notes: list[str] = []
    state: dict[str, dict[str, _MetricOverride]] = {CLIENT: {}, SERVER: {}}
    all_off: set[str] = set()
    if PROMETHEUS in in_scope:
        parent = [p.lower() for p in default_providers]
        for _, m in entries:
            providers = names(m) or parent
            parent = providers
            if PROMETHEUS not in providers:
                continue
            for o in m.overrides or ():
                if o is None:
                    continue
                sel = o.match
                modes = [sel.mode] if sel is not None and sel.mode in (CLIENT, SERVER) else [CLIENT, SERVER]
                if _is_all(sel) and o.disabled is True:
                    all_off.update(modes)
                    continue
                all_off.difference_update(modes)
                if sel is not None and sel.custom_metric is not None:
                    metrics = []  # a custom metric: none is served here, but the mode is back on (as in Istio)
                elif sel is not None and sel.metric not in (None, ALL_METRICS):
                    metrics = [sel.metric]
                else:
                    metrics = list(METRIC_BY_TELEMETRY_NAME)
                for mode in modes:
                    for metric in metrics:
                        st = state[mode].setdefault(metric, _MetricOverride())
                        if o.disabled is not None:
                            st.disabled = o.disabled
                        for tag, to in (o.tag_overrides or {}).items():
                            if to is not None and tag:
                                st.tags[prometheus_label(tag)] = to
    else:
        all_off = {CLIENT, SERVER}
        notes.append(
            f"no Prometheus metrics: the providers in effect (from {scope_from}) are {', '.join(in_scope) or 'none'}"
        )
    for mode in sorted(all_off):
        if PROMETHEUS in in_scope:
            notes.append(f"all metrics are disabled for {mode} ({'outbound' if mode == CLIENT else 'inbound'})")

    def plans(mode: str) -> tuple[MetricPlan, ...]:
        out = []
        for m in METRICS:
            st = state[mode].get(m.telemetry_name)
            if mode in all_off:
                out.append(MetricPlan(m, MetricPlan.standard(m).label_names, None, True))
            elif st is None:
                out.append(MetricPlan.standard(m))
            else:
                out.append(build_plan(m, st.tags, bool(st.disabled)))
        return tuple(out)

    headers: set[str] = set()
    for mode, per_metric in state.items():
        for st in per_metric.values() if mode not in all_off else ():
            for to in st.tags.values() if not st.disabled else ():
                if (to.operation or UPSERT) == UPSERT and to.value:
                    headers |= expression_headers(to.value)
    return TelemetryPlans(
        inbound=plans(SERVER),
        outbound=plans(CLIENT),
        sources=tuple(AppliedTelemetry(level, t.ident, t.origin) for level, t in chosen),
        ignored=tuple(ignored),
        notes=tuple(notes),
        request_headers=frozenset(headers),
    )
