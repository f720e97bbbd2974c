"""Tests for the answer formats of the harder benchmarks (tests/reward_cases.py FORMAT_CASES):
inequalities and sets, restated golds, units and rounded golds, multiple choice, text vocabularies,
labelled answers; the set algebra of mathsets.py; and that every gold is a real benchmark gold."""

import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import data  # noqa: E402
import mathparse  # noqa: E402
import mathsets  # noqa: E402
import reward  # noqa: E402
from reward import extract_answer, verify  # noqa: E402
from reward_cases import ALL_CASES, ALL_FORMAT_CASES, FORMAT_CASES, B  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"benchmark data not found at {DATA}")
# the benchmarks the golds of FORMAT_CASES come from (data.py renders each row's gold)
SOURCES = ["olympiadbench", "college_math", "gaokao2023en", "gaokao2024_I", "gaokao2024_II", "gaokao2024_mix",
           "gaokao_math_cloze", "cn_middle_school", "minerva_math", "aqua", "sat_math", "mmlu_stem", "math500",
           "gsm8k"]


def test_enough_new_hand_labels_with_near_misses():
    assert len(ALL_FORMAT_CASES) >= 120
    for kind, cases in FORMAT_CASES.items():
        labels = {expected for _, _, expected in cases}
        assert labels == {True, False}, f"{kind} needs both correct answers and near misses"


@pytest.mark.parametrize(
    "kind,response,gold,expected", ALL_FORMAT_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(ALL_FORMAT_CASES)]
)
def test_format_case(kind, response, gold, expected):
    assert verify(response, gold) is expected


def test_agreement_by_kind():
    """At least 98% on the new pairs, and 100% on the original families."""
    for kind, cases in FORMAT_CASES.items():
        right = sum(verify(r, g) is e for r, g, e in cases)
        print(f"\n{kind}: {right}/{len(cases)}", end="")
    new = sum(verify(r, g) is e for _, r, g, e in ALL_FORMAT_CASES) / len(ALL_FORMAT_CASES)
    old = sum(verify(r, g) is e for _, r, g, e in ALL_CASES) / len(ALL_CASES)
    assert new >= 0.98 and old == 1.0


@needs_data
@pytest.mark.filterwarnings("ignore:.*without a gold answer")
def test_every_gold_is_a_benchmark_gold():
    """The pairs are written against real golds: each gold is one that data.py gives for a row of
    ../shared/data (the comments cite which)."""
    golds = {p.answer for name in SOURCES for p in data.load_benchmark(name, DATA)}
    golds |= {g.split("####")[-1].strip() for g in golds if "####" in g}
    missing = sorted({gold for _, _, gold, _ in ALL_FORMAT_CASES} - golds)
    assert not missing, missing


# -- sets of reals


def _set(text):
    return mathsets.real_set(reward._restated(mathparse.parse(reward._normalize(text))))


def _same(a, b):
    return mathsets.equal_sets(_set(a), _set(b), reward._equal_expr)


def test_set_algebra():
    assert _same("[1,2]\\cup[2,3]", "[1,3]")  # touching pieces merge
    assert not _same("[1,2)\\cup(2,3]", "[1,3]")  # a missing point does not
    assert _same("(0,5)\\setminus\\{2\\}", "(0,2)\\cup(2,5)")
    assert _same("x \\ne 1", "\\mathbb{R}\\setminus\\{1\\}")
    assert _same("\\{x \\mid x > 0 \\land x < 1\\}", "0 < x < 1")
    assert _same("\\{x \\mid x > 0, x < 1\\}", "(0, 1)")  # in set-builder, a comma means and
    assert _same("x < 0, x > 1", "(-\\infty,0)\\cup(1,\\infty)")  # in a list of answers, or
    assert _same("x < 1 \\land x > 0", "(0,1)")
    assert _same("x \\ge 2, x \\le 2", "\\mathbb{R}")
    assert _same("x > 3, x < 1", "\\mathbb{R}\\setminus[1,3]")
    assert _same("-\\sqrt{2} < x < \\sqrt{2}", "(-1.41421356237, 1.41421356237)")  # within REL_TOL
    assert not _same("x > 0", "x < 0")
    assert _set("x > y") is None  # a relation between two unknowns is not a set of reals
    assert _set("x > 1, y < 2") is None  # nor are conditions on two variables
    assert _set("[5, 2]") is None  # a reversed interval is compared by structure


