"""Verifiable reward for math answers: extract the final answer, decide equivalence with the gold.

    verify(response, gold) -> bool         score(response, gold) -> 1.0 / 0.0
    extract_answer(text) -> str | None     score_batch(responses, golds) -> list[float]

Equivalence, cheapest test first:
  1. the normalised strings are equal (units, \\text, \\left, \\dfrac, thousands separators,
     degrees, %, $ ... removed), which settles most correct answers;
  2. both answers are parsed (mathparse.py) into sympy objects and compared by structure:
     tuples in order, bare lists and sets in any order, intervals with their open/closed ends,
     unions part by part, matrices entry by entry, "x = 5" against "5", equations up to a
     constant factor, and multiple-choice letters / text answers as normalised text;
  3. numbers: exactly when both are rational (0.33 != 1/3), otherwise with relative tolerance
     REL_TOL = 1e-6 (so a rounded 3.14 does not match \\pi, but 1.4142136 matches \\sqrt{2});
  4. expressions: equal values at three fixed generic points (SYM_TOL), computed with guarded
     mpmath arithmetic. This decides x^2+2x+1 = (x+1)^2 or \\cot x = \\cos x/\\sin x without
     sympy.simplify, expand or evalf, whose running time on untrusted input is unbounded.

Safety: model text is never evaluated as Python; mathparse builds sympy objects from a
whitelist and lets sympy compute nothing but exact rational arithmetic. Work is bounded by
input length (only the response's tail is read, in linear time), nesting depth, number sizes
and exponents (checked before anything is computed), and a deadline that starts with each
verification and is checked as it goes, which works in any thread or process. A verification
that hits a bound returns False and is counted in STATS, in total and by reason (bound_hits()).
score_batch also kills and replaces a worker that overruns its timeout, as a last line of defence.
"""

import atexit
import multiprocessing
import os
import re
import threading
import time
from collections import Counter
from functools import lru_cache

import sympy as sp

from mathparse import (
    BoundError, Equation, Interval, Matrix, ParseError, Seq, SetUnion, children, numeric, parse,
)

MAX_RESPONSE_CHARS = 10_000  # the answer sits at the end; a 2 MB response is cut to its tail
MAX_ANSWER_CHARS = 1_000  # longer extracted answers are rejected (and counted as bound hits)
TIME_LIMIT_S = 1.0  # per verification, extraction included, checked cooperatively
REL_TOL = 1e-6  # numbers that are not both rational
SYM_TOL = 1e-9  # values of symbolic expressions at the test points (computed to ~29 digits)
MIN_PARALLEL = 64  # smaller batches are scored in-process: worker round trips cost more

STATS = Counter()  # "bound_hits": verifications stopped by a bound; "bound_<reason>": by reason
BOUND_REASONS = ("time", "size", "depth")  # deadline; length, digits, exponents; nesting
_STATS_LOCK = threading.Lock()


def bound_hits() -> dict[str, int]:
    """A copy of the bound-hit counters: "bound_hits" (all) and "bound_time", "bound_size",
    "bound_depth". The difference of two copies counts the bound hits of what ran between."""
    with _STATS_LOCK:
        return {key: STATS[key] for key in ("bound_hits", *(f"bound_{r}" for r in BOUND_REASONS))}


def _count_bound(reason):
    with _STATS_LOCK:
        STATS["bound_hits"] += 1
        STATS[f"bound_{reason}"] += 1


# -- answer extraction

_BOXED = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])\s*")
_BARE = re.compile(r"[^\s${}]*")  # \boxed 5
_BRACE = re.compile(r"\\.|[{}]", re.S)  # an escaped character (skipped) or a brace
_HASHES = re.compile(r"####\s*([^\n]+)")
# "is\s*(?::\s*)?", not "is\s*:?\s*": two \s* side by side backtrack quadratically over blank lines
_ANSWER_IS = re.compile(r"the\s+(?:final\s+)?answer\s+is\s*(?::\s*)?(\S[^\n]*)", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?:\s|$)")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def extract_answer(text: str, last_number: bool = True) -> str | None:
    """The last \\boxed{...} / \\fbox{...} / \\boxed X; else a GSM8K "#### X"; else "the (final)
    answer is X"; else, if last_number, the last number in the text."""
    text = text[-MAX_RESPONSE_CHARS:]
    for find in (_last_boxed, _after_hashes, _answer_is):
        answer = find(text)
        if answer:
            return answer
    if last_number:
        numbers = _NUMBER.findall(text)
        return numbers[-1] if numbers else None
    return None


