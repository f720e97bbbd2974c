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

import mathparse  # noqa: E402
import reward  # noqa: E402
from reward import extract_answer, score, score_batch, verify  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"benchmark data not found at {DATA}")


def B(answer):
    """A typical model response ending in a boxed answer."""
    return f"Let me think step by step.\nSo the final answer is $\\boxed{{{answer}}}$."


PMATRIX_2X2 = r"\begin{pmatrix} -1 & 0 \\ 0 & -1 \end{pmatrix}"
PMATRIX_COL = r"\begin{pmatrix} 1/5 \\ -18/5 \end{pmatrix}"
PMATRIX_THIRDS = r"\begin{pmatrix} -1/3 \\ 2/3 \\ 5/3 \end{pmatrix}"
PLANE = "5x - 7y + 11z + 4 = 0"

# (response, gold, expected), labelled by hand; near-misses are False.
CASES = {
    "integers": [
        (B("42"), "42", True),
        (B("-42"), "42", False),
        (B("025"), "25", True),  # AIME answers are written with three digits
        (B("1,234"), "1234", True),
        (B("1{,}234"), "1234", True),
        (B(r"1\,234"), "1234", True),
        (B("1,234,567"), "1234567", True),
        (B(r"11,\! 111,\! 111,\! 100"), "11111111100", True),
        (B("1234"), "1,234", True),
        (B("1,235"), "1234", False),
        (B("27"), "27.0", True),  # AMC23 golds are floats
        (B("27.5"), "27.0", False),
        (B("+5"), "5", True),
        (B("- 5"), "-5", True),
        (B("5"), "-5", False),
        (B("10"), "100", False),
        (B("3"), "3.0", True),
        (B("2.0"), "2", True),
        (B("1 000 000"), "1000000", True),
        (B("−5"), "-5", True),  # unicode minus
    ],
    "fractions_decimals": [
        (B(r"\frac{1}{2}"), "0.5", True),
        (B("0.5"), r"\frac12", True),
        (B(r"\dfrac{3}{4}"), r"\frac{3}{4}", True),
        (B(r"\tfrac34"), "0.75", True),
        (B("3/4"), r"\frac{3}{4}", True),
        (B(r"\frac{6}{8}"), r"\frac34", True),
        (B("0.33"), r"\frac{1}{3}", False),
        (B("0.333"), r"\frac{1}{3}", False),
        (B(r"0.\overline{3}"), r"\frac{1}{3}", True),
        (B(r"0.1\overline{6}"), r"\frac{1}{6}", True),
        (B(r"1\frac{4}{5}"), r"\frac{9}{5}", True),
        (B("1.8"), r"1\frac{4}{5}", True),
        (B("137.5"), r"137 \frac{1}{2}", True),
        (B(r"\frac{-3}{8}"), r"-\frac{3}{8}", True),
        (B(r"\frac{3}{-8}"), r"-\frac38", True),
        (B(r"\frac{3}{8}"), r"-\frac{3}{8}", False),
        (B("0.35625"), ".35625", True),
        (B(r"\frac{57}{160}"), ".35625", True),
        (B(r"6.72 \times 10^{-5}"), ".0000672", True),
        (B("0.0000673"), ".0000672", False),
        (B("1.25"), r"\frac54", True),
        (B("1.3"), r"\frac54", False),
        (B(r"17.5\%"), "17.5", True),
        (B("17.5"), r"17.5\%", True),
        (B(r"\frac{9}{19}"), r"\frac9{19}", True),
        (B(r"\frac{270}{7}"), r"\frac{270}7\text{ degrees}", True),
        (B(r"\frac{1}{4}"), r"\frac{1}{2}", False),
    ],
    "radicals_constants_functions": [
        (B(r"\sqrt{117}"), r"3\sqrt{13}", True),
        (B(r"3\sqrt{12}"), r"3\sqrt{13}", False),
        (B(r"11\sqrt{2}"), r"11\sqrt2", True),
        (B(r"\frac{1}{\sqrt3}"), r"\frac{\sqrt{3}}{3}", True),
        (B("0.577"), r"\frac{\sqrt{3}}{3}", False),  # rounded
        (B(r"2\sqrt{2}"), r"\sqrt{8}", True),
        (B(r"\sqrt[3]{8}"), "2", True),
        (B(r"\sqrt[3]{500}"), r"5\sqrt[3]{4}", True),
        (B(r"\pi"), r"\pi", True),
        (B("3.14"), r"\pi", False),
        (B("6.28"), r"2\pi", False),
        (B(r"\frac{20000}{\pi}"), r"\frac{20000}{\pi}", True),
        (B(r"2^{10}"), "1024", True),
        (B(r"2\cdot 2^{1008}"), r"2^{1009}", True),
        (B(r"2^{1008}"), r"2^{1009}", False),
        (B("5!"), "120", True),
        (B(r"\frac{100!}{2^{50}}"), r"\frac{100!}{2^{50}}", True),
        (B(r"\binom{6}{2}"), "15", True),
        (B(r"\dbinom{6}{3}"), "15", False),
        (B(r"\log_2 8"), "3", True),
        (B(r"\log_{10} 1000"), "3", True),
        (B(r"\ln e^2"), "2", True),
        (B(r"\sin \frac{\pi}{6}"), r"\frac12", True),
        (B(r"\cos 0"), "1", True),
        (B(r"\tan\frac{\pi}{4}"), "2", False),
        (B(r"\frac{\sqrt{2}}{2}"), r"\sin\frac{\pi}{4}", True),
        (B(r"e^{i\pi}"), "-1", True),
        (B(r"\frac{\pi}{6}"), r"-\frac{\pi}{6}", False),
        (B(r"18+2\pi"), r"2\pi+18", True),
        (B(r"288\pi"), r"288 \pi", True),
        (B(r"70\sqrt{2}"), r"70 \sqrt{2}", True),
    ],
    "scientific_complex": [
        (B("4e33"), r"4 \times 10^{33}", True),
        (B(r"4.0 \times 10^{33}"), "4e33", True),
        (B(r"3 \times 10^{8}"), "3e8", True),
        (B(r"1.77 \cdot 10^{-6}"), "1.77e-6", True),
        (B("1.78e-6"), "1.77e-6", False),
        (B("4.4e7"), "44000000", True),
        (B("-5i+6"), "6 - 5i", True),
        (B("6+5i"), "6 - 5i", False),
        (B("(1+i)^2"), "2i", True),
        (B(r"\frac{1}{i}"), "-i", True),
        (B(r"-2+2\sqrt{3} i"), r"-2+2 \sqrt{3} i", True),
        (B(r"-8-8i\sqrt3"), r"-8-8 \sqrt{3} i", True),
        (B("1-12i"), "1 - 12i", True),
        (B("1+12i"), "1 - 12i", False),
    ],
    "units_text_degrees": [
        (B(r"90^\circ"), "90", True),
        (B("90"), r"90^\circ", True),
        (B(r"90^{\circ}"), r"90^\circ", True),
        (B(r"\frac{\pi}{2}"), r"90^\circ", False),
        (B(r"45^\circ"), r"90^\circ", False),
        (B(r"\$32,348"), r"\$32,\!348", True),
        (B("32348"), r"\$32,\!348", True),
        (B("18.9"), r"\$18.90", True),
        (B("18.09"), r"\$18.90", False),
        (B(r"36 \text{ dollars}"), r"\$36", True),
        (B(r"5.4 \text{ cents}"), "5.4", True),
        (B("5.4"), r"5.4 \text{ cents}", True),
        (B(r"864 \text{ in}^2"), r"864 \mbox{ inches}^2", True),
        (B(r"15 \text{ cm}^2"), r"15\mbox{ cm}^2", True),
        (B("16"), r"15\mbox{ cm}^2", False),
        (B(r"10 \text{ inches}"), "10", True),
        (B(r"1.6 \mathrm{~cm}"), "1.6", True),
        (B("1.6 cm"), "1.6", True),
        (B(r"50 \%"), "50", True),
        (B(r"\text{Evelyn}"), r"\text{Evelyn}", True),
        (B("Evelyn"), r"\text{Evelyn}", True),
        (B(r"\text{Navin}"), r"\text{Evelyn}", False),
        (B(r"\text{East}"), r"\text{east}", True),
        (B(r"\text{west}"), r"\text{east}", False),
        (B(r"\text{parabola}"), r"\text{ellipse}", False),
        (B(r"\textbf{even}"), r"\text{even}", True),
        (B(r"\text{odd}"), r"\text{even}", False),
        (B(r"\mathbf{12}"), "12", True),
        (B(r"\textbf{13}"), "12", False),
        (B("52_{8}"), "52_8", True),
        (B("52"), "52_8", True),  # the base is given by the question
        (B("42"), "52_8", False),
    ],
    "multiple_choice": [
        (B("C"), r"\text{(C)}", True),
        (B("(C)"), r"\text{(C)}", True),
        (B(r"\textbf{(C)}"), r"\text{(C)}", True),
        (B(r"\text{C}"), "C", True),
        (B(r"\mathrm{(E)}"), r"\text{(E)}", True),
        (B("B"), r"\text{(C)}", False),
        (B("(A)"), r"\text{(E)}", False),
        (B(r"\textbf{(C) }12"), r"\text{(C)}", True),
    ],
    "tuples_sets_lists": [
        (B(r"(3, \frac{\pi}{2})"), r"\left( 3, \frac{\pi}{2} \right)", True),
        (B(r"(\frac{\pi}{2}, 3)"), r"\left( 3, \frac{\pi}{2} \right)", False),
        (B("(6,31,-1)"), "(6,31,-1)", True),
        (B("(6, 31, 1)"), "(6,31,-1)", False),
        (B("(6,31)"), "(6,31,-1)", False),
        (B("(1.5,-13)"), r"\left( \frac{3}{2}, -13 \right)", True),
        (B("-2, 1"), "1,-2", True),
        (B("1"), "1,-2", False),
        (B("1, 2"), "1,-2", False),
        (B("7, 5, 3"), "3, 5, 7", True),
        (B("3, 5"), "3, 5, 7", False),
        (B(r"\{1,2\}"), r"\{2,1\}", True),
        (B(r"\{1,2\}"), "(1,2)", False),  # a set is not an ordered pair
        (B("(2,1)"), "(1,2)", False),
        (B("1, 2"), r"\{1,2\}", True),
        (B(r"\{-2, 1+\sqrt5, 1-\sqrt5\}"), r"\{1\pm\sqrt{5},-2\}", True),
        (B(r"1+\sqrt{5}, 1-\sqrt{5}"), r"\{1\pm\sqrt{5},-2\}", False),
        (B(r"1 \pm \sqrt{19}"), r"1 \pm \sqrt{19}", True),
        (B(r"1-\sqrt{19}, 1+\sqrt{19}"), r"1 \pm \sqrt{19}", True),
        (B(r"1+\sqrt{19}"), r"1 \pm \sqrt{19}", False),
        (B(r"3 + 2\sqrt{2}, 3 - 2\sqrt{2}"), r"3 \pm 2 \sqrt{2}", True),
        (B(r"3, 5, \text{ and } 7"), "3, 5, 7", True),
        (B(r"(1 \pm 2, 3)"), "(3, 3), (-1, 3)", True),
        (B("(1,1006),(3,331),(11,31)"), "$(1,1006),(3,331),(11,31)$", True),
        (B("(3,331),(11,31),(1,1006)"), "$(1,1006),(3,331),(11,31)$", True),
        (B("(1,1006),(3,331)"), "$(1,1006),(3,331),(11,31)$", False),
        (B("(1006,1),(3,331),(11,31)"), "$(1,1006),(3,331),(11,31)$", False),
        (B(r"\emptyset"), r"\varnothing", True),
        (B(r"\{1\}"), r"\varnothing", False),
    ],
    "intervals": [
        (B("[1,2]"), "[1,2]", True),
        (B("(1,2]"), "[1,2]", False),
        (B("[1,2)"), "[1,2]", False),
        (B(r"\left(3, 4\right]"), "(3,4]", True),
        (B("[3,4]"), "(3,4]", False),
        (B(r"(2,\infty)"), r"(2,\infty)", True),
        (B(r"[2,\infty)"), r"(2,\infty)", False),
        (B(r"(-\infty,0]"), r"(-\infty, 0]", True),
        (B(r"(-\infty, 0)"), r"(-\infty, 0]", False),
        (B(r"(\infty, 0]"), r"(-\infty, 0]", False),
        (B(r"(9,36) \cup (0,9)"), r"(0,9) \cup (9,36)", True),
        (B("(0,36)"), r"(0,9) \cup (9,36)", False),
        (B(r"(-\infty,2)\cup(3,\infty)"), r"(-\infty, 2) \cup (3, \infty)", True),
        (B(r"(-\infty,2]\cup(3,\infty)"), r"(-\infty, 2) \cup (3, \infty)", False),
        (B(r"x \in [-2,7]"), "[-2,7]", True),
        (B("[-2,7]"), r"x \in [-2,7]", True),
        (B(r"x \in (0,9) \cup (9,36)"), r"(0,9) \cup (9,36)", True),
        (B(r"\left(\frac35, \frac83\right]"), r"\left(\frac{3}{5},\frac{8}{3}\right]", True),
        (B(r"(0.6, \frac83]"), r"\left(\frac{3}{5},\frac{8}{3}\right]", True),
        (B(r"[\frac{\pi^2}{8}, \frac{5\pi^2}{4}]"), r"\left[ \frac{\pi^2}{8}, \frac{5 \pi^2}{4} \right]", True),
        (B(r"(-\sqrt{3}, \sqrt{3})"), r"(-\sqrt{3}, \sqrt{3})", True),
        (B(r"[-\sqrt{3}, \sqrt{3}]"), r"(-\sqrt{3}, \sqrt{3})", False),
        (B(r"(-\infty,0)\cup\{1\}"), r"$(-\infty, 0) \cup\{1\}$", True),
        (B(r"(-\infty,0)\cup\{2\}"), r"$(-\infty, 0) \cup\{1\}$", False),
    ],
    "matrices": [
        (B(PMATRIX_2X2), PMATRIX_2X2, True),
        (B(PMATRIX_2X2.replace("pmatrix", "bmatrix")), PMATRIX_2X2, True),
        (B(r"\begin{pmatrix} -1 & 0 \\ 0 & 1 \end{pmatrix}"), PMATRIX_2X2, False),
        (B(r"\begin{pmatrix} -1 \\ 0 \\ 0 \\ -1 \end{pmatrix}"), PMATRIX_2X2, False),
        (B(r"\begin{pmatrix} -\frac13 \\ \frac23 \\ \frac53 \end{pmatrix}"), PMATRIX_THIRDS, True),
        (B(r"\begin{pmatrix} 0.2 \\ -3.6 \end{pmatrix}"), PMATRIX_COL, True),
        (B("(0.2, -3.6)"), PMATRIX_COL, True),
        (B(r"\begin{pmatrix} -18/5 \\ 1/5 \end{pmatrix}"), PMATRIX_COL, False),
        (B(r"\begin{pmatrix} -7 \\ 16 \\ 5 \end{pmatrix}"), r"\begin{pmatrix} -7 \\ 16 \\ 5 \end{pmatrix}", True),
        (B(r"\begin{pmatrix} 7 \\ 16 \\ 5 \end{pmatrix}"), r"\begin{pmatrix} -7 \\ 16 \\ 5 \end{pmatrix}", False),
    ],
    "equations": [
        (B("5"), "x=5", True),
        (B("x=5"), "5", True),
        (B("x = 6"), "x=5", False),
        (B("y=3+2x"), "y = 2x + 3", True),
        (B("2x - y + 3 = 0"), "y = 2x + 3", True),
        (B("y = 2x - 3"), "y = 2x + 3", False),
        (B("-2x"), "y = -2x", True),
        (B("y = 2x"), "y = -2x", False),
        (B("-5x + 7y - 11z - 4 = 0"), PLANE, True),
        (B("10x - 14y + 22z + 8 = 0"), PLANE, True),
        (B("5x - 7y + 11z - 4 = 0"), PLANE, False),
        (B("k = 3"), "$k=3$", True),
        (B("3"), "$k=3$", True),
        (B("f(x) = 2x"), "$f(x)=2 x$", True),
        (B("2x"), "$f(x)=2 x$", True),
        (B("f(x)=x"), "$f(x)=2 x$", False),
        (B(r"M=\frac{9\sqrt2}{32}"), r"$M=\frac{9}{32} \sqrt{2}$", True),
        (B("x = 1, x = -2"), "1,-2", True),
        (B("x = 1"), "1,-2", False),
    ],
    "symbolic": [
        (B("(x+1)^2"), "x^2+2x+1", True),
        (B("x^2+2x+1"), "(x+1)^2", True),
        (B("(x-1)^2"), "x^2+2x+1", False),
        (B("(x-1)(x^4+x^2+1)"), "x^5 - x^4 + x^3 - x^2 + x - 1", True),
        (B("x^5 - x^4 + x^3 - x^2 + x + 1"), "x^5 - x^4 + x^3 - x^2 + x - 1", False),
        (B("-q+p"), "p - q", True),
        (B("q-p"), "p - q", False),
        (B("ab+2a+5b+10"), "(a+5)(b+2)", True),
        (B("(a+2)(b+5)"), "(a+5)(b+2)", False),
        (B("2(k+1)"), "2k+2", True),
        (B("2k+1"), "2k+2", False),
        (B(r"\frac{9a}{20}+\frac{11}{20}"), r"\frac{11+9a}{20}", True),
        (B("0.55+0.45a"), r"\frac{11+9a}{20}", True),
        (B(r"\frac{\cos x}{\sin x}"), r"\cot x", True),
        (B(r"\tan x"), r"\cot x", False),
        (B(r"\frac{1}{2(n+1)}"), r"$\frac{1}{2 n+2}$", True),
        (B(r"\frac{2n^3+3n^2+n}{6}"), r"$\frac{n(n+1)(2 n+1)}{6}$", True),
        (B("n^2+n+1"), "$n^{2}-n+1$", False),
        (B(r"\frac{(2n)!}{(n!)^2}"), r"$\binom{2n}{n}$", True),
        (B(r"\frac{2^k}{2}"), "$2^{k-1}$", True),
        (B(r"2^{k+1}"), "$2^{k-1}$", False),
        (B("2(3r^2-2r-12)"), "6r^2-4r-24", True),
        (B(r"e^{-2t}/15"), r"\frac{e^{-2 t}}{15}", True),
        (B(r"\sin^2 x + \cos^2 x"), "1", True),
        (B("x^2"), "x^3", False),
    ],
    "floor_abs": [
        (B(r"\lfloor 3.7 \rfloor"), "3", True),
        (B(r"\lceil 3.2 \rceil"), "3", False),
        (B("|-3|"), "3", True),
        (B(r"\left| -3 \right|"), "3", True),
        (B(r"\lfloor \log_2 n \rfloor + 1"), r"$\left\lfloor\log _{2} n\right\rfloor+1$", True),
        (B(r"mn - \lfloor m/2 \rfloor"), r"$m n-\lfloor m / 2\rfloor$", True),
        (B(r"mn - \lceil m/2 \rceil"), r"$m n-\lfloor m / 2\rfloor$", False),
    ],
    "extraction": [
        ("The answer is 42.", "42", True),
        ("So the final answer is: 3.5.", "3.5", True),
        ("Adding up the costs...\n#### 70,000", "70000", True),
        ("We get 3 apples, then 5 more, for a total of 8", "8", True),
        ("We get 3 apples, then 5 more, for a total of 8 apples.", "5", False),
        (r"First \boxed{3}, but wait, actually \boxed{5}", "5", True),
        (r"First \boxed{3}, but wait, actually \boxed{5}", "3", False),
        (r"Hence $\fbox{7}$.", "7", True),
        (r"Hence $\boxed 7$.", "7", True),
        ("No final answer here.", "5", False),
        (r"The answer is $\frac{1}{2}$.", "0.5", True),
        (r"\boxed{\{1, 2\}}", "1,2", True),
        (r"\[\boxed{x^2 + 1}\]", "x^2+1", True),
        (r"\boxed{}", "5", False),
        (B("18"), "She earns 9 * 2 = <<9*2=18>>18 dollars.\n#### 18", True),
        (B("5"), r"Adding, we get $2 + 3 = \boxed{5}$.", True),
        (B(r"\frac{a}{b}"), r"So $\boxed{\frac{a}{b}}$.", True),
    ],
}
# Labels the verifier gets wrong, kept to measure agreement honestly.
KNOWN_LIMITS = [
    (B("|x|"), "x", False),  # symbols are only tested at positive points
    (B("x > 2"), r"(2, \infty)", True),  # inequalities are compared as text
]
ALL_CASES = [(family, *case) for family, cases in CASES.items() for case in cases]


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
