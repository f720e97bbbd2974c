"""The packed forward (packing.py) computes the padded reference's numbers (entropy.response_logprobs):
log-probs, entropies and gradients, for any padding, ragged lengths, groups split over micro-batches,
EchoRL with DAPO's echo-only rows, and under torchrun.

fp64 checks patch Qwen2's RMSNorm to normalise in the input's dtype: transformers' norm rounds to fp32,
and where the reference adds a shared prompt's G gradient copies after that rounding, the packed
forward adds them before it, so in fp64 the two would differ by fp32 rounding (~1e-7), not 1e-12.
"""
import dataclasses

import pytest
import torch
from transformers.models.qwen2 import modeling_qwen2

import echorl
import packing
import tiny
import train
from entropy import response_logprobs as reference
from rollout import Rollout, concat, update_slices

from conftest import scripted, small_cfg, with_echo_only_groups

TOK = tiny.build_tokenizer()
PAD = TOK.pad_token_id


def _norm_in_input_dtype(self, x):  # Qwen2RMSNorm, accumulating in max(dtype, fp32) instead of fp32
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return self.weight * h.to(x.dtype)


@pytest.fixture
def fp64_norm(monkeypatch):
    monkeypatch.setattr(modeling_qwen2.Qwen2RMSNorm, "forward", _norm_in_input_dtype)


def model64(seed=0):
    return tiny.build_model(TOK, seed=seed, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=64).double()


