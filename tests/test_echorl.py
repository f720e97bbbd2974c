"""echorl.py as a specification: EchoClip selection on hand-made entropy profiles, and L_echo."""
import dataclasses

import pytest
import torch

from echorl import (EchoConfig, dropped_groups_to_keep, echo_loss, echo_term, peak_entropy_change, peak_tokens,
                    row_uniforms, select_clips)
from losses import ADVANTAGES, PRESETS, Norm, policy_loss


def cfg(**kw):
    return dataclasses.replace(EchoConfig(), **kw)


def run(correct, group, mask, ent, sids, generator=None, **kw):
    return select_clips(torch.tensor(correct), torch.tensor(group), torch.tensor(mask, dtype=torch.float),
                        torch.tensor(ent, dtype=torch.float), torch.tensor(sids), cfg(**kw), generator)


# One response, 9 tokens + 1 padding token (entropy 9 there, which must never count).
#   step 0 = [1, 1, 1, 1, 1]: mean 1,   max 1, sum 5
#   step 1 = [3, 0]:          mean 1.5, max 3, sum 3
#   step 2 = [2, 2]:          mean 2,   max 2, sum 4
# peak step: mean -> 2, max -> 1, sum -> 0 ; lowest (mean) -> 0
PROFILE = [1.0, 1, 1, 1, 1, 3, 0, 2, 2, 9]
PROFILE_SIDS = [0, 0, 0, 0, 0, 1, 1, 2, 2, -1]
PROFILE_MASK = [1] * 9 + [0]


def prefix(n, R=10):
    return [1.0] * n + [0.0] * (R - n)


@pytest.mark.parametrize("reduce, n_clip", [("mean", 9), ("max", 7), ("sum", 5)])
def test_peak_clip_ends_at_the_step_of_highest_reduced_entropy(reduce, n_clip):
    clip, stats = run([True], [0], [PROFILE_MASK], [PROFILE], [PROFILE_SIDS], reduce=reduce)
    # mean: steps 0..2 = 9 tokens ; max: steps 0..1 = 7 ; sum: step 0 = 5
    assert clip.tolist() == [prefix(n_clip)]
    assert stats["echo/n_clips"] == 1.0 and stats["echo/clip_tokens"] == n_clip


@pytest.mark.parametrize("select, n_clip", [("peak", 9), ("lowest_entropy", 5), ("full", 9)])
def test_selection_modes_on_the_crafted_profile(select, n_clip):
    clip, _ = run([True], [0], [PROFILE_MASK], [PROFILE], [PROFILE_SIDS], select=select)
    assert clip.tolist() == [prefix(n_clip)]


def test_full_selection_takes_the_whole_response_even_when_the_peak_is_early():
    # step means [3, 1]: peak = step 0 (2 tokens), full = both steps (4 tokens)
    ent, sids, mask = [[3.0, 3, 1, 1]], [[0, 0, 1, 1]], [[1, 1, 1, 1]]
    assert run([True], [0], mask, ent, sids, select="peak")[0].tolist() == [[1.0, 1, 0, 0]]
    assert run([True], [0], mask, ent, sids, select="full")[0].tolist() == [[1.0, 1, 1, 1]]


def test_ties_pick_the_earliest_step():
    # step means [2, 2, 1]: peak tie between 0 and 1 -> step 0 (2 tokens)
    clip, _ = run([True], [0], [[1] * 6], [[2.0, 2, 2, 2, 1, 1]], [[0, 0, 1, 1, 2, 2]])
    assert clip.tolist() == [[1.0, 1, 0, 0, 0, 0]]
    # step means [1, 2, 1]: lowest tie between 0 and 2 -> step 0 (2 tokens)
    clip, _ = run([True], [0], [[1] * 6], [[1.0, 1, 2, 2, 1, 1]], [[0, 0, 1, 1, 2, 2]], select="lowest_entropy")
    assert clip.tolist() == [[1.0, 1, 0, 0, 0, 0]]


