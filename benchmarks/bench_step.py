"""Seconds per phase of a training step on the tiny config (configs/tiny.yaml).

Runs a few steps of train.train_step on a run built by train.setup (as train.train builds it),
and averages the `time/*` metrics that train_step records. The first step is a warm-up and is
left out of the means.

Usage (from the repo root):
    python benchmarks/bench_step.py [--quick] [--device cpu|cuda] [--steps 5] [--set key=value ...]
    torchrun --nproc_per_node 2 benchmarks/bench_step.py ...     # the same step over 2 processes (FSDP2)
--quick uses a random tiny model (the warm start takes minutes on its first use) and a small batch.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from _common import machine, random_model_dir, resolve_device, table, tiny_config  # noqa: E402

PHASES = ["generate", "score", "advantages", "old_logprobs", "echo_select", "update"]
QUICK = ["rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=16",
         "train.micro_batch_size=8", "reward.workers=1"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="random tiny model, small batch, 2 steps (smoke test)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=5, help="measured steps (after one warm-up step)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, as in train.py")
    args = ap.parse_args(argv)

    import train
    device = resolve_device(args.device)
    cfg = tiny_config((QUICK if args.quick else []) + [f"train.device={device}", *args.overrides])
    steps = 2 if args.quick else args.steps
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            cfg.model.name_or_path = str(random_model_dir(cfg, Path(tmp)))
        run = train.setup(cfg)
    say = print if run.world.main else (lambda *a, **k: None)
    say(machine(device) + (f" | {run.world.size} processes" if run.world.size > 1 else ""))
    say(f"model: {'random tiny' if args.quick else 'warm-started tiny'}; algo {cfg.algo.name}"
          f"{' + EchoRL' if cfg.echo.enabled else ''}, {cfg.rollout.prompts_per_step} prompts x "
          f"G={cfg.rollout.group_size}, max_new_tokens {cfg.rollout.max_new_tokens}, "
          f"micro-batch {cfg.train.micro_batch_size}, {steps} measured steps after 1 warm-up")

    rows = []
    for i in tqdm(range(1 + steps), desc="train steps", disable=not run.world.main):
        t0 = time.perf_counter()
        metrics, _ = train.train_step(run)
        if device == "cuda":
            torch.cuda.synchronize()
        metrics["time/step"] = time.perf_counter() - t0
        if i > 0:
            rows.append(metrics)

    mean = lambda k: sum(m.get(k, 0.0) for m in rows) / len(rows)
    total = mean("time/step")
    out = [[p, mean(f"time/{p}"), f"{100 * mean(f'time/{p}') / total:.1f}%"] for p in PHASES]
    other = total - sum(r[1] for r in out)
    out += [["other (bookkeeping, metrics)", other, f"{100 * other / total:.1f}%"], ["total step", total, "100%"]]
    say()
    say(table(["phase", "mean s", "share of step"], out))
    say(f"mean over steps: reward {mean('reward'):.3f}, frac_degenerate {mean('frac_degenerate'):.2f}, "
          f"response_len {mean('response_len'):.1f}, EchoClips {mean('echo/n_clips'):.1f}, rows {mean('batch_rows'):.0f}")
    import dist
    dist.close(run.world)


if __name__ == "__main__":
    main()
