"""Verifiable reward for math answers: extract the final answer, decide equivalence with the gold.

    verify(response, gold) -> bool         score(response, gold) -> 1.0 / 0.0
    extract_answer(text) -> str | None     score_batch(responses, golds) -> list[float]

Equivalence, cheapest test first:
  1. the normalised strings are equal (units, \\text, \\left, \\dfrac, thousands separators,
     degrees, %, $ ... removed; a few fixed vocabularies spelled one way), which settles most
     correct answers;
  2. both answers are parsed (mathparse.py) into sympy objects and compared by structure:
     tuples in order, bare lists and sets in any order, labelled values ("p = 2, q = -5") by
     label, matrices entry by entry, "x = 5" against "5", a chain "t = ... = 10 ln 18" by its last
     member, equations up to a constant factor; inequalities, intervals, unions, set-builder sets
     and differences as sets of reals (mathsets.py), so "x < -1 or x > 4" is (-oo,-1) U (4,oo);
  3. numbers: exactly when both are rational (0.33 != 1/3), otherwise with relative tolerance
     REL_TOL = 1e-6 (so a rounded 3.14 does not match \\pi, but 1.4142136 matches \\sqrt{2}); a
     gold written as a decimal with 2+ significant digits is rounded, and an exact answer that
     rounds to it matches; a percentage may stand for a probability (37.5\\% for 0.375);
  4. expressions: equal values at three fixed generic points (SYM_TOL), computed with guarded
     mpmath arithmetic (mathnumeric.py), the arbitrary constant of a general solution under any
     of its usual names. This decides x^2+2x+1 = (x+1)^2 or \\cot x = \\cos x/\\sin x without
     sympy.simplify, expand or evalf, whose running time on untrusted input is unbounded.
A gold that restates itself ("-1<x\\le 1:(-1,1]") matches any of its statements. A gold that is
an option letter is matched by the letter the response chose ("Answer: D", "choice (A)", "故选 B").
Free paraphrase is out of scope: text answers match only as normalised text or through the fixed
vocabularies (no solution, diverges/converges, even/odd/neither, quadrants, times of day).

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

from mathnumeric import numeric
from mathparse import BoundError, Equation, Interval, Matrix, ParseError, Seq, SetUnion, children, parse
from mathsets import equal_sets, is_set_like, real_set

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
    return _last_number(text) if last_number else None


_SENTENCE_END = re.compile(r"\n|(?<!\b[a-zA-Z])[.!?](?:\s|$)")  # not the points of i.e. or a.m.
_RESTATED = re.compile(r"\b(?:that is|i\.e\.|in other words|which is|or)(?![a-z])|\(", re.IGNORECASE)


def _last_number(text):
    """The last number of the text; but in "90 seconds, that is 1.5 minutes" or "35 seconds (0.58
    minutes)" the number that is restated, not its restatement."""
    numbers = list(_NUMBER.finditer(text))
    if not numbers:
        return None
    last, start = numbers[-1], 0
    for m in _SENTENCE_END.finditer(text, 0, last.start()):
        start = m.end()
    sentence = [m for m in numbers if m.start() >= start]
    cut = _RESTATED.search(text, sentence[0].end(), last.start())
    if cut is None:
        return last.group()
    return [m for m in sentence if m.end() <= cut.start()][-1].group()


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