def test_random_step_clip_ends_at_a_step_boundary_and_is_reproducible_with_a_seeded_generator():
    # 4 steps of lengths 2, 3, 1, 2, then 2 padding tokens: step ends after 2, 5, 6 or 8 tokens
    sids = [[0, 0, 1, 1, 1, 2, 3, 3, -1, -1]] * 4
    mask = [[1] * 8 + [0, 0]] * 4
    ent = [[0.5] * 10] * 4
    seen = set()
    for seed in range(10):
        clip, _ = run([True] * 4, [0] * 4, mask, ent, sids, generator=torch.Generator().manual_seed(seed),
                      select="random_step", clips_per_group="all")
        again, _ = run([True] * 4, [0] * 4, mask, ent, sids, generator=torch.Generator().manual_seed(seed),
                       select="random_step", clips_per_group="all")
        assert torch.equal(clip, again)
        for row in clip.tolist():
            n = int(sum(row))
            assert n in (2, 5, 6, 8) and row == prefix(n)
            seen.add(n)
    assert seen == {2, 5, 6, 8}  # 40 draws: every step is reachable


@pytest.mark.parametrize("select", ["peak", "lowest_entropy", "full", "random_step"])
def test_one_step_response_is_clipped_whole(select):
    clip, _ = run([True], [0], [[1, 1, 1, 1, 0]], [[0.3, 2.0, 0.1, 0.7, 5.0]], [[0, 0, 0, 0, -1]],
                  generator=torch.Generator().manual_seed(0), select=select)
    assert clip.tolist() == [[1.0, 1, 1, 1, 0]]


@pytest.mark.parametrize("select", ["peak", "full"])
def test_clips_never_include_padding_on_left_or_right_padded_responses(select):
    # same response (steps of 2 and 3 tokens, step means [1, 2]) left- and right-padded by 2;
    # the padding carries a huge entropy that would win the peak if it counted
    mask = [[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]]
    ent = [[50.0, 50, 1, 1, 2, 2, 2], [1.0, 1, 2, 2, 2, 50, 50]]
    sids = [[-1, -1, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, -1, -1]]
    clip, _ = run([True, True], [0, 0], mask, ent, sids, select=select, clips_per_group="all")
    assert clip.tolist() == [[0.0, 0, 1, 1, 1, 1, 1], [1.0, 1, 1, 1, 1, 0, 0]]


# Three groups of 2 (group ids 0, 1, 2): all-success, mixed (row 2 correct), all-fail.
# Every row has 2 steps of 2 tokens; entropies give peak step means
#   row 0: [1, 2] -> 2 (step 1) ; row 1: [3, 1] -> 3 (step 0) ; row 2: [1, 4] -> 4 (step 1) ; rows 3-5: [1, 2]
SCOPE_ENT = [[1.0, 1, 2, 2], [3.0, 3, 1, 1], [1.0, 1, 4, 4], [1.0, 1, 2, 2], [1.0, 1, 2, 2], [1.0, 1, 2, 2]]
SCOPE_SIDS = [[0, 0, 1, 1]] * 6
SCOPE_MASK = [[1, 1, 1, 1]] * 6
SCOPE_CORRECT = [True, True, True, False, False, False]
SCOPE_GROUP = [0, 0, 1, 1, 2, 2]
FULL, HALF, NONE = [1.0, 1, 1, 1], [1.0, 1, 0, 0], [0.0, 0, 0, 0]


@pytest.mark.parametrize("scope, per_group, expected, n_clips, clip_tokens", [
    # degenerate: only the all-success group; '1' keeps row 1 (peak 3 > 2): its clip is step 0
    ("degenerate", "1", [NONE, HALF, NONE, NONE, NONE, NONE], 1, 2.0),
    ("degenerate", "all", [FULL, HALF, NONE, NONE, NONE, NONE], 2, 3.0),          # (4 + 2) / 2
    # success: also the correct row of the mixed group; never a wrong row
    ("success", "1", [NONE, HALF, FULL, NONE, NONE, NONE], 2, 3.0),               # (2 + 4) / 2
    ("success", "all", [FULL, HALF, FULL, NONE, NONE, NONE], 3, 10 / 3),          # (4 + 2 + 4) / 3
])
def test_scope_and_clips_per_group(scope, per_group, expected, n_clips, clip_tokens):
    clip, stats = run(SCOPE_CORRECT, SCOPE_GROUP, SCOPE_MASK, SCOPE_ENT, SCOPE_SIDS,
                      scope=scope, clips_per_group=per_group)
    assert clip.tolist() == expected
    assert stats["echo/n_clips"] == n_clips
    assert stats["echo/clip_tokens"] == pytest.approx(clip_tokens)
    # one degenerate (all-success) group, and it yields a clip
    assert stats["echo/clip_group_share"] == 1.0


