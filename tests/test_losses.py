"""losses.py as a specification: advantages, PPO/GSPO policy losses, aggregation, KL, presets.

Every expected number is worked out by hand in the comment next to it.
"""
import dataclasses
import math

import pytest
import torch

from config import AlgoConfig
from losses import (ADVANTAGES, AGGREGATIONS, POLICY_LOSSES, PRESETS, Norm, tis_weights, adv_grpo, aggregate, gspo_loss, kl_k3,
                    overlong_penalty, policy_loss, ppo_clip_loss, zvp_advantages)

# Two groups of 4: one mixed, one all-success (advantage-degenerate).
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
GROUP = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
EPS = 1e-6

# mixed group: mean 0.5, deviations +-0.5; unbiased var = 4 * 0.25 / 3 = 1/3
SQRT_THIRD = math.sqrt(1 / 3)                                    # 0.57735
# batch of centred rewards [.5 -.5 -.5 .5 0 0 0 0]: mean 0, unbiased var = 4 * 0.25 / 7 = 1/7
SQRT_SEVENTH = math.sqrt(1 / 7)                                  # 0.37796
EXPECTED_ADV = {
    # (r - mean) / (std + eps) = +-0.5 / (0.57735 + 1e-6) = +-0.86602
    "grpo": [s * 0.5 / (SQRT_THIRD + EPS) for s in (1, -1, -1, 1)] + [0.0] * 4,
    # r - mean = +-0.5
    "drgrpo": [0.5, -0.5, -0.5, 0.5] + [0.0] * 4,
    # 1 - (0 + 0 + 1) / 3 = 2/3 ; 0 - (1 + 0 + 1) / 3 = -2/3 ; all-ones group: 1 - 3/3 = 0
    "rloo": [2 / 3, -2 / 3, -2 / 3, 2 / 3] + [0.0] * 4,
    # +-0.5 / (0.37796 + 1e-6) = +-1.32287
    "reinforce_pp_baseline": [s * 0.5 / (SQRT_SEVENTH + EPS) for s in (1, -1, -1, 1)] + [0.0] * 4,
    # RAFT++: 1 on every correct response, the all-success group's included (no baseline)
    "positive": [1.0, 0.0, 0.0, 1.0] + [1.0] * 4,
}
# Advantages relative to the group (zero on a group of equal rewards); RAFT++'s is not, by design.
GROUP_RELATIVE = sorted(set(ADVANTAGES) - {"positive"})


# ----------------------------------------------------------------------------------------
# Advantages


@pytest.mark.parametrize("mode", sorted(ADVANTAGES))
def test_advantage_matches_hand_values_on_two_groups_of_four(mode):
    adv = ADVANTAGES[mode](REWARDS, GROUP)
    assert adv.shape == (8,)
    assert torch.allclose(adv, torch.tensor(EXPECTED_ADV[mode]), atol=1e-6)


def test_grpo_eps_is_added_to_the_unbiased_std():
    # eps = 1: 0.5 / (0.57735 + 1) = 0.31699
    adv = adv_grpo(REWARDS[:4], GROUP[:4], eps=1.0)
    assert torch.allclose(adv, torch.tensor([1.0, -1.0, -1.0, 1.0]) * 0.5 / (SQRT_THIRD + 1.0), atol=1e-6)


@pytest.mark.parametrize("mode", sorted(ADVANTAGES))
def test_unsorted_noncontiguous_group_ids_give_the_same_per_row_advantage(mode):
    # rows shuffled, groups renamed 0 -> 42 and 1 -> 7 (ids neither dense nor sorted)
    perm = torch.tensor([5, 0, 7, 2, 1, 4, 6, 3])
    renamed = torch.where(GROUP == 0, 42, 7)
    adv = ADVANTAGES[mode](REWARDS[perm], renamed[perm])
    assert torch.allclose(adv, torch.tensor(EXPECTED_ADV[mode])[perm], atol=1e-6)


@pytest.mark.parametrize("mode", GROUP_RELATIVE)
def test_zero_std_groups_get_exactly_zero_advantage(mode):
    # all-success and all-fail groups beside a mixed one
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    group = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)
    adv = ADVANTAGES[mode](rewards, group)
    assert torch.equal(adv[:8], torch.zeros(8))
    assert (adv[8:] != 0).all()


