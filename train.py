"""EchoRL training: one RLVR step in named stages, then the run around it.

    problems ─► sample ─► score ─► advantages ─► old_policy ─► echo_clips ─► update
               rollout.py reward.py  losses.py    entropy.py    echorl.py     losses.py + echorl.py

`train_step` runs the stages once. Each stage is a plain function that reads and fills fields of
one `Rollout` record (rollout.py), so a notebook can run them one at a time. DAPO's dynamic
sampling repeats sample + score until enough groups carry a learning signal (`collect`).
`setup(cfg)` builds everything a step needs (a `Run`); `train` is the harness around the steps:
evaluation, logging, checkpoints, resume, and stopping cleanly.

    python train.py --config configs/tiny.yaml [--set echo.coef=0.01 ...] [--resume]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import threading
import time
import zlib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

import dist
import reward
from config import Config, ConfigError, load_config, to_dict
from data import DataError
from dist import World
from echorl import echo_loss, peak_entropy_change, peak_tokens, select_clips
from entropy import delimiter_table, step_ids
from losses import ADVANTAGES, Norm, aggregate, constant_groups, kl_k3, overlong_penalty, policy_loss, tis_weights
from models import count_parameters, load_policy, model_source, resolve_device, rollout_dtype
from packing import response_logprobs
from rollout import Rollout, concat, eos_ids, generate_hf, render_prompts
from sampler import Sampler, refresh_sampling_copy, sampling_copy
from runs import (CheckpointError, Logger, RunFolderError, dump_rollouts, latest_checkpoint, load_checkpoint,
                  prepare_out_dir, python_cmd, save_checkpoint, summary)

RewardFn = Callable[[list[str], list[str]], list[float]]  # (responses, golds) -> rewards; 1.0 = verified correct


@dataclass
class Run:
    """Everything a step needs, built once by `setup`."""
    cfg: Config
    model: torch.nn.Module            # the policy being trained (weights in cfg.model.dtype)
    tok: Any
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    stream: Any                       # .next(n) -> problems; state_dict() / load_state_dict() for resume
    reward_fn: RewardFn
    ref_model: torch.nn.Module | None  # frozen initial policy for the KL term (algo.kl_coef > 0)
    gen: torch.Generator              # EchoRL's random_step selection
    delims: dict                      # entropy.delimiter_table of echo.delimiter
    eos: list[int]                    # ids that end a response
    sampler: torch.nn.Module | None = None  # the weights rollouts and evals sample from (None: the policy)
    engine: Sampler | None = None     # the slot sampler over those weights (None: rollout.engine "hf")
    world: World = World()            # this process's place among torchrun's processes (dist.py)
    step: int = 0                     # completed steps


class NonFiniteError(RuntimeError):
    """A loss or gradient norm that is not finite: the update stops before the optimizer step."""


@contextmanager
def timer(times: dict, key: str):
    t0 = time.perf_counter()
    yield
    times[key] = times.get(key, 0.0) + time.perf_counter() - t0


def autocast(cfg: Config, model):
    """Mixed precision for forwards; weights and optimizer states keep `model.dtype`."""
    if cfg.model.autocast == "none":
        return nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=getattr(torch, cfg.model.autocast))

# ========================================================================================
# The step, stage by stage


def sample(run: Run, problems: list, seed: int = 0) -> Rollout:
    """Stage 1: G responses per problem (rows i*G .. i*G+G-1 answer problem i), with the sampler's
    log-probs and entropies of every token; golds, prompts and the sampler's statistics in extras.
    Row b draws from its own random stream keyed on (seed, b)."""
    cfg, rc = run.cfg, run.cfg.rollout
    prompts = render_prompts([p.question for p in problems], run.tok, cfg.data.template, cfg.data.system_prompt)
    kw = dict(group_size=rc.group_size, max_new_tokens=rc.max_new_tokens, temperature=rc.temperature, top_p=rc.top_p)
    if run.engine is not None:
        batch = run.engine.generate(prompts, seed=seed, **kw)
        batch.extras["sampler_stats"] = dict(run.engine.stats)
    else:  # HF generate, the reference engine: the global torch RNG, autocast as the config asks
        model = run.sampler or run.model
        model.eval()
        with autocast(cfg, model) if run.sampler is None else nullcontext():
            batch = generate_hf(model, run.tok, prompts, batch_size=rc.slots or None, return_logprobs=True, **kw)
    batch.extras.update(golds=[p.answer for p in problems for _ in range(rc.group_size)],
                        prompts=[p for p in prompts for _ in range(rc.group_size)])
    return batch


def score(batch: Rollout, cfg: Config, reward_fn: RewardFn) -> None:
    """Stage 2: batch.correct (the verifier's verdict) and batch.rewards (after the truncation rule and
    DAPO's overlong shaping). Texts leave for the verifier; the scores come back onto the batch's device."""
    rewards = torch.tensor(reward_fn(batch.texts, batch.extras["golds"]), dtype=torch.float,
                           device=batch.response_ids.device)                    # [B]
    correct = rewards >= 1.0
    if cfg.reward.truncated == "zero":
        rewards, correct = rewards.masked_fill(batch.truncated, 0.0), correct & ~batch.truncated
    if cfg.algo.overlong_buffer:
        buf = cfg.rollout.max_new_tokens // 4 if cfg.algo.overlong_buffer < 0 else cfg.algo.overlong_buffer
        rewards = rewards + overlong_penalty(batch.response_lengths, cfg.rollout.max_new_tokens, buf,
                                             cfg.algo.overlong_penalty)
    batch.correct, batch.rewards = correct, rewards


def collect(run: Run, stats: dict, times: dict) -> Rollout:
    """Stages 1-2 for one step's batch (this rank's share of the prompts). With dynamic sampling (DAPO),
    zero-std groups are dropped and refilled from new prompts (at most `max_sampling_rounds` extra
    rounds; every rank runs the same rounds and draws the same number of prompts per round); with
    EchoRL on and keep_dropped_groups, dropped all-success groups stay in the batch with in_policy = 0,
    so they feed EchoClips only. Policy groups come first, then the echo-only groups."""
    cfg, world = run.cfg, run.world
    G, n_want = cfg.rollout.group_size, cfg.rollout.prompts_per_step // world.size
    kept, echo_only, n_kept, n_echo = [], [], 0, 0
    rounds = 1 + (cfg.algo.max_sampling_rounds if cfg.algo.dynamic_sampling else 0)
    for r in range(rounds):
        n_draw = n_want if r == 0 else int(world.max(n_want - n_kept))   # a rank that is full draws and skips
        problems, batch = run.stream.next(n_draw)[:n_want - n_kept], None
        if problems:
            with timer(times, "generate"):
                batch = sample(run, problems, seed=step_seed(run, r))
            rollout_stats(batch, stats)
            with timer(times, "score"):
                score(batch, cfg, run.reward_fn)
        if r == 0:
            first = batch
            stats.update(group_stats(batch.correct, batch.rewards, G))
        if not cfg.algo.dynamic_sampling:
            kept.append(batch)
            break
        if batch is not None:
            live = ~constant_groups(batch.rewards, G)                              # [n_groups]
            rows = lambda gmask: torch.nonzero(gmask.repeat_interleave(G)).squeeze(-1)
            take = live & (live.cumsum(0) <= n_want - n_kept)
            kept.append(batch.select(rows(take)))
            n_kept += int(take.sum())
            if cfg.echo.enabled and cfg.echo.keep_dropped_groups:
                drop = ~live & batch.correct.view(-1, G).all(-1)
                drop &= drop.cumsum(0) <= n_want - n_echo
                if drop.any():
                    echo_only.append(batch.select(rows(drop)))
                    n_echo += int(drop.sum())
        if world.all(n_kept >= n_want):
            break
    stats["sampling_rounds"] = float(r + 1)
    kept, echo_only = [b for b in kept if len(b)], [b for b in echo_only if len(b)]
    for b in kept:
        b.in_policy = torch.ones(len(b), device=b.response_ids.device)
    for b in echo_only:
        b.in_policy = torch.zeros(len(b), device=b.response_ids.device)
    parts = kept + echo_only
    if not parts:  # nothing survived dynamic sampling: round 0's batch, outside the policy loss
        first.in_policy = torch.zeros(len(first), device=first.response_ids.device)
        parts = [first]
    batch = concat(parts, run.tok.pad_token_id) if len(parts) > 1 else parts[0]
    batch.group = torch.arange(len(batch) // G, device=batch.response_ids.device).repeat_interleave(G)
    return batch


def step_seed(run: Run, round_: int) -> int:
    """The sampling seed of a step's round: a function of (seed, rank, step, round) alone, so a resumed
    run draws what the uninterrupted one would have."""
    return zlib.crc32(f"{run.cfg.train.seed}/{run.world.rank}/{run.step}/{round_}".encode())


def rollout_stats(batch: Rollout, stats: dict) -> None:
    """Adds a sampling call's useful tokens and slot-steps (decode efficiency = their ratio)."""
    s = batch.extras.get("sampler_stats")
    if s:
        stats["rollout/tokens"] = stats.get("rollout/tokens", 0.0) + s["tokens"]
        stats["rollout/slot_steps"] = stats.get("rollout/slot_steps", 0.0) + s["tokens"] / max(s["efficiency"], 1e-9)


