"""EchoRL: select EchoClips from advantage-degenerated groups and add a small SFT loss on them.

In a group where every rollout is correct, all advantages are zero and
the policy loss teaches nothing. EchoRL splits a correct rollout into steps, finds the step of
highest mean token entropy (its hardest decision that it still got right), and keeps the prefix
that ends there (the EchoClip). A supervised term `-coef * mean log p(clip tokens)` is added to
the RL loss. Selection is a few tensor ops on quantities the loop already has (old-policy
entropies, the response mask); the loss reuses the training forward's log-probs.

Everything here is a pure function of tensors so it can be called from a notebook:

    sids = entropy.step_ids(response_ids, response_mask, entropy.delimiter_table(tok), eos_ids, min_tokens=4)
    clip_mask, stats = select_clips(correct, group, response_mask, entropies, sids, EchoConfig())
    loss = policy_loss + echo_loss(logprobs, clip_mask, coef=0.001)
"""
from __future__ import annotations

import copy
import time
import zlib
from dataclasses import dataclass, field
from typing import Literal

import torch

from entropy import step_ids, step_reduce
from losses import Norm, aggregate
from metrics import Max, Mean, Sum


@dataclass
class EchoConfig:
    enabled: bool = True
    coef: float = 0.001                      # lambda; the authors' script uses 1e-3
    delimiter: Literal["newline", "sentence", "ids"] = "newline"  # newline: every token whose text holds a newline
                                             # (from the vocabulary); ids: exactly the tokens of delimiter_ids
    delimiter_ids: list[int] = field(default_factory=lambda: [198, 271])  # the authors' newline_token_ids: Qwen2.5's
                                             # "\n" and "\n\n" (checked against the tokenizer at setup)
    reduce: Literal["mean", "max", "sum"] = "mean"
    select: Literal["peak", "random_step", "full", "lowest_entropy"] = "peak"
    scope: Literal["degenerate", "success"] = "degenerate"  # degenerate: all-correct groups (by the verifier; DAPO's
                                             # overlong shaping may leave their rewards unequal); success: every
                                             # correct rollout of any group
    clips_per_group: Literal["1", "all"] = "1"
    min_step_tokens: int = 4                 # a shorter step merges into the next (entropy.step_ids); 1 = plain split
    min_steps: int = 1                       # responses with fewer steps give no clip
    max_clip_tokens: int = 0                 # 0 = no bound
    keep_dropped_groups: bool = True         # DAPO: groups dropped by dynamic sampling still feed clips
    normalizer: Literal["clip_tokens", "policy"] = "clip_tokens"  # L_echo: mean over clip tokens, or the policy
                                             # loss's own aggregation and normalisers (the paper is silent)

# Positive-only SFT (RAFT's loss, arXiv 2504.11343: -mean over the tokens of every correct response of log pi) is
# EchoRL with select=full, clips_per_group=all, scope=success: L_echo = -coef * sum_{correct a, t} log pi / #tokens.
# RAFT++ (its clipped, importance-weighted form) is a policy loss instead: algo.name=raftpp (losses.adv_positive).