def _last_boxed(text):
    """The last \\boxed{...} / \\fbox{...} / \\boxed X that is not blank. Linear in the text: a group
    that never closes is not scanned past again, as no group opening before it can close after it."""
    end = len(text)
    for m in reversed(list(_BOXED.finditer(text))):
        start, content = m.end(), None
        if text.startswith("{", start):
            close = _closing_brace(text, start, end)
            if close is None:
                end = start
            else:
                content = text[start + 1 : close]
        else:
            content = _BARE.match(text, start).group()
        if content and content.strip():
            return content.strip()
    return None


def _closing_brace(text, start, end):
    """Index of the } that closes the { at text[start], if it comes before text[end]; escaped
    \\{ \\} do not count."""
    depth = 0
    for m in _BRACE.finditer(text, start, end):
        c = m[0]
        depth += (c == "{") - (c == "}")
        if depth == 0:
            return m.start()
    return None


def _after_hashes(text):
    found = _HASHES.findall(text)
    return found[-1].strip() if found else None


def _answer_is(text):
    found = _ANSWER_IS.findall(text)
    return _SENTENCE_END.split(found[-1])[0].strip() if found else None


@lru_cache(maxsize=1 << 14)
def _gold_answer(gold):
    """A reference may be a bare answer or a solution with \\boxed{} or "####"."""
    return _last_boxed(gold) or _after_hashes(gold) or gold.strip()


# -- normalisation: LaTeX variants that mean the same answer