def group_stats(correct: torch.Tensor, rewards: torch.Tensor, G: int) -> dict:
    """Shares of degenerate groups (constant rewards: zero advantage), all-success and all-fail."""
    c = correct.view(-1, G)
    return {"frac_all_success": float(c.all(-1).float().mean()), "frac_all_fail": float((~c).all(-1).float().mean()),
            "frac_degenerate": float(constant_groups(rewards, G).float().mean())}


def compute_advantages(batch: Rollout, cfg: Config, world: World = World()) -> None:
    """Stage 3: group-relative advantages of the policy rows (losses.ADVANTAGES). Echo-only rows get
    0 and stay out of every batch statistic (REINFORCE++'s whitening, taken over all ranks' rows)."""
    pol = batch.in_policy > 0
    adv = torch.zeros_like(batch.rewards)
    total = world.sum if world.size > 1 else None
    if pol.any() or total is not None:  # under torchrun every rank joins the batch-wide sums, rows or not
        adv[pol] = ADVANTAGES[cfg.algo.advantage](batch.rewards[pol], batch.group[pol], total=total)
    batch.advantages = adv


@torch.no_grad()
def old_policy(run: Run, batch: Rollout) -> dict:
    """Stage 4: old log-probs and token entropies of the policy that sampled the batch (and the
    reference model's log-probs for the KL term); returns the sampler-vs-trainer statistics.

    The old policy is the sampling policy. Where the sampler computed the same numbers (the policy's
    own weights and dtype: train.old_logprobs auto -> "sampler"), its log-probs and entropies are
    used and no pass runs; they differ from a teacher-forced pass only by cached vs full-sequence
    float rounding (~1e-6), so the first update's ratio is 1 up to that. Otherwise (bf16 sampling
    copy, autocast, or "recompute") a pass computes them in the micro-batches the update will use,
    so the first update sees ratio == 1 exactly (README pitfall 3), and the mismatch with the
    sampler's log-probs is logged."""
    cfg = run.cfg
    use_sampler = old_logprobs_from_sampler(run) and batch.sample_logprobs is not None
    if use_sampler:
        batch.old_logprobs, batch.entropies = batch.sample_logprobs, batch.sample_entropies
        if run.ref_model is None:
            return {}
    models = ([] if use_sampler else [run.model]) + ([run.ref_model] if run.ref_model is not None else [])
    for m in models:
        m.eval()
    out = {m: ([], []) for m in models}
    slices = [rows for mini in even_out(update_slices(batch.in_policy, cfg), run.world) for rows in mini]
    for rows in slices:
        mb = batch.select(rows if rows is not None else [0])  # None: a forward keeping FSDP's collectives in step
        for m in models:
            with autocast(cfg, m):
                lp, ent = response_logprobs(m, mb, temperature=cfg.rollout.temperature,
                                            chunk_size=cfg.train.logprob_chunk, pack=cfg.train.pack,
                                            prompt_once=cfg.train.prompt_once, with_entropy=m is run.model)
            if rows is not None:
                out[m][0].append(lp)
                out[m][1].append(ent)
    order = torch.cat([rows for rows in slices if rows is not None]).argsort().to(batch.response_ids.device)
    if run.ref_model is not None:
        batch.ref_logprobs = torch.cat(out[run.ref_model][0])[order]
    if use_sampler:
        return {}
    batch.old_logprobs, batch.entropies = torch.cat(out[run.model][0])[order], torch.cat(out[run.model][1])[order]
    return sampler_mismatch(batch) if batch.sample_logprobs is not None else {}