@pytest.mark.parametrize("mode", GROUP_RELATIVE)
def test_batch_of_only_degenerate_groups_gets_exactly_zero_advantage(mode):
    # reinforce_pp whitening divides by a batch std of 0 here: must give 0, not nan
    adv = ADVANTAGES[mode](torch.tensor([1.0] * 4 + [0.0] * 4), torch.tensor([0] * 4 + [1] * 4))
    assert torch.equal(adv, torch.zeros(8))


@pytest.mark.parametrize("mode", GROUP_RELATIVE)
def test_group_of_equal_fractional_rewards_gets_exactly_zero_advantage(mode):
    # DAPO shaping: 8 correct rollouts, each 40 tokens long with max_len 48 and buffer 12, all get
    # 1 - (40 - 36) / 12 = 2/3. The group's rewards are identical, so its std is 0 and every
    # advantage must be exactly 0 (README pitfall 5), whatever the float rounding of 2/3.
    lengths = torch.tensor([40] * 8)
    shaped = 1.0 + overlong_penalty(lengths, max_len=48, buffer=12)
    assert torch.allclose(shaped, torch.full((8,), 2 / 3))
    rewards = torch.cat([torch.tensor([1.0, 0.0, 1.0, 0.0]), shaped])
    group = torch.tensor([0] * 4 + [1] * 8)
    adv = ADVANTAGES[mode](rewards, group)
    assert torch.equal(adv[4:], torch.zeros(8)), adv[4:]


def test_overlong_penalty_is_zero_then_linear_down_to_minus_penalty():
    # max_len 10, buffer 4: free up to 6 tokens, then -(len - 6) / 4, capped at -1
    lengths = torch.tensor([5, 6, 7, 8, 10])
    got = overlong_penalty(lengths, max_len=10, buffer=4)
    assert torch.allclose(got, torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0]))
    # penalty 0.5 scales it: -0.5 * 2/4 = -0.25 at length 8
    assert torch.allclose(overlong_penalty(lengths, 10, 4, penalty=0.5), torch.tensor([0.0, 0.0, -0.125, -0.25, -0.5]))


def test_overlong_penalty_with_zero_buffer_is_off():
    assert torch.equal(overlong_penalty(torch.tensor([3, 10]), max_len=10, buffer=0), torch.zeros(2))


# ----------------------------------------------------------------------------------------
# PPO clip

RATIOS = [0.5, 0.9, 1.0, 1.1, 1.25, 1.5]


def _ppo_inputs(ratios, advs):
    """old log-probs -1, log-probs -1 + log(ratio): every row gets the same ratios."""
    r = torch.tensor([ratios] * len(advs), dtype=torch.float64)
    old = torch.full_like(r, -1.0)
    logp = (old + r.log()).requires_grad_(True)
    return logp, old, torch.tensor(advs, dtype=torch.float64), torch.ones_like(r)


def test_ppo_clip_per_token_loss_with_clip_higher():
    logp, old, adv, mask = _ppo_inputs(RATIOS, [2.0, -1.0])
    loss, stats = ppo_clip_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    # A = +2: max(-2r, -2 clip(r, 0.8, 1.28)); r = 1.5 -> max(-3.0, -2.56) = -2.56 (clipped high),
    #         r = 0.5 -> max(-1.0, -1.6) = -1.0 (a low ratio is not clipped for A > 0)
    # A = -1: max(r, clip(r)); r = 0.5 -> max(0.5, 0.8) = 0.8 (clipped low), r = 1.5 -> 1.5 (not clipped)
    expected = torch.tensor([[-1.0, -1.8, -2.0, -2.2, -2.5, -2.56],
                             [0.8, 0.9, 1.0, 1.1, 1.25, 1.5]], dtype=torch.float64)
    assert torch.allclose(loss, expected, atol=1e-9)
    assert stats["clip_high"].sum() == 1 and stats["clip_high"][0, 5] == 1
    assert stats["clip_low"].sum() == 1 and stats["clip_low"][1, 0] == 1


def test_ppo_clip_symmetric_eps_also_clips_ratio_1_25():
    logp, old, adv, mask = _ppo_inputs(RATIOS, [2.0, -1.0])
    loss, stats = ppo_clip_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.2)
    # A = +2, r = 1.25 > 1.2: max(-2.5, -2.4) = -2.4; r = 1.5: max(-3.0, -2.4) = -2.4
    assert torch.allclose(loss[0], torch.tensor([-1.0, -1.8, -2.0, -2.2, -2.4, -2.4], dtype=torch.float64))
    assert stats["clip_high"].sum() == 2 and stats["clip_low"].sum() == 1


