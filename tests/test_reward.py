"""Tests for reward.py: hand-labelled pairs, benchmark golds, shuffled golds, hostile inputs."""

import ast
import json
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # reward_cases, also when imported as tests.test_reward

import mathparse  # noqa: E402
import reward  # noqa: E402
from reward import extract_answer, score, score_batch, verify  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"benchmark data not found at {DATA}")


from reward_cases import ALL_CASES, KNOWN_LIMITS, B  # noqa: E402  (the hand-labelled table)



def test_enough_hand_labels():
    assert len(ALL_CASES) + len(KNOWN_LIMITS) >= 150


@pytest.mark.parametrize(
    "family,response,gold,expected", ALL_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(ALL_CASES)]
)
def test_hand_labelled(family, response, gold, expected):
    assert verify(response, gold) is expected


def test_hand_label_agreement():
    labelled = [case[1:] for case in ALL_CASES] + KNOWN_LIMITS
    wrong = [(r, g, e) for r, g, e in labelled if verify(r, g) is not e]
    agreement = 1 - len(wrong) / len(labelled)
    print(f"\nhand-label agreement {agreement:.1%} over {len(labelled)} pairs")
    for r, g, e in wrong:
        print(f"  disagree: expected {e}: {r!r} vs {g!r}")
    assert agreement >= 0.98


def test_extract_answer():
    assert extract_answer(r"so \boxed{\frac{1}{2}} and") == r"\frac{1}{2}"
    assert extract_answer(r"\boxed{\{1,2\}}") == r"\{1,2\}"
    assert extract_answer("#### 1,234\n") == "1,234"
    assert extract_answer("The final answer is $x=3$. Done.") == "$x=3$"
    assert extract_answer("I get 12 and then -3.5") == "-3.5"
    assert extract_answer("I get 12 and then -3.5", last_number=False) is None
    assert extract_answer("nothing") is None


def test_score_and_format_reward():
    assert score(B("5"), "5") == 1.0
    assert score(B("4"), "5") == 0.0
    assert score(B("4"), "5", format_reward=0.1) == 0.1
    assert score("I think it is 4", "5", format_reward=0.1) == 0.0  # no \boxed answer


# -- benchmark golds verify against themselves


def _jsonl(name):
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


def _golds(name):
    if name == "gsm8k":
        return [r["answer"].split("####")[-1].strip() for r in _jsonl("gsm8k/test.jsonl")]
    return [str(r["answer"]) for r in _jsonl(f"{name}/test.jsonl")]


@needs_data
@pytest.mark.parametrize("name", ["math500", "gsm8k", "aime24", "amc23"])
def test_golds_verify_against_themselves(name):
    golds = _golds(name)
    failures = [g for g in golds if not verify(B(g), g)]
    assert not failures, failures


@needs_data
def test_full_gsm8k_solution_as_gold():
    rows = _jsonl("gsm8k/test.jsonl")[:200]
    assert all(verify(B(r["answer"].split("####")[-1].strip()), r["answer"]) for r in rows)


@needs_data
def test_shuffled_golds_rarely_match():
    """Each MATH500 answer against the gold of another problem (fixed-seed derangement).

    All 8 matches were checked by hand; each pair is two problems with the same answer:
    10/10, 2/2, 12/12, 9/9, 3/3, 5/5, 3/3, 9/9. So the raw match rate (1.6%) is entirely
    shared answers, and the rate of matches between different answers is 0.
    """
    golds = _golds("math500")
    rng, order = random.Random(0), list(range(len(golds)))
    while any(i == j for i, j in enumerate(order)):
        rng.shuffle(order)
    matches = [(golds[j], golds[i]) for i, j in enumerate(order) if verify(B(golds[j]), golds[i])]
    false_matches = [(a, g) for a, g in matches if reward._normalize(a) != reward._normalize(g)]
    print(f"\nshuffled golds: {len(matches)}/{len(golds)} match ({len(matches) / len(golds):.1%}): {matches}")
    print(f"matches between different answers: {len(false_matches) / len(golds):.1%} {false_matches}")
    assert len(false_matches) / len(golds) <= 0.01
    assert len(matches) / len(golds) <= 0.03


# -- hostile inputs: each must return False quickly, in any thread or process