def old_logprobs_from_sampler(run: Run) -> bool:
    """train.old_logprobs: "auto" takes the sampler's numbers when it samples with the policy's own fp32
    (or fp64) weights without autocast: the same computation as the trainer's pass."""
    mode, m = run.cfg.train.old_logprobs, run.cfg.model
    if mode == "auto":  # in bf16/fp16, cached decoding and a full pass differ at the dtype's precision
        return run.sampler is None and m.autocast == "none" and m.dtype in ("float32", "float64") and \
            run.engine is not None
    return mode == "sampler"


def sampler_mismatch(batch: Rollout) -> dict:
    """How far the sampler's log-probs are from the old policy's (policy tokens): mean and max |diff|
    and the k3 estimate of KL(sampler || trainer) with r = pi_old / pi_sampler: mean(r - 1 - log r)."""
    m = batch.policy_mask.bool()
    if not m.any():
        return {}
    d = (batch.old_logprobs - batch.sample_logprobs)[m]                              # log r
    return {"sampler/logprob_abs_diff": float(d.abs().mean()), "sampler/logprob_max_diff": float(d.abs().max()),
            "sampler/kl_k3": float((d.exp() - 1 - d).mean())}


def echo_clips(batch: Rollout, cfg: Config, delims: dict, eos: list[int], gen: torch.Generator) -> dict:
    """Stage 5: EchoClips of the all-correct groups (echorl.select_clips on the old policy's entropies):
    fills batch.clip_mask (and the step ids, for the rollout dumps); returns EchoRL's statistics."""
    sids = step_ids(batch.response_ids, batch.response_mask, delims, eos, cfg.echo.min_step_tokens)
    batch.extras["step_ids"] = sids
    batch.clip_mask, stats = select_clips(batch.correct, batch.group, batch.response_mask, batch.entropies, sids,
                                          cfg.echo, generator=gen)
    n = batch.clip_mask.sum()
    if n > 0:  # how much there is to learn: the old policy's NLL of the clip tokens
        stats["echo/clip_nll"] = float(-(batch.old_logprobs * batch.clip_mask).sum() / n)
    return stats


