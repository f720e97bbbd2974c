"""One optimizer step on a fixed rollout batch, or whole train_steps, in one process or as one rank of
torchrun (test_dist.py).

    python tests/_dist_worker.py BATCH MODEL_DIR OUT                      # one process, all rows
    torchrun --nproc_per_node 2 tests/_dist_worker.py BATCH MODEL_DIR OUT  # each rank: its share of groups
    python tests/_dist_worker.py --steps CASES OUT                        # train_steps of each case's config

BATCH holds, per case, a scored rollout batch (policy groups, then echo-only groups) and the config
overrides. Each rank takes its contiguous share of the policy groups and of the echo-only groups, runs
the stages after sampling (advantages, old policy, EchoClips, update) and rank 0 saves the full
parameters after the step and the step's reduced metrics to OUT.
"""
import json
import os
import sys
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dist  # noqa: E402
import echorl  # noqa: E402
import metrics  # noqa: E402
import train  # noqa: E402
from config import load_config  # noqa: E402
from rollout import Rollout, batch_stats, concat  # noqa: E402


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
        stats = train.compute_advantages(run, mine) | train.old_policy(run, mine)
        if cfg.echo.enabled:
            stats |= echorl.echo_clips(run, mine)
        stats |= train.update(run, mine) | batch_stats(mine)
        stats = metrics.reduce(stats, world)
        params = dist.full_state_dict(run.model, world)
        if world.main:
            results[name] = {"params": {k: v.detach().cpu().clone() for k, v in params.items()}, "stats": stats}
        world.barrier()
    if int(os.environ.get("RANK", 0)) == 0:
        torch.save(results, out_file)
    dist.close(world)


def problem_reward(texts: list[str], golds: list[str]) -> list[float]:
    """Rewards that depend on the text and the problem alone (so on no rank or batch): a third of the
    problems all correct, a third all wrong, a third decided by the response."""
    kind = lambda g: zlib.crc32(g.encode()) % 3
    return [1.0 if kind(g) == 0 else 0.0 if kind(g) == 1 else float(zlib.crc32(t.encode()) % 2)
            for t, g in zip(texts, golds)]


def steps(cases_file: str, out_file: str, n_steps: int = 2) -> None:
    """train.setup + n train_steps per case (config overrides from CASES_FILE, JSON); rank 0 saves the
    parameters and every step's metrics."""
    results = {}
    for name, overrides in json.loads(Path(cases_file).read_text()).items():
        cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), overrides)
        world = dist.init(cfg)
        run = train.setup(cfg, world=world, reward_fn=problem_reward)
        history = [train.train_step(run)[0] for _ in range(n_steps)]
        params = dist.full_state_dict(run.model, world)
        if world.main:
            results[name] = {"params": {k: v.detach().cpu().clone() for k, v in params.items()}, "stats": history}
        world.barrier()
    if int(os.environ.get("RANK", 0)) == 0:
        torch.save(results, out_file)
    dist.close(world)


if __name__ == "__main__":
    if sys.argv[1] == "--steps":
        steps(sys.argv[2], sys.argv[3])
    else:
        main(*sys.argv[1:4])
