"""Sets of real numbers for reward.py: inequalities, intervals, unions, set-builder sets and
differences, brought to one canonical form, so that "x < -1 or x > 4", (-\\infty,-1)\\cup(4,\\infty),
\\{t \\mid t<-1 \\lor t>2\\} and \\mathbb{R}\\setminus[-1,4] are the same set; also families
\\{f(k) \\mid k \\in \\mathbb{Z}\\}.

A canonical set is a sorted tuple of disjoint, non-touching Pieces (a point is the closed piece
[a, a]). Endpoints keep their sympy value, which the caller compares with its own tolerance, and
an mpmath value, which orders them. A value we cannot order (a symbol, a complex number, a set of
tuples) is not a set of reals here, and the caller compares it by structure. Work is bounded by
the parser's bounds: the number of pieces by the answer length, nesting by its depth; each
operation sorts or walks the pieces once.
"""

from dataclasses import dataclass

import sympy as sp

from mathnumeric import numeric
from mathparse import Condition, Domain, Equation, Interval, Seq, SetBuilder, SetDifference, SetUnion

_INF = float("inf")
_CLOSE = 1e-20  # relative: endpoints of one answer this close are the same point (rounding only)


@dataclass(frozen=True)
class Piece:
    lo: sp.Expr
    hi: sp.Expr
    lo_closed: bool
    hi_closed: bool
    lo_v: object  # mpmath value, or +-inf
    hi_v: object


@dataclass(frozen=True)
class IntegerFamily:
    """\\{expr \\mid param \\in \\mathbb{Z}\\}"""

    expr: sp.Expr
    param: sp.Symbol


class _NotReal(Exception):
    pass


SET_TYPES = (Interval, SetUnion, SetDifference, Domain, Condition, SetBuilder)


def is_set_like(value):
    """Only a set can stand for it: an interval, inequality, union, set-builder set, \\mathbb{R},
    or a list with an inequality in it ("x = 2 or x >= 4")."""
    if isinstance(value, SET_TYPES):
        return True
    return isinstance(value, Seq) and value.kind == "list" and any(isinstance(v, Condition) for v in value.items)


def real_set(value):
    """The canonical pieces of a set of reals, an IntegerFamily, or None."""
    try:
        if isinstance(value, SetBuilder):
            family = _family(value)
            if family is not None:
                return family
        return _set(value, "or")
    except _NotReal:
        return None


def equal_sets(x, y, equal):
    """Canonical sets x, y (see real_set) are equal; equal(a, b) compares two sympy endpoints."""
    if isinstance(x, IntegerFamily) or isinstance(y, IntegerFamily):
        return isinstance(x, IntegerFamily) and isinstance(y, IntegerFamily) and _same_family(x, y)
    if len(x) != len(y):
        return False
    for p, q in zip(x, y):
        if (p.lo_closed, p.hi_closed) != (q.lo_closed, q.hi_closed):
            return False
        for a, b, av, bv in ((p.lo, q.lo, p.lo_v, q.lo_v), (p.hi, q.hi, p.hi_v, q.hi_v)):
            if abs(av) == _INF or abs(bv) == _INF:
                if av != bv:
                    return False
            elif not equal(a, b):
                return False
    return True


# -- building sets


def _set(value, comma):
    """`comma` is what a comma means between conditions: "or" in a list of answers, "and" in a
    set-builder set."""
    if isinstance(value, Interval):
        lo_v, hi_v = _real(value.lo), _real(value.hi)
        if lo_v > hi_v:
            raise _NotReal("empty interval")
        return _canonical([_piece(value.lo, value.hi, not value.left_open, not value.right_open)])
    if isinstance(value, Seq) and value.kind == "set":
        return _canonical([_piece(x, x, True, True) for x in value.items])
    if isinstance(value, Seq) and value.kind == "tuple" and len(value.items) == 2:  # (a, b): open
        return _set(Interval(value.items[0], value.items[1], True, True), comma)
    if isinstance(value, SetUnion):
        return _canonical([p for part in value.parts for p in _set(part, comma)])
    if isinstance(value, SetDifference):
        return _intersection(_set(value.left, comma), _complement(_set(value.right, comma)))
    if isinstance(value, Domain):
        if value.name != "R":
            raise _NotReal("not the real line")
        return (_piece(-sp.oo, sp.oo, False, False),)
    if isinstance(value, SetBuilder):
        if not isinstance(value.head, sp.Symbol):
            raise _NotReal("set-builder head")
        return _conditions(value.conditions, value.head, "and")
    if isinstance(value, (Condition, Equation)):
        return _condition(value, None)
    if isinstance(value, Seq) and value.kind == "list":
        return _conditions(value, None, comma)
    raise _NotReal(type(value).__name__)


def _conditions(seq, var, comma):
    """Conditions joined by or / and / commas ("and" binds tighter); all in one variable."""
    items = seq.items if isinstance(seq, Seq) else (seq,)
    var = _variable(items[0]) if var is None else var
    result, group = (), None
    for k, item in enumerate(items):
        piece_set = _condition(item, var)
        group = piece_set if group is None else _intersection(group, piece_set)
        sep = seq.seps[k] if isinstance(seq, Seq) and k < len(seq.seps) else "or"
        if (comma if sep == "," else sep) == "or":
            result, group = _canonical(result + group), None
    return result if group is None else _canonical(result + group)


def _variable(item):
    if isinstance(item, Equation) and isinstance(item.lhs, sp.Symbol):
        return item.lhs
    if isinstance(item, Condition):
        names = [x for x in item.items if isinstance(x, sp.Symbol)]
        if names:
            return names[0]
    raise _NotReal("no variable")