def select_clips(correct: torch.Tensor, group: torch.Tensor, response_mask: torch.Tensor,
                 entropies: torch.Tensor, sids: torch.Tensor, cfg: EchoConfig,
                 generator: torch.Generator | None = None, uniforms: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, dict]:
    """EchoClip mask [B, R] (float) and statistics.

    correct [B] bool, group [B] long, response_mask [B, R], entropies [B, R] (old policy, no grad),
    sids [B, R] step index per token (-1 on padding, from entropy.step_ids). select = random_step
    draws row b's step from uniforms[b] in [0, 1) (`row_uniforms`: keyed on what identifies the row),
    else from `generator`.
    """
    B, R = response_mask.shape
    assert correct.shape == group.shape == (B,) and entropies.shape == sids.shape == (B, R)
    dev = response_mask.device
    valid = response_mask > 0
    correct = correct.bool()
    _, g = torch.unique(group, return_inverse=True)                               # dense group ids
    n_groups = int(g.max()) + 1 if B else 0
    g_all = torch.ones(n_groups, dtype=torch.long, device=dev).scatter_reduce(0, g, correct.long(), "amin")
    all_success = g_all[g] == 1                                                   # [B]

    step_h = step_reduce(entropies, sids, cfg.reduce)                            # [B, S], -inf = no step
    n_steps = sids.amax(-1) + 1                                                   # [B]
    peak_h, peak_k = step_h.amax(-1), step_h.argmax(-1)                           # earliest on ties
    if cfg.select == "peak":
        k = peak_k
    elif cfg.select == "lowest_entropy":
        k = step_h.masked_fill(step_h == float("-inf"), float("inf")).argmin(-1)
    elif cfg.select == "full":
        k = n_steps - 1
    elif cfg.select == "random_step":
        u = uniforms.to(dev) if uniforms is not None else torch.rand(B, generator=generator, device="cpu").to(dev)
        k = (u * n_steps.clamp_min(1)).long().clamp(max=n_steps.clamp_min(1) - 1)
    else:
        raise ValueError(f"unknown echo.select {cfg.select!r}; allowed: peak, random_step, full, lowest_entropy")

    scope = {"degenerate": all_success, "success": torch.ones_like(all_success)}[cfg.scope]
    eligible = correct & scope & (n_steps >= max(cfg.min_steps, 1))
    if cfg.clips_per_group == "1":
        # One rollout per group: the one whose peak step is hardest (earliest row on ties).
        score = peak_h.masked_fill(~eligible, float("-inf"))
        g_best = torch.full((n_groups,), float("-inf"), device=dev, dtype=score.dtype).scatter_reduce(0, g, score, "amax")
        cand = eligible & (score == g_best[g])
        rows = torch.arange(B, device=dev).masked_fill(~cand, B)
        g_first = torch.full((n_groups,), B, device=dev).scatter_reduce(0, g, rows, "amin")
        chosen = cand & (rows == g_first[g])
    elif cfg.clips_per_group == "all":
        chosen = eligible
    else:
        raise ValueError(f"unknown echo.clips_per_group {cfg.clips_per_group!r}; allowed: '1', 'all'")

    clip = valid & chosen[:, None] & (sids <= k[:, None]) & (sids >= 0)           # [B, R]
    if cfg.max_clip_tokens > 0:
        clip = clip & (clip.long().cumsum(-1) <= cfg.max_clip_tokens)
    return clip.float(), _stats(clip, chosen, valid, all_success, g, n_groups, k, n_steps, step_h, entropies)


def _stats(clip, chosen, valid, all_success, g, n_groups, k, n_steps, step_h, entropies) -> dict:
    """The per-step metrics of EchoRL: counts, and means over the clips (or the all-correct groups)."""
    n = int(chosen.sum())
    degenerate_groups = torch.zeros(n_groups, dtype=torch.bool, device=clip.device).index_fill(
        0, g[all_success], True)
    groups_with_clip = torch.zeros(n_groups, dtype=torch.bool, device=clip.device).index_fill(0, g[chosen], True)
    n_deg = int(degenerate_groups.sum())
    out = {"echo/n_clips": Sum(n), "echo/success_groups": Sum(n_deg)}
    if n_deg:  # undefined without all-success groups: the key is left out
        out["echo/clip_group_share"] = Mean(float((groups_with_clip & degenerate_groups).sum()) / n_deg, n_deg)
    if n:
        acc = step_h.dtype  # fp32, or fp64 for fp64 entropies
        c, vf = clip[chosen].to(acc), valid[chosen].to(acc)
        kk, ns = k[chosen].to(acc), n_steps[chosen].to(acc)
        ent = entropies[chosen].to(acc)
        per_clip = {
            "echo/clip_tokens": c.sum(-1).mean(),
            "echo/clip_frac": (c.sum(-1) / vf.sum(-1).clamp_min(1)).mean(),
            "echo/peak_step": kk.mean(),
            "echo/peak_pos": ((kk + 1) / ns).mean(),                       # 1.0 = the last step
            "echo/peak_step_entropy": step_h[chosen].gather(1, k[chosen, None]).mean(),
            "echo/mean_step_entropy": _mean_step(step_h[chosen]).mean(),
            "echo/response_entropy": ((ent * vf).sum(-1) / vf.sum(-1).clamp_min(1)).mean(),
        }
        out.update({key: Mean(float(v), n) for key, v in per_clip.items()})
    return out