_UNIT_TEXT = r"\\(?:text|textrm|textnormal|mbox|mathrm)\s*\{[^{}]*\}"
_UNIT_WORD = r"[a-zA-Z]{3,}|cm|mm|km|ft|kg|mi|hr|lb|oz|ml"  # bare words; single letters may be variables
_TEXT_CMD = r"\\(?:text|textbf|textrm|textit|textnormal|mathbf|mathrm|mathit|mbox|boldsymbol|emph)"
_REWRITES = [
    (re.compile(r"\\\$|\\?%"), ""),  # dollars, percent
    (re.compile(r"\$|\\[()\[\]]"), ""),  # math delimiters
    (re.compile(r"\\(?:left|right|[bB]igg?[lr]?)(?![a-zA-Z])\.?|\\displaystyle"), ""),
    (re.compile(r"\\[dtc]frac"), r"\\frac"),
    (re.compile(r"\\[dt]binom"), r"\\binom"),
    (re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|°|\\degree"), ""),  # degrees
    (re.compile(r"\{,\}\s*|,\\!\s*"), ","),  # 1{,}234 and 10,\!080
    (re.compile(r"(?<=\d)(?:(?<!\\)\\[,;: ]|\s)+(?=\d{3}(?!\d))"), ","),  # 1\,234
    (re.compile(r"(?<!\\)\\[!,;: ]|~|\\q?quad(?![a-zA-Z])"), " "),  # spacing, not the \\ row break
    (re.compile(rf",?\s*(?:{_TEXT_CMD}\s*\{{\s*(?:or|and)\s*\}}|\s(?:or|and)\s)"), ","),  # 1, 2 and 3
    (re.compile(r"(?<!\\)\{\s*\}"), ""),  # empty groups left behind, as in 5{ }^{\circ}
    (  # trailing units: 5 \text{ cm}^2, 3 \mathrm{m}/\mathrm{s}, 12 apples
        re.compile(rf"(?<=[\w}}).])(?:\s*(?:{_UNIT_TEXT}|/|\b(?:{_UNIT_WORD})\b)(?:\s*\^\s*\{{?\d\}}?)?)+\s*$"),
        "",
    ),
    (re.compile(r"^[a-zA-Z]\s*\\in\s*"), ""),  # x \in [-2, 7]
    (re.compile(r"(?<=\d)_\{?\(?\d+\)?\}?"), ""),  # base subscripts: 52_8 -> 52
]
_UNWRAP = re.compile(rf"{_TEXT_CMD}\s*\{{([^{{}}]*)\}}")  # \text{(C)} -> (C)
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_CHOICE = re.compile(r"\(([A-E])\).*|([A-E])")  # (C), C, or (C) 12
_UNICODE = str.maketrans({"−": "-", "×": r"\times ", "·": r"\cdot ", "π": r"\pi ", "∞": r"\infty "})


@lru_cache(maxsize=1 << 16)
def _normalize(answer):
    s = answer.translate(_UNICODE)
    for pattern, repl in _REWRITES:
        s = pattern.sub(repl, s)
    for _ in range(3):  # nested, e.g. \textbf{\text{(C)}}
        s = _UNWRAP.sub(r"\1", s)
    s = " ".join(s.split()).rstrip(" .")  # a sentence's full stop, not the point of .5
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    choice = _CHOICE.fullmatch(s)
    return choice.group(1) or choice.group(2) if choice else s


def _key(s):
    return "".join(s.split())


_PARSED, _MISSING = {}, object()  # normalised answer -> parsed value; emptied when full


def _parse(answer, deadline):
    """Parsed value of a normalised answer, or None for text. BoundError propagates uncached.
    (Cached by hand: an lru_cache would key on the deadline too.)"""
    value = _PARSED.get(answer, _MISSING)
    if value is _MISSING:
        try:
            value = parse(answer, deadline)
        except ParseError:
            value = None
        if len(_PARSED) >= 1 << 14:
            _PARSED.clear()
        _PARSED[answer] = value
    return value


# -- equivalence


def verify(response: str, gold: str) -> bool:
    """Is the final answer of `response` equivalent to the reference `gold`?"""
    deadline = time.perf_counter() + TIME_LIMIT_S
    try:
        answer = extract_answer(response)
        return answer is not None and _equivalent(_gold_answer(str(gold)), answer, deadline)
    except BoundError as e:
        _count_bound(e.reason)
    except RecursionError:  # Python's stack, a net behind mathparse.MAX_DEPTH
        _count_bound("depth")
    return False


def _equivalent(gold, answer, deadline):
    if max(len(gold), len(answer)) > MAX_ANSWER_CHARS:
        raise BoundError("size", "answer too long")
    g, a = _normalize(gold), _normalize(answer)
    _tick(deadline)  # extraction and normalisation, bounded by length, count against the deadline
    if _key(g) == _key(a):
        return True
    gv, av = _parse(g, deadline), _parse(a, deadline)
    if gv is None or av is None:  # text answers such as \text{East}
        return _key(g).casefold() == _key(a).casefold()
    return _equal(gv, av, deadline)


def _tick(deadline):
    if time.perf_counter() > deadline:
        raise BoundError("time", "time limit")


def _equal(x, y, deadline):
    """Equivalence of two parsed answers; symmetric in x and y."""
    _tick(deadline)
    if isinstance(x, Equation) or isinstance(y, Equation):
        return _equal_equations(x, y, deadline)
    if isinstance(x, sp.Expr) and isinstance(y, sp.Expr):
        return _equal_expr(x, y)
    if isinstance(x, Matrix) or isinstance(y, Matrix):
        return _equal_matrices(x, y, deadline)
    if isinstance(x, (Interval, SetUnion)) or isinstance(y, (Interval, SetUnion)):
        return _equal_sets(x, y, deadline)
    if isinstance(x, Seq) and isinstance(y, Seq):
        if {x.kind, y.kind} == {"tuple", "set"}:
            return False
        if "tuple" in (x.kind, y.kind):  # a bare list against a tuple keeps its order
            return _equal_ordered(x.items, y.items, deadline)
        return _covers(x.items, y.items, deadline) and _covers(y.items, x.items, deadline)
    return False


def _equal_ordered(xs, ys, deadline):
    return len(xs) == len(ys) and all(_equal(a, b, deadline) for a, b in zip(xs, ys))


def _covers(xs, ys, deadline, equal=_equal):
    """Every item of xs equals some item of ys (lists of solutions compare as sets)."""
    return all(any(equal(a, b, deadline) for b in ys) for a in xs)


def _equal_matrices(x, y, deadline):
    """Same shape and entries; a row or column vector also matches a tuple of its entries."""
    if isinstance(x, Matrix) and isinstance(y, Matrix):
        same_shape = len(x.rows) == len(y.rows) and len(x.rows[0]) == len(y.rows[0])
        return same_shape and _equal_ordered(children(x), children(y), deadline)
    m, t = (x, y) if isinstance(x, Matrix) else (y, x)
    is_vector = len(m.rows) == 1 or len(m.rows[0]) == 1
    is_tuple = isinstance(t, Seq) and t.kind == "tuple"
    return is_tuple and is_vector and _equal_ordered(children(m), t.items, deadline)


def _set_parts(v):
    """An interval, set or union as its parts; a 2-tuple reads as an open interval."""
    parts = []
    for p in v.parts if isinstance(v, SetUnion) else (v,):
        if isinstance(p, Seq) and p.kind == "tuple" and len(p.items) == 2:
            p = Interval(p.items[0], p.items[1], True, True)
        if not (isinstance(p, Interval) or isinstance(p, Seq) and p.kind == "set"):
            return None
        parts.append(p)
    return parts


def _equal_sets(x, y, deadline):
    xs, ys = _set_parts(x), _set_parts(y)
    if xs is None or ys is None or len(xs) != len(ys):
        return False
    return _covers(xs, ys, deadline, _equal_part) and _covers(ys, xs, deadline, _equal_part)


def _equal_part(x, y, deadline):
    if isinstance(x, Interval) and isinstance(y, Interval):
        same_ends = (x.left_open, x.right_open) == (y.left_open, y.right_open)
        return same_ends and _equal_ordered((x.lo, x.hi), (y.lo, y.hi), deadline)
    return isinstance(x, Seq) and isinstance(y, Seq) and _equal(x, y, deadline)


def _equal_equations(x, y, deadline):
    if isinstance(x, Equation) and isinstance(y, Equation):
        if x.named and y.named and x.lhs == y.lhs:
            return _equal(x.rhs, y.rhs, deadline)
        return _same_equation(x, y)
    eq, other = (x, y) if isinstance(x, Equation) else (y, x)
    return eq.named and _equal(eq.rhs, other, deadline)  # "x = 5" against "5"


def _same_equation(x, y):
    """lhs - rhs of the two equations differ by a constant nonzero factor (2x = 4y vs x - 2y = 0)."""
    if not isinstance(x.rhs, sp.Expr) or not isinstance(y.rhs, sp.Expr):
        return False
    dx, dy = (sp.Add(e.lhs, sp.Mul(-1, e.rhs, evaluate=False), evaluate=False) for e in (x, y))
    ratios = [a / b for a, b in _values_at_points(dx, dy) if a is not None and b is not None and b != 0]
    return len(ratios) >= 2 and ratios[0] != 0 and all(_close(r, ratios[0], SYM_TOL) for r in ratios)


_POINTS = (  # generic values for the symbols of an expression, one row per test point
    (1.3173, 0.7291, 1.9437, 0.5813, 2.2719, 1.1087, 0.8663, 1.6321, 2.4109, 0.6547, 1.4783, 2.0953),
    (0.6839, 1.8517, 1.2263, 2.3371, 0.9127, 1.5689, 2.1447, 0.7753, 1.3919, 2.2583, 1.0391, 0.5261),
    (2.1137, 1.4471, 0.6023, 1.0859, 1.7929, 2.4617, 0.5537, 1.2811, 0.9403, 1.6967, 2.3251, 0.8179),
)


def _equal_expr(x, y):
    if x == y:
        return True
    if x in (sp.oo, -sp.oo) or y in (sp.oo, -sp.oo):  # infinity only ever stands alone
        return False
    if not (x.free_symbols or y.free_symbols):  # numbers: exact when both rational, else numeric
        return not (x.is_Rational and y.is_Rational) and _close(numeric(x), numeric(y), REL_TOL)
    agreed = 0
    for a, b in _values_at_points(x, y):
        if a is None and b is None:  # both undefined here, e.g. log of a negative
            continue
        if not _close(a, b, SYM_TOL):
            return False
        agreed += 1
    return agreed >= 2


def _values_at_points(x, y):
    """Values of x and y at each test point. A symbol missing from one side does not change its
    value, so sin^2 t + cos^2 t still equals 1, while 2k + 2 differs from 2n + 2. The points are
    positive, the usual domain of answer variables (lengths, counts), so |x| equals x there."""
    symbols = sorted(x.free_symbols | y.free_symbols, key=str)
    if len(symbols) > len(_POINTS[0]):
        return []
    return [(numeric(x, env), numeric(y, env)) for env in (dict(zip(symbols, p)) for p in _POINTS)]


def _close(a, b, tol):
    return a is not None and b is not None and abs(a - b) <= tol * max(abs(a), abs(b))


# -- rewards


def score(response: str, gold: str, format_reward: float = 0.0) -> float:
    """1.0 for a correct answer. A wrong one earns `format_reward` (default 0.0) if the response
    at least put an answer in \\boxed{}: an optional shaping term for early training."""
    if verify(response, gold):
        return 1.0
    return format_reward if _last_boxed(response[-MAX_RESPONSE_CHARS:]) else 0.0


def score_batch(
    responses: list[str],
    golds: list[str],
    workers: int = 0,
    format_reward: float = 0.0,
    timeout: float = 10.0,
) -> list[float]:
    """score() over a batch, in order, on a persistent pool of `workers` processes (0: one per
    CPU). Bound hits in the workers are added to STATS. A chunk that runs past `timeout` seconds
    has its worker killed; its items are retried one at a time, and an item that times out alone
    scores 0.0 and counts as a bound hit of reason "time"."""
    if len(responses) != len(golds):
        raise ValueError(f"{len(responses)} responses but {len(golds)} golds")
    n, workers = len(responses), workers or os.cpu_count() or 1
    if workers == 1 or n < MIN_PARALLEL:
        return [score(r, g, format_reward) for r, g in zip(responses, golds)]
    responses = [r[-MAX_RESPONSE_CHARS:] for r in responses]  # all score() reads; less to send
    size = max(8, min(64, -(-n // (4 * workers))))
    todo, scores = [(i, min(i + size, n)) for i in range(0, n, size)], [0.0] * n
    with _POOL_LOCK:
        while todo:
            pool = _pool(workers)
            jobs = [(a, b, pool.apply_async(_score_span, (responses[a:b], golds[a:b], format_reward)))
                    for a, b in todo]
            todo = []
            for k, (a, b, job) in enumerate(jobs):
                try:
                    scores[a:b], hits = job.get(timeout)
                except multiprocessing.TimeoutError:
                    _close_pool()  # the only way to stop a runaway computation in a worker
                    hits = {"bound_hits": 1, "bound_time": 1} if b - a == 1 else {}  # timed out alone
                    retry = [(i, i + 1) for i in range(a, b)] if b - a > 1 else []
                    todo = retry + [(a2, b2) for a2, b2, _ in jobs[k + 1 :]]
                with _STATS_LOCK:
                    STATS.update(hits)  # adds
                if todo:
                    break
    return scores


def _score_span(responses, golds, format_reward):
    """Runs in a worker: scores plus the bound hits they caused, by reason."""
    before = bound_hits()
    scores = [score(r, g, format_reward) for r, g in zip(responses, golds)]
    return scores, {key: n - before[key] for key, n in bound_hits().items()}


_POOL, _POOL_SIZE, _POOL_LOCK = None, 0, threading.Lock()


def _pool(workers):
    """A persistent pool. Workers are spawned, not forked: the trainer process may hold CUDA
    state and threads that must not be copied."""
    global _POOL, _POOL_SIZE
    if _POOL is None or _POOL_SIZE != workers:
        _close_pool()
        _POOL, _POOL_SIZE = multiprocessing.get_context("spawn").Pool(workers), workers
    return _POOL


def _close_pool():
    global _POOL
    if _POOL is not None:
        _POOL.terminate()
        _POOL.join()
        _POOL = None


atexit.register(_close_pool)  # close workers while the interpreter can still do so cleanly
