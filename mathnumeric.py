"""Guarded numeric evaluation of the sympy trees that mathparse.py builds (used by reward.py).

sympy's evalf can spend minutes on exp(exp(exp(10))) or on the sign of sin(10^999); numeric()
is a small mpmath evaluator instead, in which every step is bounded: arguments of functions
that reduce or grow them, the size of every intermediate value, and the power.
"""

import threading

import mpmath
import sympy as sp

MAX_ARGUMENT = 1e6  # largest |argument| of sin, exp, gamma, ...
MAX_LOG2 = 1e5  # |log2 value| beyond this counts as overflow


_MP_FUNCS = {
    sp.sin: "sin", sp.cos: "cos", sp.tan: "tan", sp.cot: "cot", sp.sec: "sec", sp.csc: "csc",
    sp.asin: "asin", sp.acos: "acos", sp.atan: "atan", sp.sinh: "sinh", sp.cosh: "cosh",
    sp.tanh: "tanh", sp.exp: "exp", sp.log: "log", sp.Abs: "fabs", sp.floor: "floor",
    sp.ceiling: "ceil", sp.factorial: "factorial", sp.binomial: "binomial",
}
_SAFE_FOR_HUGE = {sp.log, sp.Abs, sp.floor, sp.ceiling}  # no argument reduction or growth
_LOCAL = threading.local()


def _context():
    """One mpmath context per thread: mpmath functions raise and restore the working precision
    of their context, which threads sharing one context would leave permanently raised."""
    if not hasattr(_LOCAL, "mp"):
        _LOCAL.mp = mpmath.MPContext()
        _LOCAL.mp.prec = 96  # about 29 significant digits; the comparison tolerances are far looser
    return _LOCAL.mp


class _Undefined(ArithmeticError):
    pass


def numeric(expr, env=None):
    """Value of a sympy expression as an mpmath number (symbols taken from env), or None when it
    is undefined there, overflows, or uses something we do not evaluate (oo)."""
    mp = _context()
    try:
        return _ev(expr, {k: mp.mpf(v) for k, v in (env or {}).items()}, mp)
    except (ArithmeticError, ValueError, TypeError, KeyError):
        return None


def _ev(e, env, mp):
    if e.is_Rational:
        v = mp.mpf(e.p) / e.q
    elif e.is_Symbol:
        v = env[e]
    elif e is sp.pi:
        v = mp.pi
    elif e is sp.E:
        v = mp.e
    elif e is sp.I:
        v = mp.mpc(0, 1)
    elif e.is_Add:
        v = mp.fsum(_ev(a, env, mp) for a in e.args)
    elif e.is_Mul:
        v = mp.fprod(_ev(a, env, mp) for a in e.args)
    elif e.is_Pow:
        v = _power(_ev(e.base, env, mp), _ev(e.exp, env, mp), mp)
    elif e.func in _MP_FUNCS:
        args = [_ev(a, env, mp) for a in e.args]
        if e.func not in _SAFE_FOR_HUGE and any(abs(a) > MAX_ARGUMENT for a in args):
            raise _Undefined("argument too large")
        v = getattr(mp, _MP_FUNCS[e.func])(*args)
    else:
        raise _Undefined(f"cannot evaluate {e.func}")
    if not mp.isfinite(v) or (v != 0 and mp.mag(v) > MAX_LOG2):
        raise _Undefined("overflow")
    return v


def _power(b, x, mp):
    if b == 0:
        if mp.re(x) > 0:
            return mp.zero
        raise _Undefined("0 to a non-positive power")
    if abs(x) * (abs(mp.log(abs(b))) + 1) > MAX_LOG2:
        raise _Undefined("power too large")
    return b**x