def _mean_step(step_h: torch.Tensor) -> torch.Tensor:
    """[n, S] step values (-inf: no such step) -> [n] mean over each row's steps."""
    real = step_h > float("-inf")
    return step_h.masked_fill(~real, 0.0).sum(-1) / real.sum(-1).clamp_min(1)


# ----------------------------------------------------------------------------------------
# Probes (log.probe_every): how much of the update EchoRL drives, and what it does to the peak step


def probe_update(run, batch, micro: list[torch.Tensor], forward, rl_loss) -> dict:
    """The probes that run before the update (train.py's hook, log.probe_every): EchoRL's gradient share
    (`probe_gradients`), the effect of an echo-only and of a policy-only optimizer step on the peak step
    (`probe_split_steps`), and the stakes of the peak step (`probe_stakes`, log.stakes_samples > 0).
    They work on copies: the weights, the optimizer's state and the global RNG streams leave as they came,
    so the update that follows is bit-identical with probes on or off (tests/test_probes.py)."""
    cuda = next(run.model.parameters()).is_cuda
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
        grads, stats = _probe_grads(run, batch, micro, forward, rl_loss)
        stats |= probe_split_steps(run, batch, grads, forward)
        stats |= probe_stakes(run, batch)
    return stats


def probing(run, batch) -> bool:
    """log.probe_every: EchoRL's probes run on this step (one process; they hold clips to measure)."""
    every = run.cfg.log.probe_every
    return bool(every and run.cfg.echo.enabled and (run.step + 1) % every == 0 and batch.clip_mask.sum() > 0)


def probe_gradients(run, batch, micro: list[torch.Tensor], forward, rl_loss) -> dict:
    """The norm of EchoRL's gradient over the policy loss's, on the first mini-batch of the update (all
    its micro-batches, echo-only rows included), normalised as in the update. One more forward and two
    backwards of that mini-batch. `forward(run, model, mb)` and `rl_loss(run, logp, ent, mb, norm)`
    are train.py's."""
    return _probe_grads(run, batch, micro, forward, rl_loss)[1]


def _probe_grads(run, batch, micro, forward, rl_loss) -> tuple[dict, dict]:
    """probe_gradients' metrics, and each loss's gradient {"policy"/"echo": (per-parameter fp32 gradients,
    the mini-batch's tokens of that loss)} for probe_split_steps."""
    cfg, model = run.cfg, run.model
    rows = torch.cat(micro)
    norm = Norm.of(batch.policy_mask[rows], cfg.rollout.max_new_tokens)
    n_clip = float(batch.clip_mask[rows].sum())
    params = [p for p in model.parameters() if p.requires_grad]
    g_pg, g_echo = [torch.zeros_like(p, dtype=torch.float32) for p in params], \
        [torch.zeros_like(p, dtype=torch.float32) for p in params]
    model.train()
    for idx in micro:
        mb = batch.select(idx)
        logp, ent = forward(run, model, mb, with_entropy=cfg.algo.entropy_coef > 0)
        pg, _ = rl_loss(run, logp, ent, mb, norm)
        echo = echo_term(logp, mb.clip_mask, cfg.echo, n_clip, cfg.algo.aggregation, norm)
        for acc, loss in ((g_pg, pg), (g_echo, echo)):
            if loss.requires_grad:
                for a, g in zip(acc, torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)):
                    if g is not None:
                        a += g.float()
    norm_of = lambda gs: float(torch.sqrt(sum((g ** 2).sum() for g in gs)))
    pg_n, echo_n = norm_of(g_pg), norm_of(g_echo)
    grads = {"policy": (g_pg, norm.n_tokens_real), "echo": (g_echo, n_clip)}
    return grads, {"probe/grad_norm_policy": pg_n, "probe/grad_norm_echo": echo_n,
                   "probe/echo_over_policy": echo_n / pg_n if pg_n > 0 else float(echo_n > 0) * float("inf")}


