"""Reward throughput and worst-case latency; prints a markdown table.

    python benchmarks/bench_reward.py

Every MATH500 gold answer is wrapped in a typical response and verified against itself (the
common, mostly-True case), and against the gold of another problem (mostly False, so both
sides get parsed). Caches are cleared before each timed pass, so nothing is measured warm.
The hostile inputs and the repetition loops are the tables of tests/reward_cases.py: one row for
each hostile input, one row for each loop family (its verification at 10 KB and at 2 MB), and
the time score_batch takes over 256 loop texts of each size.
"""

import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tqdm import tqdm  # noqa: E402

import reward  # noqa: E402
from tests.reward_cases import HOSTILE, LOOP_SIZES, LOOPS, loop  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def typical(answer):
    return f"Let me think step by step.\nSo the final answer is $\\boxed{{{answer}}}$."


def clear_caches():
    for cached in (reward._gold_answer, reward._normalize, reward._gold_letters, reward._restatements):
        cached.cache_clear()
    reward._PARSED.clear()


def rate(responses, golds, passes=5):
    """Verifications per second in this process, cold caches, best of `passes`."""
    best = float("inf")
    for _ in tqdm(range(passes), desc="single process", leave=False):
        clear_caches()
        start = time.perf_counter()
        for r, g in zip(responses, golds):
            reward.verify(r, g)
        best = min(best, time.perf_counter() - start)
    return len(responses) / best


def batch_rate(responses, golds, workers):
    """Verifications per second through score_batch; the pool is started (and its workers'
    caches filled with unrelated GSM8K answers) before timing."""
    warm = [r["answer"].split("####")[-1].strip() for r in load("gsm8k/test.jsonl")[:256]]
    reward.score_batch([typical(a) for a in warm], warm, workers=workers)
    start = time.perf_counter()
    reward.score_batch(responses, golds, workers=workers)
    return len(responses) / (time.perf_counter() - start)


def timed_verify(response, expected):
    clear_caches()
    start = time.perf_counter()
    assert reward.verify(response, "2") is expected
    return time.perf_counter() - start


def loop_rows():
    """Each loop family at each size, then score_batch over 256 loop texts per size."""
    rows, worst = [], 0.0
    for name, (*_, expected) in tqdm(LOOPS.items(), desc="repetition loops", leave=False):
        seconds = [timed_verify(loop(name, size), expected) for size in LOOP_SIZES.values()]
        worst = max(worst, *seconds)
        rows.append((f"loop: {name}", " / ".join(f"{s:.4f} s" for s in seconds) + " (10 KB / 2 MB)"))
    rows.append(("loop: worst case", f"{worst:.4f} s"))
    names = [list(LOOPS)[i % len(LOOPS)] for i in range(256)]  # every family, in turn
    expected = [float(LOOPS[name][3]) for name in names]
    for label, size in LOOP_SIZES.items():
        texts = {name: loop(name, size) for name in LOOPS}
        for workers in (1, 2):
            reward.score_batch([typical("1")] * 64, ["1"] * 64, workers=workers)  # start the pool
            clear_caches()
            start = time.perf_counter()
            assert reward.score_batch([texts[name] for name in names], ["2"] * 256, workers=workers) == expected
            seconds = time.perf_counter() - start
            rows.append((f"loops: score_batch of 256 texts at {label}, {workers} worker(s)", f"{seconds:.3f} s"))
    return rows


def load(name):
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


def main():
    golds = [r["answer"] for r in load("math500/test.jsonl")]
    responses = [typical(g) for g in golds]
    rng, order = random.Random(0), list(range(len(golds)))
    while any(i == j for i, j in enumerate(order)):
        rng.shuffle(order)
    shuffled = [golds[j] for j in order]

    rows = [
        ("MATH500 golds vs themselves, 1 process", f"{rate(responses, golds):,.0f} verif/s"),
        ("MATH500 golds vs themselves, score_batch 2 workers", f"{batch_rate(responses, golds, 2):,.0f} verif/s"),
        ("MATH500 shuffled golds (mostly False), 1 process", f"{rate(responses, shuffled):,.0f} verif/s"),
    ]
    worst = 0.0
    for name, response in tqdm(HOSTILE.items(), desc="hostile inputs", leave=False):
        seconds = timed_verify(response, False)
        worst = max(worst, seconds)
        rows.append((f"hostile: {name}", f"{seconds:.4f} s"))
    rows.append(("hostile: worst case", f"{worst:.4f} s"))
    rows += loop_rows()

    print(f"\nreward.py benchmark ({os.cpu_count()} CPUs)\n")
    print("| case | result |\n|---|---|")
    for case, result in rows:
        print(f"| {case} | {result} |")


if __name__ == "__main__":
    main()
