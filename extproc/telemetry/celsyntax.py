"""Whether a text parses as a CEL expression: the check Istio makes on an access-log filter.

istiod validates `accessLogging[].filter.expression` with cel-go's `Env.Parse` (pkg/config/
validation/validation_istiod.go): syntax only, no types and no declarations, so
`response.code >= 400 && unknown.thing` passes and `response.code >=` does not. extproc
does not evaluate access-log filters (Envoy's access log does), but a filter Istio would
refuse must be refused here too, so this module implements CEL's full grammar (the
`CEL.g4` of cel-spec) without building anything: literals of every kind, the operators
with their precedence, selection, indexing, calls, lists, maps, message construction,
comments, reserved words, and the macro argument rules cel-go enforces while parsing
(`has()` takes a field selection; the comprehension macros take a simple name first).

The tag values of metric overrides use a smaller, typed subset (`cel.py`); this is
only the yes/no question "does it parse".
"""

from __future__ import annotations

import re

MAX_DEPTH = 250  # cel-go's default parser recursion limit

RESERVED = frozenset(
    {"as", "break", "const", "continue", "else", "for", "function", "if", "import", "let", "loop", "package"}
    | {"namespace", "return", "var", "void", "while"}
)
_COMPREHENSIONS = {"all": (2,), "exists": (2,), "exists_one": (2,), "filter": (2,), "map": (2, 3)}

_TOKEN = re.compile(
    r"""
    (?P<ws>[ \t\r\n\f]+|//[^\n]*)
  | (?P<float>(?:\d+\.\d+(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+|\.\d+(?:[eE][+-]?\d+)?))
  | (?P<uint>(?:0[xX][0-9a-fA-F]+|\d+)[uU])
  | (?P<int>0[xX][0-9a-fA-F]+|\d+)
  | (?P<str>(?:[rR][bB]?|[bB][rR]?)?(?:'''|\"\"\"|'|"))
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>==|!=|<=|>=|&&|\|\||[<>!?:+\-*/%()\[\]{}.,])
    """,
    re.VERBOSE,
)
_ESCAPE = re.compile(r"\\(?:[abfnrtv\\'\"`?]|[0-3][0-7]{2}|[xX][0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8})")


class CelSyntaxError(ValueError):
    def __init__(self, message: str, column: int) -> None:
        super().__init__(f"{message} (column {column})")


def _string_end(text: str, start: int, prefix: str, quote: str) -> int:
    """The index after a string literal whose quote starts at `start`, checking its escapes."""
    raw = "r" in prefix.lower()
    i = start + len(quote)
    while i < len(text):
        if text.startswith(quote, i):
            return i + len(quote)
        c = text[i]
        if len(quote) == 1 and c in "\r\n":
            break
        if c == "\\" and not raw:
            m = _ESCAPE.match(text, i)
            if m is None:
                raise CelSyntaxError(f"invalid escape sequence {text[i : i + 2]!r}", i + 1)
            i = m.end()
            continue
        i += 1
    raise CelSyntaxError("unterminated string literal", start + 1)