def microbatch_loss(logp: torch.Tensor, ent: torch.Tensor, mb: Rollout, norm: Norm, n_clip: float,
                    cfg: Config) -> tuple[torch.Tensor, dict]:
    """The loss of one micro-batch: a pure function of this forward's log-probs and entropies [b, R],
    the rows' tensors and the mini-batch normalisers (`norm`, `n_clip`: see accumulate_gradients).

        L = policy loss (+ kl_coef * KL) (- entropy_coef * entropy) (+ EchoRL's clip-SFT loss)

    Two masks: `mb.policy_mask` (response tokens of rows in the policy loss) for every RL term, and
    `mb.clip_mask` (EchoClip tokens, all-correct groups only) for the echo term."""
    a = cfg.algo
    mask = mb.policy_mask                                                       # [b, R]
    loss, clipped = pg_term(logp, mb, norm, cfg)
    stats = {"loss_pg": loss.detach(), "clip_low": clipped["clip_low"], "clip_high": clipped["clip_high"]}
    if mb.ref_logprobs is not None and a.kl_coef > 0:
        kl = aggregate(kl_k3(logp, mb.ref_logprobs), mask, a.aggregation, norm)
        loss = loss + a.kl_coef * kl
        stats["kl"] = kl.detach()
    if a.entropy_coef > 0:
        bonus = aggregate(ent, mask, a.aggregation, norm)
        loss = loss - a.entropy_coef * bonus
        stats["entropy_bonus"] = bonus.detach()
    if cfg.echo.enabled and mb.clip_mask is not None and n_clip > 0:
        le = echo_term(logp, mb, norm, n_clip, cfg)
        loss = loss + le
        stats["loss_echo"] = le.detach()
    return loss, stats


def pg_term(logp: torch.Tensor, mb: Rollout, norm: Norm, cfg: Config) -> tuple[torch.Tensor, dict]:
    """The method's policy loss of a micro-batch (losses.policy_loss), with truncated importance
    sampling on the sampler/trainer ratio when algo.tis_cap asks for it."""
    a = cfg.algo
    tis = None
    if a.tis_cap is not None and mb.sample_logprobs is not None:
        tis = tis_weights(mb.old_logprobs, mb.sample_logprobs, a.tis_cap)
    return policy_loss(logp, mb.old_logprobs, mb.advantages, mb.policy_mask, policy_loss=a.policy_loss,
                       aggregation=a.aggregation, eps_low=a.eps_low, eps_high=a.eps_high, norm=norm,
                       dual_clip=a.dual_clip, token_weights=tis)


def echo_term(logp: torch.Tensor, mb: Rollout, norm: Norm, n_clip: float, cfg: Config) -> torch.Tensor:
    """EchoRL's clip-SFT loss of a micro-batch: -coef x the mean log-prob over the mini-batch's clip
    tokens, or with echo.normalizer "policy", the clip tokens' log-probs under the
    policy loss's own aggregation and normalisers."""
    if cfg.echo.normalizer == "policy":
        return -cfg.echo.coef * aggregate(logp, mb.clip_mask, cfg.algo.aggregation, norm)
    return echo_loss(logp, mb.clip_mask, cfg.echo.coef, n_clip)


def accumulate_gradients(model, batch: Rollout, micro: list[torch.Tensor | None], cfg: Config,
                         world: World = World()) -> dict:
    """Backward the loss of one mini-batch (the rows `micro`, one tensor of row indices per
    micro-batch; None: a step-keeping forward, see even_out); gradients accumulate in .grad.
    Returns the mini-batch's summed statistics, and under "tokens" the policy and clip tokens the
    whole mini-batch (every rank) trains on: 0 means nothing to learn from, no optimizer step."""
    rows = torch.cat([idx for idx in micro if idx is not None] or [torch.zeros(0, dtype=torch.long)])
    # Normalisers over the whole mini-batch (on every rank), not per micro-batch: every micro-batch loss
    # is then its exact share of the mini-batch loss, so the gradient does not depend on how the
    # mini-batch is split into micro-batches or over processes (README pitfall 4). The echo term
    # divides by the clip tokens of the mini-batch likewise.
    mask = batch.policy_mask[rows]                                                   # [n, R]
    clip = batch.clip_mask[rows].sum() if batch.clip_mask is not None else mask.new_zeros(())
    counts = world.sum(torch.stack([(mask.sum(-1) > 0).sum().to(mask), mask.sum(), clip.to(mask)]).double())
    norm = Norm(n_seqs=max(float(counts[0]), 1.0), n_tokens=max(float(counts[1]), 1.0),
                max_len=cfg.rollout.max_new_tokens)
    n_clip = float(counts[2])
    with_entropy = cfg.algo.entropy_coef > 0
    sums: dict[str, torch.Tensor] = {}
    for idx in micro:
        mb = batch.select(idx if idx is not None else [0])
        with autocast(cfg, model):
            logp, ent = response_logprobs(model, mb, temperature=cfg.rollout.temperature,
                                          chunk_size=cfg.train.logprob_chunk, pack=cfg.train.pack,
                                          prompt_once=cfg.train.prompt_once, with_entropy=with_entropy)
        if idx is None:  # keeps FSDP's collectives in step with the other ranks; adds nothing
            (logp.sum() * 0.0).backward()
            continue
        loss, stats = microbatch_loss(logp, ent, mb, norm, n_clip, cfg)
        if not world.launched and not torch.isfinite(loss):  # under torchrun the global grad norm catches it
            raise NonFiniteError(f"non-finite loss ({float(loss.detach())}; policy part {float(stats['loss_pg'])})")
        loss.backward()
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v
    out = {k: float(v) for k, v in sums.items()}
    for k in ("clip_low", "clip_high"):  # clipped tokens -> fraction of the mini-batch's policy tokens
        out[k] = out.get(k, 0.0) / norm.n_tokens
    out["tokens"] = float(counts[1]) + (n_clip if cfg.echo.enabled else 0.0)
    return out


