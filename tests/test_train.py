"""The loop's invariants (the README's pitfalls) on a small random Qwen2, plus config and resume."""
import math
import json
from pathlib import Path

from types import SimpleNamespace

import pytest
import torch

import echorl
import train
from entropy import response_logprobs
from rollout import concat, micro_batches, mini_batch_rows, update_slices
from sampler import sampler_mismatch
from config import load_config
from data import DataError

from conftest import SHARED, scripted, small_cfg


def prepared_batch(model_dir, tmp_path, *extra, rewards=(1, 0, 0, 1, 1, 1, 0, 1)):
    """One rollout batch with scripted rewards, advantages, old log-probs, entropies and EchoClips:
    the stages of train_step before the update."""
    cfg = small_cfg(model_dir, tmp_path, "reward.truncated=score", *extra)  # random text never stops
    run = train.setup(cfg, reward_fn=scripted(rewards))
    batch, _ = train.collect(run)
    train.old_policy(run, batch)
    train.compute_advantages(run, batch)
    if cfg.echo.enabled:
        echorl.echo_clips(run, batch)
    return run, batch


def accumulate(run, batch, micro_batch_size=None):
    """The gradient of the whole batch as one mini-batch, in micro-batches of micro_batch_size."""
    micro = micro_batches(len(batch), micro_batch_size or run.cfg.train.micro_batch_size)
    return train.accumulate_gradients(run, batch, micro)


def snapshot(model) -> dict:
    """A copy of the model's weights, by name."""
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


@pytest.mark.parametrize("source", ["recompute", "sampler"])
def test_first_update_sees_ratio_one_and_no_clipping(model_dir, tmp_path, source):
    """README pitfall 3. `recompute`: the old-policy pass runs in the update's micro-batches, so the ratio
    is exactly 1. `sampler` (auto here: fp32 weights, no autocast, the policy samples itself): the old
    log-probs are the sampler's, computed over a KV cache instead of the full sequence, so the ratio is
    1 up to float rounding (stated bound 1e-5) and no token is clipped."""
    run, batch = prepared_batch(model_dir, tmp_path, "train.micro_batch_size=3", f"train.old_logprobs={source}")
    assert train.old_logprobs_from_sampler(run) == (source == "sampler")
    run.model.train()
    for idx in [rows for mini in train.slices_of(run, batch) for rows in mini]:  # the update's micro-batches
        mb = batch.select(idx)
        logp, _ = train.forward(run, run.model, mb)
        ratio = torch.exp(logp - mb.old_logprobs)
        if source == "recompute":
            assert torch.equal(ratio, torch.ones_like(logp))
        else:
            assert torch.equal(mb.old_logprobs, mb.sample_logprobs)
            assert torch.allclose(ratio, torch.ones_like(logp), atol=1e-5, rtol=0)
    st = accumulate(run, batch)
    assert st["clip_frac_low"] == 0.0 and st["clip_frac_high"] == 0.0


@pytest.mark.parametrize("method", ["grpo", "dapo", "drgrpo", "rloo", "reinforce_pp", "gspo"])
def test_gradient_does_not_depend_on_micro_batch_size(model_dir, tmp_path, method):
    """README pitfall 4: the same batch split 1, 2 or 4 ways gives the same gradient
    (policy loss + EchoRL loss; echo on with scope 'success' so mixed groups have clips too)."""
    run, batch = prepared_batch(model_dir, tmp_path, f"algo.name={method}", "echo.scope=success",
                                "echo.coef=0.5", "algo.dynamic_sampling=false")
    assert batch.clip_mask.sum() > 0 and batch.in_policy.all()
    ref = None
    for mbs in (8, 4, 2):
        run.model.zero_grad(set_to_none=True)
        accumulate(run, batch, mbs)
        g = grads(run.model)
        if ref is None:
            ref = g
            assert sum(float(v.abs().sum()) for v in g.values()) > 0
        else:
            for n in ref:
                assert torch.allclose(g[n], ref[n], atol=1e-7, rtol=1e-5), (mbs, n)


def test_all_success_batch_gives_zero_policy_gradient_and_nonzero_echo_gradient(model_dir, tmp_path):
    """README pitfall 5: zero-std groups contribute exactly nothing to the policy gradient."""
    ones = (1,) * 8
    run, batch = prepared_batch(model_dir, tmp_path, "echo.enabled=false", rewards=ones)
    assert (batch.advantages == 0).all()
    run.model.zero_grad(set_to_none=True)
    accumulate(run, batch)
    assert all((g == 0).all() for g in grads(run.model).values())

    run, batch = prepared_batch(model_dir, tmp_path, "echo.enabled=true", rewards=ones)
    assert batch.clip_mask.sum() > 0
    run.model.zero_grad(set_to_none=True)
    accumulate(run, batch)
    assert sum(float(g.abs().sum()) for g in grads(run.model).values()) > 0


