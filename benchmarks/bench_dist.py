"""One process vs several (torchrun + FSDP2): the tiny step's time, and memory per rank at scale.

    python benchmarks/bench_dist.py [--steps 5] [--procs 2]

1. Runs benchmarks/bench_step.py on the tiny config in one process (all threads), then under
   `torchrun --nproc_per_node N` (threads split between the processes), back to back, and prints
   the seconds per step of each and their ratio. On a 2-core machine this is no speed claim: the
   same cores do the same work, so the ratio shows what sharding, gathering the sampling copy and
   the collectives cost.
2. Prints the memory table per rank for Qwen2.5-Math-1.5B and -7B at N = 1, 2, 4, 8, computed from
   the models' shapes (dist.bytes_per_param): fp32 weights + gradients + AdamW moments sharded over
   N ranks, plus the full bf16 sampling copy; activations, KV cache and logits chunks come on top.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

from _common import ROOT, machine, table

# Qwen2.5-Math-7B's shape (its config.json; not in ../shared/models, which holds the 1.5B files)
QWEN_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)


def step_seconds(cmd: list[str], env: dict) -> tuple[float, str]:
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    m = re.search(r"\| total step\s*\|\s*([\d.e-]+)", out.stdout)
    return float(m.group(1)), out.stdout


def parameters(**shape) -> int:
    import torch
    from transformers import AutoConfig, Qwen2Config, Qwen2ForCausalLM
    conf = Qwen2Config(**shape) if shape else AutoConfig.from_pretrained(ROOT.parent / "shared" / "models" /
                                                                         "qwen2.5-math-1.5b")
    with torch.device("meta"):
        return sum(p.numel() for p in Qwen2ForCausalLM(conf).parameters())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="random tiny model, small batch")
    args = ap.parse_args(argv)
    import dist
    threads = os.cpu_count() or 1
    common = [str(ROOT / "benchmarks" / "bench_step.py"), "--steps", str(args.steps)] + (["--quick"] if args.quick else [])
    env = {**os.environ}
    one, _ = step_seconds([sys.executable, *common, "--set", f"train.threads={threads}"], env)
    per = max(1, threads // args.procs)
    many, text = step_seconds([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               str(args.procs), *common, "--set", f"train.threads={per}"],
                              {**env, "OMP_NUM_THREADS": str(per)})
    print(machine("cpu"))
    print(table(["run", "threads per process", "s / step", "vs 1 process"], [
        ["1 process", threads, one, "1.00"], [f"{args.procs} processes (FSDP2, gloo)", per, many, f"{many / one:.2f}"]]))
    print()
    rows = []
    for name, n in (("Qwen2.5-Math-1.5B", parameters()), ("Qwen2.5-Math-7B", parameters(**QWEN_7B))):
        for N in (1, 2, 4, 8):
            sharded = n * 16 / N / 2 ** 30
            copy = n * 2 / 2 ** 30
            rows.append([name, f"{n / 1e9:.2f} B", N, f"{16 / N:g}", f"{sharded:.1f}", f"{copy:.1f}",
                         f"{n * dist.bytes_per_param(N, 2) / 2 ** 30:.1f}"])
    print(table(["model", "parameters", "GPUs", "state bytes / param / rank", "sharded states GiB / rank",
                 "bf16 sampling copy GiB", "total GiB / rank (before activations)"], rows))


if __name__ == "__main__":
    main()