def test_ppo_clip_gradient_is_zero_exactly_where_clipped():
    logp, old, adv, mask = _ppo_inputs(RATIOS, [2.0, -1.0])
    loss, _ = ppo_clip_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    loss.sum().backward()
    # d(-A r)/d logp = -A r where unclipped; 0 where the clamp is active
    expected = torch.tensor([[-1.0, -1.8, -2.0, -2.2, -2.5, 0.0],
                             [0.0, 0.9, 1.0, 1.1, 1.25, 1.5]], dtype=torch.float64)
    assert torch.allclose(logp.grad, expected, atol=1e-9)
    assert logp.grad[0, 5] == 0 and logp.grad[1, 0] == 0


def test_dual_clip_caps_the_loss_of_negative_advantages_at_c_times_minus_a():
    logp, old, adv, mask = _ppo_inputs([0.5, 2.0, 4.0], [-1.0, 2.0])
    plain, _ = ppo_clip_loss(logp, old, adv, mask, 0.2, 0.28)
    capped, _ = ppo_clip_loss(logp, old, adv, mask, 0.2, 0.28, dual_clip=3.0)
    # A = -1: max(r, clip(r)) = [0.8, 2.0, 4.0]; the cap -A * c = 3 turns 4.0 into 3.0
    assert torch.allclose(plain[0], torch.tensor([0.8, 2.0, 4.0], dtype=torch.float64))
    assert torch.allclose(capped[0], torch.tensor([0.8, 2.0, 3.0], dtype=torch.float64))
    # A = +2 is untouched: [max(-1, -1.6), max(-4, -2.56), max(-8, -2.56)] = [-1, -2.56, -2.56]
    assert torch.allclose(capped[1], torch.tensor([-1.0, -2.56, -2.56], dtype=torch.float64))
    capped.sum().backward()
    # capped token: constant 3 -> zero gradient; r = 2 unclipped -> d(r)/d logp = 2
    assert torch.allclose(logp.grad[0], torch.tensor([0.0, 2.0, 0.0], dtype=torch.float64))


def test_ppo_clip_indicators_ignore_masked_tokens():
    logp, old, adv, mask = _ppo_inputs(RATIOS, [2.0, -1.0])
    mask[0, 5] = 0  # the only clipped-high token is padding
    _, stats = ppo_clip_loss(logp, old, adv, mask, 0.2, 0.28)
    assert stats["clip_high"].sum() == 0 and stats["clip_low"].sum() == 1


def test_first_update_has_ratio_exactly_one_and_no_clipping():
    torch.manual_seed(0)
    old = torch.randn(3, 5) - 2.0
    logp = old.clone().requires_grad_(True)
    adv = torch.tensor([1.5, -0.5, 0.0])
    loss, stats = ppo_clip_loss(logp, old, adv, torch.ones(3, 5), 0.2, 0.28)
    assert torch.equal(stats["ratio"], torch.ones(3, 5))
    assert stats["clip_low"].sum() == 0 and stats["clip_high"].sum() == 0
    # loss = -A * 1 per token, gradient = -A * 1
    assert torch.allclose(loss, -adv[:, None].expand(3, 5))
    loss.sum().backward()
    assert torch.allclose(logp.grad, -adv[:, None].expand(3, 5))


# ----------------------------------------------------------------------------------------
# GSPO


