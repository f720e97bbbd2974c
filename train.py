"""EchoRL training: one RLVR step in named stages, and the loop that runs them.

    problems ─► sample ─► score ─► old_policy ─► advantages ─► echo_clips ─► update
               sampler.py reward.py  entropy.py    losses.py     echorl.py     losses.py + echorl.py

`train_step(run)` runs the stages once. `collect(run)` samples and scores a step's batch (DAPO's
dynamic sampling refills it); every stage after it is `stage(run, batch) -> stats`, reading and
filling fields of one `Rollout` record (rollout.py), so a notebook can run them one at a time.
The policy path reads as plain GRPO/DAPO; EchoRL acts in three places, each one call into
echorl.py marked "EchoRL". `setup(cfg)` builds a `Run`; `train(cfg)` is the loop around the steps
(evaluation, logging, checkpoints, a clean stop).

    python train.py --config configs/tiny.yaml [--set echo.coef=0.01 ...] [--resume]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
import zlib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm
from transformers.utils import logging as hf_logging

import dist
import echorl
import metrics
import reward
import tiny
from config import Config, ConfigError, load_config, to_dict
from data import DataError, ListStream, load_problems
from dist import World, even_out
from entropy import delimiter_table
from eval import evaluate_run, load_benchmarks, longest_row
from hf_generate import generate_hf
from losses import (ADVANTAGES, Norm, aggregate, constant_groups, kl_k3, overlong_penalty, policy_loss, tis_weights,
                    zvp_advantages)
from metrics import Max, Sum
from models import autocast, count_parameters, load_policy, model_source, resolve_device, rollout_dtype
from packing import response_logprobs
from rollout import Rollout, batch_stats, concat, eos_ids, render_prompts, update_slices
from runs import (CheckpointError, Interrupted, Logger, RunFolderError, StopAfterStep, dump_rollouts, further,
                  latest_checkpoint, launch_command, load_checkpoint, prepare_out_dir, rerun_hint, save_checkpoint,
                  seed_everything, summary)
from sampler import Sampler, refresh_sampling_copy, resolve_compile, row_seed, sampler_mismatch, sampling_copy

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
    delims: dict                      # entropy.delimiter_table of echo.delimiter
    eos: list[int]                    # ids that end a response
    sampling_weights: torch.nn.Module | None = None  # the copy rollouts sample from (None: the policy itself)
    sampler: Sampler | None = None    # the slot sampler over those weights (None: rollout.engine "hf")
    world: World = World()            # this process's place among torchrun's processes (dist.py)
    step: int = 0                     # completed steps


class NonFiniteError(RuntimeError):
    """A loss or gradient norm that is not finite: the update stops before the optimizer step."""


@contextmanager
def timer(stats: dict, key: str):  # adds the block's seconds to stats[key]: the slowest rank's over ranks
    t0 = time.perf_counter()
    yield
    stats[key] = Max(stats.get(key, 0.0) + time.perf_counter() - t0)

# ========================================================================================
# The step, stage by stage


def train_step(run: Run) -> tuple[dict, Rollout]:
    """One RLVR step: the stages in order. Returns the step's metrics (plain floats) and its batch."""
    cuda = next(run.model.parameters()).is_cuda
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    batch, stats = collect(run)
    with timer(stats, "time/old_logprobs"):
        stats |= old_policy(run, batch)
    with timer(stats, "time/advantages"):
        stats |= compute_advantages(run, batch)
    if run.cfg.echo.enabled:  # EchoRL: the clips of the all-correct groups
        with timer(stats, "time/echo_select"):
            stats |= echorl.echo_clips(run, batch)
    probe = echorl.probing(run, batch)
    if probe:
        with timer(stats, "time/probe"):
            first = slices_of(run, batch, echorl.rows_to_update(batch))[0]
            stats |= echorl.probe_update(run, batch, first, forward, rl_loss)
    with timer(stats, "time/update"):
        stats |= update(run, batch)
    if probe:
        with timer(stats, "time/probe"):
            stats |= echorl.probe_sharpening(run, batch, forward)
    run.step += 1
    stats |= batch_stats(batch)
    if cuda:
        stats["mem/peak_gib"] = Max(torch.cuda.max_memory_allocated() / 2 ** 30)
    stats = metrics.reduce(stats, run.world)
    if "rollout/tokens" in stats:  # over every rank: useful tokens / slot-steps, and tokens / slowest rank's time
        stats["rollout/decode_efficiency"] = stats["rollout/tokens"] / max(stats.pop("rollout/slot_steps"), 1.0)
        stats["time/rollout_tokens_per_s"] = stats["rollout/tokens"] / max(stats.get("time/generate", 0.0), 1e-9)
    return stats, batch