_UNIT_TEXT = r"\\(?:text|textrm|textnormal|mbox|mathrm)\s*\{(?:[^{}]|\{[^{}]*\})*\}"  # \mathrm{erg\,s^{-1}}
_POWER = r"(?:\s*\^\s*\{?-?\d\}?)?"  # m^2, s^{-1}
_UNIT_WORD = r"[a-zA-Z]{3,}|cm|mm|km|ft|kg|mi|hr|lb|oz|ml"  # bare words; single letters may be variables
_TEXT_CMD = r"\\(?:text|textbf|textrm|textit|textnormal|mathbf|mathrm|mathit|mbox|boldsymbol|emph)"
_REWRITES = [  # (pattern, replacement, the substring(s) it needs: a cheap test before the regex)
    (re.compile(r"\\mathrm\s*\{\s*([ie])\s*\}"), r"\1", "\\mathrm"),  # \mathrm{i}, \mathrm{e}: constants, not units
    (re.compile(r"\\text\s*\{\s*([ap])\.?\s*m\.?\s*\}"), r" \1m", "\\text"),  # 1:58 \text{ a.m.}
    (re.compile(r"\b(?:np|numpy|math|sympy|sp)\.(?=[a-z])"), r"\\", "."),  # np.arcsin(10/13)
    (re.compile(rf"(?<=[\w}}])\s*(?:\\[,;: ]|~)\s*[a-zA-Z]{{1,3}}{_POWER}\s*$"), "", ("\\", "~")),  # 576\pi\;m^{2}
    (re.compile(r"\\\$|\\?%"), "", ("$", "%")),  # dollars, percent
    (re.compile(r"\$|\\[()\[\]]"), "", ("$", "\\")),  # math delimiters
    (re.compile(r"\\(?:left|right|[bB]igg?[lr]?)(?![a-zA-Z])\.?|\\displaystyle"), "", "\\"),
    (re.compile(r"\\[dtc]frac"), r"\\frac", "frac"),
    (re.compile(r"\\[dt]binom"), r"\\binom", "binom"),
    (re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|°|\\degree"), "", ("circ", "°", "degree")),  # degrees
    (re.compile(r"\{,\}\s*|,\\!\s*"), ",", ("{,}", ",\\!")),  # 1{,}234 and 10,\!080
    (re.compile(r"(?<=\d)(?:(?<!\\)\\[,;: ]|\s)+(?=\d{3}(?!\d))"), ",", None),  # 1\,234
    (re.compile(r"(?<!\\)\\[!,;: ]|~|\\q?quad(?![a-zA-Z])"), " ", ("\\", "~")),  # spacing, not the \\ row break
    (re.compile(rf",?\s*(?:{_TEXT_CMD}\s*\{{\s*or\s*\}}|(?<=\s)or\s)|或"), r" \\lor ", ("or", "或")),  # x<-1 or x>4
    (re.compile(rf",?\s*(?:{_TEXT_CMD}\s*\{{\s*and\s*\}}|(?<=\s)and\s)|且"), r" \\land ", ("and", "且")),  # 3, 5 and 7
    (re.compile(r"(?<!\\)\{\s*\}"), "", "{"),  # empty groups left behind, as in 5{ }^{\circ}
    (  # trailing units: 5 \text{ cm}^2, 3 \mathrm{m}/\mathrm{s}, 12 apples
        re.compile(rf"(?<=[\w}}).])(?:\s*(?:{_UNIT_TEXT}|/|\b(?:{_UNIT_WORD})\b){_POWER})+\s*$"),
        "",
        None,
    ),
    (re.compile(r"^[a-zA-Z]\s*\\in\s*"), "", "\\in"),  # x \in [-2, 7]
    (re.compile(r"(?<=\d)_\{?\(?\d+\)?\}?"), "", "_"),  # base subscripts: 52_8 -> 52
]
_UNWRAP = re.compile(rf"{_TEXT_CMD}\s*\{{([^{{}}]*)\}}")  # \text{(C)} -> (C)
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_CHOICE = re.compile(r"\(?([A-K])\)(?:\s.*)?|([A-K])")  # (C), C), C, or (C) 12
_UNICODE = str.maketrans({
    "−": "-", "×": r"\times ", "·": r"\cdot ", "π": r"\pi ", "∞": r"\infty ", "≤": r"\le ", "≥": r"\ge ",
    "≠": r"\ne ", "∈": r"\in ", "∪": r"\cup ", "；": ";", "，": ",", "：": ":",
})


@lru_cache(maxsize=1 << 16)
def _normalize(answer):
    if len(answer) <= 60 and (answer.lstrip()[:1].isalpha() or "\\text" in answer):  # words only
        known = _VOCABULARY.get(_vocabulary_key(answer))
        if known:
            return known
    s = answer.translate(_UNICODE)
    for pattern, repl, needs in _REWRITES:
        if needs is None or (needs in s if type(needs) is str else any(n in s for n in needs)):
            s = pattern.sub(repl, s)
    for _ in range(3):  # nested, e.g. \textbf{\text{(C)}}
        s, n = _UNWRAP.subn(r"\1", s)
        if not n:
            break
    s = " ".join(s.split()).rstrip(" .")  # a sentence's full stop, not the point of .5
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    choice = _CHOICE.fullmatch(s)
    if choice:
        return choice.group(1) or choice.group(2)
    time = _TIME.fullmatch(s)
    return f"{int(time[1])}:{time[2] or '00'} {time[3]}m" if time else s


# -- text answers: a few fixed vocabularies, each mapped to one spelling. Free paraphrase ("the
# -- series does not converge") is out of scope: it is compared as text and does not match.

_VOCABULARY = {
    **dict.fromkeys(("nosolution", "nosolutions", "norealsolution", "norealsolutions", "norealroots",
                     "nosolutionexists", "noneexist", "none"), r"\varnothing"),
    **dict.fromkeys(("allrealnumbers", "allreals", "allrealx", "allx", "everyrealnumber"), r"\mathbb{R}"),
    **dict.fromkeys(("diverges", "divergent", "itdiverges", "isdivergent"), "diverges"),
    **dict.fromkeys(("converges", "convergent", "itconverges", "isconvergent"), "converges"),
    **dict.fromkeys(("convergesconditionally", "conditionallyconvergent", "convergentconditionally"),
                    "converges conditionally"),
    **dict.fromkeys(("convergesabsolutely", "absolutelyconvergent", "convergentabsolutely"),
                    "converges absolutely"),
    **dict.fromkeys(("even", "evenfunction", "itiseven"), "even"),
    **dict.fromkeys(("odd", "oddfunction", "itisodd"), "odd"),
    **dict.fromkeys(("neither", "neitherevennorodd", "neitheroddnoreven"), "neither"),
    **{key: f"quadrant {n}" for n, names in enumerate(
        (("i", "1", "first", "一"), ("ii", "2", "second", "二"), ("iii", "3", "third", "三"), ("iv", "4", "fourth", "四")),
        start=1) for name in names for key in (f"quadrant{name}", f"{name}quadrant", f"第{name}象限")},
}
_TIME = re.compile(r"(\d{1,2})(?::(\d\d))?\s*([ap])\.?\s*m\.?")  # 7:05 p.m., 5am
_NOT_A_WORD = re.compile(rf"{_TEXT_CMD}|\\mathrm|[^\w]")


def _vocabulary_key(answer):
    """\\text{The first quadrant.} -> firstquadrant"""
    key = _NOT_A_WORD.sub("", answer.casefold())
    return key[3:] if key.startswith("the") and key[3:] in _VOCABULARY else key


def _key(s):
    return "".join(s.split())


_PARSED, _MISSING = {}, object()  # normalised answer -> parsed value; emptied when full


def _parse(answer, deadline):
    """Parsed value of a normalised answer, or None for text. BoundError propagates uncached.
    (Cached by hand: an lru_cache would key on the deadline too.)"""
    value = _PARSED.get(answer, _MISSING)
    if value is _MISSING:
        try:
            value = _restated(parse(answer, deadline))
        except ParseError:
            value = None
        if len(_PARSED) >= 1 << 14:
            _PARSED.clear()
        _PARSED[answer] = value
    return value


def _restated(value):
    """An equation that only works a value out ("\\ln(e^5) = 5", "i^{15} = ... = -i") states its
    last member; so do the items of a list of them."""
    if isinstance(value, Equation) and not value.lhs.free_symbols and isinstance(value.rhs, sp.Expr):
        return value.rhs
    if isinstance(value, Seq) and value.kind == "list":
        return Seq(tuple(_restated(v) for v in value.items), value.kind, value.seps)
    return value


# -- equivalence


def verify(response: str, gold: str) -> bool:
    """Is the final answer of `response` equivalent to the reference `gold`?"""
    deadline = time.perf_counter() + TIME_LIMIT_S
    try:
        gold = _gold_answer(str(gold))
        letters = _gold_letters(gold)
        if letters:  # multiple choice: the letter is the answer
            return _response_letters(response[-MAX_RESPONSE_CHARS:]) == letters
        answer = extract_answer(response)
        return answer is not None and _equivalent(gold, answer, deadline)
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
    percent = ("%" in gold) != ("%" in answer)
    return any(_match(candidate, a, percent and "%" in gold, percent and "%" in answer, deadline)
               for candidate in _restatements(g))


def _match(g, a, gold_percent, answer_percent, deadline):
    gv, av = _parse(g, deadline), _parse(a, deadline)
    if gv is None or av is None:  # text answers such as \text{East}
        return _key(g).casefold() == _key(a).casefold()
    if _equal(gv, av, deadline) or _within_rounding(g, gv, a, av):
        return True
    if gold_percent or answer_percent:  # 37.5\% against 0.375: a probability as a percentage
        gv, av = (_percent(gv) if gold_percent else gv), (_percent(av) if answer_percent else av)
        return _equal(gv, av, deadline)
    return False


_RESTATEMENT = re.compile(r"(?<!\d):|:(?!\d)|,?\s*\bi\.\s?e\.,?")  # not the colon of 1:58 or 1:9  # 0<x\le 2: (0,2], \{...\}, i.e., all x


@lru_cache(maxsize=1 << 12)
def _restatements(gold):
    """A gold and, when it restates itself ("-1<x\\le 1:(-1,1]"), each of its statements, last first."""
    parts = [p.strip() for p in _RESTATEMENT.split(gold)]
    if len(parts) == 1 or len(parts) > 4 or not all(parts):
        return (gold,)
    return (gold, *(_normalize(p) for p in reversed(parts)))


def _percent(value):
    if isinstance(value, Seq):
        return Seq(tuple(_percent(v) for v in value.items), value.kind, value.seps)
    if isinstance(value, sp.Expr) and value.is_Rational:
        return value / 100
    return value


_DECIMAL = re.compile(r"-?(\d*)\.?(\d*)(?:e(-?\d+)|\s*\\times\s*10\s*\^\s*\{?(-?\d+)\}?)?")


def _within_rounding(g, gv, a, av):
    """A gold written as a decimal with 2 or more significant digits (Minerva's 0.53, 2.7778e-6)
    is rounded: an exact answer (\\frac{\\ln 2}{1.3}, \\frac{1}{360000}) matches it when it rounds to
    it. An answer that is itself a rounded decimal does not: 0.52 is not 0.5 (see REL_TOL)."""
    gold = _DECIMAL.fullmatch(g)
    if gold is None or "." not in g or _DECIMAL.fullmatch(a) or not isinstance(av, sp.Expr) or av.free_symbols:
        return False
    whole, fraction, exp_e, exp_times = gold.groups()
    digits = (whole + fraction).lstrip("0")
    if len(digits) < 2:
        return False
    half_unit = 0.5 * 10.0 ** (int(exp_e or exp_times or 0) - len(fraction))
    value, target = numeric(av), numeric(gv)
    return value is not None and target is not None and abs(value - target) <= half_unit * (1 + 1e-9)


# -- multiple choice

_LETTERS = re.compile(r"A?B?C?D?E?F?G?")  # several correct options, in order: "BC", "ACD"
_CHOICE_CUE = re.compile(  # the letter after a cue; a lowercase one only in () or after "Answer:"
    r"(?:[Aa]nswer(?:\s+is)?\s*(?:[:：]\s*)?|[Cc]hoice\s*|[Oo]ption\s*|[故应]?选\s*)(?:\(([A-Ka-k])\)|([A-K])(?![A-Za-z]))"
    r"|[Aa]nswer\s*[:：]\s*([a-k])(?![A-Za-z])"
)


@lru_cache(maxsize=1 << 12)
def _gold_letters(gold):
    """The option letters of a multiple-choice gold ("C", "(C)", "\\text{(C)}", "BC"), or None."""
    g = _normalize(gold)
    if len(g) == 1 and "A" <= g <= "K" or len(g) > 1 and _LETTERS.fullmatch(g):
        return frozenset(g)
    return None


def _response_letters(text):
    """The letters a response chose: in its last box, else after its last cue ("Answer: D", "which
    corresponds to choice (A)", "故选 B"), else as its extracted answer."""
    for candidate in (_last_boxed(text), _last_cue(text), _answer_is(text)):
        letters = _letters_in(candidate) if candidate and len(candidate) <= MAX_ANSWER_CHARS else None
        if letters:
            return letters
    return None


def _last_cue(text):
    cue = None
    for cue in _CHOICE_CUE.finditer(text):
        pass
    return next(g for g in cue.groups() if g) if cue else None


_LIST_PUNCTUATION = re.compile(r"[\s,]|\\land|\\lor")


def _letters_in(answer):
    a = _normalize(answer)
    if len(a) == 1 and a.isalpha() and a.isascii():  # a lowercase letter is the option, too
        a = a.upper()
    choice = _CHOICE.fullmatch(a)
    if choice:
        return frozenset(choice.group(1) or choice.group(2))
    letters = _LIST_PUNCTUATION.sub("", a)
    return frozenset(letters) if 1 < len(letters) < 8 and _LETTERS.fullmatch(letters) else None


def _tick(deadline):
    if time.perf_counter() > deadline:
        raise BoundError("time", "time limit")


def _equal(x, y, deadline):
    """Equivalence of two parsed answers; symmetric in x and y."""
    _tick(deadline)
    if is_set_like(x) or is_set_like(y):  # inequalities, intervals, set-builder: sets of reals
        xs, ys = real_set(x), real_set(y)
        if xs is not None and ys is not None:
            return equal_sets(xs, ys, _equal_expr)
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
        labelled = _equal_labelled(x, y, deadline)
        if labelled is not None:
            return labelled
        return _covers(x.items, y.items, deadline) and _covers(y.items, x.items, deadline)
    return False


def _labels(seq):
    """For a list with labelled values ("p = 2, q = -5"): {label: value} when all are labelled,
    else the values in written order. None for an unlabelled list, and for one that lists the
    solutions of one unknown (x = 1, x = -2), which compares as a set."""
    named = [v.lhs for v in seq.items if isinstance(v, Equation) and v.named]
    if not named or len(set(named)) != len(named):
        return None
    if len(named) == len(seq.items):
        return {str(v.lhs): v.rhs for v in seq.items}
    return [v.rhs if isinstance(v, Equation) and v.named else v for v in seq.items]


def _equal_labelled(x, y, deadline):
    """Labelled values compare by label, and against an unlabelled list in order (of the labels,
    or as written when only some are labelled), never as an unordered set: a wrong p fails."""
    lx, ly = _labels(x), _labels(y)
    if lx is None and ly is None:
        return None
    if isinstance(lx, dict) and isinstance(ly, dict):
        return lx.keys() == ly.keys() and all(_equal(lx[k], ly[k], deadline) for k in lx)
    xs, ys = (_in_order(l, s) for l, s in ((lx, x), (ly, y)))
    return _equal_ordered(xs, ys, deadline)


def _in_order(labels, seq):
    if labels is None:
        return seq.items
    if isinstance(labels, dict):
        return [labels[k] for k in sorted(labels, key=lambda k: (k.casefold(), k))]
    return labels


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
    if _agree_at_points(x, y):
        return True
    only_x, only_y = x.free_symbols - y.free_symbols, y.free_symbols - x.free_symbols
    if len(only_x) == len(only_y) == 1 and {str(*only_x), str(*only_y)} <= _CONSTANT_NAMES:
        return _agree_at_points(x, y, {only_y.pop(): only_x.pop()})  # C e^{-2t} is c e^{-2t}
    return False


_CONSTANT_NAMES = {"C", "c", "C_0", "c_0", "C_1", "c_1", "K"}  # the arbitrary constant of a general solution


def _agree_at_points(x, y, alias=None):
    agreed = 0
    for a, b in _values_at_points(x, y, alias):
        if a is None and b is None:  # both undefined here, e.g. log of a negative
            continue
        if not _close(a, b, SYM_TOL):
            return False
        agreed += 1
    return agreed >= 2


def _values_at_points(x, y, alias=None):
    """Values of x and y at each test point. A symbol missing from one side does not change its
    value, so sin^2 t + cos^2 t still equals 1, while 2k + 2 differs from 2n + 2. The points are
    positive, the usual domain of answer variables (lengths, counts), so |x| equals x there.
    `alias` {a: b} gives symbol a the value of b."""
    alias = alias or {}
    symbols = sorted((x.free_symbols | y.free_symbols) - alias.keys(), key=str)
    if len(symbols) > len(_POINTS[0]):
        return []
    envs = [dict(zip(symbols, p)) for p in _POINTS]
    for env in envs:
        env.update({a: env[b] for a, b in alias.items()})
    return [(numeric(x, env), numeric(y, env)) for env in envs]


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