def update(run: Run, batch: Rollout) -> dict:
    """Stage 6: ppo_epochs x mini_batches optimizer steps over the batch, each with grad clipping.
    Echo-only rows without a clip feed neither loss and skip the forward."""
    cfg, model = run.cfg, run.model
    model.train()
    keep = batch.in_policy > 0
    if batch.clip_mask is not None:
        keep = keep | (batch.clip_mask.sum(-1) > 0)
    sums, n_opt = {}, 0
    for _ in range(cfg.train.ppo_epochs):
        for micro in even_out(update_slices(batch.in_policy, cfg, keep), run.world):
            run.opt.zero_grad(set_to_none=True)
            stats = accumulate_gradients(model, batch, micro, cfg, run.world)
            stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip))
            if not math.isfinite(stats["grad_norm"]):
                raise NonFiniteError(f"non-finite grad_norm ({stats['grad_norm']})")
            if stats.pop("tokens") > 0:  # no token to learn from: no step (Adam's momentum would still move)
                run.opt.step()
            run.sched.step()
            n_opt += 1
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
    run.opt.zero_grad(set_to_none=True)  # no gradient buffers held through the next rollout
    if run.sampler is not None:  # the sampling weights follow the policy
        refresh_sampler(run)
    out = {k: v / max(n_opt, 1) for k, v in sums.items()}
    out["clip_frac_low"], out["clip_frac_high"] = out.pop("clip_low", 0.0), out.pop("clip_high", 0.0)
    for k in ("loss_pg", "loss_echo", "kl", "grad_norm"):
        out.setdefault(k, 0.0)
    return {**out, "lr": run.sched.get_last_lr()[0]}


def train_step(run: Run) -> tuple[dict, Rollout]:
    """One RLVR step: the stages in order. Returns the step's metrics and its batch."""
    times, stats = {}, {}
    cuda = next(run.model.parameters()).is_cuda
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    hits_before = reward.bound_hits()
    batch = collect(run, stats, times)
    stats.update({f"verifier/{k}": float(v - hits_before[k]) for k, v in reward.bound_hits().items()})
    with timer(times, "advantages"):
        compute_advantages(batch, run.cfg, run.world)
    with timer(times, "old_logprobs"):
        stats.update(old_policy(run, batch))
    if run.cfg.echo.enabled:
        with timer(times, "echo_select"):
            stats.update(echo_clips(batch, run.cfg, run.delims, run.eos, run.gen))
    probe = run.cfg.log.probe_every and run.cfg.echo.enabled and not run.world.launched and \
        (run.step + 1) % run.cfg.log.probe_every == 0 and batch.clip_mask.sum() > 0
    if probe:
        with timer(times, "probe"):
            stats.update(probe_gradients(run, batch))
    with timer(times, "update"):
        stats.update(update(run, batch))
    if probe:
        with timer(times, "probe"):
            stats.update(probe_sharpening(run, batch))
    run.step += 1
    stats.update(batch_stats(batch))
    stats.update({f"time/{k}": v for k, v in times.items()})
    if cuda:
        stats["mem/peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    stats = dist.reduce_metrics(stats, run.world)
    if "rollout/tokens" in stats:  # over every rank: useful tokens / slot-steps, and tokens / slowest rank's time
        stats["rollout/decode_efficiency"] = stats["rollout/tokens"] / max(stats.pop("rollout/slot_steps"), 1.0)
        stats["time/rollout_tokens_per_s"] = stats["rollout/tokens"] / max(stats.get("time/generate", 0.0), 1e-9)
    return stats, batch


def probe_gradients(run: Run, batch: Rollout) -> dict:
    """The share of the update EchoRL drives: on the update's first micro-batch (normalised as in the
    update), the norm of the echo loss's gradient over the policy loss's. One more forward and two
    backwards, about 1.5 micro-batch updates, on the steps log.probe_every names (one process only)."""
    cfg, model = run.cfg, run.model
    micro = update_slices(batch.in_policy, cfg)[0]
    rows = torch.cat(micro)
    norm = Norm.of(batch.policy_mask[rows], cfg.rollout.max_new_tokens)
    mb = batch.select(micro[0])
    model.train()
    with autocast(cfg, model):
        logp, _ = response_logprobs(model, mb, temperature=cfg.rollout.temperature, chunk_size=cfg.train.logprob_chunk,
                                    pack=cfg.train.pack, prompt_once=cfg.train.prompt_once)
    pg, _ = pg_term(logp, mb, norm, cfg)
    echo = echo_term(logp, mb, norm, float(batch.clip_mask[rows].sum()), cfg)
    params = [p for p in model.parameters() if p.requires_grad]

    def grad_norm(loss: torch.Tensor) -> float:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))
    g_pg, g_echo = grad_norm(pg), grad_norm(echo)
    return {"probe/grad_norm_policy": g_pg, "probe/grad_norm_echo": g_echo,
            "probe/echo_over_policy": g_echo / g_pg if g_pg > 0 else float(g_echo > 0) * float("inf")}