def test_unsorted_noncontiguous_group_ids_select_the_same_rows():
    perm = [4, 1, 5, 2, 0, 3]
    renamed = {0: 17, 1: 3, 2: 8}
    group = [renamed[SCOPE_GROUP[i]] for i in perm]
    for per_group in ("1", "all"):
        ref, _ = run(SCOPE_CORRECT, SCOPE_GROUP, SCOPE_MASK, SCOPE_ENT, SCOPE_SIDS, clips_per_group=per_group)
        clip, _ = run([SCOPE_CORRECT[i] for i in perm], group, [SCOPE_MASK[i] for i in perm],
                      [SCOPE_ENT[i] for i in perm], [SCOPE_SIDS[i] for i in perm], clips_per_group=per_group)
        assert torch.equal(clip, ref[perm])


def test_one_clip_per_group_takes_the_highest_peak_and_the_earliest_row_on_ties():
    # group 0 (rows 0-2) peaks 1.5, 2.5, 2.5 -> row 1 ; group 1 (rows 3-4) peaks 0.5, 0.7 -> row 4
    ent = [[1.0, 1, 1.5, 1.5], [2.5, 2.5, 1, 1], [1.0, 1, 2.5, 2.5], [0.5, 0.5, 0.1, 0.1], [0.1, 0.1, 0.7, 0.7]]
    clip, stats = run([True] * 5, [0, 0, 0, 1, 1], [[1] * 4] * 5, ent, [[0, 0, 1, 1]] * 5)
    assert clip.tolist() == [NONE, HALF, NONE, NONE, FULL]
    # 2 clips of 2 and 4 tokens, both degenerate groups yield one
    assert stats["echo/n_clips"] == 2 and stats["echo/clip_tokens"] == 3.0
    assert stats["echo/clip_group_share"] == 1.0


def test_min_steps_drops_short_responses_and_lowers_the_group_share():
    # group 0: one-step responses; group 1: two-step responses (step means [1, 2])
    ent = [[1.0] * 4, [1.0] * 4, [1.0, 1, 2, 2], [1.0, 1, 2, 2]]
    sids = [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    clip, stats = run([True] * 4, [0, 0, 1, 1], [[1] * 4] * 4, ent, sids, min_steps=2, clips_per_group="all")
    assert clip.tolist() == [NONE, NONE, FULL, FULL]
    # 2 degenerate groups, 1 yields clips -> 1/2
    assert stats["echo/n_clips"] == 2 and stats["echo/clip_group_share"] == 0.5
    _, stats = run([True] * 4, [0, 0, 1, 1], [[1] * 4] * 4, ent, sids, min_steps=1, clips_per_group="all")
    assert stats["echo/n_clips"] == 4 and stats["echo/clip_group_share"] == 1.0


def test_max_clip_tokens_keeps_the_first_tokens_of_the_clip():
    # the 9-token mean-peak clip of PROFILE, cut to 3 ; left-padded copy: its first 3 valid tokens
    clip, stats = run([True], [0], [PROFILE_MASK], [PROFILE], [PROFILE_SIDS], max_clip_tokens=3)
    assert clip.tolist() == [prefix(3)]
    assert stats["echo/clip_tokens"] == 3.0
    left = [0] + PROFILE_MASK[:9]
    clip, _ = run([True], [0], [left], [[9.0] + PROFILE[:9]], [[-1] + PROFILE_SIDS[:9]], max_clip_tokens=3)
    assert clip.tolist() == [[0.0, 1, 1, 1, 0, 0, 0, 0, 0, 0]]


def test_no_degenerate_group_gives_no_clip_and_no_share_metric():
    clip, stats = run([True, False], [0, 0], [[1, 1]] * 2, [[1.0, 2.0]] * 2, [[0, 1]] * 2)
    assert clip.sum() == 0
    # the share of all-success groups with a clip is undefined without such groups
    assert stats["echo/n_clips"] == 0 and "echo/clip_group_share" not in stats


# ----------------------------------------------------------------------------------------
# L_echo

LOGP = [[-1.0, -2.0, -3.0, -4.0], [-0.5, -1.5, -2.5, -3.5]]
CLIP = torch.tensor([[1.0, 1, 0, 0], [1.0, 0, 0, 0]])


def test_echo_loss_is_minus_coef_times_mean_clip_logprob_and_its_gradient_lives_on_clip_tokens():
    logp = torch.tensor(LOGP, requires_grad=True)
    loss = echo_loss(logp, CLIP, coef=0.1)
    # clip tokens -1, -2, -0.5: mean -3.5 / 3 = -1.166667 -> loss = 0.1 * 1.166667 = 0.1166667
    assert loss.item() == pytest.approx(0.1166667, abs=1e-6)
    loss.backward()
    # d loss / d logp_t = -coef / n_clip = -0.1 / 3 on clip tokens, 0 elsewhere
    assert torch.allclose(logp.grad, CLIP * (-0.1 / 3))
    assert torch.equal(logp.grad != 0, CLIP.bool())


def test_zero_clips_give_zero_echo_loss_and_zero_gradient():
    logp = torch.tensor(LOGP, requires_grad=True)
    loss = echo_loss(logp, torch.zeros(2, 4), coef=0.1)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(2, 4))