def sample(run: Run, problems: list, seed: int = 0) -> Rollout:
    """G responses per problem (rows i*G .. i*G+G-1 answer problem i), with the sampler's log-probs
    and entropies of every token; golds, prompts and row keys ("problem id/j") in extras.
    Row (problem p, sample j) draws from its own random stream keyed on (seed, p.id, j)."""
    cfg, rc = run.cfg, run.cfg.rollout
    prompts = render_prompts([p.question for p in problems], run.tok, cfg.data.template, cfg.data.system_prompt)
    kw = dict(group_size=rc.group_size, max_new_tokens=rc.max_new_tokens, temperature=rc.temperature, top_p=rc.top_p)
    if run.sampler is not None:
        batch = run.sampler.generate(prompts, seed=seed, row_seeds=[row_seed(p.id, j) for p in problems
                                                                     for j in range(rc.group_size)], **kw)
        batch.extras["sampler_stats"] = dict(run.sampler.stats)
    else:  # HF generate, the reference engine: the global torch RNG, autocast as the config asks
        model = run.sampling_weights or run.model
        model.eval()
        with autocast(cfg, model) if run.sampling_weights is None else nullcontext():
            batch = generate_hf(model, run.tok, prompts, batch_size=rc.slots or None, return_logprobs=True, **kw)
    G = rc.group_size
    batch.extras.update(golds=[p.answer for p in problems for _ in range(G)],
                        prompts=[p for p in prompts for _ in range(G)],
                        row_keys=[f"{p.id}/{j}" for p in problems for j in range(G)])
    return batch


def score(run: Run, batch: Rollout) -> dict:
    """batch.correct (the verifier's verdict) and batch.rewards (after the truncation rule and DAPO's
    overlong shaping). Texts leave for the verifier; the scores come back onto the batch's device."""
    cfg = run.cfg
    hits = reward.bound_hits()
    rewards = torch.tensor(run.reward_fn(batch.texts, batch.extras["golds"]), dtype=torch.float,
                           device=batch.response_ids.device)                    # [B]
    correct = rewards >= 1.0
    if cfg.reward.truncated == "zero":
        rewards, correct = rewards.masked_fill(batch.truncated, 0.0), correct & ~batch.truncated
    if cfg.algo.overlong_buffer:
        buf = cfg.rollout.max_new_tokens // 4 if cfg.algo.overlong_buffer < 0 else cfg.algo.overlong_buffer
        rewards = rewards + overlong_penalty(batch.response_lengths, cfg.rollout.max_new_tokens, buf,
                                             cfg.algo.overlong_penalty)
    batch.correct, batch.rewards = correct, rewards
    return {f"verifier/{k}": Sum(v - hits[k]) for k, v in reward.bound_hits().items()}