def test_echo_disabled_update_is_bit_identical_to_echo_with_zero_coef(model_dir, tmp_path):
    states = []
    for flags in (["echo.enabled=false"], ["echo.enabled=true", "echo.coef=0.0"]):
        run, batch = prepared_batch(model_dir, tmp_path, *flags)
        train.update(run, batch)
        states.append(snapshot(run.model))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def _drop_times(h):
    return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in h]


def test_resume_after_kill_reproduces_the_uninterrupted_run(model_dir, tmp_path, monkeypatch):
    full = train.train(small_cfg(model_dir, tmp_path / "a"))
    cfg = small_cfg(model_dir, tmp_path / "b")
    real_step, calls = train.train_step, {"n": 0}

    def dying_step(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed after the step-2 checkpoint
        return real_step(*a, **k)

    monkeypatch.setattr(train, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg)
    monkeypatch.setattr(train, "train_step", real_step)
    resumed = train.train(cfg, resume=True)
    assert [m["step"] for m in resumed] == [3, 4]
    assert _drop_times(resumed) == _drop_times(full[2:])
    lines = [json.loads(l) for l in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3, 4]
    ck = tmp_path / "b" / "run" / "checkpoints"
    assert (ck / "latest").read_text() == "step_000004" and not list(ck.glob(".tmp*"))


def test_missing_train_file_and_malformed_row_are_clear_errors(model_dir, tmp_path):
    cfg = small_cfg(model_dir, tmp_path, f"data.train={tmp_path}/missing.jsonl")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        train.train_stream(cfg)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "2+2?"\n')
    cfg = small_cfg(model_dir, tmp_path, f"data.train={bad}")
    with pytest.raises(DataError, match=r"bad.jsonl: line 2"):
        train.train_stream(cfg)


@pytest.mark.skipif(not (SHARED / "models" / "qwen2.5-math-1.5b").is_dir(), reason="shared/models not present")
def test_qwen_config_runs_one_step_with_real_tokenizer_and_shrunk_model(tmp_path):
    """configs/qwen1.5b.yaml as users run it, with the real Qwen2.5-Math tokenizer and config,
    layers shrunk so it runs on CPU; the train file is MATH train from shared/data."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    src = SHARED / "models" / "qwen2.5-math-1.5b"
    real = json.loads((src / "config.json").read_text())
    real.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_window_layers=2)
    conf = Qwen2Config(**real)
    assert conf.vocab_size == 151936 and conf.tie_word_embeddings
    torch.manual_seed(0)
    d = tmp_path / "qwen_small"
    Qwen2ForCausalLM(conf).to(torch.bfloat16).save_pretrained(d)
    AutoTokenizer.from_pretrained(src).save_pretrained(d)
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "qwen1.5b.yaml", [
        f"model.name_or_path={d}", f"data.train={SHARED / 'data' / 'math' / 'train.jsonl'}",
        "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=8", "train.steps=1",
        "train.device=cpu", "eval.benchmarks=[]", f"train.out_dir={tmp_path}/run", "log.log_rollouts_every=1"])
    assert cfg.model.autocast == "bfloat16" and cfg.model.gradient_checkpointing
    hist = train.train(cfg)
    m = hist[0]
    assert m["step"] == 1 and m["batch_rows"] == 4 and torch.isfinite(torch.tensor(m["grad_norm"]))
    assert (tmp_path / "run" / "checkpoints" / "step_000001" / "model.safetensors").exists()


def test_dapo_dynamic_sampling_drops_zero_std_groups_refills_and_keeps_success_groups_for_echo(model_dir, tmp_path):
    """Round 1 (2 prompts): [1, 1] all-success -> dropped from the policy but kept for EchoRL,
    [1, 0] mixed -> kept. Round 2 asks for the 1 missing prompt: [1, 0] -> kept. The batch is the
    2 policy groups followed by the echo-only group (in_policy = 0)."""
    cfg = small_cfg(model_dir, tmp_path, "algo.name=dapo", "rollout.prompts_per_step=2", "rollout.group_size=2",
                    "echo.enabled=true", "echo.keep_dropped_groups=true", "algo.overlong_buffer=0",
                    "reward.truncated=score")  # a random model never stops: score truncated rows too
    run = train.setup(cfg, reward_fn=scripted([1, 1, 1, 0], [1, 0]))
    batch, stats = train.collect(run)
    assert stats["sampling_rounds"] == 2.0 and stats["frac_degenerate"] == 0.5
    assert batch.in_policy.tolist() == [1, 1, 1, 1, 0, 0]
    assert batch.correct.tolist() == [True, False, True, False, True, True]
    assert batch.group.tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("method", ["grpo", "dapo", "drgrpo", "rloo", "reinforce_pp", "gspo"])
def test_every_method_runs_a_training_step_with_echorl(model_dir, tmp_path, method):
    cfg = small_cfg(model_dir, tmp_path, f"algo.name={method}", "echo.enabled=true", "train.steps=1")
    hist = train.train(cfg)
    assert len(hist) == 1
    assert "echo/n_clips" in hist[0] and "time/echo_select" in hist[0]


def test_dapo_step_with_only_degenerate_groups_trains_on_nothing_without_crashing(model_dir, tmp_path):
    """Every round all-fail: nothing survives dynamic sampling; the step still runs and changes nothing."""
    cfg = small_cfg(model_dir, tmp_path, "algo.name=dapo", "echo.enabled=false", "algo.max_sampling_rounds=1",
                    "algo.overlong_buffer=0")  # no length shaping: all-fail groups are truly constant
    run = train.setup(cfg, reward_fn=lambda texts, golds: [0.0] * len(texts))
    before = snapshot(run.model)
    stats, batch = train.train_step(run)
    assert len(batch) == 8 and batch.in_policy.sum() == 0 and stats["sampling_rounds"] == 2.0
    assert stats["frac_degenerate"] == 1.0 and stats["grad_norm"] == 0.0
    assert all(torch.equal(before[k], v) for k, v in run.model.state_dict().items())


def test_old_logprobs_match_the_update_forward_exactly_with_several_mini_batches(model_dir, tmp_path):
    run, batch = prepared_batch(model_dir, tmp_path, "train.mini_batches=3", "train.micro_batch_size=2",
                                "train.old_logprobs=recompute")
    run.model.train()
    for mini in train.slices_of(run, batch):
        for idx in mini:
            mb = batch.select(idx)
            logp, _ = train.forward(run, run.model, mb)
            assert torch.equal(logp, mb.old_logprobs)


def test_mini_batches_take_groups_by_global_index_mod_k_and_keep_echo_only_rows_apart():
    rows = lambda minis: [(p.tolist(), e.tolist()) for p, e in minis]
    # 4 policy groups of 2 rows (global indices 0..3), then 2 echo-only groups (their own indices 0, 1)
    in_policy = torch.tensor([1.0] * 8 + [0.0] * 4)
    gid = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 0, 0, 1, 1])
    assert rows(mini_batch_rows(in_policy, gid, 2)) == [([0, 1, 4, 5], [8, 9]), ([2, 3, 6, 7], [10, 11])]
    # 2 policy groups in 3 mini-batches: the third holds no policy row and is left out; the 3 echo-only
    # groups go over the 2 that remain (0, 1, 0): no echo-only extra step
    gid = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1, 2, 2])
    assert rows(mini_batch_rows(torch.tensor([1.0] * 4 + [0.0] * 6), gid, 3)) == \
        [([0, 1], [4, 5, 8, 9]), ([2, 3], [6, 7])]
    # no policy row at all: echo-only groups over all k
    assert rows(mini_batch_rows(torch.zeros(4), torch.tensor([0, 0, 1, 1]), 2)) == [([], [0, 1]), ([], [2, 3])]


def test_two_ranks_holding_halves_of_the_groups_form_the_one_process_mini_batches():
    """Rank 0 holds global groups 0, 1, rank 1 groups 2, 3 (2 rows each, k = 2): mini-batch j on each rank
    holds its groups of index j mod 2, so the ranks' rows of mini-batch j are one process's mini-batch j."""
    one = mini_batch_rows(torch.ones(8), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), 2)
    shares = []
    for gid, other in ((torch.tensor([0, 0, 1, 1]), torch.tensor([2, 2, 2, 2])),
                       (torch.tensor([2, 2, 3, 3]), torch.tensor([2, 2, 2, 2]))):
        counts_other = torch.bincount(other % 2, minlength=2).double()
        shares.append(mini_batch_rows(torch.ones(4), gid, 2, total=lambda x, c=counts_other: x + c))
    for j in range(2):  # rank 1's local row i is global row 4 + i
        union = shares[0][j][0].tolist() + (shares[1][j][0] + 4).tolist()
        assert union == one[j][0].tolist()


def test_update_slices_cut_micro_batches_and_skip_echo_only_rows_without_a_clip():
    b = SimpleNamespace(in_policy=torch.tensor([1.0] * 8 + [0.0] * 4), extras={"global_group": [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1]})
    keep = torch.tensor([True] * 8 + [False, False, True, False])
    assert [[i.tolist() for i in mini] for mini in update_slices(b, 2, 3)] == \
        [[[0, 1, 2], [3], [8, 9]], [[4, 5, 6], [7], [10, 11]]]
    assert [[i.tolist() for i in mini] for mini in update_slices(b, 2, 3, keep)] == \
        [[[0, 1, 2], [3]], [[4, 5, 6], [7], [10]]]


def test_echo_only_rows_at_zero_coef_leave_the_update_unchanged(model_dir, tmp_path):
    """DAPO + EchoRL appends dropped all-success groups (in_policy = 0). With coef 0 they must not
    change the policy update: each mini-batch keeps the policy rows it has without them."""
    states = []
    for extra in (False, True):
        run, batch = prepared_batch(model_dir, tmp_path, "echo.enabled=true", "echo.coef=0.0",
                                    "train.mini_batches=2")
        if extra:  # 4 echo-only copies of rows 4..7 (group 1: all correct), appended as collect does
            echo = batch.select(torch.arange(4, 8))
            echo.in_policy = torch.zeros(4)
            batch = concat([batch, echo], 0)
            batch.group = torch.arange(len(batch) // 4).repeat_interleave(4)
        train.update(run, batch)
        states.append(snapshot(run.model))
    assert all(torch.allclose(states[0][k], states[1][k], atol=1e-6) for k in states[0])


# ----------------------------------------------------------------------------------------
# Loop-level behaviour of config switches


def test_truncated_responses_score_zero_unless_told_to_verify_them(model_dir, tmp_path):
    """A random model rarely emits EOS within 8 tokens: most rows are truncated. With every answer
    verified correct, `reward.truncated: zero` sets the truncated rows' reward to 0 (and `correct` to
    False); `score` keeps the verifier's 1.0."""
    for mode in ("zero", "score"):
        run = train.setup(small_cfg(model_dir, tmp_path, f"reward.truncated={mode}"),
                          reward_fn=lambda texts, golds: [1.0] * len(texts))
        batch, _ = train.collect(run)
        cut = batch.truncated
        assert cut.sum() >= 4
        want = (~cut).float() if mode == "zero" else torch.ones(len(batch))
        assert torch.equal(batch.rewards, want) and torch.equal(batch.correct, want > 0)