def probe_split_steps(run, batch, grads: dict, forward) -> dict:
    """EchoRL's own effect on the decision it targets, apart from the policy loss's. From the policy as it
    is before the update, one optimizer step with one loss's gradient alone (`grads`: "echo" -> L_echo's,
    "policy" -> the RL loss's: policy loss, KL and entropy terms; each summed over the update's first
    mini-batch, as probe_gradients sums them), taken on a copy of the model and of the optimizer (same
    type, hyperparameters, learning rate and state), clipped at train.grad_clip as the update clips;
    a loss without tokens in that mini-batch takes no step (change 0), as in the update. Logs the
    change of each EchoClip's peak-step mean entropy after that step, against the same forward of the
    policy before it: `probe/peak_entropy_change_echo` and `_policy` (< 0: the step sharpened the
    decision). `probe/peak_entropy_change` (probe_sharpening) is the whole update's. Memory: one
    more copy of the model and its optimizer state, one at a time."""
    rows = torch.nonzero(batch.clip_mask.sum(-1) > 0).squeeze(-1)
    mb = batch.select(rows)
    peak = peak_tokens(mb.clip_mask, mb.extras["step_ids"])
    run.model.eval()
    with torch.no_grad():
        _, before = forward(run, run.model, mb, with_entropy=True)
    out = {}
    for name, (g, tokens) in grads.items():
        change = 0.0
        if tokens > 0:
            model, opt = copy.deepcopy((run.model, run.opt))  # one memo: the copy's optimizer holds the copy's
            params = [p for p in model.parameters() if p.requires_grad]
            for p, gi in zip(params, g):
                p.grad = gi.to(p.dtype)
            torch.nn.utils.clip_grad_norm_(params, run.cfg.train.grad_clip)
            opt.step()
            model.eval()
            with torch.no_grad():
                _, after = forward(run, model, mb, with_entropy=True)
            change = peak_entropy_change(before, after, peak)
            del model, opt
        out[f"probe/peak_entropy_change_{name}"] = change
    return out


@torch.no_grad()
def probe_sharpening(run, batch, forward) -> dict:
    """After the update: the change of the mean token entropy of each EchoClip's peak step (the
    decision EchoRL targets), from the old policy to the updated one. This is the whole update's
    effect (policy loss included), not EchoRL's alone. One no-grad forward of the clipped rows."""
    rows = torch.nonzero(batch.clip_mask.sum(-1) > 0).squeeze(-1)
    mb = batch.select(rows)
    run.model.eval()
    _, after = forward(run, run.model, mb, with_entropy=True)
    peak = peak_tokens(mb.clip_mask, mb.extras["step_ids"])
    return {"probe/peak_entropy_change": peak_entropy_change(mb.entropies, after, peak)}


def peak_tokens(clip_mask: torch.Tensor, sids: torch.Tensor) -> torch.Tensor:
    """[B, R] bool: the tokens of each EchoClip's last step (the peak step k* when select = peak)."""
    clip = clip_mask > 0
    last = sids.masked_fill(~clip, -1).amax(-1)                                    # [B], -1: no clip
    return clip & (sids == last[:, None])


def peak_entropy_change(before: torch.Tensor, after: torch.Tensor, peak: torch.Tensor) -> float:
    """Mean over clips of the change of the peak step's mean token entropy, after minus before the
    update (entropies [B, R] of the same tokens): < 0 means EchoRL sharpened the decision it targets."""
    rows = peak.any(-1)
    if not rows.any():
        return 0.0
    n = peak[rows].sum(-1)
    mean = lambda h: (h[rows] * peak[rows]).sum(-1) / n
    return float((mean(after) - mean(before)).mean())