def collect(run: Run) -> tuple[Rollout, dict]:
    """Sample + score one step's batch (this rank's share of the prompts). With dynamic sampling
    (DAPO), groups with equal rewards are dropped and refilled from new prompts, at most
    `max_sampling_rounds` extra rounds. Which groups to keep is decided over the global order of the
    groups (every rank's, rank by rank), so N ranks draw and keep what one process would; a rank
    may then hold more policy groups than another. Policy groups come first, then EchoRL's
    echo-only groups (in_policy = 0); extras["global_group"] numbers each in the global order."""
    cfg, world, stats = run.cfg, run.world, {}
    G, want = cfg.rollout.group_size, cfg.rollout.prompts_per_step
    kept, echo_only, n_kept, n_echo = [], [], 0, 0                                 # counts: global
    rounds = 1 + (cfg.algo.max_sampling_rounds if cfg.algo.dynamic_sampling else 0)
    for r in range(rounds):
        problems = run.stream.next(want - n_kept)   # this rank's share of the round's global draw
        batch = None
        if problems:
            with timer(stats, "time/generate"):
                batch = sample(run, problems, seed=step_seed(run, r))
            stats = metrics.add(stats, rollout_stats(batch))
            with timer(stats, "time/score"):
                stats = metrics.add(stats, score(run, batch))
        if r == 0:
            first = batch  # round 0: every rank holds an equal share, so global group = rank offset + local
            first.extras["global_group"] = [world.rank * len(batch) // G + i // G for i in range(len(batch))]
            stats |= group_stats(batch.correct, batch.rewards, G)
        if not cfg.algo.dynamic_sampling:
            kept.append(batch)
            break
        if batch is None:  # this rank drew nothing this round: it still joins the global decisions
            live = keep = torch.zeros(0, dtype=torch.bool)
        else:
            live = ~constant_groups(batch.rewards, G)                                 # [n_groups]
            keep = echorl.dropped_groups_to_keep(batch.correct, live, want, cfg.echo)  # EchoRL
        take, take_at = dist.first_in_global_order(live, want - n_kept, n_kept, world)
        echo, echo_at = dist.first_in_global_order(keep, want - n_echo, n_echo, world)
        for part, gmask, at in ((kept, take, take_at), (echo_only, echo, echo_at)):
            if batch is not None and gmask.any():
                part.append(batch.select(torch.nonzero(gmask.repeat_interleave(G)).squeeze(-1).cpu()))
                part[-1].extras["global_group"] = at.repeat_interleave(G).tolist()
        n_kept, n_echo = n_kept + int(world.sum(take.sum().double())), n_echo + int(world.sum(echo.sum().double()))
        if n_kept >= want:
            break
    stats["sampling_rounds"] = float(r + 1)
    parts = [(b, 1.0) for b in kept if len(b)] + [(b, 0.0) for b in echo_only if len(b)]
    if not parts:  # nothing survived dynamic sampling here: round 0's batch, outside the loss
        parts = [(first, 0.0)]
    for b, flag in parts:
        b.in_policy = torch.full((len(b),), flag, device=b.response_ids.device)
    batch = concat([b for b, _ in parts], run.tok.pad_token_id) if len(parts) > 1 else parts[0][0]
    batch.group = torch.arange(len(batch) // G, device=batch.response_ids.device).repeat_interleave(G)
    return batch, stats


def step_seed(run: Run, round_: int) -> int:
    """The sampling seed of a step's round, a function of (seed, step, round) alone: a resumed run draws what the
    uninterrupted one would; with the row seeds (problem id, sample index) 1 process and N ranks draw alike."""
    return zlib.crc32(f"{run.cfg.train.seed}/{run.step}/{round_}".encode())


def rollout_stats(batch: Rollout) -> dict:
    """A sampling call's useful tokens and slot-steps (decode efficiency = their ratio over the step)."""
    s = batch.extras.get("sampler_stats")
    if not s:
        return {}
    return {"rollout/tokens": Sum(s["tokens"]), "rollout/slot_steps": Sum(s["tokens"] / max(s["efficiency"], 1e-9)),
            # torch's counters: graphs compiled and CUDA graph captures skipped while sampling (0 once warm)
            "sampler/recompiles": Sum(s["recompiles"]), "sampler/cudagraph_skips": Sum(s["cudagraph_skips"])}


def group_stats(correct: torch.Tensor, rewards: torch.Tensor, G: int) -> dict:
    """Shares of degenerate groups (constant rewards: zero advantage), all-success and all-fail
    (every rank holds the same number of groups in round 0, so plain means average over ranks)."""
    c = correct.view(-1, G)
    return {"frac_all_success": float(c.all(-1).float().mean()), "frac_all_fail": float((~c).all(-1).float().mean()),
            "frac_degenerate": float(constant_groups(rewards, G).float().mean())}


def compute_advantages(run: Run, batch: Rollout) -> dict:
    """Group-relative advantages of the policy rows (losses.ADVANTAGES). Rows outside the policy loss
    get 0 and stay out of every batch statistic (REINFORCE++'s whitening, taken over all ranks' rows).
    With algo.zvp_coef (RL-ZVP) they become per-token [B, R], from the old policy's token entropies."""
    algo, pol = run.cfg.algo, batch.in_policy > 0
    adv = torch.zeros_like(batch.rewards)
    total = run.world.sum if run.world.size > 1 else None
    if pol.any() or total is not None:  # under torchrun every rank joins the batch-wide sums, rows or not
        adv[pol] = ADVANTAGES[algo.advantage](batch.rewards[pol], batch.group[pol], total=total)
    if algo.zvp_coef > 0:  # rows outside the policy loss keep 0 on every token
        adv = zvp_advantages(adv, batch.rewards, batch.correct, batch.group, batch.entropies,
                             batch.response_mask * pol[:, None], algo.zvp_coef)
    batch.advantages = adv
    return {}


def forward(run: Run, model, mb: Rollout, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and token entropies [b, R] of a micro-batch's responses under `model` (the policy, or
    the reference model), in the config's precision, at the sampling temperature."""
    t = run.cfg.train
    with autocast(run.cfg, model):
        return response_logprobs(model, mb, temperature=run.cfg.rollout.temperature, chunk_size=t.logprob_chunk,
                                 pack=t.pack, prompt_once=t.prompt_once, with_entropy=with_entropy)


@torch.no_grad()
def old_policy(run: Run, batch: Rollout) -> dict:
    """Old log-probs and token entropies of the policy that sampled the batch (and the reference
    model's log-probs for the KL term); returns the sampler-vs-trainer statistics.

    The old policy is the sampling policy. Where the sampler computed the same numbers (the policy's
    weights in its own dtype, no autocast: train.old_logprobs auto -> "sampler"), its log-probs and
    entropies are used and no pass runs; they differ from a teacher-forced pass only by cached vs
    full-sequence float rounding (~1e-7 in fp32, ~1e-16 in fp64). Otherwise a pass computes them in
    the micro-batches the update will use, so the first update sees ratio == 1 exactly (README
    pitfall 3), and the mismatch with the sampler's log-probs is logged."""
    use_sampler = old_logprobs_from_sampler(run) and batch.sample_logprobs is not None
    if use_sampler:
        batch.old_logprobs, batch.entropies = batch.sample_logprobs, batch.sample_entropies
        if run.ref_model is None:
            return {}
    models = ([] if use_sampler else [run.model]) + ([run.ref_model] if run.ref_model is not None else [])
    for m in models:
        m.eval()
    out = {m: ([], []) for m in models}
    slices = [rows for mini in even_out(slices_of(run, batch), run.world) for rows in mini]
    for rows in slices:
        mb = batch.select(rows if rows is not None else [0])  # None: a forward keeping FSDP's collectives in step
        for m in models:
            lp, ent = forward(run, m, mb, with_entropy=m is run.model)
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
    """train.old_logprobs: "auto" takes the sampler's numbers when it samples with the policy's own weights in
    fp32/fp64 without autocast (the trainer's computation; under torchrun too, so N ranks resolve it alike)."""
    mode, m = run.cfg.train.old_logprobs, run.cfg.model
    if mode == "auto":  # in bf16/fp16, cached decoding and a full pass differ at the dtype's precision
        same_dtype = rollout_dtype(run.cfg) == getattr(torch, m.dtype)
        return same_dtype and m.autocast == "none" and m.dtype in ("float32", "float64") and run.sampler is not None
    return mode == "sampler"


def update(run: Run, batch: Rollout) -> dict:
    """ppo_epochs x mini_batches optimizer steps over the batch, each with grad clipping."""
    cfg, model = run.cfg, run.model
    model.train()
    keep = echorl.rows_to_update(batch)  # EchoRL: echo-only rows ride along only where they hold a clip
    totals, n_opt = {}, 0
    for _ in range(cfg.train.ppo_epochs):
        for micro in even_out(slices_of(run, batch, keep), run.world):
            run.opt.zero_grad(set_to_none=True)
            stats = accumulate_gradients(run, batch, micro)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip))
            if not math.isfinite(grad_norm):
                raise NonFiniteError(f"non-finite grad_norm ({grad_norm})")
            if stats.pop("tokens") > 0:  # no token to learn from: no step (Adam's momentum would still move)
                run.opt.step()
            run.sched.step()
            n_opt += 1
            totals = metrics.add(totals, stats | {"grad_norm": Sum(grad_norm)})
    run.opt.zero_grad(set_to_none=True)  # no gradient buffers held through the next rollout
    if run.sampling_weights is not None:  # the sampling weights follow the policy
        (dist.refresh_copy if run.world.launched else refresh_sampling_copy)(run.sampling_weights, run.model)
    out = {k: Sum(v / max(n_opt, 1)) for k, v in totals.items()}  # per optimizer step
    out["grad_norm"] = float(out.get("grad_norm", 0.0))           # global already: equal on every rank
    out = {k: Sum(0.0) for k in ("loss_pg", "loss_echo", "kl", "clip_frac_low", "clip_frac_high")} | out
    return {**out, "lr": run.sched.get_last_lr()[0]}