@torch.no_grad()
def probe_sharpening(run: Run, batch: Rollout) -> dict:
    """After the update: the change of the mean token entropy of each EchoClip's peak step (the
    decision EchoRL targets), from the old policy to the updated one. One no-grad forward of the
    clipped rows."""
    cfg = run.cfg
    rows = torch.nonzero(batch.clip_mask.sum(-1) > 0).squeeze(-1)
    mb = batch.select(rows)
    run.model.eval()
    with autocast(cfg, run.model):
        _, after = response_logprobs(run.model, mb, temperature=cfg.rollout.temperature,
                                     chunk_size=cfg.train.logprob_chunk, pack=cfg.train.pack,
                                     prompt_once=cfg.train.prompt_once, with_entropy=True)
    peak = peak_tokens(mb.clip_mask, mb.extras["step_ids"])
    return {"probe/peak_entropy_change": peak_entropy_change(mb.entropies, after, peak)}


def batch_stats(batch: Rollout) -> dict:
    """Reward, accuracy, entropy and length over the policy rows of a batch (plain floats), with the
    counts they are means over."""
    live = batch.in_policy > 0
    m = batch.response_mask[live]
    out = {"batch_rows": float(len(batch)), "batch/policy_rows": float(live.sum()), "batch/policy_tokens": float(m.sum())}
    if not live.any():
        return {**out, "reward": 0.0, "accuracy": 0.0, "entropy": 0.0, "response_len": 0.0, "truncated": 0.0}
    return {**out, "reward": float(batch.rewards[live].mean()), "accuracy": float(batch.correct[live].float().mean()),
            "entropy": float((batch.entropies[live] * m).sum() / m.sum().clamp_min(1)),
            "response_len": float(batch.response_lengths[live].mean()),
            "truncated": float(batch.truncated[live].float().mean())}


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
    # Micro-batches of whole groups where they fit: the packed forward runs each distinct prompt once.
    G, out = cfg.rollout.group_size, []
    size = cfg.train.micro_batch_size // G * G or cfg.train.micro_batch_size
    keep = keep.cpu() if keep is not None else None
    for pol, echo in mini_batch_rows(in_policy, cfg.train.mini_batches):
        if keep is not None:
            echo = echo[keep[echo]]
        out.append([pol[i] for i in micro_batches(len(pol), size)] + [echo[i] for i in micro_batches(len(echo), size)])
    return out

def even_out(slices: list[list[torch.Tensor]], world: World) -> list[list[torch.Tensor | None]]:
    """Under torchrun, pad this rank's mini-batches (and each one's micro-batches) with None up to the
    most any rank has: FSDP gathers weights in every forward and reduces gradients in every backward,
    so all ranks must run as many. In one process: the slices unchanged."""
    if world.size == 1:
        return slices
    slices = slices + [[] for _ in range(int(world.max(len(slices))) - len(slices))]
    return [mini + [None] * (int(world.max(len(mini))) - len(mini)) for mini in slices]

# ========================================================================================
# Setup: one place that builds a run (train.py, the benchmarks and the tests all use it)


def setup(cfg: Config, *, checkpoint: Path | None = None, reward_fn: RewardFn | None = None,
          world: World | None = None) -> Run:
    """Model, tokenizer, optimizer, scheduler, reference model, problem stream and reward function.

    `checkpoint`: a checkpoint folder to continue from (weights, optimizer, scheduler, stream and RNG
    state). `reward_fn(responses, golds) -> rewards` replaces the verifier (default: reward.score_batch
    with cfg.reward's settings). Under torchrun (`world`, default: dist.init) the policy is sharded
    with FSDP2 and rollouts sample from a full copy of it (dist.py). Global RNGs are seeded after
    every model is built or loaded, so the run does not depend on whether the tiny warm start had to
    be built first."""
    world = world or dist.init(cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device, world)
    stream = train_stream(cfg)
    if world.launched:
        stream = dist.RankShare(stream, world)
    base = world.on_main(model_source, cfg)  # rank 0 builds the tiny warm start (or checks the hub) once
    sampling = rollout_dtype(cfg)
    copy_bytes = torch.finfo(sampling).bits // 8 if world.launched or sampling != getattr(torch, cfg.model.dtype) else 0
    dist.check_fits(count_parameters(base, cfg), world, device, copy_bytes)
    model, tok = load_policy(str(checkpoint) if checkpoint else base, cfg, device, checkpoint=checkpoint is not None)
    ref_model = None
    if cfg.algo.kl_coef > 0:
        ref_model = load_policy(base, cfg, device)[0].requires_grad_(False).eval()
    sampler = None
    if copy_bytes:  # the weights rollouts sample from, when they are not the policy itself
        sampler = sampling_copy(model, sampling, always=world.launched)
    if world.launched:
        compute = getattr(torch, cfg.model.autocast) if cfg.model.autocast != "none" else None
        model = dist.shard(model, compute)
        if ref_model is not None:
            ref_model = dist.shard(ref_model, compute)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                            betas=tuple(cfg.train.betas))
    sched = make_scheduler(opt, cfg)
    seed_everything(cfg.train.seed + world.rank)
    gen = torch.Generator().manual_seed(cfg.train.seed + world.rank)
    if reward_fn is None:
        reward_fn = partial(reward.score_batch, workers=cfg.reward.workers, format_reward=cfg.reward.format_reward)
    engine = None
    if cfg.rollout.engine == "slots":
        engine = Sampler(sampler or model, tok, slots=cfg.rollout.slots,
                         compile={"auto": "auto", "on": True, "off": False}[cfg.rollout.compile])
    run = Run(cfg=cfg, model=model, tok=tok, opt=opt, sched=sched, stream=stream, reward_fn=reward_fn,
              ref_model=ref_model, gen=gen, delims=delimiter_table(tok, cfg.echo.delimiter), eos=eos_ids(tok, model),
              sampler=sampler, engine=engine, world=world)
    if checkpoint is not None:
        run.step = load_checkpoint(checkpoint, run)
    return run