def test_echo_loss_summed_over_micro_batches_with_the_global_count_equals_the_full_batch():
    full_leaf = torch.tensor(LOGP, requires_grad=True)
    full = echo_loss(full_leaf, CLIP, coef=0.1)
    full.backward()
    leaf = torch.tensor(LOGP, requires_grad=True)
    n = float(CLIP.sum())  # 3 clip tokens in the whole mini-batch
    total = echo_loss(leaf[:1], CLIP[:1], 0.1, n) + echo_loss(leaf[1:], CLIP[1:], 0.1, n)
    total.backward()
    # 0.1 * 3 / 3 + 0.1 * 0.5 / 3 = 0.1 + 0.0166667
    assert total.item() == pytest.approx(0.1166667, abs=1e-6)
    assert torch.allclose(total, full, atol=1e-7)
    assert torch.allclose(leaf.grad, full_leaf.grad, atol=1e-7)


# ----------------------------------------------------------------------------------------
# The point of EchoRL: degenerate groups carry no policy gradient, but do carry echo gradient


@pytest.mark.parametrize("preset", ["grpo", "dapo", "drgrpo"])
def test_all_success_batch_has_zero_policy_gradient_but_nonzero_echo_gradient_on_clip_tokens(preset):
    p = PRESETS[preset]
    # two all-success groups of 2; responses of 4 and 3 tokens (2 steps each)
    rewards, group = torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([0, 0, 1, 1])
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0]])
    sids = torch.tensor([[0, 0, 1, 1], [0, 1, 1, -1], [0, 0, 1, 1], [0, 1, 1, -1]])
    ent = torch.tensor([[2.0, 2, 1, 1], [1.0, 3, 3, 0], [0.5, 0.5, 1, 1], [0.2, 0.1, 0.1, 0]])
    adv = ADVANTAGES[p["advantage"]](rewards, group)
    assert torch.equal(adv, torch.zeros(4))

    g = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 4, generator=g) - 0.5
    logp = (old + 0.1 * torch.randn(4, 4, generator=g)).requires_grad_(True)   # ratios != 1
    loss, _ = policy_loss(logp, old, adv, mask, policy_loss=p["policy_loss"], aggregation=p["aggregation"],
                          eps_low=p["eps_low"], eps_high=p["eps_high"], norm=Norm.of(mask, 4))
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(4, 4))

    clip, _ = select_clips(torch.ones(4, dtype=torch.bool), group, mask, ent, sids, EchoConfig())
    # group 0: row 0 peak 2 (step 0, 2 tokens) < row 1 peak 3 (step 1, 3 tokens) -> row 1 whole
    # group 1: row 2 peak 1 (step 1) > row 3 peak 0.2 (step 0) -> row 2 whole
    assert clip.tolist() == [[0.0] * 4, [1.0, 1, 1, 0], [1.0] * 4, [0.0] * 4]
    logp.grad = None
    echo_loss(logp, clip, coef=0.001).backward()
    # -0.001 / 7 clip tokens on each clip token, 0 elsewhere
    assert torch.allclose(logp.grad, clip * (-0.001 / 7))
    assert torch.equal(logp.grad != 0, clip.bool())