def accumulate_gradients(run: Run, batch: Rollout, micro: list[torch.Tensor | None]) -> dict:
    """Backward the loss of one mini-batch (`micro`: one tensor of row indices per micro-batch; None:
    a step-keeping forward, see even_out); gradients accumulate in .grad. Returns this rank's share
    of the mini-batch's losses and clip fractions, and under "tokens" the policy and clip tokens the
    whole mini-batch (every rank) trains on: 0 means nothing to learn from. Normalisers are counted over
    the whole mini-batch on every rank, so each micro-batch loss is its exact share of the mini-batch's
    and the gradient does not depend on the split into micro-batches or processes (README pitfall 4)."""
    cfg, algo, world = run.cfg, run.cfg.algo, run.world
    rows = torch.cat([idx for idx in micro if idx is not None] or [torch.zeros(0, dtype=torch.long)])
    mask = batch.policy_mask[rows]                                                      # [n, R]
    clip = batch.clip_mask[rows].sum() if batch.clip_mask is not None else mask.new_zeros(())
    counts = world.sum(torch.stack([(mask.sum(-1) > 0).sum().to(mask), mask.sum(), clip.to(mask)]).double())
    norm = Norm.from_counts(float(counts[0]), float(counts[1]), cfg.rollout.max_new_tokens)
    n_clip = float(counts[2]) if cfg.echo.enabled else 0.0
    sums, bad = {}, None
    for idx in micro:
        mb = batch.select(idx if idx is not None else [0])
        logp, ent = forward(run, run.model, mb, with_entropy=algo.entropy_coef > 0)
        if idx is None:  # keeps FSDP's collectives in step with the other ranks; adds nothing
            (logp.sum() * 0.0).backward()
            continue
        loss, stats = rl_loss(run, logp, ent, mb, norm)
        if n_clip > 0:  # EchoRL: the clip-SFT term, on the same forward's log-probs
            le = echorl.echo_term(logp, mb.clip_mask, cfg.echo, n_clip, algo.aggregation, norm)
            loss, stats["loss_echo"] = loss + le, le.detach()
        if bad is None and not torch.isfinite(loss.detach()):
            bad = f"{float(loss.detach())}; policy part {float(stats['loss_pg'])}"
        loss.backward()
        sums = {k: sums.get(k, 0.0) + float(v) for k, v in stats.items()}
    if world.max(float(bad is not None)) > 0:  # every rank stops alike, before the optimizer step
        raise NonFiniteError(f"non-finite loss ({bad or 'on another rank'})")
    for k in ("clip_low", "clip_high"):  # clipped tokens -> fraction of the mini-batch's policy tokens
        sums[f"clip_frac_{k[5:]}"] = sums.pop(k, 0.0) / norm.n_tokens
    return {k: Sum(v) for k, v in sums.items()} | {"tokens": float(counts[1]) + n_clip}