def _gspo_inputs():
    # row 0: valid diffs [0.1, 0.3, -0.1] (mean 0.1), padding diff 5.0 must be ignored
    # row 1: diffs 1e-4 on 4 tokens (mean 1e-4, inside the small clip range)
    # row 2: diffs [-0.01, -0.01], two padding tokens with diff -3
    diff = torch.tensor([[0.1, 0.3, -0.1, 5.0],
                         [1e-4, 1e-4, 1e-4, 1e-4],
                         [-0.01, -0.01, -3.0, -3.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.float64)
    old = torch.full_like(diff, -2.0)
    logp = (old + diff).requires_grad_(True)
    return logp, old, torch.tensor([1.0, -2.0, -1.0], dtype=torch.float64), mask


def test_gspo_sequence_ratio_is_exp_of_mean_valid_log_ratio():
    logp, old, adv, mask = _gspo_inputs()
    _, stats = gspo_loss(logp, old, adv, mask, eps_low=3e-4, eps_high=4e-4)
    s = torch.tensor([math.exp(0.1), math.exp(1e-4), math.exp(-0.01)], dtype=torch.float64)
    assert torch.allclose(stats["ratio"], s[:, None] * mask, atol=1e-12)


def test_gspo_loss_is_one_clipped_sequence_loss_on_every_valid_token():
    logp, old, adv, mask = _gspo_inputs()
    loss, stats = gspo_loss(logp, old, adv, mask, eps_low=3e-4, eps_high=4e-4)
    # row 0: A = 1, s = e^0.1 = 1.10517 > 1.0004 -> max(-1.10517, -1.0004) = -1.0004 (clipped high)
    # row 1: A = -2, s = e^1e-4 = 1.000100005 inside [0.9997, 1.0004] -> 2 * 1.000100005
    # row 2: A = -1, s = e^-0.01 = 0.99005 < 0.9997 -> max(0.99005, 0.9997) = 0.9997 (clipped low)
    seq = torch.tensor([-1.0004, 2 * math.exp(1e-4), 0.9997], dtype=torch.float64)
    valid = mask.bool()
    assert torch.allclose(loss[valid], seq[:, None].expand_as(mask)[valid], atol=1e-12)
    # token-summed clip counts: 3 clipped-high tokens (row 0), 2 clipped-low (row 2)
    assert (stats["clip_high"] * mask).sum() == 3 and (stats["clip_low"] * mask).sum() == 2


def test_gspo_gradient_flows_only_through_unclipped_sequences_and_valid_tokens():
    logp, old, adv, mask = _gspo_inputs()
    loss, _ = gspo_loss(logp, old, adv, mask, eps_low=3e-4, eps_high=4e-4)
    aggregate(loss, mask, "seq-mean-token-mean", Norm.of(mask, 4)).backward()
    # loss = (1/3) sum_seq loss_seq; row 1: d(-A s)/d logp_t = 2 * s / 4 -> (1/3) * 0.5 * e^1e-4
    expected = torch.zeros(3, 4, dtype=torch.float64)
    expected[1] = 0.5 * math.exp(1e-4) / 3
    assert torch.allclose(logp.grad, expected, atol=1e-12)


# ----------------------------------------------------------------------------------------
# Aggregation


def test_aggregate_hand_values_for_every_mode():
    # padding carries 100s that must not count; row 2 is a sequence outside the policy loss
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0], [100.0] * 4])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    norm = Norm.of(mask, max_len=4)
    assert (norm.n_seqs, norm.n_tokens, norm.max_len) == (2.0, 4.0, 4)
    # token-mean: (1 + 2 + 3 + 4) / 4 = 2.5
    assert aggregate(values, mask, "token-mean", norm).item() == pytest.approx(2.5)
    # seq-mean-token-mean: (mean(1, 2, 3) + mean(4)) / 2 = (2 + 4) / 2 = 3
    assert aggregate(values, mask, "seq-mean-token-mean", norm).item() == pytest.approx(3.0)
    # seq-mean-token-sum-norm: 10 / (2 sequences * L_max 4) = 1.25
    assert aggregate(values, mask, "seq-mean-token-sum-norm", norm).item() == pytest.approx(1.25)


def test_aggregate_rejects_an_unknown_mode_and_names_the_allowed_ones():
    with pytest.raises(ValueError, match="token-mean"):
        aggregate(torch.ones(1, 2), torch.ones(1, 2), "sum", Norm.of(torch.ones(1, 2), 2))


def _batch_of_four():
    """4 sequences of response lengths 5, 2, 1, 4 (T = 5), padding with large junk values."""
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1.0, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]])
    values = torch.randn(4, 5, generator=g, dtype=torch.float64)
    old = values.detach() + 0.3 * torch.randn(4, 5, generator=g, dtype=torch.float64) - 1.0
    values = values - 1.0
    values[mask == 0] = 50.0
    return values, old, mask


SPLITS = {1: [slice(0, 4)], 2: [slice(0, 2), slice(2, 4)], 4: [slice(i, i + 1) for i in range(4)]}