def test_format_reward_reaches_the_default_verifier(model_dir, tmp_path):
    run = train.setup(small_cfg(model_dir, tmp_path, "reward.format_reward=0.25"))
    assert run.reward_fn(["so \\boxed{3}", "it is 3", "\\boxed{4}"], ["4", "4", "4"]) == [0.25, 0.0, 1.0]


def test_kl_term_is_zero_at_the_reference_and_acts_once_the_policy_moves(model_dir, tmp_path):
    """k3 KL = exp(d) - d - 1 with d = ref - logp has value and gradient 0 at d = 0: with one optimizer
    step per batch (policy == reference during it) the update equals kl_coef=0's exactly; with two
    mini-batches the second step sees a moved policy, a positive KL and a different update."""
    states = {}
    for minis in (1, 2):
        for kl in (0.0, 1.0):
            run, batch = prepared_batch(model_dir, tmp_path, f"algo.kl_coef={kl}", f"train.mini_batches={minis}",
                                        "train.old_logprobs=recompute")
            assert (run.ref_model is None) == (kl == 0)
            if kl:
                assert torch.equal(batch.ref_logprobs, batch.old_logprobs)
            stats = train.update(run, batch)
            states[(minis, kl)] = snapshot(run.model)
            if kl and minis == 2:
                assert stats["kl"] > 0
            if kl and minis == 1:
                assert stats["kl"] == 0.0
    assert same(states[(1, 0.0)], states[(1, 1.0)])
    assert not same(states[(2, 0.0)], states[(2, 1.0)])


