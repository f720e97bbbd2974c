"""Safe LaTeX -> sympy parser for final answers (the front end of reward.py).

Model text never reaches eval, exec or any of sympy's string parsers: a regex tokenizer and a
recursive-descent parser build sympy objects from a whitelist of operations.

sympy is used as a passive tree. Only exact rational arithmetic is carried out (2^{10} becomes
1024, \\frac{6}{8} becomes 3/4); everything else is built with evaluate=False. sympy's automatic
simplification asks questions such as "is this number positive?", which it answers by running
evalf at whatever precision it takes, and that can run for minutes on inputs like
\\tan e^{(i+\\pi)!}. Values are instead computed by mathnumeric.numeric(), a small mpmath
evaluator whose every step is guarded.

Work is bounded: nesting depth, the size of exact numbers, numeric exponents, and a wall-clock
deadline checked at every atom. Breaking a bound raises BoundError, whose `reason` says which
("size", "depth" or "time"); text that is not a math answer we understand raises ParseError (the
caller then compares it as text).

Tuples, intervals, unordered lists, equations, matrices, inequalities and sets (set-builder,
\\mathbb{R}, differences) get small containers rather than sympy's Interval/FiniteSet/Union,
which evaluate eagerly (merging, sorting, comparing) and cannot say that "(1, 2)" may be a point
or an open interval. mathsets.py turns the set-like ones into canonical unions of intervals.
"""

import fractions
import math
import re
import time
from dataclasses import dataclass

import sympy as sp

from mathnumeric import numeric

MAX_DEPTH = 40  # nesting of brackets, braces, functions and exponents
MAX_SIGN_CHOICES = 64  # (\\pm 1, \\pm 4) stands for 4 tuples; more than this many is a size bound
MAX_DIGITS = 1000  # largest exact number, in decimal digits (100! has 158, 2^1009 has 304)
MAX_EXPONENT = 10_000  # largest |numeric exponent|
MAX_FACTORIAL = 450  # 450! has about 1000 digits
PARSE_SECONDS = 0.5  # default deadline of parse()


class ParseError(ValueError):
    """The text is not a math answer this parser understands."""


class BoundError(RuntimeError):
    """The input broke a bound. `reason`: "size" (length, digits, exponent), "depth" (nesting)
    or "time" (the deadline)."""

    def __init__(self, reason, message):
        super().__init__(reason, message)  # both in args, so that it survives pickling
        self.reason = reason


@dataclass(frozen=True)
class Seq:
    items: tuple
    kind: str  # "tuple": (a, b), ordered | "list": bare a, b (all solutions) | "set": \{a, b\}
    seps: tuple = ()  # between items: "," (also ;), "or", "and"; says how conditions combine


@dataclass(frozen=True)
class Interval:
    lo: sp.Expr
    hi: sp.Expr
    left_open: bool
    right_open: bool


@dataclass(frozen=True)
class SetUnion:
    parts: tuple


@dataclass(frozen=True)
class Equation:
    lhs: sp.Expr
    rhs: object
    named: bool  # lhs is a bare name such as x, a_1 or f(x): "x = 5" may be compared with "5"


@dataclass(frozen=True)
class Matrix:
    rows: tuple


@dataclass(frozen=True)
class Condition:
    """A chain of inequalities or a membership: -2 < x <= 5, x \\ne 1, k \\in \\mathbb{Z}."""

    items: tuple  # expressions; after "in", a set
    ops: tuple  # "<", "<=", ">", ">=", "!=", "in"


@dataclass(frozen=True)
class SetBuilder:
    head: object  # x in \\{x | x > 0\\}, 3k in \\{3k | k \\in \\mathbb{Z}\\}
    conditions: Seq


@dataclass(frozen=True)
class Domain:
    name: str  # the letter of \\mathbb{R}, \\mathbb{Z}, ...


@dataclass(frozen=True)
class SetDifference:
    left: object
    right: object