@pytest.mark.parametrize("mode", AGGREGATIONS)
@pytest.mark.parametrize("n_micro", [2, 4])
def test_aggregate_summed_over_micro_batches_equals_full_batch_value_and_gradient(mode, n_micro):
    values, _, mask = _batch_of_four()
    norm = Norm.of(mask, max_len=5)
    full_leaf = values.clone().requires_grad_(True)
    full = aggregate(full_leaf, mask, mode, norm)
    full.backward()
    leaf = values.clone().requires_grad_(True)
    total = sum(aggregate(leaf[s], mask[s], mode, norm) for s in SPLITS[n_micro])
    total.backward()
    assert torch.allclose(total, full, atol=1e-6)
    assert torch.allclose(leaf.grad, full_leaf.grad, atol=1e-6)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("n_micro", [1, 2, 4])
def test_policy_loss_is_invariant_to_micro_batch_split(preset, n_micro):
    p = PRESETS[preset]
    logp, old, mask = _batch_of_four()
    # groups of 2: rewards [1, 0], [1, 1] -> one mixed, one degenerate group
    adv = ADVANTAGES[p["advantage"]](torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 1, 1]))
    # a mixed-sign, non-zero advantage per row so every sequence carries gradient
    adv = adv.double() + torch.tensor([0.0, 0.0, 0.7, -0.4], dtype=torch.float64)
    norm = Norm.of(mask, max_len=5)
    kw = dict(policy_loss=p["policy_loss"], aggregation=p["aggregation"], eps_low=p["eps_low"],
              eps_high=p["eps_high"], norm=norm)
    full_leaf = logp.clone().requires_grad_(True)
    full, full_stats = policy_loss(full_leaf, old, adv, mask, **kw)
    full.backward()
    leaf = logp.clone().requires_grad_(True)
    parts = [policy_loss(leaf[s], old[s], adv[s], mask[s], **kw) for s in SPLITS[n_micro]]
    total = sum(v for v, _ in parts)
    total.backward()
    assert torch.allclose(total, full, atol=1e-6)
    assert torch.allclose(leaf.grad, full_leaf.grad, atol=1e-6)
    assert full_leaf.grad.abs().sum() > 0
    for k in ("clip_low", "clip_high"):
        assert sum(st[k] for _, st in parts) == full_stats[k]


# ----------------------------------------------------------------------------------------
# KL


def test_kl_k3_hand_value_zero_at_equality_and_nonnegative():
    # logp = 0, ref = ln 2: d = ln 2 -> e^d - d - 1 = 2 - 0.693147 - 1 = 0.306853
    assert kl_k3(torch.tensor([0.0]), torch.tensor([math.log(2.0)])).item() == pytest.approx(0.306853, abs=1e-6)
    x = torch.randn(50, generator=torch.Generator().manual_seed(1))
    assert torch.equal(kl_k3(x, x), torch.zeros(50))
    y = torch.randn(50, generator=torch.Generator().manual_seed(2)) * 3
    assert (kl_k3(x, y) >= 0).all()


# ----------------------------------------------------------------------------------------
# Presets


def test_every_preset_fills_every_key_the_config_leaves_unset():
    # keys the preset must fill: config fields whose default is None (dual_clip, tis_cap: None means "off")
    needed = {f.name for f in dataclasses.fields(AlgoConfig) if f.default is None} - {"dual_clip", "tis_cap"}
    for name in PRESETS:
        assert needed <= set(PRESETS[name]), (name, needed - set(PRESETS[name]))
        algo = AlgoConfig(name=name).resolved()
        for key in needed:
            assert getattr(algo, key) is not None, (name, key)


def test_presets_name_registered_functions():
    for name, p in PRESETS.items():
        assert p["advantage"] in ADVANTAGES and p["policy_loss"] in POLICY_LOSSES, name
        assert p["aggregation"] in AGGREGATIONS, name