HOSTILE = {
    "power tower": B("9^{9^{9^9}}"),
    "5000 nested parentheses": B("(" * 5000 + "1" + ")" * 5000),
    "300 nested parentheses": B("(" * 300 + "2" + ")" * 300),
    "400 nested braces": B("{" * 400 + "2" + "}" * 400),
    "2 MB boxed number": B("2" * 2_000_000),
    "2 MB of braces": r"\boxed{" + "{" * 2_000_000,
    "2 MB of text": "the answer is " + "ab " * 700_000,
    "division by zero": B(r"\frac{2}{0}"),
    "python import": B("__import__('os').system('ls')"),
    "python lambda": B("lambda: 0"),
    "python dunder": B("().__class__.__bases__"),
    "exp tower": B("e^{e^{e^{e^{10}}}}"),
    "nested exp": B(r"\exp(\exp(\exp(\exp(10))))"),
    "huge factorial": B("(10^{100})!"),
    "huge power": B("10^{10^{10}}"),
    "many big factors": B("10^{999}" * 110),
    "many radicals": B(r"\sqrt{10^{99}+1}" * 50),
    "sine of a huge number": B(r"\sin(10^{999})"),
    "floor of a huge number": B(r"\lfloor 10^{999}\pi \rfloor"),
    "huge binomial": B(r"\binom{10^{4}}{5000}"),
    "991 minus signs": B("-" * 991 + "2"),
    "long answer": B("1+" * 600 + "1"),
    "symbolic huge power": B("(x+1)^{10000} - x"),
}
# Inputs that must stop at a bound (and be counted). Others are rejected without one: the 5000
# parentheses lose their \boxed{ when the response is cut to its tail, Python is text, 1/0 undefined.
BOUNDED = ["power tower", "300 nested parentheses", "2 MB boxed number", "huge factorial", "long answer"]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_input_is_false_and_fast(name):
    start = time.perf_counter()
    assert verify(HOSTILE[name], "2") is False
    assert time.perf_counter() - start < 2.0


def test_bound_hits_are_counted():
    for name in BOUNDED:
        before = reward.STATS["bound_hits"]
        assert verify(HOSTILE[name], "2") is False
        assert reward.STATS["bound_hits"] == before + 1, name


def test_verify_in_concurrent_threads():
    reward._normalize.cache_clear()  # make the threads do the work
    reward._parse.cache_clear()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda case: verify(case[1], case[2]), ALL_CASES))
    assert results == [case[3] for case in ALL_CASES]


def test_hostile_input_off_main_thread():
    results = {}
    thread = threading.Thread(target=lambda: results.update(ok=verify(HOSTILE["power tower"], "2")))
    start = time.perf_counter()
    thread.start()
    thread.join(5)
    assert results == {"ok": False} and time.perf_counter() - start < 2.0


def test_score_batch_in_workers():
    normal = [(B(str(i)), str(i)) for i in range(70)]
    hostile = [(HOSTILE[name], "2") for name in BOUNDED]
    pairs = normal[:35] + hostile + normal[35:]
    before = reward.STATS["bound_hits"]
    scores = score_batch([r for r, _ in pairs], [g for _, g in pairs], workers=2)
    assert scores == [1.0] * 35 + [0.0] * len(hostile) + [1.0] * 35
    assert reward.STATS["bound_hits"] == before + len(hostile)  # counted in workers, added here
    assert score_batch(["\\boxed{1}"] * 3, ["1", "2", "1"]) == [1.0, 0.0, 1.0]  # small: in-process


def test_score_batch_kills_a_stuck_worker(monkeypatch):
    monkeypatch.setattr(reward, "MIN_PARALLEL", 1)
    reward._close_pool()  # workers must start first, so nothing can finish within the timeout
    before = reward.STATS["bound_hits"]
    assert score_batch([B("1")], ["1"], workers=2, timeout=1e-9) == [0.0]  # cannot finish in time
    assert reward.STATS["bound_hits"] == before + 1
    assert score_batch([B("1")], ["1"], workers=2) == [1.0]  # a fresh pool replaced the killed one


def test_random_garbage_is_handled():
    """Token soup never raises and never takes long."""
    tokens = ["1", "x", "e", "i", "\\pi", "\\infty", "+", "-", "/", "^", "!", "(", ")", "[", "]", "{", "}", ",",
              "=", "|", "\\frac", "\\sqrt", "\\binom", "\\sin", "\\log", "\\lfloor", "\\rfloor", "\\pm", "\\cup",
              "\\{", "\\}", "&", "\\\\", "\\begin{pmatrix}", "\\end{pmatrix}", "0.5", "1e5", "9^{9^{"]
    rng = random.Random(0)
    for _ in range(300):
        answer = "".join(rng.choice(tokens) for _ in range(rng.randint(1, 40)))
        start = time.perf_counter()
        assert verify(B(answer), rng.choice(["2", "x+1", "(1,2)", answer])) in (True, False)
        assert time.perf_counter() - start < 2.0


# -- safety by construction


def test_no_eval_like_calls():
    """Model text must never reach anything that evaluates or parses it as code."""
    banned = {"eval", "exec", "compile", "__import__", "sympify", "parse_expr", "parse_latex"}
    banned_methods = {"eval", "exec", "sympify", "parse_expr", "parse_latex", "S"}  # sympy.S("..") parses
    for module in (reward, mathparse):
        tree = ast.parse(Path(module.__file__).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in banned, (module.__name__, node.lineno)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                assert node.func.attr not in banned_methods, (module.__name__, node.lineno)
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [getattr(node, "module", None) or ""] + [alias.name for alias in node.names]
                assert not any("parsing" in n for n in names), (module.__name__, node.lineno)


def test_numeric_tolerance():
    """Exact for rationals; relative 1e-6 otherwise, so only a decimal good to about 7
    significant digits matches an irrational value."""
    assert verify(B("1.4142136"), r"\sqrt{2}")
    assert not verify(B("1.414"), r"\sqrt{2}")
    assert not verify(B("3.1416"), r"\pi")
    assert not verify(B("0.3333333"), r"\frac{1}{3}")
    assert not verify(B("100000001"), "100000000")