def test_entropy_bonus_raises_the_policy_entropy(model_dir, tmp_path):
    """All groups correct and EchoRL off: the policy loss is 0, so the update follows the entropy bonus
    alone, and the mean token entropy of the same rollouts goes up."""
    run, batch = prepared_batch(model_dir, tmp_path, "echo.enabled=false", "algo.entropy_coef=1.0",
                                "train.lr=1e-3", rewards=(1,) * 8)
    m = batch.response_mask
    before = float((batch.entropies * m).sum() / m.sum())
    stats = train.update(run, batch)
    assert stats["entropy_bonus"] == pytest.approx(before, rel=1e-5)  # first update: the old entropies
    with torch.no_grad():
        _, ent = response_logprobs(run.model, batch, temperature=1.0, with_entropy=True)
    assert float((ent * m).sum() / m.sum()) > before


def test_zvp_gives_an_all_correct_batch_a_policy_loss_of_minus_alpha_times_the_mean_entropy(model_dir, tmp_path):
    """RL-ZVP on a batch whose groups are all correct: every token's advantage is alpha * H_t (the old
    policy's entropy), so at ratio 1 the GRPO loss (seq-mean-token-mean) is -alpha * mean over rows of each
    row's mean token entropy, where plain GRPO would have 0."""
    run, batch = prepared_batch(model_dir, tmp_path, "echo.enabled=false", "algo.zvp_coef=0.1", rewards=(1,) * 8)
    m = batch.response_mask
    assert batch.advantages.shape == m.shape
    want = -0.1 * float(((batch.entropies * m).sum(-1) / m.sum(-1)).mean())
    stats = accumulate(run, batch)
    assert float(stats["loss_pg"]) == pytest.approx(want, rel=1e-5) and want < 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in run.model.parameters())