# ----------------------------------------------------------------------------------------
# Premise metrics: is there something to learn in the all-correct groups, and does EchoRL learn it?


def test_mean_step_entropy_of_the_chosen_rollout_averages_its_steps_not_its_tokens():
    # PROFILE's steps: means 1, 1.5, 2 (5, 2 and 2 tokens): step average 1.5, token average 13/9
    _, st = run([True], [0], [PROFILE_MASK], [PROFILE], [PROFILE_SIDS])
    assert st["echo/mean_step_entropy"] == pytest.approx(1.5)
    assert st["echo/peak_step_entropy"] == pytest.approx(2.0)


def test_peak_tokens_are_the_last_step_inside_each_clip():
    sids = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, -1], [0, 0, 0, 1, 1, 1]])
    clip = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]]).float()
    assert peak_tokens(clip, sids).int().tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 0], [0] * 6]


def test_peak_entropy_change_averages_each_clips_peak_step_mean():
    """Row 0: peak tokens 2, 3: mean 1.0 -> 0.4 (-0.6). Row 1: peak token 4: 2.0 -> 2.2 (+0.2).
    Row 2 has no clip. Mean over clips: -0.2."""
    peak = torch.tensor([[0, 0, 1, 1, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]]).bool()
    before = torch.tensor([[9.0, 9.0, 1.5, 0.5, 9.0], [9.0, 9.0, 9.0, 9.0, 2.0], [5.0] * 5])
    after = torch.tensor([[0.0, 0.0, 0.6, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0, 2.2], [0.0] * 5])
    assert peak_entropy_change(before, after, peak) == pytest.approx(-0.2)
    assert peak_entropy_change(before, after, torch.zeros(3, 5, dtype=torch.bool)) == 0.0


def test_echo_term_policy_normaliser_uses_the_policy_tokens_and_falls_back_to_the_clip_mean_without_them():
    """Clip log-probs (-1, -2, -3) sum to -6 over 3 clip tokens, coef 0.5. clip_tokens: -0.5 * -6 / 3 = 1.0.
    policy, token-mean over 4 policy tokens: -0.5 * -6 / 4 = 0.75. policy with no policy token in the
    mini-batch (DAPO, every group all-correct): no normaliser to borrow, so the clip mean 1.0, not the sum 3.0."""
    logp = torch.tensor([[-1.0, -2.0], [-3.0, 0.0]])
    clip = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    cfg = lambda n: EchoConfig(coef=0.5, normalizer=n)
    assert float(echo_term(logp, clip, cfg("clip_tokens"), 3.0, "token-mean", Norm.from_counts(2, 4, 8))) == 1.0
    assert float(echo_term(logp, clip, cfg("policy"), 3.0, "token-mean", Norm.from_counts(2, 4, 8))) == 0.75
    assert float(echo_term(logp, clip, cfg("policy"), 3.0, "token-mean", Norm.from_counts(0, 0, 8))) == 1.0


def test_dapo_keeps_dropped_all_correct_groups_up_to_the_room_left():
    """Groups: live, all-correct, mixed-but-dropped (constant shaped reward), all-correct, all-correct.
    Only dropped all-correct groups qualify; room 2 keeps the first two of them."""
    correct = torch.tensor([1, 0, 1, 1, 1, 0, 1, 1, 1, 1], dtype=torch.bool)  # G = 2
    live = torch.tensor([True, False, False, False, False])
    keep = dropped_groups_to_keep(correct, live, 2, EchoConfig())
    assert keep.tolist() == [False, True, False, True, False]
    assert not dropped_groups_to_keep(correct, live, 2, EchoConfig(keep_dropped_groups=False)).any()