def children(value):
    """The values a container holds (nothing for a sympy expression)."""
    if isinstance(value, Seq):
        return value.items
    if isinstance(value, SetUnion):
        return value.parts
    if isinstance(value, Interval):
        return (value.lo, value.hi)
    if isinstance(value, Equation):
        return (value.lhs, value.rhs)
    if isinstance(value, Matrix):
        return tuple(x for row in value.rows for x in row)
    if isinstance(value, Condition):
        return value.items
    if isinstance(value, SetBuilder):
        return (value.head, value.conditions)
    if isinstance(value, SetDifference):
        return (value.left, value.right)
    return ()


_TOKEN = re.compile(
    r"""
    (?P<ws>\s+|\\[,;:!\ ]|~|\\q?quad(?![a-zA-Z])|\\displaystyle(?![a-zA-Z])
        |\\(?:left|right|[bB]igg?[lr]?)(?![a-zA-Z])\.?)
  | (?P<env>\\(?:begin|end)\s*\{[a-zA-Z]+\})
  | (?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
  | (?P<cmd>\\[a-zA-Z]+|\\[{}|\\])
  | (?P<name>[a-zA-Z])
  | (?P<op>[-+*/^_!=(),;:<>\[\]{}|&])
    """,
    re.X,
)
_ENV = re.compile(r"\\(?:begin|end)\s*\{[a-zA-Z]+\}")
_WORD = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{3,}")  # a word, not a product of variables

_FRAC = {r"\frac", r"\dfrac", r"\tfrac", r"\cfrac"}
_BINOM = {r"\binom", r"\dbinom", r"\tbinom"}
_FUNCS = {
    "sin": sp.sin, "cos": sp.cos, "tan": sp.tan, "cot": sp.cot, "sec": sp.sec, "csc": sp.csc,
    "arcsin": sp.asin, "arccos": sp.acos, "arctan": sp.atan,
    "sinh": sp.sinh, "cosh": sp.cosh, "tanh": sp.tanh, "exp": sp.exp, "ln": sp.log, "log": sp.log,
}
_INVERSE = {"sin": "arcsin", "cos": "arccos", "tan": "arctan"}  # \sin^{-1} x
_CONSTANTS = {r"\pi": sp.pi, r"\infty": sp.oo, r"\infin": sp.oo}
_EMPTY = {r"\emptyset", r"\varnothing", r"\oslash"}
_RELATIONS = {
    "=": "=", "<": "<", ">": ">", r"\lt": "<", r"\gt": ">", r"\ne": "!=", r"\neq": "!=", r"\in": "in",
    **dict.fromkeys((r"\le", r"\leq", r"\leqslant", r"\leqq"), "<="),
    **dict.fromkeys((r"\ge", r"\geq", r"\geqslant", r"\geqq"), ">="),
}
_SEPARATORS = {",": ",", ";": ",", r"\lor": "or", r"\land": "and"}
_SUCH_THAT = {r"\mid", "|", ":"}
_ACCENTS = {r"\bar", r"\hat", r"\vec", r"\overline", r"\tilde", r"\overrightarrow", r"\dot"}
_GREEK = set(
    "alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu "
    "xi rho sigma tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Sigma Phi Psi "
    "Omega".split()
)
_MATRICES = {"pmatrix", "bmatrix", "Bmatrix", "matrix", "smallmatrix"}
_SIGNS = ("+", "-", r"\pm", r"\mp")
# the token texts that follow the 1 of a mixed number 1\frac{4}{5} or 1\frac45
_MIXED = re.compile(r"\\[dtc]?frac (?:\{ \d+ \} |\d )(?:\{ \d+ \} |\d )|\\[dtc]?frac \d\d ")


def parse(text, deadline=None):
    """Parse a normalised answer into a sympy expression or one of the containers above, by
    `deadline` (a time.perf_counter() time; default: PARSE_SECONDS from now)."""
    if _WORD.search(_ENV.sub("", text)):
        raise ParseError("text answer")
    if deadline is None:
        deadline = time.perf_counter() + PARSE_SECONDS
    parser = _Parser(_tokenize(text), deadline)
    items, seps = parser.listed(parser.relation)
    if parser.peek() is not None:
        raise ParseError(f"unexpected {parser.peek()!r}")
    return items[0] if len(items) == 1 else Seq(tuple(items), "list", tuple(seps))