def refresh_sampler(run: Run) -> None:
    """After an optimizer step: the sampling weights take the policy's new values."""
    if run.world.launched:
        dist.refresh_copy(run.sampler, run.model)
    else:
        refresh_sampling_copy(run.sampler, run.model)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def train_stream(cfg: Config):
    if cfg.data.train == "tiny":
        import tiny
        return tiny.ProblemStream(cfg.tiny, cfg.train.seed)
    from data import ListStream, load_problems
    return ListStream(load_problems(cfg.data.train, cfg.data.question_key, cfg.data.answer_key,
                                    max_question_chars=cfg.data.max_question_chars), cfg.train.seed, cfg.data.shuffle)


def eval_problems(cfg: Config) -> dict[str, list]:
    from data import load_benchmark
    import tiny
    limit = cfg.eval.limit or None
    return {name: tiny.heldout(cfg.tiny, limit) if name == "tiny" else
            load_benchmark(name, cfg.eval.data_dir, limit, max_question_chars=cfg.data.max_question_chars)
            for name in cfg.eval.benchmarks}


def make_scheduler(opt, cfg: Config):
    """Linear warm-up, then constant or cosine, counted in optimizer steps."""
    per_step = cfg.train.ppo_epochs * cfg.train.mini_batches
    total, w = cfg.train.steps * per_step, cfg.train.warmup_steps * per_step

    def lr_lambda(s: int) -> float:
        if s < w:
            return (s + 1) / w
        if cfg.train.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - w) / max(1, total - w))))
        return 1.0
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)

# ========================================================================================
# The harness: evaluation, logging, checkpoints, resume, stopping


def run_eval(run: Run, problems: dict, progress: bool = True) -> dict:
    """Held-out accuracy (avg@n) per benchmark. Under torchrun each rank scores every size-th problem
    with its sampling copy and the counts are summed."""
    from eval import evaluate
    cfg, world = run.cfg, run.world
    model = run.sampler or run.model
    model.eval()
    out = {}
    n = cfg.eval.n if cfg.eval.temperature > 0 else 1
    for name, probs in problems.items():
        mine = probs[world.rank::world.size]
        res = {"avg@n": 0.0}  # a rank with no problem of this benchmark adds nothing
        if mine:
            with autocast(cfg, model) if run.sampler is None and run.engine is None else nullcontext():
                res = evaluate(model, run.tok, mine, n=n, temperature=cfg.eval.temperature, top_p=1.0,
                               max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
                               template=cfg.data.template, system_prompt=cfg.data.system_prompt,
                               batch_size=cfg.eval.batch_size, progress=progress and world.main, desc=f"eval {name}",
                               leave=False, sampler=run.engine, seed=cfg.train.seed, ks=(n,))
        correct, passed, samples = world.sum(torch.tensor(
            [res["avg@n"] * len(mine) * n, res.get(f"pass@{n}", 0.0) * len(mine), len(mine) * n],
            dtype=torch.float64, device=world.device)).tolist()
        out[f"eval/{name}/acc"] = correct / samples               # avg@n
        if n > 1:                                                 # pass@n: a correct answer among the n samples
            out[f"eval/{name}/pass@{n}"] = passed / (samples / n)
    return out


class StopAfterStep:
    """Ctrl-C (SIGINT) asks the loop to stop after the current step, save it and exit; a second
    Ctrl-C stops at once (the last saved checkpoint stays). Only in the main thread."""

    def __enter__(self):
        self.requested, self.old = False, None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("Ctrl-C: stopping after this step and saving it (Ctrl-C again to stop now, without saving)")

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
        return False


