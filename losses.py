"""Rewards and log-probs in, a scalar loss out: advantages, policy losses, aggregation, KL.

Every method (GRPO, DAPO, Dr.GRPO, RLOO, REINFORCE++, GSPO, RAFT++, and `paper`, the EchoRL authors' setting) is a
row of PRESETS: an advantage estimator, a policy loss and an aggregation (plus a few flags for DAPO and the entropy
bonus). A new variant is a new small function and a row. RL-ZVP (`zvp_advantages`) turns the zero advantages of
zero-variance groups into per-token ones; it composes with every PPO-clip row.

Micro-batch invariance (README pitfall 4): `aggregate` takes normalisers computed over the
whole mini-batch (`Norm`), so summing the per-micro-batch losses gives the full-batch loss for
any split, and gradient accumulation needs no extra rescaling.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# ----------------------------------------------------------------------------------------
# Advantages: rewards [B], group ids [B] -> advantages [B]


def _group_stats(rewards: torch.Tensor, group: torch.Tensor):
    """Per-row centred reward r - mean_g, unbiased group std, and group size.

    A group of equal rewards gets a centred reward of exactly 0: float32 `sum / n` is not exact
    for rewards like 2/3 (overlong shaping), and a 1e-8 residue divided by std + eps would become
    a real policy gradient on a degenerate group (README pitfall 5).
    """
    _, inv = torch.unique(group, return_inverse=True)
    n_groups = int(inv.max()) + 1 if inv.numel() else 0  # no rows (a rank whose groups all dropped out)
    r = rewards.float()
    zeros = torch.zeros(n_groups, device=r.device)
    size = zeros.index_add(0, inv, torch.ones_like(r))
    mean = zeros.index_add(0, inv, r) / size
    hi = torch.full_like(zeros, float("-inf")).scatter_reduce(0, inv, r, "amax")
    lo = torch.full_like(zeros, float("inf")).scatter_reduce(0, inv, r, "amin")
    centred = torch.where((hi == lo)[inv], torch.zeros_like(r), r - mean[inv])
    std = (zeros.index_add(0, inv, centred ** 2) / (size - 1).clamp_min(1)).sqrt()  # unbiased, as torch.std
    return centred, std[inv], size[inv]


def adv_grpo(rewards, group, eps: float = 1e-6, total=None):
    """GRPO: (r - mean_g) / (std_g + eps)."""
    centred, std, _ = _group_stats(rewards, group)
    return centred / (std + eps)


def adv_drgrpo(rewards, group, eps: float = 1e-6, total=None):
    """Dr. GRPO: r - mean_g (no std division, which over-weights easy/hard prompts)."""
    return _group_stats(rewards, group)[0]


def adv_rloo(rewards, group, eps: float = 1e-6, total=None):
    """RLOO: r_i - mean_{j != i} r_j  =  G / (G - 1) * (r_i - mean_g)."""
    centred, _, size = _group_stats(rewards, group)
    return centred * size / (size - 1).clamp_min(1)


def adv_reinforce_pp_baseline(rewards, group, eps: float = 1e-6, total=None):
    """REINFORCE++ (baseline), sequence-level: c_i = r_i - mean_g, then A_i = c_i / (std(c) + eps), the
    unbiased std over the batch's sequences, with no mean subtracted (every group's centred rewards sum
    to 0, so their sequence mean is 0 already). A group of equal rewards, or of one response, keeps
    exactly 0.

    verl (core_algos.compute_reinforce_plus_plus_baseline_outcome_advantage + masked_whiten) and
    OpenRLHF whiten the same c_i token by token instead: mean and variance weighted by response
    length, the mean subtracted. Where length correlates with the centred reward that mean is not 0,
    and every token of an all-correct group gets the advantage -mean/std: a gradient on a degenerate
    group, the thing EchoRL's premise rests on not happening. Two groups of two, rewards (1, 0) with
    lengths (1, 3) and (1, 1) with lengths (2, 2): ours (1.22, -1.22, 0, 0); verl (1.77, -1.06,
    0.35, 0.35). `total` sums a tensor over every process that holds part of the batch (None: this
    process holds all of it); the std is then the batch's, whatever the number of processes.
    """
    a = adv_drgrpo(rewards, group)
    if total is None:
        return a / (a.std() + eps) if a.numel() > 1 else a
    n = total(torch.tensor([float(a.numel())], device=a.device))
    mean = total(a.sum()[None]) / n
    var = total(((a - mean) ** 2).sum()[None]) / (n - 1).clamp_min(1)
    return a / (var.sqrt() + eps) if n.item() > 1 else a


def adv_positive(rewards, group, eps: float = 1e-6, total=None):
    """RAFT++ (Xiong et al. 2025, arXiv 2504.11343, the RAFT++ objective of Sec. 2): A = 1 on every verified-success
    response (reward 1.0, reward.py's correct answer), 0 on every other one: a clipped policy gradient on the
    positives only, no baseline. Under seq-mean-token-mean and PPO clip the loss is the paper's
    -(1/|D|) sum_a (1/|a|) sum_t min(rho_t, clip(rho_t, 1 - eps, 1 + eps)) * 1[a is correct]."""
    return (rewards.float() >= 1.0).float()


# The advantage table: fn(rewards [B], group [B], eps, total) -> advantages [B]. Group statistics are
# local to a process (whole groups per rank); `total` is for the rare batch-wide statistic.
ADVANTAGES = {"grpo": adv_grpo, "drgrpo": adv_drgrpo, "rloo": adv_rloo,
              "reinforce_pp_baseline": adv_reinforce_pp_baseline, "positive": adv_positive}


def zvp_advantages(adv: torch.Tensor, rewards: torch.Tensor, correct: torch.Tensor, group: torch.Tensor,
                   entropies: torch.Tensor, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """RL-ZVP (Le et al. 2025, arXiv 2509.21880, Eq. 5): per-token advantages [B, R] that give zero-variance
    groups (every reward of the group equal, so `adv` is 0 there) a signed, entropy-scaled signal:

        all correct:  A_t = alpha * H_t                      (confident tokens move least)
        all wrong:    A_t = -alpha * (max_k H_k - H_t)       (max over the response's own tokens: confident
                                                              tokens of a wrong response are pushed down most)

    H_t is the token entropy of the policy that sampled the batch, a constant (no gradient flows through it).
    Every other row keeps its sequence advantage on each of its tokens. adv, rewards, correct, group [B];
    entropies, mask [B, R]. A zero-variance group that is neither all correct nor all wrong (equal shaped
    rewards) keeps 0."""
    _, std, _ = _group_stats(rewards, group)                      # exactly 0 on zero-variance groups
    _, g = torch.unique(group, return_inverse=True)
    n = int(g.max()) + 1 if g.numel() else 0
    c = correct.long()
    all_right = torch.ones(n, dtype=torch.long, device=c.device).scatter_reduce(0, g, c, "amin")[g] == 1
    all_wrong = torch.zeros(n, dtype=torch.long, device=c.device).scatter_reduce(0, g, c, "amax")[g] == 0
    valid = mask > 0
    H = entropies.detach().float().masked_fill(~valid, 0.0)                       # [B, R]
    h_max = H.masked_fill(~valid, float("-inf")).amax(-1, keepdim=True).clamp_min(0.0)  # [B, 1]
    zv = (std == 0)[:, None]
    out = torch.where(zv & all_right[:, None], alpha * H, adv.float()[:, None].expand_as(H))
    out = torch.where(zv & all_wrong[:, None], -alpha * (h_max - H), out)
    return out * valid


def constant_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[n_groups] bool: every reward of the group is equal (zero advantage, "degenerate").
    Rows are grouped contiguously; an exact max == min test, not std == 0 (see _group_stats)."""
    g = rewards.view(-1, group_size)
    return g.amax(-1) == g.amin(-1)


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO soft overlong punishment: 0 up to max_len - buffer, then linear down to -penalty at max_len."""
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float)
    over = (lengths.float() - (max_len - buffer)).clamp(min=0)
    return -penalty * (over / buffer).clamp(max=1.0)


# ----------------------------------------------------------------------------------------
# Policy losses: per-token loss [B, T] and clip indicators


def ppo_clip_loss(logp, old_logp, adv, mask, eps_low: float, eps_high: float, dual_clip: float | None = None):
    """PPO clip with asymmetric eps (DAPO clip-higher) and optional dual clip (c > 1).

    loss_t = max(-A rho_t, -A clip(rho_t, 1 - eps_low, 1 + eps_high)); with dual clip, for A < 0
    the loss is also capped at -A * c.  logp, old_logp, mask [B, T]; adv [B] (one per sequence) or [B, T]
    (one per token: `zvp_advantages`).
    """
    A = (adv[:, None] if adv.dim() == 1 else adv).to(logp.dtype)
    ratio = torch.exp(logp - old_logp)                                           # [B, T]
    loss1, loss2 = -A * ratio, -A * ratio.clamp(1 - eps_low, 1 + eps_high)
    loss = torch.maximum(loss1, loss2)
    if dual_clip is not None:
        loss = torch.where(A < 0, torch.minimum(loss, -A * dual_clip), loss)
    clipped = (loss2 > loss1) & (mask > 0)
    stats = {"clip_low": (clipped & (ratio < 1 - eps_low)).float(),
             "clip_high": (clipped & (ratio > 1 + eps_high)).float(), "ratio": ratio.detach()}
    return loss, stats


def gspo_loss(logp, old_logp, adv, mask, eps_low: float, eps_high: float, dual_clip: float | None = None):
    """GSPO: one length-normalised sequence ratio s = exp(mean_t(logp - old)), clipped per sequence.

    Returned per token (each valid token carries its sequence's loss), so the `seq-mean-token-mean`
    aggregation yields the mean over sequences of the sequence loss.
    """
    n = mask.sum(-1).clamp_min(1)
    log_s = ((logp - old_logp) * mask).sum(-1) / n                               # [B]
    s = torch.exp(log_s)
    A = adv.to(logp.dtype)
    loss1, loss2 = -A * s, -A * s.clamp(1 - eps_low, 1 + eps_high)
    loss = torch.maximum(loss1, loss2)
    clipped = loss2 > loss1
    per_tok = lambda x: x[:, None].expand_as(mask) * (mask > 0)
    stats = {"clip_low": per_tok((clipped & (s < 1 - eps_low)).float()),
             "clip_high": per_tok((clipped & (s > 1 + eps_high)).float()), "ratio": per_tok(s.detach())}
    return loss[:, None].expand_as(mask), stats


# The policy-loss table. A loss is a function
#     (logp, old_logp, adv, mask, eps_low, eps_high, dual_clip) -> (loss_tok, stats)
# with logp, old_logp, mask [B, T] (logp carries the gradient), adv [B] (ppo_clip also takes [B, T]); it returns the per-token loss
# loss_tok [B, T] (aggregated by `aggregate` under the method's aggregation) and stats, a dict of
# per-token float indicators [B, T]: "clip_low" and "clip_high" (the token's ratio was clipped below /
# above; logged as fractions of the policy tokens) and "ratio" (detached). A new loss is a function
# of that signature and a row here; the config accepts every key of this table.
POLICY_LOSSES = {"ppo_clip": ppo_clip_loss, "gspo": gspo_loss}


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || ref) per token: exp(ref - logp) - (ref - logp) - 1 >= 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


# ----------------------------------------------------------------------------------------
# Aggregation: per-token values [b, T] of one micro-batch -> its share of the mini-batch loss


@dataclass
class Norm:
    """Normalisers of one mini-batch (all its micro-batches share them)."""
    n_seqs: float     # sequences in the mini-batch that enter the policy loss (at least 1: a divisor)
    n_tokens: float   # their response tokens (at least 1: a divisor)
    max_len: int      # constant L_max of seq-mean-token-sum-norm (Dr. GRPO)
    n_tokens_real: float = 1.0  # the token count before clamping: 0 = no policy token in the mini-batch

    @staticmethod
    def of(mask: torch.Tensor, max_len: int) -> "Norm":
        """mask [B, T] (zero rows = sequences outside the policy loss)."""
        return Norm.from_counts(float((mask.sum(-1) > 0).sum()), float(mask.sum()), max_len)

    @staticmethod
    def from_counts(n_seqs: float, n_tokens: float, max_len: int) -> "Norm":
        return Norm(n_seqs=max(n_seqs, 1.0), n_tokens=max(n_tokens, 1.0), max_len=max_len, n_tokens_real=n_tokens)


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str, norm: Norm) -> torch.Tensor:
    """token-mean: sum / tokens. seq-mean-token-mean: mean over sequences of each one's token mean.
    seq-mean-token-sum-norm: sum / (sequences * L_max), a constant that does not depend on lengths."""
    v = values * mask
    if mode == "token-mean":
        return v.sum() / norm.n_tokens
    if mode == "seq-mean-token-mean":
        return (v.sum(-1) / mask.sum(-1).clamp_min(1)).sum() / norm.n_seqs
    if mode == "seq-mean-token-sum-norm":
        return v.sum() / (norm.n_seqs * norm.max_len)
    raise ValueError(f"unknown loss aggregation {mode!r}; allowed: {AGGREGATIONS}")


AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")

# ----------------------------------------------------------------------------------------
# Method presets. Config keys left unset take these values.

PRESETS = {
    "grpo": dict(advantage="grpo", policy_loss="ppo_clip", aggregation="seq-mean-token-mean",
                 eps_low=0.2, eps_high=0.2, dynamic_sampling=False, overlong_buffer=0, entropy_coef=0.0),
    "dapo": dict(advantage="grpo", policy_loss="ppo_clip", aggregation="token-mean",
                 eps_low=0.2, eps_high=0.28, dynamic_sampling=True, overlong_buffer=-1, entropy_coef=0.0),  # -1: max_len // 4
    "drgrpo": dict(advantage="drgrpo", policy_loss="ppo_clip", aggregation="seq-mean-token-sum-norm",
                   eps_low=0.2, eps_high=0.2, dynamic_sampling=False, overlong_buffer=0, entropy_coef=0.0),
    "rloo": dict(advantage="rloo", policy_loss="ppo_clip", aggregation="token-mean",
                 eps_low=0.2, eps_high=0.2, dynamic_sampling=False, overlong_buffer=0, entropy_coef=0.0),
    "reinforce_pp": dict(advantage="reinforce_pp_baseline", policy_loss="ppo_clip", aggregation="token-mean",
                         eps_low=0.2, eps_high=0.2, dynamic_sampling=False, overlong_buffer=0, entropy_coef=0.0),
    "gspo": dict(advantage="grpo", policy_loss="gspo", aggregation="seq-mean-token-mean",
                 eps_low=3e-4, eps_high=4e-4, dynamic_sampling=False, overlong_buffer=0, entropy_coef=0.0),
    "raftpp": dict(advantage="positive", policy_loss="ppo_clip", aggregation="seq-mean-token-mean",
                   eps_low=0.2, eps_high=0.2, dynamic_sampling=False, overlong_buffer=0, entropy_coef=0.0),
    # The EchoRL authors' script (verl): grpo_use_std=False (Dr. GRPO's r - mean_g), PPO clip 0.2,
    # loss_remove_token_mean=True (a token sum over a constant length), entropy_coeff=0.001, no KL.
    "paper": dict(advantage="drgrpo", policy_loss="ppo_clip", aggregation="seq-mean-token-sum-norm",
                  eps_low=0.2, eps_high=0.2, dynamic_sampling=False, overlong_buffer=0, entropy_coef=0.001),
}


def policy_loss(logp, old_logp, adv, mask, *, policy_loss: str, aggregation: str, eps_low: float,
                eps_high: float, norm: Norm, dual_clip: float | None = None, token_weights=None):
    """The method's policy loss for one micro-batch, and token-summed clip counts for logging.
    `token_weights` [B, T] (no gradient) multiply the per-token loss, e.g. `tis_weights`.

    With GSPO every token carries its sequence's loss, so a token's weight scales that whole loss:
    under seq-mean-token-mean a sequence's loss (and its gradient, spread over all its tokens) is
    scaled by the mean of its tokens' weights, as TRL does; verl's token-level importance weights
    scale each token's own term instead (tests/test_losses.py, GSPO with TIS)."""
    loss_tok, stats = POLICY_LOSSES[policy_loss](logp, old_logp, adv, mask, eps_low, eps_high, dual_clip)
    if token_weights is not None:
        loss_tok = loss_tok * token_weights
    return aggregate(loss_tok, mask, aggregation, norm), {k: (v * mask).sum() for k, v in stats.items()}


def tis_weights(old_logp: torch.Tensor, sampler_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling (the correction verl and TRL document for a sampler whose numbers
    differ from the trainer's, e.g. bf16 sampling): w_t = min(pi_old(y_t) / pi_sampler(y_t), cap),
    no gradient. The tokens were drawn from the sampler, the PPO ratio is taken against pi_old."""
    return torch.exp(old_logp - sampler_logp).clamp(max=cap).detach()