def _tokenize(text):
    tokens, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ParseError(f"unexpected character {text[pos]!r}")
        pos = m.end()
        if m.lastgroup == "env":
            tokens.append(("env", re.sub(r"\s", "", m.group())))
        elif m.lastgroup != "ws":
            tokens.append((m.lastgroup, m.group()))
    return tokens


class _Parser:
    def __init__(self, tokens, deadline):
        self.tokens, self.i, self.depth, self.bars = tokens, 0, 0, 0
        self.pm, self.saw_pm = 1, False  # the sign \pm stands for in this pass, see listed()
        self.deadline = deadline

    def peek(self):
        return self.tokens[self.i][1] if self.i < len(self.tokens) else None

    def kind(self):
        return self.tokens[self.i][0] if self.i < len(self.tokens) else None

    def take(self):
        if self.i >= len(self.tokens):
            raise ParseError("unexpected end")
        self.i += 1
        return self.tokens[self.i - 1][1]

    def expect(self, text):
        if self.take() != text:
            raise ParseError(f"expected {text!r}")

    # -- answer level: lists, equations, inequalities, unions
    def listed(self, parse_item):
        """Items separated by , ; \\lor \\land, and the separators. An item with \\pm is parsed
        twice and stands for two values; a tuple with several stands for all their sign choices."""
        items, seps = self.with_pm(parse_item), []
        while self.peek() in _SEPARATORS:
            sep = _SEPARATORS[self.take()]
            more = self.with_pm(parse_item)
            seps += [sep] + [","] * (len(more) - 1)
            items += more
        seps = [","] * (len(items) - 1 - len(seps)) + seps  # the second value of a leading \\pm
        flat, flat_seps = [], []
        for k, item in enumerate(items):  # sign choices of a tuple are listed in its place
            parts = item.items if isinstance(item, Seq) and item.kind == "choices" else (item,)
            flat_seps += ([seps[k - 1]] if k else []) + [","] * (len(parts) - 1)
            flat += parts
        return flat, flat_seps

    def with_pm(self, parse_item):
        outer, start = (self.pm, self.saw_pm), self.i
        self.pm, self.saw_pm = 1, False
        items = [parse_item()]
        if self.saw_pm:
            self.i, self.pm = start, -1
            items.append(parse_item())
        self.pm, self.saw_pm = outer
        return items

    def relation(self):
        """x = 5, a chain a = b = c (which states c), or a chain of inequalities."""
        named = self._name_then_equals()
        items, ops = [self.union()], []
        while self.peek() in _RELATIONS:
            ops.append(_RELATIONS[self.take()])
            items.append(self.union())
        if not ops:
            return items[0]
        if all(op == "=" for op in ops):
            return Equation(_expr(items[0]), items[-1], named)
        if "=" in ops or ("in" in ops and len(ops) > 1):
            raise ParseError("mixed relations")
        if ops[0] == "in":
            return Condition((_expr(items[0]), items[1]), tuple(ops))
        return Condition(tuple(_expr(x) for x in items), tuple(ops))

    def _name_then_equals(self):
        """Lookahead: name [_sub] [(names)] '=' -- as in x = 5, a_{1} = 2, f(x) = 2x."""
        toks = self.tokens

        def at(j):
            return toks[j][1] if j < len(toks) else None

        j = self.i
        if at(j) in _ACCENTS and at(j + 1) == "{" and at(j + 3) == "}":  # \\bar{x} = 4/7
            j += 3
        elif at(j) is None or not (toks[j][0] == "name" or at(j)[1:] in _GREEK):
            return False
        j += 1
        if at(j) == "_":
            j += 1
            if at(j) == "{":
                while at(j) not in ("}", None):
                    j += 1
            j += 1
        if at(j) == "(":
            j += 1
            while at(j) == "," or (at(j) is not None and toks[j][0] == "name"):
                j += 1
            if at(j) != ")":
                return False
            j += 1
        return at(j) == "="

    def union(self):
        """A \\cup B \\cup C, then \\setminus D: \\mathbb{R} \\setminus [0, 1]."""
        value = self._cups()
        while self.peek() in (r"\setminus", r"\backslash"):
            self.i += 1
            value = SetDifference(value, self._cups())
        return value

    def _cups(self):
        parts = [self.expr()]
        while self.peek() == r"\cup":
            self.i += 1
            parts.append(self.expr())
        return parts[0] if len(parts) == 1 else SetUnion(tuple(parts))

    # -- arithmetic
    def sign(self, op):
        if op in (r"\pm", r"\mp"):
            self.saw_pm = True
            return sp.Integer(self.pm if op == r"\pm" else -self.pm)
        return sp.Integer(-1 if op == "-" else 1)

    def expr(self):
        value = self.term()
        while self.peek() in _SIGNS:
            sign = self.sign(self.take())
            value = _add(value, _mul(sign, self.term()))
        return value

    def term(self):
        value = self.signed()
        while True:
            tok = self.peek()
            if tok in ("*", r"\cdot", r"\times"):
                self.i += 1
                value = _mul(value, self.signed())
            elif tok in ("/", r"\div"):
                self.i += 1
                value = _div(value, self.signed())
            elif self._starts_factor():  # implicit multiplication: 2x, 3\sqrt{2}, (a+1)(b+2)
                value = _mul(value, self.power())
            else:
                return value

    def signed(self):
        sign = sp.Integer(1)
        while self.peek() in _SIGNS:  # a loop, not recursion: "------5" cannot blow the stack
            sign *= self.sign(self.take())
        value = self.power()
        return value if sign == 1 else _mul(sign, value)

    def _starts_factor(self):
        kind, tok = self.kind(), self.peek()
        if kind in ("num", "name") or tok in ("(", "{") or kind == "env" and tok.startswith(r"\begin"):
            return True
        if tok == "|":
            return self.bars == 0  # inside |...| a bar closes
        return kind == "cmd" and (
            tok in _FRAC or tok in _BINOM or tok in _CONSTANTS or tok[1:] in _FUNCS
            or tok[1:] in _GREEK or tok in (r"\sqrt", r"\lfloor", r"\lceil") or tok in _ACCENTS
        )

    def power(self):
        value = self.postfix(self.atom())
        while self.peek() == "^":
            self.i += 1
            value = self.postfix(_pow(value, self.exponent()))
        return value

    def postfix(self, value):
        while self.peek() == "!":
            self.i += 1
            value = _factorial(value)
        return value

    def exponent(self):
        """x^2, x^{n+1}, x^-1, 2^\\pi: a braced group or one (signed) atom."""
        sign = sp.Integer(1)
        while self.peek() in ("+", "-"):
            sign *= self.sign(self.take())
        return _mul(sign, self.atom(mixed=False))

    def arg(self):
        """Argument of \\frac, \\sqrt, \\binom: {group} or one token, so that \\frac12 = 1/2."""
        tok = self.peek()
        if self.kind() == "num" and tok.isdigit() and len(tok) > 1:
            self.tokens[self.i : self.i + 1] = [("num", tok[0]), ("num", tok[1:])]
        return self.atom(mixed=False)

    # -- atoms
    def atom(self, mixed=True):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise BoundError("depth", "nesting too deep")
        if time.perf_counter() > self.deadline:
            raise BoundError("time", "parse time limit")
        try:
            return self._atom(mixed)
        finally:
            self.depth -= 1

    def _atom(self, mixed):
        kind, tok = self.kind(), self.take()
        if kind == "num":
            return self.number(tok, mixed)
        if kind == "name" or tok[1:] in _GREEK:
            return self.name(tok.lstrip("\\"))
        if kind == "env":
            return self.matrix(tok)
        if tok in ("(", "["):
            return self.bracket(tok)
        if tok == "{":
            value = self.expr()
            self.expect("}")
            return value
        if tok == r"\{":
            return self.braced_set()
        if tok == "|":
            self.bars += 1
            value = self.expr()
            self.bars -= 1
            self.expect("|")
            return _apply(sp.Abs, value)
        if tok in (r"\lfloor", r"\lceil"):
            value = self.expr()
            self.expect(r"\rfloor" if tok == r"\lfloor" else r"\rceil")
            return _apply(sp.floor if tok == r"\lfloor" else sp.ceiling, value)
        if tok in _FRAC:
            return _div(self.arg(), self.arg())
        if tok in _BINOM:
            return _binomial(self.arg(), self.arg())
        if tok == r"\sqrt":
            return self.sqrt()
        if tok in _CONSTANTS:
            return _CONSTANTS[tok]
        if tok in _EMPTY:
            return Seq((), "set")
        if tok == r"\mathbb":
            self.expect("{")
            name = self.take()
            self.expect("}")
            return Domain(name)
        if tok in _ACCENTS:
            letter = self.arg()
            if not isinstance(letter, sp.Symbol):
                raise ParseError("accent on a non-name")
            return sp.Symbol(f"{letter}_{tok[1:]}")
        if tok[1:] in _FUNCS:
            return self.function(tok[1:])
        raise ParseError(f"unsupported {tok!r}")

    def number(self, tok, mixed):
        if len(tok) > MAX_DIGITS:
            raise BoundError("size", "number too long")
        mantissa, _, exp10 = tok.lower().partition("e")
        value = fractions.Fraction(mantissa.rstrip(".") or "0")
        if self.peek() == r"\overline" and "." in mantissa:  # 0.1\overline{6} = 1/6
            self.i += 1
            repeat = self.take()
            if repeat == "{":
                repeat = self.take()
                self.expect("}")
            if not repeat.isdigit() or len(repeat) > 50:
                raise ParseError("bad repeating decimal")
            whole, _, head = mantissa.partition(".")
            value = fractions.Fraction(
                int(whole + head + repeat) - int(whole + head), 10 ** len(head) * (10 ** len(repeat) - 1)
            )
        if exp10:
            if abs(int(exp10)) > MAX_DIGITS:
                raise BoundError("size", "exponent too large")
            value *= fractions.Fraction(10) ** int(exp10)
        number = sp.Rational(value.numerator, value.denominator)
        fraction = self.mixed_fraction() if mixed and tok.isdigit() else None
        return number if fraction is None else number + fraction

    def mixed_fraction(self):
        """1\\frac{4}{5} is the mixed number 9/5 when both parts are integer literals; a lexical
        check, so that 2\\frac{\\pi}{3} is left to implicit multiplication without re-parsing."""
        ahead = " ".join(t for _, t in self.tokens[self.i : self.i + 7]) + " "
        if not _MIXED.match(ahead):
            return None
        self.i += 1
        return _div(self.arg(), self.arg())

    def braced_set(self):
        """\\{1, 2\\} or set-builder \\{x \\mid x > 0\\}, \\{3k \\mid k \\in \\mathbb{Z}\\}; after the \\{."""
        if self.peek() == r"\}":
            self.i += 1
            return Seq((), "set")
        self.bars += 1  # in \\{x | x > 0\\} the bar separates, it does not open |x|
        items, seps = self.listed(self.expr)
        self.bars -= 1
        if self.peek() in _SUCH_THAT and len(items) == 1:
            self.i += 1
            conditions, seps = self.listed(self.relation)
            self.expect(r"\}")
            return SetBuilder(items[0], Seq(tuple(conditions), "list", tuple(seps)))
        self.expect(r"\}")
        return Seq(tuple(items), "set")

    def name(self, letter):
        if letter == "C" and self._binomial_ahead():  # C_{n}^{k}, the binomial coefficient
            self.i += 1
            n = self.arg()
            self.expect("^")
            return _binomial(n, self.arg())
        if self.peek() == "_":
            self.i += 1
            return sp.Symbol(f"{letter}_{self.subscript()}")
        return {"e": sp.E, "i": sp.I}.get(letter) or sp.Symbol(letter)

    def _binomial_ahead(self):
        """C_{400}^{40} or C_5^2: integer literals as subscript and superscript."""
        ahead = [t for _, t in self.tokens[self.i : self.i + 8]]
        j = 0
        for _ in range(2):
            if ahead[j : j + 1] not in (["_"], ["^"]):
                return False
            j += 1
            if ahead[j : j + 1] == ["{"]:
                j += 1
                if not (ahead[j : j + 1] and ahead[j].isdigit() and ahead[j + 1 : j + 2] == ["}"]):
                    return False
                j += 2
            elif ahead[j : j + 1] and ahead[j].isdigit():
                j += 1
            else:
                return False
        return ahead[0] == "_" and "^" in ahead

    def subscript(self):
        if self.peek() != "{":
            return self.take()
        self.i += 1
        parts = []
        while self.peek() != "}":
            if self.peek() == "{" or len(parts) > 20:
                raise ParseError("complex subscript")
            parts.append(self.take())
        self.i += 1
        return "".join(parts)

    def bracket(self, open_):
        """(a) is grouping; (a, b) a tuple or open interval; [a, b], (a, b], [a, b) intervals.
        Each \\pm in a tuple is a sign of its own: (\\pm 1, \\pm 4) stands for four tuples."""
        if open_ == "(" and self._pm_in_tuple():
            return self.signed_tuples()
        items = [self.expr()]  # a \pm elsewhere makes two values, see with_pm()
        while self.peek() == ",":
            self.i += 1
            items.append(self.expr())
        close = self.take()
        if close not in (")", "]"):
            raise ParseError("unclosed bracket")
        if len(items) == 1:
            if open_ + close in ("()", "[]"):
                return items[0]
            raise ParseError("half-open bracket around one value")
        if open_ + close == "()":
            return Seq(tuple(items), "tuple")
        if len(items) == 2:
            return Interval(_expr(items[0]), _expr(items[1]), open_ == "(", close == ")")
        raise ParseError("bracketed list")

    def _pm_in_tuple(self):
        """Lookahead: this ( group has a top-level comma and a \\pm somewhere."""
        depth, comma, pm = 0, False, False
        for _, t in self.tokens[self.i : self.i + 200]:
            if t in ("(", "[", "{", r"\{"):
                depth += 1
            elif t in (")", "]", "}", r"\}"):
                if depth == 0:
                    return comma and pm
                depth -= 1
            comma |= t == "," and depth == 0
            pm |= t in (r"\pm", r"\mp")
        return False

    def signed_tuples(self):
        """(a, \\pm b, ...) after its (: the tuples of every sign choice, as Seq kind "choices"."""
        choices = [()]
        while True:
            values = self.with_pm(self.expr)
            choices = [c + (v,) for c in choices for v in values]
            if len(choices) > MAX_SIGN_CHOICES:
                raise BoundError("size", "too many sign choices")
            if self.peek() != ",":
                break
            self.i += 1
        self.expect(")")
        if len(choices[0]) < 2:
            raise ParseError("signs in a group")
        tuples = tuple(Seq(c, "tuple") for c in choices)
        return tuples[0] if len(tuples) == 1 else Seq(tuples, "choices")

    def sqrt(self):
        if self.peek() == "[":  # \sqrt[3]{x}
            self.i += 1
            index = self.expr()
            self.expect("]")
            return _pow(self.arg(), _div(sp.Integer(1), index))
        return _pow(self.arg(), sp.Rational(1, 2))

    def function(self, name):
        base = power = None
        if name == "log" and self.peek() == "_":
            self.i += 1
            base = self.arg()
        if self.peek() == "^":
            self.i += 1
            power = self.exponent()
        if power == -1 and name in _INVERSE:
            name, power = _INVERSE[name], None
        arg = self.operand()
        value = _pow(sp.E, arg) if name == "exp" else _apply(_FUNCS[name], arg)
        if base is not None:
            value = _div(value, _apply(sp.log, base))
        return value if power is None else _pow(value, power)

    def operand(self):
        """\\sin(x), \\sin 2x, \\log_2 8: a bracket, or a product of plain factors."""
        if self.peek() == "(":
            return self.atom()
        value = self.power()
        while self.kind() in ("num", "name") or self.peek() in _CONSTANTS:
            value = _mul(value, self.power())
        return value

    def matrix(self, env):
        name = env[len(r"\begin{") : -1]
        if not env.startswith(r"\begin") or name not in _MATRICES:
            raise ParseError(f"unsupported environment {env}")
        end, rows, row = rf"\end{{{name}}}", [], [_expr(self.expr())]
        while True:
            tok = self.take()
            if tok == "&":
                row.append(_expr(self.expr()))
                continue
            if tok not in ("\\\\", end):
                raise ParseError("bad matrix")
            rows.append(tuple(row))
            if tok == end:
                break
            if self.peek() == end:  # a trailing \\ before \end
                self.i += 1
                break
            row = [_expr(self.expr())]
        if len({len(r) for r in rows}) != 1:
            raise ParseError("ragged matrix")
        return Matrix(tuple(rows))