def rl_loss(run: Run, logp: torch.Tensor, ent: torch.Tensor, mb: Rollout, norm: Norm) -> tuple[torch.Tensor, dict]:
    """The RL loss of one micro-batch, from this forward's log-probs and entropies [b, R] and the
    mini-batch normalisers `norm`, over the policy rows' response tokens (`mb.policy_mask`):

        L = policy loss (with truncated importance sampling when algo.tis_cap asks) + kl_coef * KL
            - entropy_coef * entropy"""
    algo, mask = run.cfg.algo, mb.policy_mask                                    # [b, R]
    tis = tis_weights(mb.old_logprobs, mb.sample_logprobs, algo.tis_cap) \
        if algo.tis_cap is not None and mb.sample_logprobs is not None else None
    loss, clipped = policy_loss(logp, mb.old_logprobs, mb.advantages, mask, policy_loss=algo.policy_loss,
                                aggregation=algo.aggregation, eps_low=algo.eps_low, eps_high=algo.eps_high,
                                norm=norm, dual_clip=algo.dual_clip, token_weights=tis)
    stats = {"loss_pg": loss.detach(), "clip_low": clipped["clip_low"], "clip_high": clipped["clip_high"]}
    if mb.ref_logprobs is not None and algo.kl_coef > 0:
        kl = aggregate(kl_k3(logp, mb.ref_logprobs), mask, algo.aggregation, norm)
        loss, stats["kl"] = loss + algo.kl_coef * kl, kl.detach()
    if algo.entropy_coef > 0:
        bonus = aggregate(ent, mask, algo.aggregation, norm)
        loss, stats["entropy_bonus"] = loss - algo.entropy_coef * bonus, bonus.detach()
    return loss, stats