def test_row_uniforms_depend_on_the_row_key_not_on_its_position_in_the_batch():
    a = row_uniforms(0, 3, ["p1/0", "p1/1", "p2/0"])
    b = row_uniforms(0, 3, ["p2/0", "p1/0"])
    assert a[0] == b[1] and a[2] == b[0] and a[0] != a[1]
    assert ((a >= 0) & (a < 1)).all() and row_uniforms(1, 3, ["p1/0"])[0] != a[0]


# ----------------------------------------------------------------------------------------
# The authors' step rule (echo.delimiter: ids) and positive-only SFT


def test_delimiter_ids_end_steps_exactly_at_the_listed_ids(tok_model):
    from entropy import delimiter_table, step_ids
    tok, _ = tok_model
    eos = [tok.eos_token_id]
    nl = tok("\n", add_special_tokens=False).input_ids[-1]
    # " 1 + 2 = 3 \n 4 <eos>" as ids; the delimiters are ' +' (14) and ' =' (18), the newline is not one
    resp = torch.tensor([[5, 14, 6, 18, 7, nl, 8, tok.eos_token_id]])
    mask = torch.ones_like(resp, dtype=torch.float)
    # a step ends at each delimiter followed by content: after position 1 and after position 3
    sids = step_ids(resp, mask, delimiter_table(tok, "ids", [14, 18]), eos, min_tokens=1)
    assert sids.tolist() == [[0, 0, 1, 1, 2, 2, 2, 2]]
    # the vocabulary-derived rule splits only at the newline (position 5)
    assert step_ids(resp, mask, delimiter_table(tok, "newline"), eos, min_tokens=1).tolist() == [[0] * 6 + [1] * 2]


def test_delimiter_ids_outside_the_vocabulary_are_a_config_error_at_setup(tok_model):
    import train
    from config import ConfigError, load_config
    from conftest import TINY
    tok, _ = tok_model
    V = len(tok)
    cfg = load_config(None, [*TINY, "echo.delimiter=ids", f"echo.delimiter_ids=[14, {V}]"])
    with pytest.raises(ConfigError, match=rf"'echo.delimiter_ids'.*\[{V}\].*vocabulary"):
        train.step_delimiters(tok, cfg)
    ok = load_config(None, [*TINY, "echo.delimiter=ids", "echo.delimiter_ids=[14, 18]"])
    assert train.step_delimiters(tok, ok)["newline"].nonzero().flatten().tolist() == [14, 18]


def test_positive_only_sft_is_echo_full_all_success_and_its_loss_is_the_mean_correct_token_nll():
    # Positive-only SFT (RAFT, arXiv 2504.11343): L = -coef * sum over correct responses' tokens of log p / #tokens.
    # group 0 = (correct 3 tokens, wrong 2 tokens), group 1 = (correct 2 tokens, correct 1 token): every correct
    # response is taken whole, in a mixed group too: 3 + 2 + 1 = 6 tokens.
    mask = [[1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 0, 0]]
    ent = [[0.5, 2.0, 0.1], [1.0, 1.0, 0.0], [3.0, 0.2, 0.0], [0.7, 0.0, 0.0]]
    sids = [[0, 1, 1], [0, 0, -1], [0, 1, -1], [0, -1, -1]]
    clip, stats = run([True, False, True, True], [0, 0, 1, 1], mask, ent, sids,
                      select="full", clips_per_group="all", scope="success")
    assert clip.tolist() == [[1.0, 1, 1], [0, 0, 0], [1, 1, 0], [1, 0, 0]]
    assert stats["echo/n_clips"] == 3.0
    logp = torch.tensor([[-0.1, -0.2, -0.3], [-5.0, -5.0, 0.0], [-0.4, -0.5, 0.0], [-0.6, 0.0, 0.0]])
    # -(0.1 + 0.2 + 0.3 + 0.4 + 0.5 + 0.6) / 6 * -coef  ->  coef 0.5: 0.5 * 2.1 / 6 = 0.175
    assert echo_loss(logp, clip, coef=0.5).item() == pytest.approx(0.175, abs=1e-7)