def test_a_new_policy_loss_is_a_function_and_a_table_row(monkeypatch):
    """The config reads the registry: a loss added to POLICY_LOSSES is a valid `algo.policy_loss` at once,
    and an unregistered name is refused with the table's keys."""
    from config import ConfigError, load_config
    base = ["model.name_or_path=tiny", "data.train=tiny"]
    with pytest.raises(ConfigError, match=r"'algo.policy_loss': 'plain_pg' is not allowed.*'ppo_clip', 'gspo'"):
        load_config(None, [*base, "algo.policy_loss=plain_pg"])

    def plain_pg(logp, old_logp, adv, mask, eps_low, eps_high, dual_clip=None):  # REINFORCE: -A * logp
        zero = torch.zeros_like(logp)
        return -adv[:, None] * logp, {"clip_low": zero, "clip_high": zero, "ratio": torch.ones_like(logp)}
    monkeypatch.setitem(POLICY_LOSSES, "plain_pg", plain_pg)
    cfg = load_config(None, [*base, "algo.policy_loss=plain_pg"])
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, stats = policy_loss(logp, logp, torch.tensor([1.0, -2.0]), mask, policy_loss=cfg.algo.policy_loss,
                              aggregation="token-mean", eps_low=0.2, eps_high=0.2, norm=Norm.of(mask, 2))
    # tokens: A=1 on -1, -2 -> 1 + 2; A=-2 on -0.5 -> -1; mean over 3 tokens = 2/3
    assert loss.item() == pytest.approx(2 / 3) and stats["clip_low"].item() == 0


@pytest.mark.parametrize("name, advantage, policy, aggregation, eps_low, eps_high", [
    ("grpo", "grpo", "ppo_clip", "seq-mean-token-mean", 0.2, 0.2),
    ("dapo", "grpo", "ppo_clip", "token-mean", 0.2, 0.28),
    ("drgrpo", "drgrpo", "ppo_clip", "seq-mean-token-sum-norm", 0.2, 0.2),
    ("rloo", "rloo", "ppo_clip", "token-mean", 0.2, 0.2),
    ("reinforce_pp", "reinforce_pp_baseline", "ppo_clip", "token-mean", 0.2, 0.2),
    ("gspo", "grpo", "gspo", "seq-mean-token-mean", 3e-4, 4e-4),
    ("raftpp", "positive", "ppo_clip", "seq-mean-token-mean", 0.2, 0.2),
    ("paper", "drgrpo", "ppo_clip", "seq-mean-token-sum-norm", 0.2, 0.2),
])
def test_presets_match_the_method_table(name, advantage, policy, aggregation, eps_low, eps_high):
    p = PRESETS[name]
    assert (p["advantage"], p["policy_loss"], p["aggregation"]) == (advantage, policy, aggregation)
    assert p["eps_low"] == pytest.approx(eps_low) and p["eps_high"] == pytest.approx(eps_high)


def test_only_dapo_uses_dynamic_sampling_and_overlong_shaping():
    assert PRESETS["dapo"]["dynamic_sampling"] is True and PRESETS["dapo"]["overlong_buffer"] != 0
    for name in set(PRESETS) - {"dapo"}:
        assert PRESETS[name]["dynamic_sampling"] is False and PRESETS[name]["overlong_buffer"] == 0


# ----------------------------------------------------------------------------------------
# Truncated importance sampling (sampler vs trainer log-probs)


def test_tis_weights_are_the_capped_trainer_over_sampler_ratio_without_gradient():
    old = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    sampled = torch.tensor([[-1.5, -1.0, -0.5]])
    w = tis_weights(old, sampled, cap=1.5)
    # exp(0.5) = 1.6487 -> capped at 1.5; exp(-1) = 0.3679; exp(0) = 1
    assert w.tolist()[0] == pytest.approx([1.5, math.exp(-1.0), 1.0]) and not w.requires_grad


def test_tis_weights_scale_each_tokens_policy_loss():
    """PPO-clip at ratio 1 gives -A per token; weighted by w and token-mean aggregated over 3 tokens:
    A = (2, -1): (-2 * 1.5 - 2 * 0.5 + 1 * 1.0) / 3 = -1."""
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    w = torch.tensor([[1.5, 0.5], [1.0, 7.0]])
    kw = dict(policy_loss="ppo_clip", aggregation="token-mean", eps_low=0.2, eps_high=0.2, norm=Norm.of(mask, 2))
    loss, _ = policy_loss(logp, logp, torch.tensor([2.0, -1.0]), mask, token_weights=w, **kw)
    assert loss.item() == pytest.approx(-1.0)
    plain, _ = policy_loss(logp, logp, torch.tensor([2.0, -1.0]), mask, **kw)
    assert plain.item() == pytest.approx((-2 - 2 + 1) / 3)


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_every_advantage_takes_zero_rows(name):
    """A rank whose groups all dropped out of dynamic sampling still calls the advantage function (its
    batch-wide sums must meet the other ranks'): zero rows in, zero rows out."""
    out = ADVANTAGES[name](torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,)