# -- construction: exact arithmetic on rationals (size-checked), unevaluated nodes otherwise


def _expr(value):
    if not isinstance(value, sp.Expr):
        raise ParseError("expected a number or expression, not a tuple, set, interval or matrix")
    return value


def _finite(value):
    if _expr(value) in (sp.oo, -sp.oo):
        raise ParseError("arithmetic with infinity")  # it is an answer or an interval end
    return value


_MAX_RATIONAL = 10**MAX_DIGITS


def _rational(value):
    if max(abs(value.p), value.q) > _MAX_RATIONAL:
        raise BoundError("size", "number too large")
    return value


def _node(cls, a, b):
    """Unevaluated a + b or a * b, flattened so that long sums stay shallow trees."""
    return cls(*(a.args if type(a) is cls else (a,)), *(b.args if type(b) is cls else (b,)), evaluate=False)


def _add(a, b):
    if _finite(a).is_Rational and _finite(b).is_Rational:
        return _rational(a + b)
    return _node(sp.Add, a, b)


def _mul(a, b):
    if a == 1:  # the sign of a term; keeps trees free of 1*x
        return b
    if isinstance(b, Matrix) and isinstance(a, sp.Expr):  # a scalar factored out: \\frac13 (1, 2, 2)
        return Matrix(tuple(tuple(_mul(a, x) for x in row) for row in b.rows))
    if isinstance(b, Seq) and b.kind == "tuple" and isinstance(a, sp.Expr):
        return Seq(tuple(_mul(a, x) for x in b.items), "tuple")
    if a == -1 and b in (sp.oo, -sp.oo):  # -\infty
        return a * b
    if _finite(a).is_Rational and _finite(b).is_Rational:
        return _rational(a * b)
    return _node(sp.Mul, a, b)