def test_ppo_epochs_take_epochs_x_mini_batches_optimizer_steps_on_the_same_rollouts(model_dir, tmp_path):
    """Two epochs: 2 x 2 optimizer steps (the scheduler counts them); the second epoch's ratios are no
    longer 1, so its clip statistics or loss differ from a second single-epoch update's."""
    run, batch = prepared_batch(model_dir, tmp_path, "train.ppo_epochs=2", "train.mini_batches=2",
                                "train.lr=0.05")
    train.update(run, batch)
    assert run.sched.last_epoch == 4 and run.opt.state[next(iter(run.opt.state))]["step"] == 4
    one, batch1 = prepared_batch(model_dir, tmp_path, "train.ppo_epochs=1", "train.mini_batches=2",
                                 "train.lr=0.05")
    train.update(one, batch1)
    assert one.sched.last_epoch == 2
    differ = [k for k, v in one.model.state_dict().items() if not torch.equal(v, run.model.state_dict()[k])]
    assert differ  # the second epoch moved the weights further


def test_verifier_bound_hits_are_logged_per_step_by_reason(model_dir, tmp_path):
    """Each response here is scored as a 300-deep brace nesting, which the verifier refuses by its depth
    bound: the step logs exactly one depth hit per rollout and none of the other kinds."""
    import reward
    deep = "\\boxed{" + "{" * 300 + "2" + "}" * 300 + "}"
    run = train.setup(small_cfg(model_dir, tmp_path),
                      reward_fn=lambda texts, golds: [reward.score(deep, "2") for _ in texts])
    stats, batch = train.train_step(run)
    assert stats["verifier/bound_depth"] == len(batch) == 8
    assert stats["verifier/bound_hits"] == 8 and stats["verifier/bound_time"] == stats["verifier/bound_size"] == 0


def test_a_sampling_copy_in_another_dtype_follows_the_policy_after_each_step(model_dir, tmp_path):
    run = train.setup(small_cfg(model_dir, tmp_path))  # fp32 weights, no autocast: sample from the policy itself
    assert run.sampling_weights is None
    run = train.setup(small_cfg(model_dir, tmp_path, "rollout.dtype=bfloat16", "algo.entropy_coef=0.1"))
    before = snapshot(run.model)
    assert all(p.dtype == torch.bfloat16 for p in run.sampling_weights.parameters())
    train.train_step(run)
    moved = [k for k, v in run.model.state_dict().items() if not torch.equal(v, before[k])]
    assert moved  # the entropy bonus moved the policy, and the copy holds its new values, rounded to bf16
    copy = run.sampling_weights.state_dict()
    assert all(torch.equal(copy[k], v.to(torch.bfloat16)) for k, v in run.model.state_dict().items())


