"""One optimizer step on a fixed rollout batch, in one process or as one rank of torchrun (test_dist.py).

    python tests/_dist_worker.py BATCH MODEL_DIR OUT                      # one process, all rows
    torchrun --nproc_per_node 2 tests/_dist_worker.py BATCH MODEL_DIR OUT  # each rank: its share of groups

BATCH holds, per case, a scored rollout batch (policy groups, then echo-only groups) and the config
overrides. Each rank takes its contiguous share of the policy groups and of the echo-only groups, runs
the stages after sampling (advantages, old policy, EchoClips, update) and rank 0 saves the full
parameters after the step and the step's reduced metrics to OUT.
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dist  # noqa: E402
import train  # noqa: E402
from config import load_config  # noqa: E402
from rollout import Rollout, concat  # noqa: E402


def share(batch, G: int, world) -> "train.Rollout":
    """This rank's groups: its slice of the policy groups, then its slice of the echo-only groups."""
    parts = []
    for policy in (True, False):
        rows = torch.nonzero((batch.in_policy > 0) == policy).squeeze(-1)
        groups = rows.view(-1, G)
        n = len(groups) // world.size
        mine = groups[world.rank * n:(world.rank + 1) * n].reshape(-1)
        if len(mine):
            parts.append(batch.select(mine))
    out = concat(parts, 0) if len(parts) > 1 else parts[0]
    out.group = torch.arange(len(out) // G).repeat_interleave(G)
    return out


def main(batch_file: str, model_dir: str, out_file: str) -> None:
    with torch.serialization.safe_globals([Rollout]):  # the test's own batches: tensors inside a Rollout
        cases = torch.load(batch_file, weights_only=True)
    results = {}
    for name, (batch, overrides) in cases.items():
        cfg = load_config(None, [f"model.name_or_path={model_dir}", "data.train=tiny", "train.threads=1",
                                 "eval.benchmarks=[]", *overrides])
        world = dist.init(cfg)
        run = train.setup(cfg, world=world)
        mine = share(batch, cfg.rollout.group_size, world)
        train.compute_advantages(mine, cfg, world)
        train.old_policy(run, mine)
        stats = {}
        if cfg.echo.enabled:
            stats.update(train.echo_clips(mine, cfg, run.delims, run.eos, run.gen))
        stats.update(train.update(run, mine))
        stats.update(train.batch_stats(mine))
        stats = dist.reduce_metrics(stats, world)
        params = dist.full_state_dict(run.model, world)
        if world.main:
            results[name] = {"params": {k: v.detach().cpu().clone() for k, v in params.items()}, "stats": stats}
        world.barrier()
    if int(os.environ.get("RANK", 0)) == 0:
        torch.save(results, out_file)
    dist.close(world)


if __name__ == "__main__":
    main(*sys.argv[1:4])