def test_reinforce_pp_whitens_with_the_statistics_of_every_process():
    """Two processes hold groups A = (1, 0) and B = (1, 1, 0, 0) of one batch; `total` adds the other
    process's sums. Centred c = (0.5, -0.5 | 0.5, 0.5, -0.5, -0.5): unbiased std over 6 rows =
    sqrt(6 * 0.25 / 5) = 0.5477, so A's advantages are +-0.9129, as one process holding all rows gives."""
    from losses import adv_reinforce_pp_baseline
    other = {"n": 4.0, "sum": 0.0, "sq": 1.0}   # process 2: four centred rewards +-0.5
    calls = iter([other["n"], other["sum"], other["sq"]])
    total = lambda x: x + next(calls)
    mine = adv_reinforce_pp_baseline(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), total=total)
    whole = adv_reinforce_pp_baseline(torch.tensor([1.0, 0.0, 1, 1, 0, 0]), torch.tensor([0, 0, 1, 1, 1, 1]))
    assert mine.tolist() == pytest.approx(whole[:2].tolist(), rel=1e-5) and mine[0].item() == pytest.approx(0.9129, abs=1e-4)


def test_gspo_with_tis_scales_each_sequence_by_the_mean_of_its_tokens_weights():
    """Two sequences, ratio 1 (logp = old), A = (1, -1), no clipping; TIS weights (0.5, 1.0 | 2.0, pad).
    seq-mean-token-mean of the per-token loss (each token carries its sequence's loss -A s, times its own
    weight): ((-0.75) + 2.0) / 2 = 0.625. The gradient on sequence 0's tokens: 1/2 (sequences) x 0.75
    (its mean weight) x d(-A s)/dlogp_t = -A s / n = -0.5, so -0.1875 on both tokens: the sequence's
    gradient scaled by its mean weight (as TRL does), not each token's term by its own weight (-0.125,
    -0.25, as a token-level importance weight would give)."""
    old = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])
    logp = old.clone().requires_grad_(True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    w = torch.tensor([[0.5, 1.0], [2.0, 7.0]])
    loss, _ = policy_loss(logp, old, torch.tensor([1.0, -1.0]), mask, policy_loss="gspo",
                          aggregation="seq-mean-token-mean", eps_low=10.0, eps_high=10.0, norm=Norm.of(mask, 2),
                          token_weights=w)
    assert float(loss.detach()) == pytest.approx(0.625)
    loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([-0.1875, -0.1875])


# ----------------------------------------------------------------------------------------
# The authors' setting, RAFT++ and RL-ZVP


def test_paper_preset_is_the_authors_script_and_only_it_has_an_entropy_bonus():
    # grpo_use_std=False -> r - mean_g; PPO clip 0.2; loss_remove_token_mean=True -> sum / (n * L_max);
    # entropy_coeff=0.001; no dynamic sampling, no overlong shaping
    p = PRESETS["paper"]
    assert p["advantage"] == "drgrpo" and p["aggregation"] == "seq-mean-token-sum-norm"
    assert (p["eps_low"], p["eps_high"], p["entropy_coef"]) == (0.2, 0.2, 0.001)
    assert p["dynamic_sampling"] is False and p["overlong_buffer"] == 0
    assert AlgoConfig(name="paper").resolved().entropy_coef == 0.001
    for name in set(PRESETS) - {"paper"}:
        assert AlgoConfig(name=name).resolved().entropy_coef == 0.0, name


def test_raftpp_loss_is_the_clipped_ratio_averaged_over_each_correct_responses_tokens():
    # RAFT++ (arXiv 2504.11343, Sec. 2): -(1/|D|) sum_a (1/|a|) sum_t min(rho_t, clip(rho_t, 0.8, 1.2)) 1[a correct]
    # row 0 correct, ratios 1.1 and 1.5 -> min(1.1, 1.1) = 1.1, min(1.5, 1.2) = 1.2, token mean 1.15
    # row 1 wrong (A = 0) counts in |D| = 2: loss = -(1.15 + 0) / 2 = -0.575
    p = PRESETS["raftpp"]
    adv = ADVANTAGES[p["advantage"]](torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
    assert adv.tolist() == [1.0, 0.0]
    old = torch.tensor([[-1.0, -2.0], [-1.0, -1.0]])
    logp = old + torch.log(torch.tensor([[1.1, 1.5], [0.5, 1.0]]))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, _ = policy_loss(logp, old, adv, mask, policy_loss=p["policy_loss"], aggregation=p["aggregation"],
                          eps_low=p["eps_low"], eps_high=p["eps_high"], norm=Norm.of(mask, 2))
    assert loss.item() == pytest.approx(-0.575, abs=1e-6)


def _zvp_case():
    """Three groups of 2: all correct, all wrong, mixed; responses of 3, 2, 3, 2, 3, 3 tokens."""
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    correct = rewards > 0
    group = torch.tensor([0, 0, 1, 1, 2, 2])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]])
    ent = torch.tensor([[0.5, 1.0, 2.0], [0.2, 0.4, 9.0], [1.0, 3.0, 0.5], [0.6, 0.9, 5.0],
                        [0.3, 0.3, 0.3], [0.3, 0.3, 0.3]])   # 9.0 and 5.0 sit on padding
    return rewards, correct, group, mask, ent


