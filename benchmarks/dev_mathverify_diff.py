"""Dev-only: compare reward.verify with the math-verify package.

A comparison script, not a test, and math-verify is not a dependency of EchoRL:
    .venv/bin/pip install math-verify==0.9.0
    .venv/bin/python benchmarks/dev_mathverify_diff.py [--limit N] [--labels-only]

1. Hand labels (tests/reward_cases.py): the agreement of each verifier with the labels, by kind,
   on the answer formats of the harder benchmarks (FORMAT_CASES) and on the original families
   (CASES), with every pair a verifier gets wrong.
2. Perturbed MATH500 golds: every (gold, answer) pair on which the two verifiers disagree,
   grouped by perturbation (skipped with --labels-only).
"""

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

import math_verify

ROOT = Path(__file__).resolve().parents[1]  # the repository root, which holds reward.py
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "tests"))

from reward import verify  # noqa: E402
from reward_cases import CASES, FORMAT_CASES  # noqa: E402


def math_verify_label(response, gold):
    try:
        return bool(math_verify.verify(math_verify.parse(f"$\\boxed{{{gold}}}$"), math_verify.parse(response)))
    except Exception:  # its own timeouts and parse failures count as False
        return False


def label_agreement(tables):
    """Rows (kind, pairs, ours, math-verify) of agreement with the hand labels, and the misses."""
    rows, misses = [], []
    for title, table in tables:
        total = Counter()
        for kind, cases in table.items():
            right = Counter()
            for response, gold, expected in cases:
                for name, got in (("ours", verify(response, gold)), ("math-verify", math_verify_label(response, gold))):
                    right[name] += got is expected
                    if got is not expected:
                        misses.append((title, kind, name, response[-80:], gold, expected))
            rows.append((f"{title}: {kind}", len(cases), right["ours"], right["math-verify"]))
            total.update(right)
            total["pairs"] += len(cases)
        rows.append((f"**{title}: all**", total["pairs"], total["ours"], total["math-verify"]))
    return rows, misses


def perturbations(gold):
    """(name, answer) variants of a gold answer: some equivalent, most not."""
    yield "same", gold
    yield "dfrac", gold.replace(r"\frac", r"\dfrac")
    yield "no spaces", gold.replace(" ", "")
    digits = list(re.finditer(r"\d", gold))
    if digits:
        d = digits[-1]
        yield "last digit + 1", gold[: d.start()] + str((int(d.group()) + 1) % 10) + gold[d.end() :]
    yield "negated", gold[1:] if gold.startswith("-") else "-" + gold
    swap = {"(": "[", "[": "(", ")": "]", "]": ")"}
    if gold[0] in swap and gold[-1] in swap:
        yield "brackets swapped", swap[gold[0]] + gold[1:-1] + swap[gold[-1]]
    if "," in gold:
        close = gold[-1] if gold[-1] in ")]" else ""
        yield "last item dropped", gold.rsplit(",", 1)[0] + close
    if r"\pi" in gold:
        yield "pi = 3.14", gold.replace(r"\pi", "3.14")
    m = re.fullmatch(r"\\frac\{(\d+)\}\{(\d+)\}", gold)
    if m:
        yield "decimal, 4 places", f"{int(m[1]) / int(m[2]):.4f}"
        yield "decimal, 12 places", f"{int(m[1]) / int(m[2]):.12f}"
    yield "x = prefix", "x = " + gold


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--labels-only", action="store_true")
    args = parser.parse_args()
    rows, misses = label_agreement([("new formats", FORMAT_CASES), ("original families", CASES)])
    for title, kind, name, response, gold, expected in misses:
        print(f"[{title}: {kind}] {name} wrong (label {expected}): gold={gold!r} response=...{response!r}")
    print("\n| hand-labelled pairs | pairs | ours | math-verify |\n|---|---|---|---|")
    for kind, n, ours, theirs in rows:
        print(f"| {kind} | {n} | {ours / n:.1%} ({ours}) | {theirs / n:.1%} ({theirs}) |")
    if args.labels_only:
        return
    rows = [json.loads(line) for line in (ROOT.parent / "shared/data/math500/test.jsonl").read_text().splitlines()]
    counts, disagreements = Counter(), []
    for row in rows[: args.limit]:
        gold = row["answer"]
        gold_parsed = math_verify.parse(f"$\\boxed{{{gold}}}$")
        for name, answer in perturbations(gold):
            ours = verify(f"The answer is $\\boxed{{{answer}}}$.", gold)
            theirs = bool(math_verify.verify(gold_parsed, math_verify.parse(f"$\\boxed{{{answer}}}$")))
            counts[name, ours == theirs] += 1
            if ours != theirs:
                disagreements.append((name, gold, answer, ours, theirs))
    for name, gold, answer, ours, theirs in sorted(disagreements):
        print(f"[{name}] gold={gold!r} answer={answer!r} reward={ours} math_verify={theirs}")
    print("\n| perturbation | pairs | disagreements |\n|---|---|---|")
    for name in dict.fromkeys(n for n, _ in counts):
        total = counts[name, True] + counts[name, False]
        print(f"| {name} | {total} | {counts[name, False]} |")


if __name__ == "__main__":
    main()
