"""The RLVR loop, single process:

    prompts -> rollout.generate -> reward.score_batch -> advantages (+ DAPO dynamic sampling)
            -> old log-probs & token entropies (no grad) -> EchoClips -> micro-batched PPO update

Usage:
    python train.py --config configs/tiny.yaml [--set echo.coef=0.01 ...] [--resume]
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import reward
from checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from config import Config, load_config, to_dict
from echorl import echo_loss, select_clips
from entropy import delimiter_table, response_logprobs, step_ids
from losses import ADVANTAGES, Norm, aggregate, constant_groups, kl_k3, overlong_penalty, policy_loss
from rollout import Rollout, concat, eos_ids, generate, render_prompts

# ----------------------------------------------------------------------------------------
# Setup: model, tokenizer, problem streams


def tiny_settings(cfg: Config):
    """(TaskConfig, ModelSize, WarmStart) of the embedded tiny model from the config."""
    import tiny
    t = cfg.tiny
    return (tiny.TaskConfig(t.min_ops, t.max_ops, t.max_value, t.max_operand),
            tiny.ModelSize(t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
                           t.intermediate_size),
            tiny.WarmStart(steps=t.sft_steps, batch_size=t.sft_batch_size, lr=t.sft_lr, habit=t.sft_habit))


def model_path(cfg: Config) -> str:
    """'tiny' -> the cached warm-started tiny model folder (built on first use); else as given."""
    if cfg.model.name_or_path != "tiny":
        return cfg.model.name_or_path
    import tiny
    return str(tiny.warm_start(*tiny_settings(cfg), cfg.tiny.cache_dir, seed=0))


def autocast(cfg: Config, model):
    """Mixed precision for forwards; weights and optimizer states keep `model.dtype`."""
    if cfg.model.autocast == "none":
        return nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=getattr(torch, cfg.model.autocast))


def load_model(path: str, cfg: Config, device: str):
    """Policy (or reference) model and tokenizer, with eval.py's loader (one code path)."""
    from eval import load_model as load
    model, tok = load(path, cfg.model.dtype, device, cfg.model.attn_implementation)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tok


def train_stream(cfg: Config):
    if cfg.data.train == "tiny":
        import tiny
        return tiny.ProblemStream(tiny_settings(cfg)[0], cfg.train.seed)
    from data import ListStream, load_problems
    return ListStream(load_problems(cfg.data.train, cfg.data.question_key, cfg.data.answer_key),
                      cfg.train.seed, cfg.data.shuffle)


def eval_problems(cfg: Config) -> dict[str, list]:
    from data import load_benchmark
    limit = cfg.eval.limit or None
    out = {}
    for name in cfg.eval.benchmarks:
        if name == "tiny":
            import tiny
            out[name] = tiny.make_split(tiny_settings(cfg)[0], limit or 200, "heldout")
        else:
            out[name] = load_benchmark(name, cfg.eval.data_dir, limit)
    return out

# ----------------------------------------------------------------------------------------
# Rollout + reward (+ DAPO dynamic sampling)


@contextmanager
def timer(times: dict, key: str):
    t0 = time.perf_counter()
    yield
    times[key] = times.get(key, 0.0) + time.perf_counter() - t0


def sample_groups(model, tok, problems, cfg: Config, times: dict) -> Rollout:
    """Generate G responses per problem and score them: fills correct and rewards."""
    rc = cfg.rollout
    prompts = render_prompts([p.question for p in problems], tok, cfg.data.template, cfg.data.system_prompt)
    model.eval()
    with timer(times, "generate"), autocast(cfg, model):
        batch = generate(model, tok, prompts, group_size=rc.group_size, max_new_tokens=rc.max_new_tokens,
                         temperature=rc.temperature, top_p=rc.top_p, batch_size=rc.gen_batch_size or None)
    golds = [p.answer for p in problems for _ in range(rc.group_size)]
    with timer(times, "score"):
        scores = torch.tensor(reward.score_batch(batch.texts, golds, workers=cfg.reward.workers))
    correct = scores >= 1.0
    if cfg.reward.truncated == "zero":
        scores, correct = scores.masked_fill(batch.truncated.cpu(), 0.0), correct & ~batch.truncated.cpu()
    a = cfg.algo
    if a.overlong_buffer:
        buf = rc.max_new_tokens // 4 if a.overlong_buffer < 0 else a.overlong_buffer
        scores = scores + overlong_penalty(batch.response_lengths.cpu(), rc.max_new_tokens, buf, a.overlong_penalty)
    batch.correct, batch.rewards = correct, scores
    batch.extras.update(golds=golds, prompts=[p for p in prompts for _ in range(rc.group_size)])
    return batch


