"""Tag values are a CEL subset, parsed and type-checked when the file is loaded and compiled
once into closures over the record (`HttpRecord` for HTTP and gRPC metrics, `TcpRecord`
for TCP): string, int and bool literals; attributes (`ATTRIBUTES`, plus
`request.headers['name']`, looked up in lower case as Envoy does); `==`, `!=`, `<`, `<=`,
`>`, `>=`, `in` (a list literal or `request.headers`), `!`, `&&`, `||`, `+` (strings or
ints), `cond ? a : b`, `has(attr)` (also `has(request.headers['x'])`, which real CEL
spells `'x' in request.headers`), `string(x)` and the `startsWith`, `endsWith` and
`contains` methods. A value that is absent (empty string, no response code, a missing
header) is an evaluation error, which Istio reports as `unknown`; `has()` tests for it.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from extproc.telemetry.labels import UNKNOWN
from extproc.telemetry.record import Direction, HttpRecord, TcpRecord

MAX_EXPRESSION_CHARS = 4096
MAX_EXPRESSION_DEPTH = 32


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
