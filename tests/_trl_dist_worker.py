"""One EchoGRPOTrainer optimizer step on test_echorl_trl.py's fixed batch, as one rank of torchrun (gloo on CPU):

    torchrun --standalone --nproc_per_node 2 tests/_trl_dist_worker.py MODEL_DIR OUT

Each process holds 6 of the 12 rows (test_echorl_trl.STRADDLE); rank 0 saves (parameter update, the
step's logged metrics) to OUT/update.pt.
"""
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402

from echorl import EchoConfig  # noqa: E402
from rollout import load_tokenizer  # noqa: E402
from test_echorl_trl import STRADDLE, left_padded, make_dataset, one_sgd_step  # noqa: E402

if __name__ == "__main__":
    model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    tok = left_padded(load_tokenizer(model_dir))
    update, log = one_sgd_step(model_dir, tok, make_dataset(tok, STRADDLE["order"]), out,
                               EchoConfig(**STRADDLE["echo"]), shuffle_dataset=STRADDLE["shuffle_dataset"],
                               per_device_train_batch_size=6)
    if torch.distributed.get_rank() == 0:
        torch.save((update, log), out / "update.pt")
