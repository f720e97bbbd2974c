"""Exploratory follow-up to benchmarks/study.py, registered after the primary's result and before its own run:
does EchoRL help where its premise holds? The same branches (paper preset, lambda 0 vs 0.01, paired by seed,
held-out avg@16 after 24 steps, TOST at +/-0.02), but from the fork warm start itself, where the decision line
still has stakes (+0.14 in the primary's premise table) and few groups are all-correct (0.14).

    python benchmarks/study_followup.py            # ~6 min on 2 cores once study.py built the fork warm start

Writes benchmarks/results/study/followup.{md,json}. Runs live under runs/study_followup.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import study
from config import load_config
from stats import verdict

ARMS = {"lambda=0": study.PRIMARY["lambda=0"], "lambda=0.01": study.PRIMARY["lambda=0.01"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(study.ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--out", default="runs/study_followup")
    ap.add_argument("--results", default=str(study.ROOT / "benchmarks" / "results" / "study"))
    args = ap.parse_args(argv)
    args.overrides = []
    t0 = time.perf_counter()
    base = load_config(args.config, study.TASKS["fork"] + study.COMMON)
    warm = Path(study.models.model_source(base))  # the fork warm start (built here if study.py has not)
    walls, done = {}, [0]
    b = study.branches(args.config, "fork", warm, ARMS, args.seeds, args, walls, done)
    wall = time.perf_counter() - t0
    head = (f"Follow-up (exploratory, registered after the primary's result): `python benchmarks/study_followup.py` "
            f"(code {study.code_hash()}) on {study.cpu_model()}, {wall / 60:.1f} min. Branches from the fork warm "
            f"start (no burn-in), otherwise as the primary.")
    text = "\n\n".join([head, "\n".join(study.paired_table(b["acc"], "lambda=0", ["lambda=0.01"])),
                        "Per seed:\n\n" + "\n".join(study.per_seed_table(b["acc"]))]) + "\n"
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    (res / "followup.md").write_text(text)
    d = [x - y for x, y in zip(b["acc"]["lambda=0.01"], b["acc"]["lambda=0"])]
    (res / "followup.json").write_text(json.dumps({"code": study.code_hash(), "cpu": study.cpu_model(), "wall_s": wall,
                                                   "acc": b["acc"], "runs": b["runs"],
                                                   "verdict": verdict(d, study.MARGIN)}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