class Interrupted(Exception):
    """The run stopped on Ctrl-C after saving its last completed step."""


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False, allow_changes: bool = False,
          reward_fn: RewardFn | None = None, command: str = "train.py --config <config>") -> list[dict]:
    """Run the whole loop into cfg.train.out_dir; returns the per-step metrics written by this call.
    `command` (how the run was launched) is quoted in the closing lines' next steps. Under torchrun
    every rank runs this; rank 0 alone checks the folder, prints and writes files."""
    t_start = time.perf_counter()
    world = dist.init(cfg)
    try:
        history = _train(cfg, world, resume, overwrite, allow_changes, reward_fn, command, t_start)
    except Interrupted:  # every rank stopped after the same step: leave together
        dist.close(world)
        raise
    except BaseException:  # maybe this rank alone: leave without waiting (torchrun then stops the others)
        dist.abandon(world)
        raise
    dist.close(world)
    return history


def _train(cfg, world, resume, overwrite, allow_changes, reward_fn, command, t_start) -> list[dict]:
    ckpt = world.on_main(prepare_out_dir, cfg, resume, overwrite, allow_changes)  # rank 0 decides for all
    out = Path(cfg.train.out_dir)
    heldout = eval_problems(cfg)  # data errors surface before the model is loaded
    run = setup(cfg, checkpoint=ckpt, reward_fn=reward_fn, world=world)
    say = print if world.main else (lambda *a, **k: None)
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json.tmp").write_text(json.dumps(to_dict(cfg), indent=2))
        os.replace(out / "config.json.tmp", out / "config.json")
    if ckpt:
        say(f"resumed from {ckpt} at step {run.step}")
    logger = Logger(cfg, out, run.step) if world.main else None
    history, saved_step, start = [], run.step, {}
    if run.step == 0 and heldout and cfg.eval.at_start:
        start = {"step": 0, **run_eval(run, heldout)}
        if logger:
            logger.log(0, {k: v for k, v in start.items() if k != "step"})
    name = f"{cfg.algo.name}{'+echo' if cfg.echo.enabled else ''}"
    bar = tqdm(total=cfg.train.steps, initial=run.step, desc=name, dynamic_ncols=True, disable=not world.main)
    try:
        with StopAfterStep() as stop:
            while run.step < cfg.train.steps and not stop.requested:
                t0 = time.perf_counter()
                try:
                    metrics, batch = train_step(run)
                except NonFiniteError as e:
                    raise NonFiniteError(f"step {run.step + 1}: {e}; stopped before the optimizer step, nothing "
                                         f"saved; last good checkpoint: {latest_checkpoint(out) or 'none'}. "
                                         f"Lower train.lr or check the data.") from None
                metrics["time/step"] = time.perf_counter() - t0
                s = run.step
                if (cfg.eval.every and s % cfg.eval.every == 0) or s == cfg.train.steps:
                    metrics.update(run_eval(run, heldout))
                stop.requested = world.max(float(stop.requested)) > 0  # every rank stops after the same step
                if logger:
                    if cfg.log.log_rollouts_every and (s % cfg.log.log_rollouts_every == 0 or s == 1):
                        dump_rollouts(batch, run, out / "rollouts" / f"step_{s:06d}.jsonl")
                    logger.log(s, metrics)
                history.append({"step": s, **metrics})
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward']:.3f}", degen=f"{metrics['frac_degenerate']:.2f}",
                                **{k.split("/")[1]: f"{v:.3f}" for k, v in metrics.items() if k.endswith("/acc")})
                if (cfg.train.save_every and s % cfg.train.save_every == 0) or s == cfg.train.steps or stop.requested:
                    save_checkpoint(out, s, run, cfg.train.keep_checkpoints)
                    saved_step = s
    finally:
        bar.close()
    if run.step < cfg.train.steps:
        raise Interrupted(f"stopped at step {run.step} of {cfg.train.steps}; checkpoint "
                          f"{out / 'checkpoints' / f'step_{saved_step:06d}'}")
    if world.main:
        summary(cfg, [start] * bool(start) + history, time.perf_counter() - t_start, out, command)
    return history


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--resume", action="store_true", help="continue the run in train.out_dir from its last checkpoint")
    ap.add_argument("--overwrite", action="store_true", help="move a previous run in train.out_dir aside and start anew")
    ap.add_argument("--allow-changes", action="store_true", help="--resume even if the config differs")
    args = ap.parse_args(argv)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # HF's "loading/writing shards" bars would break the run's bar
    command = f"train.py --config {args.config}" + "".join(f" --set {o}" for o in args.overrides)
    if "WORLD_SIZE" in os.environ:  # launched by torchrun
        command = f"torchrun --nproc_per_node {os.environ.get('LOCAL_WORLD_SIZE', os.environ['WORLD_SIZE'])} {command}"
    main_rank = int(os.environ.get("RANK", 0)) == 0
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg, resume=args.resume, overwrite=args.overwrite, allow_changes=args.allow_changes, command=command)
    except (ConfigError, DataError, RunFolderError, FileNotFoundError, NonFiniteError, CheckpointError) as e:
        sys.exit(f"error: {e}" if main_rank else 1)
    except Interrupted as e:
        if main_rank:
            print(f"{e}; continue with: {command if command.startswith('torchrun') else python_cmd() + ' ' + command}"
                  f" --resume")
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit("\ninterrupted: stopped at once; the last saved checkpoint (if any) is intact; continue with --resume"
                 if main_rank else 130)


if __name__ == "__main__":
    main()
