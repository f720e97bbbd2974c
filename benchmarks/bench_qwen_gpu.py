"""Training steps of configs/qwen1.5b.yaml with a random-init model of the real shape (GPU check).

The model is Qwen2ForCausalLM built from a config.json (no weights needed) with the real
tokenizer, so every tensor has its real size: vocabulary 151,936, 28 layers, hidden 1536.
A random model never answers correctly, so the verifier is replaced by a reward function with hand-made
rewards (_common.hand_reward_fn: all-success, mixed and all-fail groups, passed to train.setup) and the
step does everything a real one does:
advantages, EchoClips, the full PPO update. Random text rarely stops at EOS, so nearly every
response runs to max_new_tokens: generation and memory are measured at their worst case
(reward.truncated=score, so the hand-made rewards of truncated responses stand).

Reports per step: generated tokens per second, seconds per phase, peak GPU memory
(torch.cuda.max_memory_allocated). With --probe-len, one more step at that response length and
a smaller batch shows the update's peak memory at the config's full response length.

Usage (from the repo root, on a GPU):
    python benchmarks/bench_qwen_gpu.py --model-dir ../shared/models/qwen2.5-math-1.5b \\
        --train-file ../shared/data/math/train.jsonl --steps 2 --max-new-tokens 512 --probe-len 3072
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from _common import ROOT, hand_reward_fn, machine, resolve_device, sync, table  # noqa: E402

PHASES = ["generate", "score", "advantages", "old_logprobs", "echo_select", "update"]


def run_steps(cfg, n: int, label: str) -> list[dict]:
    """n training steps of a run built by train.setup (model.init=random: the real shape, random weights)
    with hand-made rewards (a random model never answers correctly)."""
    import train
    run = train.setup(cfg, reward_fn=hand_reward_fn(cfg.rollout.group_size))
    rows = []
    for i in range(n):
        t0 = time.perf_counter()
        m, batch = train.train_step(run)
        sync(batch.response_ids.device.type)
        m["time/step"] = time.perf_counter() - t0
        m["gen_tokens"] = float(batch.response_mask.sum())
        m["tokens_per_s"] = m["gen_tokens"] / m["time/generate"]
        print(f"[{label}] step {i + 1}: " + json.dumps({k: round(v, 4) for k, v in m.items()}), flush=True)
        rows.append(m)
    del run
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "qwen1.5b.yaml"))
    ap.add_argument("--model-dir", default=str(ROOT.parent / "shared" / "models" / "qwen2.5-math-1.5b"),
                    help="folder with the real config.json and tokenizer files")
    ap.add_argument("--train-file", default=None, help="MATH-style jsonl (default: the config's data.train)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--probe-len", type=int, default=0, help="one more step at this response length, 2 prompts")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--layers", type=int, default=0, help="keep only this many layers (CPU smoke test)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)

    from config import load_config
    device = resolve_device(args.device)
    base = [f"train.device={device}", f"rollout.max_new_tokens={args.max_new_tokens}", "eval.benchmarks=[]",
            "log.log_rollouts_every=0", "reward.workers=1", "reward.truncated=score",
            f"model.name_or_path={args.model_dir}", "model.init=random"]
    if args.layers:
        base.append(f"model.config_overrides={{num_hidden_layers: {args.layers}, max_window_layers: {args.layers}}}")
    if args.train_file:
        base.append(f"data.train={args.train_file}")
    cfg = load_config(args.config, base + args.overrides)
    print(machine(device), flush=True)
    print(f"random-init model of {args.model_dir}'s shape, {cfg.model.dtype} weights, autocast "
          f"{cfg.model.autocast}; {cfg.rollout.prompts_per_step} prompts x G={cfg.rollout.group_size}, gen batch "
          f"{cfg.rollout.slots}, micro-batch {cfg.train.micro_batch_size}", flush=True)

    rows = run_steps(cfg, args.steps, f"max_new_tokens={args.max_new_tokens}")
    out = [[f"{i + 1}", r["gen_tokens"], r["tokens_per_s"], *(r.get(f"time/{p}", 0.0) for p in PHASES),
            r["time/step"], r.get("mem/peak_gib", 0.0)] for i, r in enumerate(rows)]
    headers = ["step", "gen tokens", "gen tok/s", *PHASES, "step s", "peak GiB"]
    if args.probe_len:
        pcfg = load_config(args.config, base + args.overrides + [
            f"rollout.max_new_tokens={args.probe_len}", "rollout.prompts_per_step=2", "rollout.slots=16"])
        r = run_steps(pcfg, 1, f"probe max_new_tokens={args.probe_len}")[0]
        out.append([f"probe ({args.probe_len} tok, 2x{pcfg.rollout.group_size} rows)", r["gen_tokens"],
                    r["tokens_per_s"], *(r.get(f"time/{p}", 0.0) for p in PHASES), r["time/step"], r.get("mem/peak_gib", 0.0)])
    print()
    print(table(headers, out))
    if device == "cuda":
        print(f"GPU total memory {torch.cuda.get_device_properties(0).total_memory / 2 ** 30:.1f} GiB; "
              f"peak reserved by the caching allocator {torch.cuda.max_memory_reserved() / 2 ** 30:.1f} GiB")


if __name__ == "__main__":
    main()