def _div(a, b):
    if _finite(b) == 0:
        raise ParseError("division by zero")
    if _finite(a).is_Rational and b.is_Rational:
        return _rational(a / b)
    return _node(sp.Mul, a, sp.Pow(b, -1, evaluate=False))


def _pow(base, exp):
    base, exp = _finite(base), _finite(exp)
    if exp.is_number and base not in (0, 1, -1):
        size = exp if exp.is_Rational else numeric(exp)
        if size is None or abs(size) > MAX_EXPONENT:
            raise BoundError("size", "exponent too large")
    if base.is_Rational and exp.is_Integer:
        if base == 0 and exp < 0:
            raise ParseError("division by zero")
        if _digits(base) * abs(int(exp)) > MAX_DIGITS:  # checked before the power is computed
            raise BoundError("size", "power too large")
        return _rational(base**exp)
    return sp.Pow(base, exp, evaluate=False)


def _digits(q):
    """Decimal digits of a rational's numerator plus its denominator."""
    return math.log10(abs(q.p) or 1) + math.log10(q.q)


def _apply(func, arg):
    """Functions evaluate on exact rationals only (sin 0 = 0, floor(7/2) = 3)."""
    if not _finite(arg).is_Rational:
        return func(arg, evaluate=False)
    value = func(arg)
    if value.has(sp.zoo, sp.nan):  # log 0, cot 0
        raise ParseError("undefined value")
    return value


def _factorial(n):
    if _finite(n).is_Integer:
        if n < 0:
            raise ParseError("factorial of a negative integer")
        if n > MAX_FACTORIAL:
            raise BoundError("size", "factorial too large")
        return sp.factorial(n)
    return sp.factorial(n, evaluate=False)


def _binomial(n, k):
    if _finite(n).is_Integer and _finite(k).is_Integer:
        if min(k, n - k) * math.log10(max(abs(int(n)), 2)) > MAX_DIGITS:
            raise BoundError("size", "binomial too large")
        return sp.binomial(n, k)
    return sp.binomial(n, k, evaluate=False)