def slices_of(run: Run, batch: Rollout, keep: torch.Tensor | None = None) -> list[list[torch.Tensor]]:
    """This rank's rows of each mini-batch, in micro-batches (rollout.update_slices) of whole groups where
    they fit: the packed forward runs each distinct prompt of a micro-batch once."""
    t, G = run.cfg.train, run.cfg.rollout.group_size
    size = t.micro_batch_size // G * G or t.micro_batch_size
    return update_slices(batch, t.mini_batches, size, keep, run.world.sum if run.world.size > 1 else None)

# ========================================================================================
# Setup: one place that builds a run (train.py, the benchmarks and the tests all use it)


def setup(cfg: Config, *, checkpoint: Path | None = None, reward_fn: RewardFn | None = None,
          world: World | None = None) -> Run:
    """Model, tokenizer, optimizer, scheduler, reference model, problem stream, reward function, sampler.

    `checkpoint`: a checkpoint folder to continue from. `reward_fn(responses, golds) -> rewards` replaces the
    verifier. Under torchrun (`world`, default: dist.init) the policy is sharded with FSDP2 and rollouts sample
    from a full copy (dist.py). RNGs are seeded after every model is built (a cached warm start or not)."""
    world = world or dist.init(cfg)
    if cfg.log.probe_every and world.launched:
        raise ConfigError("log.probe_every: EchoRL's probes compare gradients on one process's full model; "
                          "under torchrun set log.probe_every=0")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device, world)
    stream = train_stream(cfg)
    questions = [p.question for p in stream.problems] if isinstance(stream, ListStream) else None
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
    weights = sampling_copy(model, sampling, always=world.launched) if copy_bytes else None
    if cfg.train.old_logprobs == "sampler" and sampling.itemsize < 4:
        warnings.warn(f"train.old_logprobs: sampler with {sampling} sampling weights makes algo.tis_cap a no-op and the "
                      f"ratio carries the {sampling} mismatch; 'auto' recomputes them in the policy's precision")
    if world.launched:
        compute = getattr(torch, cfg.model.autocast) if cfg.model.autocast != "none" else None
        model = dist.shard(model, compute)
        if ref_model is not None:
            ref_model = dist.shard(ref_model, compute)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                            betas=tuple(cfg.train.betas), fused=True if device.type == "cuda" else None)
    sched = make_scheduler(opt, cfg)
    seed_everything(cfg.train.seed + world.rank)
    if reward_fn is None:
        reward_fn = partial(reward.score_batch, workers=cfg.reward.workers, format_reward=cfg.reward.format_reward)
    sampler = None
    if cfg.rollout.engine == "slots":
        # the build tools torch.compile needs, checked now rather than at the first decoding step
        compiled = resolve_compile({"auto": "auto", "on": True, "off": False}[cfg.rollout.compile], device)
        sampler = Sampler(weights or model, tok, slots=cfg.rollout.slots, compile=compiled,
                          max_len=longest_row(cfg, tok, questions))
    run = Run(cfg=cfg, model=model, tok=tok, opt=opt, sched=sched, stream=stream, reward_fn=reward_fn,
              ref_model=ref_model, delims=step_delimiters(tok, cfg), eos=eos_ids(tok, model),
              sampling_weights=weights, sampler=sampler, world=world)
    if checkpoint is not None:
        run.step = load_checkpoint(checkpoint, run)
    return run


