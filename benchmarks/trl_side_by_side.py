"""Our loop (train.py) and EchoGRPOTrainer (echorl_trl.py) side by side on the tiny task.

Both start from the same warm start (configs/tiny.yaml's), train on the same prompts in the same
order with the same settings (GRPO + EchoRL at coef 0.001, G = 8, 48 new tokens, temperature 1, Adam at
lr 1e-4 constant, grad clip 1, two optimizer steps per batch), one after the other in this process.
Held-out accuracy is measured the same way for both (eval.evaluate: 200 held-out problems, avg@4 at
temperature 1, seed 0), and s/step is the wall time of the training steps over their number.

Differences that stay: each samples with its own engine (ours: the slot sampler; TRL: HF generate),
and TRL scores truncated completions with the verifier, so our loop runs with reward.truncated=score.

Usage (from the repo root; needs requirements-trl.txt):
    python benchmarks/trl_side_by_side.py [--steps 20] [--prompts 16] [--eval-limit 200]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from _common import machine, table, tiny_config  # noqa: E402  (puts the repo root on sys.path)

import tiny  # noqa: E402
import train  # noqa: E402
from eval import evaluate  # noqa: E402
from rollout import eos_ids, load_tokenizer, render_prompts  # noqa: E402


def held_out(model, tok, problems, cfg) -> tuple[float, list[list[bool]]]:
    """avg@4 at temperature 1, and each sample's verdict (every model draws from the same random streams)."""
    model.eval()
    res = evaluate(model, tok, problems, n=4, temperature=1.0, max_new_tokens=cfg.rollout.max_new_tokens,
                   template=cfg.data.template, seed=0, ks=(4,), progress=False)
    return res["avg@n"], [r["correct"] for r in res["records"]]


def distance(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """||a - b|| over all parameters (L2)."""
    pb = dict(b.named_parameters())
    return float(sum(((p.detach() - pb[n].detach()) ** 2).sum() for n, p in a.named_parameters()) ** 0.5)


def run_ours(cfg) -> tuple[torch.nn.Module, float, dict]:
    run = train.setup(cfg)
    t0 = time.perf_counter()
    last = {}
    for _ in range(cfg.train.steps):
        last, _ = train.train_step(run)
    return run.model, (time.perf_counter() - t0) / cfg.train.steps, last


def run_trl(cfg, warm: Path, out: Path) -> tuple[torch.nn.Module, float, dict]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig

    from echorl_trl import EchoGRPOTrainer, verifier_reward

    tok = load_tokenizer(str(warm))
    tok.padding_side = "left"
    stream = train.train_stream(cfg)  # the same prompts, in the same order, as our loop draws them
    problems = [p for _ in range(cfg.train.steps) for p in stream.next(cfg.rollout.prompts_per_step)]
    prompts = render_prompts([p.question for p in problems], tok, cfg.data.template)
    ds = Dataset.from_list([{"prompt": q, "answer": p.answer} for q, p in zip(prompts, problems)])
    model = AutoModelForCausalLM.from_pretrained(warm, dtype=torch.float32)
    model.generation_config.eos_token_id = eos_ids(tok, model)  # stop where our loop stops
    rows = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    a, t = cfg.algo, cfg.train
    args = GRPOConfig(
        output_dir=str(out), num_generations=cfg.rollout.group_size, max_completion_length=cfg.rollout.max_new_tokens,
        temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
        per_device_train_batch_size=rows // t.mini_batches, gradient_accumulation_steps=1,
        steps_per_generation=t.mini_batches, max_steps=t.steps * t.mini_batches, shuffle_dataset=False,
        learning_rate=t.lr, lr_scheduler_type="constant", weight_decay=t.weight_decay, adam_beta1=t.betas[0],
        adam_beta2=t.betas[1], max_grad_norm=t.grad_clip, loss_type="grpo", scale_rewards="group",
        epsilon=a.eps_low, epsilon_high=a.eps_high, beta=0.0, bf16=False, use_cpu=True, seed=t.seed,
        report_to=[], save_strategy="no", logging_steps=t.mini_batches, disable_tqdm=True)
    trainer = EchoGRPOTrainer(model=model, reward_funcs=[verifier_reward], args=args, train_dataset=ds,
                              processing_class=tok, echo=cfg.echo)
    t0 = time.perf_counter()
    trainer.train()
    per_step = (time.perf_counter() - t0) / t.steps
    logs = [h for h in trainer.state.log_history if "echo/clips" in h]
    return trainer.model, per_step, logs[-1] if logs else {}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="RL steps (batches of prompts) for each")
    ap.add_argument("--prompts", type=int, default=16, help="prompts per step (x 8 rollouts)")
    ap.add_argument("--eval-limit", type=int, default=200, help="held-out problems")
    args = ap.parse_args(argv)

    cfg = tiny_config([f"train.steps={args.steps}", f"rollout.prompts_per_step={args.prompts}",
                       "reward.truncated=score", "train.device=cpu"])
    warm = tiny.warm_start(cfg.tiny)
    cfg.model.name_or_path = str(warm)
    tok = load_tokenizer(str(warm))
    problems = tiny.heldout(cfg.tiny, args.eval_limit)
    print(machine("cpu"))
    print(f"{args.steps} steps of {args.prompts} prompts x G={cfg.rollout.group_size}, "
          f"{cfg.train.mini_batches} optimizer steps each, GRPO + EchoRL (coef {cfg.echo.coef})")

    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(warm, dtype=torch.float32)
    start, _ = held_out(base, tok, problems, cfg)
    ours, ours_s, ours_last = run_ours(cfg)
    ours_acc, ours_rec = held_out(ours, tok, problems, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        trl_model, trl_s, trl_last = run_trl(cfg, warm, Path(tmp))
    trl_acc, trl_rec = held_out(trl_model, tok, problems, cfg)

    print(table(["", "held-out avg@4", "s/step", "clips (last step)", "||theta - warm start||"], [
        ["warm start", start, "", "", ""],
        ["train.py", ours_acc, ours_s, ours_last.get("echo/n_clips", 0.0), distance(ours, base)],
        ["EchoGRPOTrainer", trl_acc, trl_s, trl_last.get("echo/clips", 0.0), distance(trl_model, base)],
    ]))
    differ = sum(x != y for a, b in zip(ours_rec, trl_rec) for x, y in zip(a, b))
    print(f"||theta_train.py - theta_TRL|| = {distance(ours, trl_model):.4g}; held-out samples scored differently "
          f"by the two: {differ} of {4 * len(problems)}")


if __name__ == "__main__":
    main()