def stakes(sample_correct, response_ids: torch.Tensor, sids: torch.Tensor, steps: torch.Tensor, K: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """How much step k of a response decides its answer: P(correct | the response through step k) -
    P(correct | the response before step k), each the share of K continuations of that prefix that the
    verifier accepts (prefix + continuation is the response it verifies).

    response_ids [B, R] (right-padded), sids [B, R] (entropy.step_ids: -1 on padding), steps [B] or
    [B, J] long: the step k of each row (J steps a row; -1: none, NaN out). The prefix before step k
    holds the response tokens of steps < k, the one through it those of steps <= k.
    `sample_correct(prefixes, K) -> [n, K] bool` continues each (row, response prefix ids [L]) K times
    and verifies prefix + continuation (`continue_and_verify` does it with a run's sampler and
    verifier); each distinct prefix is asked once, all in one call. Returns (p_before, p_through),
    float64, of steps' shape; the stakes are their difference."""
    flat = steps if steps.dim() == 2 else steps[:, None]
    cut = {}                                                           # (row, prefix length) -> index
    index = torch.zeros(*flat.shape, 2, dtype=torch.long)              # [B, J, before / through]
    for b, j in torch.nonzero(flat >= 0).tolist():
        k = int(flat[b, j])
        real = sids[b] >= 0
        for side, n in enumerate((int((real & (sids[b] < k)).sum()), int((real & (sids[b] <= k)).sum()))):
            index[b, j, side] = cut.setdefault((b, n), len(cut))
    prefixes = [(b, response_ids[b, :n]) for b, n in cut]
    verdicts = sample_correct(prefixes, K) if prefixes else torch.zeros(0, K, dtype=torch.bool)
    assert verdicts.shape == (len(prefixes), K), (verdicts.shape, len(prefixes), K)
    p = verdicts.double().mean(-1).cpu()[index] if prefixes else torch.zeros(index.shape, dtype=torch.float64)
    p = p.masked_fill((flat < 0)[..., None].cpu(), float("nan"))
    p_before, p_through = p[..., 0], p[..., 1]
    return (p_before, p_through) if steps.dim() == 2 else (p_before[:, 0], p_through[:, 0])


def continue_and_verify(run, batch, prefixes: list[tuple[int, torch.Tensor]], K: int) -> torch.Tensor:
    """`stakes`' sample_correct for a run: each (row of `batch`, response prefix ids) continued K times by
    the run's sampler (the policy that sampled the batch, at the rollouts' temperature and top-p, up to
    the rest of rollout.max_new_tokens), prefix + continuation verified by run.reward_fn with the golds
    of the batch, correct as train.score decides it (reward >= 1; under reward.truncated "zero" a
    response that reaches the bound without EOS is wrong). A prefix that already holds an EOS, or fills
    the bound, is verified as it is (K equal verdicts). -> [n, K] bool.

    The sampler takes prompt + prefix as token ids: the policy continues exactly the tokens it sampled.
    (A text prompt would be re-encoded: with a BPE vocabulary, decode -> encode may split a decoded
    prefix into other tokens, which the policy would not have sampled.) Continuation j of a prefix
    draws from a stream keyed on (train.seed, step, the row's key, the prefix length, j): reproducible,
    and the global RNG is left alone."""
    cfg, N = run.cfg, run.cfg.rollout.max_new_tokens
    if run.sampler is None:
        raise ValueError("the stakes probe continues prefixes with the slot sampler; set rollout.engine: slots")
    keys = batch.extras.get("row_keys") or [str(b) for b in range(len(batch))]
    eos = set(run.eos)
    ids = [x.tolist() for _, x in prefixes]
    ended = [bool(eos & set(x)) or len(x) >= N for x in ids]
    # the responses to verify: (prefix i, continuation j; None: the ended prefix itself) -> (ids, truncated)
    responses = {(i, None): (ids[i], not (eos & set(ids[i]))) for i in range(len(ids)) if ended[i]}
    todo = [i for i in range(len(ids)) if not ended[i]]
    if todo:
        prompts = [batch.prompt_ids[prefixes[i][0]][batch.prompt_mask[prefixes[i][0]] > 0].tolist() + ids[i]
                   for i in todo]
        seeds = [zlib.crc32(f"{keys[prefixes[i][0]]}/{len(ids[i])}\x00{j}".encode()) & 0x7FFFFFFF
                 for i in todo for j in range(K)]
        gen = run.sampler.generate(prompts, group_size=K, max_new_tokens=[N - len(ids[i]) for i in todo],
                                   temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                   seed=zlib.crc32(f"stakes/{cfg.train.seed}/{run.step}".encode()), row_seeds=seeds)
        for r in range(len(gen)):
            i = todo[r // K]
            responses[(i, r % K)] = (ids[i] + gen.response_ids[r][gen.response_mask[r] > 0].tolist(),
                                     bool(gen.truncated[r]))
    cells = list(responses)
    texts = run.tok.batch_decode([responses[c][0] for c in cells], skip_special_tokens=True)
    rewards = run.reward_fn(texts, [batch.extras["golds"][prefixes[i][0]] for i, _ in cells]) if cells else []
    out = torch.zeros(len(prefixes), K, dtype=torch.bool)
    for (i, j), r in zip(cells, rewards):
        out[i, slice(None) if j is None else j] = r >= 1.0 and not (responses[(i, j)][1] and
                                                                    cfg.reward.truncated == "zero")
    return out


def probe_stakes(run, batch, samples: int | None = None, clips: int | None = None) -> dict:
    """The premise of EchoRL, measured: does the peak step decide the answer? For the EchoClips of a
    batch (at most `clips`, default log.stakes_clips, picked by a hash of (seed, step, row key)), the
    stakes (`stakes`, `continue_and_verify`; K = `samples`, default log.stakes_samples; 0: off) of
    each clip's peak step k* (highest echo.reduce step entropy under the old policy), and as controls
    of a random step of the same row (drawn as row_uniforms draws: keyed on seed, step and row key)
    and of its lowest-entropy step. Logs probe/peak_stakes, probe/random_stakes, probe/lowest_stakes
    (means over the clips), probe/peak_p_before, probe/peak_p_through, probe/stakes_clips.

    Runs on a batch after train.collect, train.old_policy and echo_clips (a notebook or a study can
    call it on a warm start; train.py calls it every log.probe_every steps, before the update).
    Cost: at most 6 x clips distinct prefixes, K continuations each, in one sampler call."""
    K = run.cfg.log.stakes_samples if samples is None else samples
    cap = run.cfg.log.stakes_clips if clips is None else clips
    if K <= 0 or batch.clip_mask is None or not (batch.clip_mask.sum(-1) > 0).any():
        return {}
    t0 = time.perf_counter()
    seed, step = run.cfg.train.seed, run.step
    keys = batch.extras.get("row_keys") or [str(b) for b in range(len(batch))]
    rows = torch.nonzero(batch.clip_mask.sum(-1) > 0).squeeze(-1).cpu()
    if 0 < cap < len(rows):  # a fixed subset: the lowest hashes of the rows' keys
        h = row_uniforms(seed, step, [f"{keys[b]}/stakes-pick" for b in rows.tolist()])
        rows = rows[h.argsort()[:cap]].sort().values
    mb = batch.select(rows)
    sids = mb.extras["step_ids"]
    step_h = step_reduce(mb.entropies, sids, run.cfg.echo.reduce)                   # [n, S], -inf = no step
    n_steps = (sids.amax(-1) + 1).clamp_min(1).cpu()
    u = row_uniforms(seed, step, [f"{keys[b]}/stakes" for b in rows.tolist()])
    random_k = (u * n_steps).long().clamp(max=n_steps - 1)
    lowest_k = step_h.masked_fill(step_h == float("-inf"), float("inf")).argmin(-1).cpu()
    steps = torch.stack([step_h.argmax(-1).cpu(), random_k, lowest_k], -1)             # [n, 3]
    before, through = stakes(lambda p, k: continue_and_verify(run, mb, p, k), mb.response_ids, sids.cpu(), steps, K)
    d, n = (through - before).mean(0), len(rows)
    return {"probe/peak_stakes": Mean(float(d[0]), n), "probe/random_stakes": Mean(float(d[1]), n),
            "probe/lowest_stakes": Mean(float(d[2]), n), "probe/peak_p_before": Mean(float(before[:, 0].mean()), n),
            "probe/peak_p_through": Mean(float(through[:, 0].mean()), n), "probe/stakes_clips": Sum(n),
            "time/probe_stakes": Max(time.perf_counter() - t0)}


def echo_loss(logprobs: torch.Tensor, clip_mask: torch.Tensor, coef: float,
              n_clip_tokens: float | None = None) -> torch.Tensor:
    """L_echo = -coef * mean over clip tokens of log pi(y_t | prefix).

    `n_clip_tokens` is the clip-token count of the whole mini-batch, so that micro-batches sum to
    the full-batch value; by default this micro-batch's own count.
    """
    n = clip_mask.sum() if n_clip_tokens is None else n_clip_tokens
    if float(n) == 0:
        return logprobs.sum() * 0.0  # keeps the graph; contributes no gradient
    return -coef * (logprobs * clip_mask).sum() / n


def echo_term(logprobs: torch.Tensor, clip_mask: torch.Tensor, cfg: EchoConfig, n_clip_tokens: float,
              aggregation: str, norm: Norm) -> torch.Tensor:
    """EchoRL's loss on one micro-batch, its exact share of the mini-batch's (README "Design choices").

    echo.normalizer "clip_tokens": `echo_loss` over the mini-batch's clip tokens (`n_clip_tokens`,
    summed over micro-batches and ranks). "policy": the clip tokens' log-probs under the policy loss's
    own aggregation and normalisers (`norm`); a mini-batch without policy tokens (DAPO, every group
    all-correct) has no such normaliser, and falls back to the clip-token mean rather than a sum."""
    if cfg.normalizer == "policy" and norm.n_tokens_real > 0:
        return -cfg.coef * aggregate(logprobs, clip_mask, aggregation, norm)
    return echo_loss(logprobs, clip_mask, cfg.coef, n_clip_tokens)


# ----------------------------------------------------------------------------------------
# Where EchoRL acts in the loop (train.py calls each once): the dropped all-correct groups it keeps
# (DAPO), the clips of a step's batch, and the rows the update must forward.


def dropped_groups_to_keep(correct: torch.Tensor, live: torch.Tensor, room: int, cfg: EchoConfig) -> torch.Tensor:
    """DAPO's dynamic sampling drops groups whose rewards are all equal; EchoRL keeps the all-correct
    ones (at most `room`) as echo-only groups: outside the policy loss, a source of clips.
    correct [B] bool, live [n_groups] bool (groups the policy loss keeps) -> [n_groups] bool."""
    if not (cfg.enabled and cfg.keep_dropped_groups):
        return torch.zeros_like(live)
    keep = ~live & correct.view(len(live), -1).all(-1)
    return keep & (keep.cumsum(0) <= room)


def row_uniforms(seed: int, step: int, row_keys: list[str]) -> torch.Tensor:
    """[B] uniforms in [0, 1), each a hash of (seed, step, the row's key): the same row draws the same
    number in one process or on any rank, whatever else is in the batch."""
    return torch.tensor([zlib.crc32(f"{seed}/{step}/{k}".encode()) / 2 ** 32 for k in row_keys], dtype=torch.float64)


def echo_clips(run, batch) -> dict:
    """The EchoClips of a step's batch (select_clips on the old policy's entropies): fills
    batch.clip_mask, and the step ids (for the rollout dumps and the probes); returns EchoRL's
    metrics, with the old policy's NLL of the clip tokens (how much there is to learn)."""
    cfg = run.cfg.echo
    sids = step_ids(batch.response_ids, batch.response_mask, run.delims, run.eos, cfg.min_step_tokens)
    batch.extras["step_ids"] = sids
    u = row_uniforms(run.cfg.train.seed, run.step, batch.extras["row_keys"]) if cfg.select == "random_step" else None
    batch.clip_mask, stats = select_clips(batch.correct, batch.group, batch.response_mask, batch.entropies, sids,
                                          cfg, uniforms=u)
    n = float(batch.clip_mask.sum())
    if n > 0:
        stats["echo/clip_nll"] = Mean(float(-(batch.old_logprobs * batch.clip_mask).sum()) / n, n)
    return stats


def rows_to_update(batch) -> torch.Tensor:
    """[B] bool: rows the update forwards: the policy rows and the echo-only rows that hold a clip
    (an echo-only row without one feeds neither loss)."""
    keep = batch.in_policy > 0
    return keep | (batch.clip_mask.sum(-1) > 0) if batch.clip_mask is not None else keep