def test_integer_families():
    assert verify(B("\\{2k+1 \\mid k \\in \\mathbb{Z}\\}"), "\\{2k-1 \\mid k\\in\\mathbb{Z}\\}")
    assert verify(B("\\{-2n+1 \\mid n \\in \\mathbb{Z}\\}"), "\\{2k-1 \\mid k\\in\\mathbb{Z}\\}")
    assert not verify(B("\\{2k \\mid k \\in \\mathbb{Z}\\}"), "\\{2k-1 \\mid k\\in\\mathbb{Z}\\}")
    assert not verify(B("\\{4k+1 \\mid k \\in \\mathbb{Z}\\}"), "\\{2k+1 \\mid k\\in\\mathbb{Z}\\}")
    assert verify(B("\\{k^2 \\mid k \\in \\mathbb{Z}\\}"), "\\{n^2 \\mid n\\in\\mathbb{Z}\\}")


def test_sign_choices_in_tuples():
    four = "(1,4),(1,-4),(-1,4),(-1,-4)"
    assert verify(B("(\\pm 1, \\pm 4)"), four)
    assert not verify(B("(\\pm 1, 4)"), four)
    assert verify(B("(1 \\pm 2, 3)"), "(3, 3), (-1, 3)")  # one \pm: two tuples, as before


def test_huge_union_compares_quickly():
    union = "\\cup".join(f"({i},{i + 1})" for i in range(0, 140, 2))
    shuffled = "\\cup".join(f"({i},{i + 1})" for i in reversed(range(0, 140, 2)))
    start = time.perf_counter()
    assert verify(B(shuffled), union)
    assert not verify(B(shuffled.replace("(0,1)", "[0,1)")), union)
    assert time.perf_counter() - start < 2.0


# -- extraction, rounding, percent, choices


def test_last_number_is_not_a_restatement():
    assert extract_answer("It takes 90 seconds, that is 1.5 minutes.") == "90"
    assert extract_answer("It takes 90 seconds (1.5 minutes).") == "90"
    assert extract_answer("First 3. Then it takes 90 seconds, i.e. 1.5 minutes.") == "90"
    assert extract_answer("We get 3 apples, then 5 more, for a total of 8") == "8"  # no restatement


def test_rounded_gold_precision():
    """A decimal gold with 2+ significant digits is rounded: an exact answer matches when it
    rounds to it; a rounded answer never matches an exact gold."""
    assert verify(B("\\frac{1}{720}"), "0.0013889")
    assert not verify(B("\\frac{1}{700}"), "0.0013889")
    assert not verify(B("1591.5"), "\\frac{5000}{\\pi}")  # the response rounded an irrational
    assert not verify(B("0.52"), "0.5")  # a decimal answer is compared exactly
    assert not verify(B("\\frac{\\sqrt{2}}{3}"), "0.5")  # one significant digit: exact


def test_percent_and_probability():
    assert verify(B("0.375"), "37.5\\%")
    assert verify(B("37.5\\%"), "0.375")
    assert not verify(B("37.5"), "0.375")
    assert not verify(B("3.75\\%"), "0.375")


def test_choice_letter_is_read_from_the_response():
    assert verify("so the value is 12, which corresponds to choice (A).", "A")
    assert verify("计算得 x=2，故选 B", "B")
    assert not verify("The answer is a prime number, namely 7.", "A")  # "a" is a word here
    assert not verify(B("12"), "A")  # the value of an option is not its letter


def test_free_paraphrase_is_out_of_scope():
    """Only fixed vocabularies are normalised; a paraphrase is compared as text."""
    assert not verify(B("\\text{the series does not converge}"), "diverges")