def _tokens(text: str) -> list[tuple[str, str, int]]:
    out: list[tuple[str, str, int]] = []
    i = 0
    while i < len(text):
        m = _TOKEN.match(text, i)
        if m is None:
            raise CelSyntaxError(f"unexpected character {text[i]!r}", i + 1)
        kind = m.lastgroup or ""
        if kind == "ws":
            i = m.end()
            continue
        if kind == "str":
            token = m.group()
            quote = token.lstrip("rRbB")
            end = _string_end(text, i + len(token) - len(quote), token[: len(token) - len(quote)], quote)
            out.append(("lit", text[i:end], i + 1))
            i = end
            continue
        value = m.group()
        if kind in ("int", "uint"):
            digits = value.rstrip("uU")
            number = int(digits, 16) if digits[:2] in ("0x", "0X") else int(digits)
            # 9223372036854775808 is valid only negated; the token cannot tell, so it is let through
            if number >= (1 << 64 if kind == "uint" else 1 << 63) and not (kind == "int" and number == 1 << 63):
                raise CelSyntaxError(f"invalid {kind} literal {value}", i + 1)
            out.append(("num" if kind == "int" else "lit", value, i + 1))
        elif kind == "float":
            out.append(("lit", value, i + 1))
        elif kind == "ident":
            if value in ("true", "false", "null"):
                out.append(("lit", value, i + 1))
            elif value == "in":
                out.append(("op", value, i + 1))
            else:
                out.append(("ident", value, i + 1))
        else:
            out.append(("op", value, i + 1))
        i = m.end()
    out.append(("end", "", len(text) + 1))
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = _tokens(text)
        self.pos = 0
        self.depth = 0

    def peek(self, ahead: int = 0) -> tuple[str, str, int]:
        return self.toks[min(self.pos + ahead, len(self.toks) - 1)]

    def at(self, value: str) -> bool:
        kind, v, _ = self.peek()
        return kind == "op" and v == value

    def take(self) -> tuple[str, str, int]:
        t = self.peek()
        self.pos += 1
        return t

    def expect(self, value: str) -> None:
        kind, v, col = self.take()
        if kind != "op" or v != value:
            got = "end of expression" if kind == "end" else repr(v)
            raise CelSyntaxError(f"expected {value!r}, found {got}", col)

    def ident(self, reserved_check: bool = False) -> str:
        kind, v, col = self.take()
        if kind != "ident":
            got = "end of expression" if kind == "end" else repr(v)
            raise CelSyntaxError(f"expected an identifier, found {got}", col)
        if reserved_check and v in RESERVED:  # cel-go checks names, not fields
            raise CelSyntaxError(f"reserved identifier: {v}", col)
        return v

    # Each method returns a small description of what it parsed, as much as the macro rules need:
    # ("ident", name), ("select",), or ("other",).

    def expr(self) -> tuple[str, ...]:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise CelSyntaxError("expression recursion limit exceeded", self.peek()[2])
        node = self.binary(0)
        if self.at("?"):
            self.take()
            self.binary(0)
            self.expect(":")
            self.expr()
            node = ("other",)
        self.depth -= 1
        return node

    _LEVELS = (("||",), ("&&",), ("==", "!=", "<", "<=", ">", ">=", "in"), ("+", "-"), ("*", "/", "%"))

    def binary(self, level: int) -> tuple[str, ...]:
        if level == len(self._LEVELS):
            return self.unary()
        node = self.binary(level + 1)
        while self.peek()[0] == "op" and self.peek()[1] in self._LEVELS[level]:
            self.take()
            self.binary(level + 1)
            node = ("other",)
        return node

    def unary(self) -> tuple[str, ...]:
        if self.at("!") or self.at("-"):
            while self.at("!") or self.at("-"):
                self.take()
            self.member()
            return ("other",)
        return self.member()

    def member(self) -> tuple[str, ...]:
        node = self.primary()
        while True:
            if self.at("."):
                self.take()
                if self.at("?"):
                    raise CelSyntaxError("optional field selection is not enabled", self.peek()[2])
                name = self.ident()
                if self.at("("):
                    col = self.peek()[2]
                    args = self.arguments(")")
                    self.check_macro(name, args, col, receiver=True)
                    node = ("other",)
                else:
                    node = ("select",)
            elif self.at("["):
                self.take()
                if self.at("?"):
                    raise CelSyntaxError("optional index is not enabled", self.peek()[2])
                self.expr()
                self.expect("]")
                node = ("other",)
            else:
                return node

    def arguments(self, close: str) -> list[tuple[str, ...]]:
        self.take()  # the opening bracket
        args: list[tuple[str, ...]] = []
        while not self.at(close):
            args.append(self.expr())
            if not self.at(","):
                break
            self.take()
            if close == ")" and self.at(")"):
                raise CelSyntaxError("expected an expression after ','", self.peek()[2])
        self.expect(close)
        return args

    def check_macro(self, name: str, args: list[tuple[str, ...]], col: int, receiver: bool) -> None:
        if not receiver and name == "has" and len(args) == 1 and args[0] != ("select",):
            raise CelSyntaxError("invalid argument to has() macro", col)
        if receiver and len(args) in _COMPREHENSIONS.get(name, ()) and args[0][0] != "ident":
            raise CelSyntaxError(f"{name}() macro: argument must be a simple name", col)

    def primary(self) -> tuple[str, ...]:
        kind, v, _ = self.peek()
        if kind in ("lit", "num"):
            self.take()
            return ("other",)
        if kind == "op" and v == "(":
            self.take()
            self.expr()
            self.expect(")")
            return ("other",)
        if kind == "op" and v == "[":
            self.arguments("]")
            return ("other",)
        if kind == "op" and v == "{":
            self.take()
            while not self.at("}"):
                if self.at("?"):
                    raise CelSyntaxError("optional map entries are not enabled", self.peek()[2])
                self.expr()
                self.expect(":")
                self.expr()
                if not self.at(","):
                    break
                self.take()
            self.expect("}")
            return ("other",)
        leading_dot = kind == "op" and v == "."
        if leading_dot:
            self.take()
        name = self.ident(reserved_check=True)
        if self.at("("):
            call_col = self.peek()[2]
            args = self.arguments(")")
            self.check_macro(name, args, call_col, receiver=False)
            return ("other",)
        # A qualified name followed by '{' is a message construction: a.b.C{f: 1}.
        ahead = 0
        while self.peek(ahead)[1] == "." and self.peek(ahead + 1)[0] == "ident":
            ahead += 2
        if self.peek(ahead)[0] == "op" and self.peek(ahead)[1] == "{":
            for _ in range(ahead // 2):
                self.take()
                self.ident()
            self.take()
            while not self.at("}"):
                if self.at("?"):
                    raise CelSyntaxError("optional fields are not enabled", self.peek()[2])
                self.ident()
                self.expect(":")
                self.expr()
                if not self.at(","):
                    break
                self.take()
            self.expect("}")
            return ("other",)
        return ("other",) if leading_dot else ("ident", name)


def parse_problem(text: str) -> str | None:
    """None if `text` parses as CEL, else what is wrong and where."""
    try:
        p = _Parser(text)
        if p.peek()[0] == "end":
            raise CelSyntaxError("empty expression", 1)
        p.expr()
        kind, v, col = p.peek()
        if kind != "end":
            raise CelSyntaxError(f"unexpected {v!r}", col)
    except CelSyntaxError as e:
        return str(e)
    except RecursionError:
        return "expression recursion limit exceeded"
    return None