def rollout(prompt_lens, resp_lens, G, P, R, seed=0):
    """Groups of G rows sharing a prompt (prompt_lens: one per group), responses right-padded."""
    g = torch.Generator().manual_seed(seed)
    B = len(resp_lens)
    prompts = torch.randint(3, len(TOK), (len(prompt_lens), P), generator=g).repeat_interleave(G, 0)   # [B, P]
    p = torch.tensor(prompt_lens).repeat_interleave(G)[:, None]
    pos = torch.arange(P)[None]
    pmask = pos >= P - p                                                                              # [B, P] left-padded
    L = torch.tensor(resp_lens)[:, None]
    rmask = (torch.arange(R)[None] < L).float()                                                       # [B, R]
    rids = torch.randint(3, len(TOK), (B, R), generator=g).masked_fill(rmask == 0, PAD)
    return Rollout(prompts.masked_fill(~pmask, PAD), pmask.long(), rids, rmask, torch.zeros(B, dtype=torch.bool),
                   torch.arange(B) // G, [""] * B)


def run_forward(model, batch, fn, seed=1, **kw):
    """log-probs and entropies [B, R], and the gradients of a random weighting of both."""
    model.zero_grad()
    lp, ent = fn(model, batch, temperature=0.7, with_entropy=True, **kw)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(2, lp.shape[0], 64, generator=g, dtype=lp.dtype)[..., :lp.shape[1]]   # [2, B, R], R-independent
    ((lp * w[0]).sum() + (ent * w[1]).sum()).backward()
    return lp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def max_diff(a, b):
    if isinstance(a, dict):
        return max(float((a[k] - b[k]).abs().max()) for k in a)
    return float((a - b).abs().max())


def test_layout_holds_each_prompt_once_and_no_padding():
    # 2 groups of 2; prompts of 2 and 3 tokens in P = 4; responses of 3, 1, 2, 4 tokens in R = 5
    b = rollout([2, 3], [3, 1, 2, 4], G=2, P=4, R=5)
    lay = packing.layout(b)
    # the prompts once (5 tokens), then each response but its last token (2 + 0 + 1 + 3): 11, of the reference's 36
    assert len(lay.input_ids) == 11
    # torch.unique sorts the prompts: the 2-token one (more left padding, -1 first) comes first
    assert lay.input_ids.tolist() == torch.cat([b.prompt_ids[0, 2:], b.prompt_ids[2, 1:], b.response_ids[0, :2],
                                                b.response_ids[2, :1], b.response_ids[3, :3]]).tolist()
    assert lay.position_ids.tolist() == [0, 1, 0, 1, 2, 2, 3, 3, 3, 4, 5]   # responses continue their prompt
    # the state predicting each real response token: its prompt's last token (1 or 4), then its own tokens
    assert lay.predict.tolist() == [1, 5, 6, 1, 4, 7, 4, 8, 9, 10]


@pytest.mark.parametrize("prompt_once", [True, False])
def test_packed_logprobs_entropies_and_gradients_equal_the_padded_reference(fp64_norm, prompt_once):
    # 3 groups of 3: ragged prompts (1, 4 and 6 tokens of P = 7), responses of 1 to R tokens
    model = model64()
    b = rollout([4, 1, 6], [9, 1, 4, 2, 9, 5, 3, 1, 7], G=3, P=7, R=9)
    want = run_forward(model, b, reference)
    got = run_forward(model, b, packing.packed_response_logprobs, prompt_once=prompt_once)
    assert max_diff(got[0], want[0]) < 1e-12 and max_diff(got[1], want[1]) < 1e-12
    assert max_diff(got[2], want[2]) < 1e-12
    assert float(want[2]["model.embed_tokens.weight"].abs().max()) > 1e-3   # a gradient that could differ
    assert torch.equal(got[0] == 0, b.response_mask == 0)                   # 0 on padding, as the reference


def test_extra_padding_and_right_padded_prompts_change_nothing(fp64_norm):
    model = model64()
    b = rollout([3, 5], [2, 6, 1, 4], G=2, P=5, R=6)
    want = run_forward(model, b, reference)
    # re-padded to wider prompts and responses, as concat() pads batches of different widths
    wide = concat([b, rollout([2], [8], G=1, P=8, R=8, seed=3)], PAD).select(torch.arange(4))
    assert wide.prompt_ids.shape[1] == 8 and wide.response_ids.shape[1] == 8
    got = run_forward(model, wide, packing.packed_response_logprobs)
    assert max_diff(got[0][:, :6], want[0]) < 1e-12 and max_diff(got[2], want[2]) < 1e-12
    # prompts padded on the right: the layout takes the real prompt tokens wherever they are
    idx = torch.argsort((b.prompt_mask == 0).long(), dim=1, stable=True)       # [B, P] real tokens first
    right = dataclasses.replace(b, prompt_ids=b.prompt_ids.gather(1, idx), prompt_mask=b.prompt_mask.gather(1, idx))
    assert right.prompt_mask[0].tolist() == [1, 1, 1, 0, 0]
    got = run_forward(model, right, packing.packed_response_logprobs)
    assert max_diff(got[0], want[0]) < 1e-12 and max_diff(got[2], want[2]) < 1e-12


def test_a_group_split_over_micro_batches_sums_to_the_same_gradient(fp64_norm):
    model = model64()
    b = rollout([4, 2], [5, 3, 6, 2, 4, 1, 6, 3], G=4, P=5, R=6)
    want = run_forward(model, b, reference)
    model.zero_grad()
    w = torch.randn(2, len(b), 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)[..., :6]
    for rows in (torch.arange(0, 3), torch.arange(3, 6), torch.arange(6, 8)):   # cuts both groups
        lp, ent = packing.packed_response_logprobs(model, b.select(rows), temperature=0.7, with_entropy=True)
        ((lp * w[0, rows]).sum() + (ent * w[1, rows]).sum()).backward()
    assert max_diff({n: p.grad for n, p in model.named_parameters()}, want[2]) < 1e-12


def test_long_segments_share_attention_blocks_only_with_similar_lengths(fp64_norm):
    # one long response among short ones: blocks by length, still the reference's numbers
    model = model64()
    b = rollout([3, 3], [40, 2, 3, 2, 2, 3, 2, 41], G=4, P=3, R=41)
    lay = packing.layout(b)
    # segments of 40, 39 | 3, 3 (prompts), 2, 2 | 1 x 4 query tokens: a block takes lengths >= 0.6 x its longest
    assert [tuple(q.shape) for q, _, _ in lay.blocks] == [(2, 40), (4, 3), (4, 1)]
    want = run_forward(model, b, reference)
    got = run_forward(model, b, packing.packed_response_logprobs)
    assert max_diff(got[0], want[0]) < 1e-12 and max_diff(got[2], want[2]) < 1e-12


def test_models_the_packed_forward_cannot_run_take_the_reference_path():
    model = model64().float()   # fp32: transformers' eager attention masks with the fp64 minimum, -inf in fp32
    b = rollout([3], [4, 2], G=2, P=4, R=5)
    assert packing.unsupported(model) is None
    model.config._attn_implementation = "eager"
    assert "eager" in packing.unsupported(model)
    lp, _ = packing.response_logprobs(model, b)
    assert torch.equal(lp, reference(model, b)[0]) and bool(lp.isfinite().all())


def _update_grads(model_dir, tmp_path, pack: bool, overrides, rewards, n_echo):
    """The stages after sampling on a fixed batch (old policy, EchoClips, one mini-batch's gradients) with
    train.pack on or off; micro-batches of 3 rows cut the groups of 4. (fp64 weights: the packed forward
    gives each row its prompt, see packing.response_logprobs; prompt sharing is checked above and below.)"""
    extra = [*overrides, "rollout.prompts_per_step=4", "rollout.group_size=4", "train.micro_batch_size=3",
             "train.old_logprobs=recompute", "reward.truncated=score", "algo.overlong_buffer=0", "model.dtype=float64",
             f"train.pack={str(pack).lower()}"]
    run = train.setup(small_cfg(model_dir, tmp_path, *extra), reward_fn=scripted(rewards, (1,) * 4 * max(n_echo, 1)))
    run.cfg.algo.dynamic_sampling = False
    batch, _ = train.collect(run)
    if n_echo:  # DAPO's dropped all-success groups, kept for EchoRL with in_policy = 0
        batch = with_echo_only_groups(run, batch, n_echo)
    train.compute_advantages(run, batch)
    train.old_policy(run, batch)
    echorl.echo_clips(run, batch)
    run.model.train()
    micro = update_slices(batch, 1, 3, echorl.rows_to_update(batch))[0]
    stats = train.accumulate_gradients(run, batch, micro)
    return batch, stats, {n: p.grad.clone() for n, p in run.model.named_parameters()}


@pytest.mark.parametrize("overrides, rewards, n_echo", [
    (["algo.name=grpo", "echo.enabled=true", "echo.coef=0.5", "algo.entropy_coef=0.1"],
     (1, 0, 0, 1, 1, 1, 1, 1, 0, 1, 0, 0, 1, 1, 1, 1), 0),
    (["algo.name=dapo", "echo.enabled=true", "echo.coef=0.5"], (1, 0, 0, 1, 0, 1, 1, 1, 0, 1, 0, 0, 1, 0, 0, 0), 2),
])
def test_update_with_echorl_and_echo_only_rows_takes_the_reference_gradient(fp64_norm, model_dir, tmp_path,
                                                                            overrides, rewards, n_echo):
    ref_batch, ref_stats, want = _update_grads(model_dir, tmp_path, False, overrides, rewards, n_echo)
    batch, stats, got = _update_grads(model_dir, tmp_path, True, overrides, rewards, n_echo)
    assert (batch.in_policy == 0).sum() == 4 * n_echo and batch.clip_mask.sum() > 0
    assert torch.equal(batch.clip_mask, ref_batch.clip_mask)   # EchoClips picked from the same entropies
    assert max_diff(batch.old_logprobs, ref_batch.old_logprobs) < 1e-12
    assert max_diff(batch.entropies, ref_batch.entropies) < 1e-12
    assert stats["loss_echo"] > 0 and stats["loss_echo"] == pytest.approx(ref_stats["loss_echo"], rel=1e-12)
    assert stats["loss_pg"] == pytest.approx(ref_stats["loss_pg"], rel=1e-12, abs=1e-15)
    assert max_diff(got, want) < 1e-12


def test_two_processes_packed_take_the_one_process_reference_step(model_dir, tmp_path):
    """torchrun (gloo, 2 ranks, FSDP2) with the packed forward vs one process with the padded reference.
    fp32 and transformers' own norm (the worker is a fresh process): the bounds of test_dist.py's fp32 case."""
    from test_dist import CASES, build_cases, one_process, two_processes
    cases = build_cases(model_dir, tmp_path, "float32", 1e-3)
    reference_cases = tmp_path / "reference.pt"
    torch.save({k: (b, [*o, "train.pack=false"]) for k, (b, o) in torch.load(cases, weights_only=False).items()},
               reference_cases)
    want = one_process(reference_cases, model_dir, tmp_path / "one.pt")
    got = two_processes(cases, model_dir, tmp_path / "two.pt")
    for name, *_ in CASES:
        a, b = want[name], got[name]
        assert max(float((b["params"][k] - a["params"][k]).abs().max()) for k in a["params"]) <= 1e-5, name
        for key in ("loss_pg", "loss_echo", "grad_norm", "entropy"):
            assert b["stats"][key] == pytest.approx(a["stats"][key], rel=1e-5, abs=1e-7), (name, key)


def test_layers_that_rebuild_their_inputs_as_fsdp2_does_still_take_the_packed_layout(fp64_norm):
    """FSDP2's MixedPrecisionPolicy casts every layer's inputs with torch.distributed.utils._apply_to_tensors,
    which rebuilds dataclasses such as the Layout: each layer then sees a copy, and the count of layers
    that used the layout must still reach every layer (it failed as 0 of 2 under torchrun + bf16)."""
    from torch.distributed.utils import _apply_to_tensors
    model = model64()
    b = rollout([3, 2], [4, 2, 5, 1], G=2, P=4, R=5)
    want = run_forward(model, b, reference)
    rebuild = lambda module, args, kwargs: (_apply_to_tensors(lambda t: t, args), _apply_to_tensors(lambda t: t, kwargs))
    hooks = [layer.register_forward_pre_hook(rebuild, with_kwargs=True) for layer in model.model.layers]
    try:
        got = run_forward(model, b, packing.packed_response_logprobs)
    finally:
        for h in hooks:
            h.remove()
    assert max_diff(got[0], want[0]) < 1e-12 and max_diff(got[2], want[2]) < 1e-12