def step_delimiters(tok, cfg: Config) -> dict:
    """entropy.delimiter_table of echo.delimiter; echo.delimiter_ids are checked here, where the vocabulary is known."""
    try:
        return delimiter_table(tok, cfg.echo.delimiter, cfg.echo.delimiter_ids)
    except ValueError as e:
        raise ConfigError(f"config key 'echo.delimiter_ids': {e}") from None


def train_stream(cfg: Config):
    """The training problems: the embedded task's endless stream, or a file's problems, shuffled."""
    if cfg.data.train == "tiny":
        return tiny.ProblemStream(cfg.tiny, cfg.train.seed)
    return ListStream(load_problems(cfg.data.train, cfg.data.question_key, cfg.data.answer_key,
                                    max_question_chars=cfg.data.max_question_chars), cfg.train.seed, cfg.data.shuffle)


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
# The loop: steps, evaluation, logging, checkpoints, a clean stop


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False, allow_changes: bool = False,
          reward_fn: RewardFn | None = None, command: str = "python train.py --config <config>") -> list[dict]:
    """Run the whole loop into cfg.train.out_dir; returns the per-step metrics written by this call.
    `command` (how the run was launched) is quoted in the closing lines' next steps. Under torchrun
    every rank runs this; rank 0 alone checks the folder, prints and writes files."""
    t_start = time.perf_counter()
    world = dist.init(cfg)
    try:
        ckpt = world.on_main(prepare_out_dir, cfg, resume, overwrite, allow_changes)  # rank 0 decides for all
        out = Path(cfg.train.out_dir)
        dist.check_shared_folder(out, world)  # every rank writes its checkpoint shards there
        heldout = load_benchmarks(cfg)  # data errors surface before the model is loaded
        run = setup(cfg, checkpoint=ckpt, reward_fn=reward_fn, world=world)
        if world.main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json.tmp").write_text(json.dumps(to_dict(cfg), indent=2))
            os.replace(out / "config.json.tmp", out / "config.json")
            if ckpt:
                print(f"resumed from {ckpt} at step {run.step}")
        if ckpt and run.step >= cfg.train.steps:
            if world.main:
                print(f"{out} is complete: {run.step} of {cfg.train.steps} steps; train further with: "
                      f"{further(command, 2 * cfg.train.steps)}")
            dist.close(world)
            return []
        logger = Logger(cfg, out, run.step) if world.main else None
        history, saved_step, start = [], run.step, {}
        if run.step == 0 and heldout and cfg.eval.at_start:
            start = {"step": 0, **evaluate_run(run, heldout)}
            if logger:
                logger.log(0, {k: v for k, v in start.items() if k != "step"})
        bar = tqdm(total=cfg.train.steps, initial=run.step, desc=f"{cfg.algo.name}{'+echo' if cfg.echo.enabled else ''}",
                   dynamic_ncols=True, disable=not world.main)
        agreed = False  # the stop every rank takes: exchanged once per step, never written by the signal handler
        with StopAfterStep() as stop, bar:
            while run.step < cfg.train.steps and not agreed:
                t0 = time.perf_counter()
                try:
                    stats, batch = train_step(run)
                except NonFiniteError as e:
                    raise NonFiniteError(f"step {run.step + 1}: {e}; stopped before the optimizer step; last good "
                                         f"checkpoint: {latest_checkpoint(out) or 'none'}. Lower train.lr or check the "
                                         f"data") from None
                stats["time/step"] = time.perf_counter() - t0
                s = run.step
                if (cfg.eval.every and s % cfg.eval.every == 0) or s == cfg.train.steps:
                    stats.update(evaluate_run(run, heldout))
                agreed = world.max(float(stop.requested)) > 0  # every rank stops after the same step
                if logger:
                    if cfg.log.log_rollouts_every and (s % cfg.log.log_rollouts_every == 0 or s == 1):
                        dump_rollouts(batch, run, out / "rollouts" / f"step_{s:06d}.jsonl")
                    logger.log(s, stats)
                history.append({"step": s, **stats})
                bar.update(1)
                bar.set_postfix(reward=f"{stats['reward']:.3f}", degen=f"{stats['frac_degenerate']:.2f}",
                                **{k.split("/")[1]: f"{v:.3f}" for k, v in stats.items() if k.endswith("/acc")})
                if (cfg.train.save_every and s % cfg.train.save_every == 0) or s == cfg.train.steps or agreed:
                    save_checkpoint(out, s, run, cfg.train.keep_checkpoints)
                    saved_step = s
        if run.step < cfg.train.steps:
            raise Interrupted(f"stopped at step {run.step} of {cfg.train.steps}; checkpoint "
                              f"{out / 'checkpoints' / f'step_{saved_step:06d}'}")
        if world.main:
            summary(cfg, [start] * bool(start) + history, time.perf_counter() - t_start, out, command)
    except Interrupted:  # every rank stopped after the same step: leave together
        dist.close(world)
        raise
    except BaseException:  # maybe this rank alone: leave without waiting (torchrun then stops the others)
        dist.abandon(world)
        raise
    dist.close(world)
    return history


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--resume", action="store_true", help="continue the run in train.out_dir from its last checkpoint")
    ap.add_argument("--overwrite", action="store_true", help="move a previous run in train.out_dir aside and start anew")
    ap.add_argument("--allow-changes", action="store_true", help="--resume even if the config differs")
    args = ap.parse_args(argv)
    hf_logging.disable_progress_bar()  # HF's "loading/writing shards" bars would break the run's bar
    command = launch_command(f"train.py --config {args.config}" + "".join(f" --set {o}" for o in args.overrides))
    say = print if int(os.environ.get("RANK", 0)) == 0 else (lambda *a, **k: None)
    out = None
    try:
        cfg = load_config(args.config, args.overrides)
        out = Path(cfg.train.out_dir)
        train(cfg, resume=args.resume, overwrite=args.overwrite, allow_changes=args.allow_changes, command=command)
    except (ConfigError, DataError, RunFolderError, FileNotFoundError, NonFiniteError, CheckpointError) as e:
        say(f"error: {e}{rerun_hint(out, command) if isinstance(e, NonFiniteError) else ''}", file=sys.stderr)
        sys.exit(1)
    except (Interrupted, KeyboardInterrupt) as e:
        what = f"{e}" if isinstance(e, Interrupted) else "interrupted: stopped at once, the last saved checkpoint is intact"
        say(f"\n{what}{rerun_hint(out, command)}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
