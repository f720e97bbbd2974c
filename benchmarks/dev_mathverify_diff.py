"""Dev-only: compare reward.verify with the math-verify package on perturbed MATH500 golds.

A comparison script, not a test, and math-verify is not a dependency of EchoRL:
    .venv/bin/pip install math-verify==0.9.0
    .venv/bin/python benchmarks/dev_mathverify_diff.py [--limit N]
Prints every (gold, answer) pair on which the two verifiers disagree, grouped by perturbation.
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

from reward import verify  # noqa: E402


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
    args = parser.parse_args()
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