def test_sampler_mismatch_statistics_by_hand():
    """Policy tokens only: d = old - sampler = (0, 0.5, 0) -> mean |d| 1/6, max 0.5,
    k3 = mean(exp(d) - 1 - d) = (e^0.5 - 1.5) / 3."""
    from rollout import Rollout
    b = Rollout(prompt_ids=torch.zeros(2, 1, dtype=torch.long), prompt_mask=torch.ones(2, 1, dtype=torch.long),
                response_ids=torch.zeros(2, 2, dtype=torch.long), response_mask=torch.tensor([[1.0, 1.0], [1.0, 0.0]]),
                truncated=torch.zeros(2, dtype=torch.bool), group=torch.zeros(2, dtype=torch.long), texts=["", ""],
                in_policy=torch.ones(2))
    b.old_logprobs = torch.tensor([[0.0, -1.0], [-2.0, 0.0]])
    b.sample_logprobs = torch.tensor([[0.0, -1.5], [-2.0, 9.0]])   # 9.0 sits on a padding position
    stats = sampler_mismatch(b)
    assert stats["sampler/logprob_abs_diff"] == pytest.approx(1 / 6)
    assert stats["sampler/logprob_max_diff"] == pytest.approx(0.5)
    assert stats["sampler/kl_k3"] == pytest.approx((math.exp(0.5) - 1.5) / 3)


def test_tis_cap_off_ignores_the_samplers_log_probs_and_on_uses_them(model_dir, tmp_path):
    """With tis_cap null the update is bit-identical whatever the sampler's log-probs say; with a cap,
    sampler log-probs off by one nat (weights e^1 capped at 2) change it."""
    states = {}
    for cap, shift in ((None, 0.0), (None, 1.0), (2.0, 1.0)):
        run, batch = prepared_batch(model_dir, tmp_path, "train.old_logprobs=recompute",
                                    *([f"algo.tis_cap={cap}"] if cap else []))
        batch.sample_logprobs = batch.old_logprobs - shift * batch.response_mask
        train.update(run, batch)
        states[(cap, shift)] = snapshot(run.model)
    assert same(states[(None, 0.0)], states[(None, 1.0)])
    assert not same(states[(None, 0.0)], states[(2.0, 1.0)])


def test_echo_normalizer_policy_divides_by_the_policy_loss_normalisers(model_dir, tmp_path):
    """clip_tokens: L_echo = -coef * sum(clip log-probs) / clip tokens. policy under token-mean (DAPO):
    the same sum over the mini-batch's policy tokens instead; the two differ by tokens / clip tokens."""
    out = {}
    for normalizer in ("clip_tokens", "policy"):
        run, batch = prepared_batch(model_dir, tmp_path, "algo.name=dapo", "algo.dynamic_sampling=false",
                                    "echo.coef=0.5", f"echo.normalizer={normalizer}", rewards=(1,) * 8)
        out[normalizer] = accumulate(run, batch)["loss_echo"]
        n_clip, n_tok = float(batch.clip_mask.sum()), float(batch.policy_mask.sum())
    assert out["clip_tokens"] > 0
    assert out["policy"] == pytest.approx(out["clip_tokens"] * n_clip / n_tok, rel=1e-5)


def test_the_probe_measures_echorls_gradient_share_and_the_peak_steps_sharpening(model_dir, tmp_path):
    """All groups correct: the policy loss has no gradient and EchoRL drives the whole update; a large echo
    coefficient lowers the entropy of the peak steps it trains on."""
    run = train.setup(small_cfg(model_dir, tmp_path, "log.probe_every=1", "echo.coef=1.0", "train.lr=1e-2",
                                "reward.truncated=score"),
                      reward_fn=lambda texts, golds: [1.0] * len(texts))
    stats, _ = train.train_step(run)
    assert stats["probe/grad_norm_policy"] == 0.0 and stats["probe/grad_norm_echo"] > 0
    assert stats["probe/echo_over_policy"] == float("inf")
    assert stats["probe/peak_entropy_change"] < 0 and stats["echo/clip_nll"] > 0


def test_a_mini_batch_with_nothing_to_learn_from_takes_no_optimizer_step(model_dir, tmp_path):
    """After a real step Adam holds momentum; a batch whose rows are all outside the policy loss (and
    clipless) must leave the weights as they are, not let the momentum move them."""
    run, batch = prepared_batch(model_dir, tmp_path, "echo.enabled=false")
    train.update(run, batch)
    before = snapshot(run.model)
    batch.in_policy = torch.zeros(len(batch))
    train.update(run, batch)
    assert all(torch.equal(before[k], v) for k, v in run.model.state_dict().items())