def collect(model, tok, stream, cfg: Config, times: dict, stats: dict) -> Rollout:
    """One step's batch. With dynamic sampling, zero-std groups are dropped and refilled from new
    prompts (at most `max_sampling_rounds` extra rounds); with EchoRL on and keep_dropped_groups,
    dropped all-success groups stay in the batch with in_policy = 0, so they feed EchoClips only."""
    G, n_want = cfg.rollout.group_size, cfg.rollout.prompts_per_step
    kept, echo_only, n_kept, n_echo = [], [], 0, 0
    rounds = 1 + (cfg.algo.max_sampling_rounds if cfg.algo.dynamic_sampling else 0)
    for r in range(rounds):
        batch = sample_groups(model, tok, stream.next(n_want if r == 0 else n_want - n_kept), cfg, times)
        live = ~constant_groups(batch.rewards, G)                                   # [n_groups]
        g_correct = batch.correct.view(-1, G)
        if r == 0:
            first = batch
            stats["frac_all_success"] = float(g_correct.all(-1).float().mean())
            stats["frac_all_fail"] = float((~g_correct).all(-1).float().mean())
            stats["frac_degenerate"] = float((~live).float().mean())
        if not cfg.algo.dynamic_sampling:
            kept.append(batch)
            break
        rows = lambda gmask: torch.nonzero(gmask.repeat_interleave(G)).squeeze(-1)
        take = live & (live.cumsum(0) <= n_want - n_kept)
        kept.append(batch.select(rows(take)))
        n_kept += int(take.sum())
        if cfg.echo.enabled and cfg.echo.keep_dropped_groups:
            drop = ~live & g_correct.all(-1) & ((~live & g_correct.all(-1)).cumsum(0) <= n_want - n_echo)
            if drop.any():
                echo_only.append(batch.select(rows(drop)))
                n_echo += int(drop.sum())
        if n_kept >= n_want:
            break
    stats["sampling_rounds"] = float(r + 1)
    parts = [b for b in kept if len(b)] + [b for b in echo_only if len(b)]
    for b in parts:
        b.in_policy = torch.ones(len(b))
    for b in echo_only:
        b.in_policy = torch.zeros(len(b))
    if not parts:  # nothing survived dynamic sampling: round 0's batch, outside the policy loss
        first.in_policy = torch.zeros(len(first))
        parts = [first]
    batch = concat(parts, tok.pad_token_id) if len(parts) > 1 else parts[0]
    batch.group = torch.arange(len(batch) // G).repeat_interleave(G).to(batch.response_ids.device)
    return batch

# ----------------------------------------------------------------------------------------
# Old-policy pass, EchoClips, update


def micro_batches(n: int, size: int) -> list[torch.Tensor]:
    return [torch.arange(s, min(s + size, n)) for s in range(0, n, size)]


def mini_batch_rows(in_policy: torch.Tensor, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(policy rows, echo-only rows) of each of the k mini-batches. Echo-only rows (in_policy = 0:
    DAPO's dropped all-success groups kept for EchoRL) are split apart from the policy rows, so
    each mini-batch holds the same policy rows as with EchoRL off, plus its share of echo-only rows."""
    ip = in_policy.cpu()
    pol, echo = torch.nonzero(ip > 0).squeeze(-1), torch.nonzero(ip <= 0).squeeze(-1)
    pol = list(pol.chunk(k)) if len(pol) else [pol]          # chunk may give fewer than k pieces
    echo = echo.tensor_split(len(pol) if len(pol[0]) else k)  # as many pieces: no echo-only extra step
    if not len(pol[0]):
        pol = pol * len(echo)
    return [(p, e) for p, e in zip(pol, echo) if len(p) + len(e)]


def update_slices(in_policy: torch.Tensor, cfg: Config, keep: torch.Tensor | None = None) -> list[list[torch.Tensor]]:
    """Row indices of each mini-batch's micro-batches, in update order: the policy rows' micro-batches,
    then the echo-only rows'. The old-policy pass uses the same slices, so the first update sees
    bit-identical log-probs (ratio == 1 exactly). `keep` (bool [B]): the echo-only rows worth a
    forward in the update, those holding clip tokens (the others feed neither loss)."""
    size, out = cfg.train.micro_batch_size, []
    for pol, echo in mini_batch_rows(in_policy, cfg.train.mini_batches):
        if keep is not None:
            echo = echo[keep.cpu()[echo]]
        out.append([pol[i] for i in micro_batches(len(pol), size)] + [echo[i] for i in micro_batches(len(echo), size)])
    return out


@torch.no_grad()
def score_old_policy(model, ref_model, batch: Rollout, cfg: Config, times: dict) -> None:
    """Old log-probs and entropies in the same micro-batches the update uses, so the first
    update sees ratio == 1 exactly (method.md pitfall 3)."""
    model.eval()
    lps, ents, refs = [], [], []
    slices = [i for mini in update_slices(batch.in_policy, cfg) for i in mini]
    with timer(times, "old_logprobs"):
        for idx in slices:
            mb = batch.select(idx)
            with autocast(cfg, model):
                lp, ent = response_logprobs(model, mb, temperature=cfg.rollout.temperature or 1.0,
                                            chunk_size=cfg.train.logprob_chunk, with_entropy=True)
            lps.append(lp)
            ents.append(ent)
            if ref_model is not None:
                with autocast(cfg, ref_model):
                    refs.append(response_logprobs(ref_model, mb, temperature=cfg.rollout.temperature or 1.0,
                                                  chunk_size=cfg.train.logprob_chunk)[0])
    order = torch.cat(slices).argsort()
    batch.old_logprobs, batch.entropies = torch.cat(lps)[order], torch.cat(ents)[order]
    batch.ref_logprobs = torch.cat(refs)[order] if refs else None


def accumulate_gradients(model, sub: Rollout, cfg: Config, slices: list[torch.Tensor] | None = None) -> dict:
    """Backward the combined loss of one mini-batch, micro-batch by micro-batch (grads accumulate).

    The mini-batch is the rows `slices` of `sub` (its micro-batches), by default all of `sub`.
    L = policy loss (+ kl_coef * KL) (- entropy_coef * entropy) (+ EchoRL clip-SFT loss).
    Normalisers are per mini-batch (Norm, clip-token count), so the gradient does not depend on
    the micro-batch size (method.md pitfall 4). The echo term reuses this forward's log-probs: no extra pass.
    """
    a, T = cfg.algo, cfg.rollout.temperature or 1.0
    if slices is None:
        slices = micro_batches(len(sub), cfg.train.micro_batch_size)
    rows = torch.cat(slices) if slices else torch.zeros(0, dtype=torch.long)
    pg_mask = sub.response_mask * sub.in_policy[:, None].to(sub.response_mask)           # [B, R]
    norm = Norm.of(pg_mask[rows.to(pg_mask.device)], cfg.rollout.max_new_tokens)
    echo_on = cfg.echo.enabled and sub.clip_mask is not None
    n_clip = float(sub.clip_mask[rows.to(sub.clip_mask.device)].sum()) if echo_on else 0.0
    st = {"loss_pg": 0.0, "loss_echo": 0.0, "kl": 0.0, "clip_low": 0.0, "clip_high": 0.0}
    for idx in slices:
        mb, m = sub.select(idx), pg_mask[idx.to(pg_mask.device)]
        with autocast(cfg, model):
            logp, ent = response_logprobs(model, mb, temperature=T, chunk_size=cfg.train.logprob_chunk,
                                          with_entropy=a.entropy_coef > 0)
        loss, clip = policy_loss(logp, mb.old_logprobs, mb.advantages, m, policy_loss=a.policy_loss,
                                 aggregation=a.aggregation, eps_low=a.eps_low, eps_high=a.eps_high,
                                 norm=norm, dual_clip=a.dual_clip)
        st["loss_pg"] += float(loss.detach())
        st["clip_low"] += float(clip["clip_low"])
        st["clip_high"] += float(clip["clip_high"])
        if mb.ref_logprobs is not None and a.kl_coef > 0:
            kl = aggregate(kl_k3(logp, mb.ref_logprobs), m, a.aggregation, norm)
            loss = loss + a.kl_coef * kl
            st["kl"] += float(kl.detach())
        if a.entropy_coef > 0:
            loss = loss - a.entropy_coef * aggregate(ent, m, a.aggregation, norm)
        if echo_on and n_clip > 0:
            le = echo_loss(logp, mb.clip_mask, cfg.echo.coef, n_clip)
            loss = loss + le
            st["loss_echo"] += float(le.detach())
        loss.backward()
    st["clip_low"] /= norm.n_tokens
    st["clip_high"] /= norm.n_tokens
    return st


def update(model, opt, sched, batch: Rollout, cfg: Config, times: dict) -> dict:
    """ppo_epochs x mini_batches optimizer steps over the batch, each with grad clipping."""
    model.train()
    sums, n_opt = {}, 0
    keep = None
    if cfg.echo.enabled and batch.clip_mask is not None:  # echo-only rows without a clip feed neither loss
        keep = (batch.in_policy > 0) | (batch.clip_mask.sum(-1) > 0)
    with timer(times, "update"):
        for _ in range(cfg.train.ppo_epochs):
            for slices in update_slices(batch.in_policy, cfg, keep):
                opt.zero_grad(set_to_none=True)
                st = accumulate_gradients(model, batch, cfg, slices)
                st["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip))
                opt.step()
                sched.step()
                n_opt += 1
                for k, v in st.items():
                    sums[k] = sums.get(k, 0.0) + v
        opt.zero_grad(set_to_none=True)  # no gradient buffers held through the next rollout
    out = {k: v / n_opt for k, v in sums.items()}
    out["clip_frac_low"], out["clip_frac_high"] = out.pop("clip_low"), out.pop("clip_high")
    return {**out, "lr": sched.get_last_lr()[0]}


def train_step(model, ref_model, opt, sched, tok, stream, cfg: Config, delims, eos, gen) -> tuple[dict, Rollout]:
    times, stats = {}, {}
    cuda = next(model.parameters()).is_cuda
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    batch = collect(model, tok, stream, cfg, times, stats)
    dev = batch.response_ids.device
    with timer(times, "advantages"):
        pol = batch.in_policy > 0  # echo-only rows never enter the policy loss nor its batch statistics
        adv = torch.zeros(len(batch))
        if pol.any():
            adv[pol] = ADVANTAGES[cfg.algo.advantage](batch.rewards[pol].float(), batch.group.cpu()[pol])
        batch.advantages = adv.to(dev)
        batch.in_policy = batch.in_policy.to(dev)
    score_old_policy(model, ref_model, batch, cfg, times)
    if cfg.echo.enabled:
        with timer(times, "echo_select"):
            sids = step_ids(batch.response_ids, batch.response_mask, delims, eos)
            batch.clip_mask, echo_stats = select_clips(batch.correct.to(dev), batch.group, batch.response_mask,
                                                       batch.entropies, sids, cfg.echo, generator=gen)
            batch.extras["step_ids"] = sids
        stats.update(echo_stats)
    stats.update(update(model, opt, sched, batch, cfg, times))
    live = batch.in_policy > 0
    m = batch.response_mask[live]
    stats.update({
        "reward": float(batch.rewards[live.cpu()].mean()) if live.any() else 0.0,
        "accuracy": float(batch.correct[live.cpu()].float().mean()) if live.any() else 0.0,
        "entropy": float((batch.entropies[live] * m).sum() / m.sum().clamp_min(1)),
        "response_len": float(batch.response_lengths[live].mean()) if live.any() else 0.0,
        "truncated": float(batch.truncated[live].float().mean()) if live.any() else 0.0,
        "batch_rows": float(len(batch)),
    })
    stats.update({f"time/{k}": v for k, v in times.items()})
    if cuda:
        stats["mem/peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return stats, batch

# ----------------------------------------------------------------------------------------
# Evaluation, logging, checkpoints


def run_eval(model, tok, problems: dict, cfg: Config) -> dict:
    from eval import evaluate
    model.eval()
    out = {}
    for name, probs in problems.items():
        with autocast(cfg, model):
            res = evaluate(model, tok, probs, n=cfg.eval.n, temperature=cfg.eval.temperature, top_p=1.0,
                           max_new_tokens=cfg.eval.max_new_tokens, template=cfg.data.template,
                           system_prompt=cfg.data.system_prompt, batch_size=cfg.eval.batch_size, progress=False)
        out[f"eval/{name}/acc"] = res["avg@n"]
    return out


def dump_rollouts(batch: Rollout, tok, path: Path) -> None:
    """One JSON line per rollout: text, tokens, entropies, step ids and EchoClip mask (for plots)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sids = batch.extras.get("step_ids")
    with open(path, "w") as f:
        for i in range(len(batch)):
            n = int(batch.response_mask[i].sum())
            ids = batch.response_ids[i, :n].tolist()
            row = {"group": int(batch.group[i]), "correct": bool(batch.correct[i]), "reward": float(batch.rewards[i]),
                   "prompt": batch.extras["prompts"][i], "gold": batch.extras["golds"][i], "text": batch.texts[i],
                   "tokens": tok.convert_ids_to_tokens(ids), "token_text": [tok.decode([t]) for t in ids],
                   "entropy": [round(x, 5) for x in batch.entropies[i, :n].tolist()],
                   "step_ids": sids[i, :n].tolist() if sids is not None else None,
                   "clip": batch.clip_mask[i, :n].int().tolist() if batch.clip_mask is not None else None}
            f.write(json.dumps(row) + "\n")


def make_optimizer(model, cfg: Config):
    return torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                             betas=tuple(cfg.train.betas))


def make_scheduler(opt, cfg: Config):
    total = cfg.train.steps * cfg.train.ppo_epochs * cfg.train.mini_batches
    w = cfg.train.warmup_steps * cfg.train.ppo_epochs * cfg.train.mini_batches

    def lr_lambda(s: int) -> float:
        if s < w:
            return (s + 1) / w
        if cfg.train.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - w) / max(1, total - w))))
        return 1.0
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)