def _condition(item, var):
    """The set of reals where a condition in `var` holds: x = 2, -2 < x <= 5, x \\ne 1, x \\in S."""
    var = _variable(item) if var is None else var
    if isinstance(item, Equation):
        if item.lhs != var or not isinstance(item.rhs, sp.Expr):
            raise _NotReal("equation")
        return (_piece(item.rhs, item.rhs, True, True),)
    if not isinstance(item, Condition):
        raise _NotReal("not a condition")
    if item.ops == ("in",):
        if item.items[0] != var:
            raise _NotReal("membership of another variable")
        return _set(item.items[1], "or")
    result = (_piece(-sp.oo, sp.oo, False, False),)
    for a, op, b in zip(item.items, item.ops, item.items[1:]):
        if b == var and a != var:  # c < x is x > c
            a, b, op = b, a, {"<": ">", ">": "<", "<=": ">=", ">=": "<=", "!=": "!="}[op]
        if a != var or b.free_symbols:
            raise _NotReal("not a bound on the variable")
        result = _intersection(result, _half_line(b, op))
    return result


def _half_line(c, op):
    if op == "!=":
        return _canonical([_piece(-sp.oo, c, False, False), _piece(c, sp.oo, False, False)])
    if op in ("<", "<="):
        return (_piece(-sp.oo, c, False, op == "<="),)
    return (_piece(c, sp.oo, op == ">=", False),)


def _family(builder):
    """\\{3k \\mid k \\in \\mathbb{Z}\\} or \\{x \\mid x = 3k, k \\in \\mathbb{Z}\\}, else None."""
    items, head = builder.conditions.items, builder.head
    integers = [c for c in items if isinstance(c, Condition) and c.ops == ("in",) and c.items[1] == Domain("Z")]
    if len(integers) != 1 or not isinstance(integers[0].items[0], sp.Symbol):
        return None
    param, rest = integers[0].items[0], [c for c in items if c is not integers[0]]
    if rest:
        if len(rest) != 1 or not isinstance(rest[0], Equation) or rest[0].lhs != head:
            return None
        head = rest[0].rhs
    if not isinstance(head, sp.Expr) or head.free_symbols != {param}:
        return None
    return IntegerFamily(head, param)


# -- canonical form and set algebra


def _real(e):
    if e == sp.oo:
        return _INF
    if e == -sp.oo:
        return -_INF
    if not isinstance(e, sp.Expr) or e.free_symbols:
        raise _NotReal("not a number")
    v = numeric(e)
    if v is None or getattr(v, "imag", 0) != 0:
        raise _NotReal("not a real number")
    return getattr(v, "real", v)


def _piece(lo, hi, lo_closed, hi_closed):
    lo_v, hi_v = _real(lo), _real(hi)
    return Piece(lo, hi, lo_closed and lo_v != -_INF, hi_closed and hi_v != _INF, lo_v, hi_v)


def _same(a, b):
    if a == b:
        return True
    return abs(a) != _INF and abs(b) != _INF and abs(a - b) <= _CLOSE * max(abs(a), abs(b))


def _empty(p):
    return p.lo_v > p.hi_v or (_same(p.lo_v, p.hi_v) and not (p.lo_closed and p.hi_closed))


def _canonical(pieces):
    """Sorted, disjoint and non-touching: overlapping or touching pieces are merged."""
    out = []
    for p in sorted((p for p in pieces if not _empty(p)), key=lambda p: (p.lo_v, not p.lo_closed)):
        last = out[-1] if out else None
        touching = last is not None and (
            p.lo_v < last.hi_v or (_same(p.lo_v, last.hi_v) and (p.lo_closed or last.hi_closed))
        )
        if not touching:
            out.append(p)
        elif p.hi_v > last.hi_v and not _same(p.hi_v, last.hi_v):
            out[-1] = Piece(last.lo, p.hi, last.lo_closed, p.hi_closed, last.lo_v, p.hi_v)
        elif _same(p.hi_v, last.hi_v) and p.hi_closed and not last.hi_closed:
            out[-1] = Piece(last.lo, last.hi, last.lo_closed, True, last.lo_v, last.hi_v)
    return tuple(out)


def _complement(pieces):
    out, lo, lo_v, lo_closed = [], -sp.oo, -_INF, False
    for p in pieces:
        out.append(Piece(lo, p.lo, lo_closed, not p.lo_closed, lo_v, p.lo_v))
        lo, lo_v, lo_closed = p.hi, p.hi_v, not p.hi_closed
    out.append(Piece(lo, sp.oo, lo_closed, False, lo_v, _INF))
    return _canonical(out)


def _intersection(a, b):
    return _complement(_canonical(_complement(a) + _complement(b)))


def _same_family(f, g):
    """Linear families a k + b are equal when |a| agree and b differ by a multiple of a (the set
    {2k+1} is {2k-1}); otherwise the two must agree at each integer tried."""
    fv, gv = (_family_values(h) for h in (f, g))
    if fv is None or gv is None:
        return False
    if _linear(fv) and _linear(gv):
        a, b = fv[1] - fv[0], gv[1] - gv[0]
        if a == 0 or not _same(abs(a), abs(b)):
            return False
        shift = (gv[0] - fv[0]) / a
        return abs(shift - round(shift)) < 1e-12
    return all(_same(p, q) or abs(p - q) < 1e-12 for p, q in zip(fv, gv))


_KS = (0, 1, 2, -1, 3, -2)


def _family_values(f):
    values = [numeric(f.expr, {f.param: k}) for k in _KS]
    if any(v is None or getattr(v, "imag", 0) != 0 for v in values):
        return None
    return [getattr(v, "real", v) for v in values]


def _linear(v):
    step = v[1] - v[0]
    return all(abs(v[i] - (v[0] + step * k)) < 1e-12 * max(1, abs(step)) for i, k in enumerate(_KS))
