"""The study's statistics on paired differences: Student's t quantile (exact, any degrees of freedom),
the paired interval, the two one-sided tests (TOST) for equivalence, and the verdict they give.

No scipy: the t distribution's CDF is the regularized incomplete beta function, evaluated with its
continued fraction (Lentz's method), and a quantile is found by bisection on it.
"""
from __future__ import annotations

import math
import statistics


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (converges fast for x < (a + 1) / (a + b + 2))."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0, x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom: 1 - I_{df/(df+t^2)}(df/2, 1/2) / 2 for t >= 0."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (0 < p < 1), by bisection to 1e-12."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    while hi - lo > 1e-12 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


def paired(deltas: list[float], level: float = 0.95) -> tuple[float, float]:
    """Mean of the paired differences and the half-width of its two-sided `level` interval (Student's t,
    n - 1 degrees of freedom); one pair: an infinite half-width."""
    m = statistics.mean(deltas)
    if len(deltas) < 2:
        return m, float("inf")
    return m, t_quantile(0.5 + level / 2, len(deltas) - 1) * statistics.stdev(deltas) / math.sqrt(len(deltas))


def tost(deltas: list[float], margin: float) -> tuple[float, bool]:
    """Two one-sided t tests of |mean| >= margin at 5% each: the larger p-value and whether both reject,
    i.e. whether the 90% interval lies inside (-margin, +margin) (equivalence within the margin)."""
    m = statistics.mean(deltas)
    if len(deltas) < 2:
        return 1.0, False
    n, sd = len(deltas), statistics.stdev(deltas)
    if sd == 0:
        return (0.0, True) if abs(m) < margin else (1.0, False)
    se = sd / math.sqrt(n)
    p_low = 1.0 - t_cdf((m + margin) / se, n - 1)   # H0: mean <= -margin
    p_high = t_cdf((m - margin) / se, n - 1)        # H0: mean >= +margin
    p = max(p_low, p_high)
    return p, p < 0.05


def verdict(deltas: list[float], margin: float = 0.02) -> str:
    """'helps' / 'hurts' when the 95% interval excludes 0 (with 'by less than the margin' when TOST also
    holds), 'no effect larger than <margin>' when only TOST holds, else 'undecided'."""
    m, h = paired(deltas, 0.95)
    _, equivalent = tost(deltas, margin)
    if m - h > 0 or m + h < 0:
        word = "helps" if m > 0 else "hurts"
        return f"{word}, by less than {margin}" if equivalent else word
    return f"no effect larger than {margin}" if equivalent else "undecided"


def effect(deltas: list[float], margin: float = 0.02) -> str:
    """'+0.012 [-0.004, +0.028], TOST p 0.21 (undecided)': mean, 95% interval, TOST p-value and verdict."""
    if all(d == 0 for d in deltas):
        return f"{0:+.3f} (identical)"
    m, h = paired(deltas, 0.95)
    p, _ = tost(deltas, margin)
    return f"{m:+.3f} [{m - h:+.3f}, {m + h:+.3f}], TOST p {p:.3f} ({verdict(deltas, margin)})"