class Logger:
    """JSONL metrics file (always), wandb (optional, offline by default)."""

    def __init__(self, cfg: Config, out: Path, resume_step: int):
        self.path = out / "metrics.jsonl"
        if self.path.exists():  # a fresh run starts a new file; a resumed one drops lines past its checkpoint
            lines = [l for l in self.path.read_text().splitlines() if l and json.loads(l)["step"] <= resume_step]
            self.path.write_text("".join(l + "\n" for l in lines) if resume_step else "")
        self.wandb = None
        if cfg.log.wandb:
            import wandb
            self.wandb = wandb.init(project=cfg.log.wandb_project, mode=cfg.log.wandb_mode, config=to_dict(cfg),
                                    dir=str(out))

    def log(self, step: int, metrics: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)


def train(cfg: Config, resume: bool = False) -> list[dict]:
    """Run the whole loop; returns the list of per-step metrics written this run."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    ckpt = latest_checkpoint(out) if resume else None
    if resume and ckpt is None:
        print(f"--resume: no checkpoint in {out / 'checkpoints'}, starting from scratch")
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    base = model_path(cfg)
    model, tok = load_model(str(ckpt) if ckpt else base, cfg, cfg.train.device)
    ref_model = None
    if cfg.algo.kl_coef > 0:
        ref_model = load_model(base, cfg, cfg.train.device)[0].requires_grad_(False)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg)
    stream = train_stream(cfg)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    start = 0
    if ckpt:
        start = load_checkpoint(ckpt, opt, sched, stream, gen)
        print(f"resumed from {ckpt} at step {start}")
    logger = Logger(cfg, out, start)
    delims = delimiter_table(tok, cfg.echo.delimiter)
    eos = eos_ids(tok, model)
    heldout = eval_problems(cfg)
    history = []
    if start == 0 and heldout and cfg.eval.at_start:
        m0 = run_eval(model, tok, heldout, cfg)
        print("eval before RL:", {k: round(v, 4) for k, v in m0.items()})
        logger.log(0, m0)
    bar = tqdm(range(start, cfg.train.steps), desc=f"{cfg.algo.name}{'+echo' if cfg.echo.enabled else ''}",
               initial=start, total=cfg.train.steps)
    for step in bar:
        t0 = time.perf_counter()
        metrics, batch = train_step(model, ref_model, opt, sched, tok, stream, cfg, delims, eos, gen)
        metrics["time/step"] = time.perf_counter() - t0
        s = step + 1
        if (cfg.eval.every and s % cfg.eval.every == 0) or s == cfg.train.steps:
            metrics.update(run_eval(model, tok, heldout, cfg))
        if cfg.log.log_rollouts_every and (s % cfg.log.log_rollouts_every == 0 or s == 1):
            dump_rollouts(batch, tok, out / "rollouts" / f"step_{s:06d}.jsonl")
        logger.log(s, metrics)
        history.append({"step": s, **metrics})
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", degen=f"{metrics['frac_degenerate']:.2f}",
                        **{k.split("/")[1]: f"{v:.3f}" for k, v in metrics.items() if k.startswith("eval/")})
        if (cfg.train.save_every and s % cfg.train.save_every == 0) or s == cfg.train.steps:
            save_checkpoint(out, s, model, tok, opt, sched, stream, gen, cfg.train.keep_checkpoints)
    return history


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--resume", action="store_true", help="continue from the last checkpoint in train.out_dir")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    hist = train(cfg, resume=args.resume)
    evals = [h for h in hist if any(k.startswith("eval/") for k in h)]
    if evals:
        print("eval after RL:", {k: round(v, 4) for k, v in evals[-1].items() if k.startswith("eval/")})


if __name__ == "__main__":
    main()