def test_zvp_advantages_are_signed_entropy_scaled_on_zero_variance_groups_only():
    # RL-ZVP (arXiv 2509.21880, Eq. 5), alpha = 0.1:
    #   all correct: A_t = 0.1 * H_t: [0.05, 0.1, 0.2] and [0.02, 0.04, pad 0]
    #   all wrong:   A_t = -0.1 * (max_k H_k - H_t), max over the response's own tokens:
    #     row 2: max 3.0 -> [-0.2, 0, -0.25]; row 3: max 0.9 (5.0 is padding) -> [-0.03, 0, pad 0]
    #   mixed (Dr. GRPO): r - mean = +-0.5 on every token
    rewards, correct, group, mask, ent = _zvp_case()
    ent = ent.requires_grad_(True)
    adv = ADVANTAGES["drgrpo"](rewards, group)
    got = zvp_advantages(adv, rewards, correct, group, ent, mask, alpha=0.1)
    want = torch.tensor([[0.05, 0.1, 0.2], [0.02, 0.04, 0.0], [-0.2, 0.0, -0.25], [-0.03, 0.0, 0.0],
                         [0.5, 0.5, 0.5], [-0.5, -0.5, -0.5]])
    assert torch.allclose(got, want, atol=1e-7)
    assert not got.requires_grad  # the entropy is a constant weight


def test_ppo_clip_takes_one_advantage_per_token():
    # ratios (1, 0.5, 1.5), A = (0.2, -0.25, 0.1), eps 0.2:
    #   -0.2 * 1 = -0.2 ; max(0.25 * 0.5, 0.25 * 0.8) = 0.2 ; max(-0.1 * 1.5, -0.1 * 1.2) = -0.12
    #   token mean = (-0.2 + 0.2 - 0.12) / 3 = -0.04
    old = torch.tensor([[-1.0, -1.0, -1.0]])
    logp = old + torch.log(torch.tensor([[1.0, 0.5, 1.5]]))
    mask = torch.ones(1, 3)
    loss, stats = policy_loss(logp, old, torch.tensor([[0.2, -0.25, 0.1]]), mask, policy_loss="ppo_clip",
                              aggregation="token-mean", eps_low=0.2, eps_high=0.2, norm=Norm.of(mask, 3))
    assert loss.item() == pytest.approx(-0.04, abs=1e-6)
    assert stats["clip_low"].item() == 1 and stats["clip_high"].item() == 1


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("n_micro", [2, 4])
def test_per_token_advantages_keep_the_loss_invariant_to_micro_batch_split(aggregation, n_micro):
    logp, old, mask = _batch_of_four()
    adv = torch.linspace(-1.0, 1.0, 20, dtype=torch.float64).view(4, 5)
    kw = dict(policy_loss="ppo_clip", aggregation=aggregation, eps_low=0.2, eps_high=0.28, norm=Norm.of(mask, 5))
    full_leaf = logp.clone().requires_grad_(True)
    full, _ = policy_loss(full_leaf, old, adv, mask, **kw)
    full.backward()
    leaf = logp.clone().requires_grad_(True)
    total = sum(policy_loss(leaf[s], old[s], adv[s], mask[s], **kw)[0] for s in SPLITS[n_micro])
    total.backward()
    assert torch.allclose(total, full, atol=1e-10) and torch.allclose(leaf.grad, full_leaf.grad, atol=1e-10)
