"""torchrun --nproc_per_node 2 tests/_shared_dir_worker.py BASE   (test_startup.py)

Two ranks over gloo check train.out_dir as train.train does: first a folder both see (BASE/shared),
then one folder per rank (BASE/rank0, BASE/rank1: two nodes whose out_dir is local storage). Each
rank prints what the second check raised; exit 0 when the first passed and the second stopped."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dist  # noqa: E402
from config import ConfigError, load_config  # noqa: E402


def main(base: str) -> int:
    cfg = load_config(None, ["model.name_or_path=tiny", "data.train=tiny", "train.device=cpu",
                             "rollout.prompts_per_step=2", "train.dist_timeout_min=2"])
    world = dist.init(cfg)
    dist.check_shared_folder(Path(base) / "shared", world, wait_s=1.0)
    try:
        dist.check_shared_folder(Path(base) / f"rank{world.rank}", world, wait_s=1.0)
    except ConfigError as e:
        print(f"rank {world.rank}: {e}", flush=True)
        dist.close(world)
        return 0
    dist.close(world)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
