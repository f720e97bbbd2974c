"""The loop's invariants (method.md section 5) on a small random Qwen2, plus config and resume."""
import copy
import json
from pathlib import Path

import pytest
import torch

import tiny
import train
from rollout import concat
from config import ConfigError, load_config

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_random")
    tok = tiny.build_tokenizer()
    tiny.build_model(tok, seed=0, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=64).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def small_cfg(model_dir, tmp_path, *extra):
    return load_config(None, [f"model.name_or_path={model_dir}", "data.train=tiny", "eval.benchmarks=[]",
                              "rollout.group_size=4", "rollout.prompts_per_step=2", "rollout.max_new_tokens=8",
                              "train.micro_batch_size=8", "train.steps=4", "train.save_every=2",
                              "log.log_rollouts_every=0", "reward.workers=1", f"train.out_dir={tmp_path}/run",
                              "train.lr=1e-2", *extra])


def prepared_batch(model_dir, tmp_path, *extra, rewards=(1, 0, 0, 1, 1, 1, 0, 1)):
    """One rollout batch with hand-set rewards (a random model solves nothing), old log-probs,
    entropies and EchoClips, as train_step prepares it."""
    cfg = small_cfg(model_dir, tmp_path, *extra)
    torch.manual_seed(0)
    model, tok = train.load_model(str(model_dir), cfg, "cpu")
    batch = train.collect(model, tok, train.train_stream(cfg), cfg, {}, {})
    r = torch.tensor(rewards, dtype=torch.float)
    batch.rewards, batch.correct = r, r > 0
    batch.advantages = train.ADVANTAGES[cfg.algo.advantage](r, batch.group)
    train.score_old_policy(model, None, batch, cfg, {})
    if cfg.echo.enabled:
        sids = train.step_ids(batch.response_ids, batch.response_mask, train.delimiter_table(tok), [0, 2])
        batch.clip_mask, _ = train.select_clips(batch.correct, batch.group, batch.response_mask, batch.entropies,
                                                sids, cfg.echo)
    return cfg, model, batch


def grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def test_first_update_sees_ratio_one_and_no_clipping(model_dir, tmp_path):
    cfg, model, batch = prepared_batch(model_dir, tmp_path, "train.micro_batch_size=3")
    model.train()
    for idx in train.micro_batches(len(batch), cfg.train.micro_batch_size):
        mb = batch.select(idx)
        logp, _ = train.response_logprobs(model, mb, temperature=1.0, chunk_size=cfg.train.logprob_chunk)
        assert torch.equal(torch.exp(logp - mb.old_logprobs), torch.ones_like(logp))
    st = train.accumulate_gradients(model, batch, cfg)
    assert st["clip_low"] == 0.0 and st["clip_high"] == 0.0


@pytest.mark.parametrize("method", ["grpo", "dapo", "drgrpo", "rloo", "reinforce_pp", "gspo"])
def test_gradient_does_not_depend_on_micro_batch_size(model_dir, tmp_path, method):
    """method.md pitfall 4: the same batch split 1, 2 or 4 ways gives the same gradient
    (policy loss + EchoRL loss; echo on with scope 'success' so mixed groups have clips too)."""
    cfg, model, batch = prepared_batch(model_dir, tmp_path, f"algo.name={method}", "echo.scope=success",
                                       "echo.coef=0.5", "algo.dynamic_sampling=false")
    batch.in_policy = torch.ones(len(batch))
    assert batch.clip_mask.sum() > 0
    ref = None
    for mbs in (8, 4, 2):
        c = copy.deepcopy(cfg)
        c.train.micro_batch_size = mbs
        model.zero_grad(set_to_none=True)
        train.accumulate_gradients(model, batch, c)
        g = grads(model)
        if ref is None:
            ref = g
            assert sum(float(v.abs().sum()) for v in g.values()) > 0
        else:
            for n in ref:
                assert torch.allclose(g[n], ref[n], atol=1e-7, rtol=1e-5), (mbs, n)


def test_all_success_batch_gives_zero_policy_gradient_and_nonzero_echo_gradient(model_dir, tmp_path):
    """method.md pitfall 5: zero-std groups contribute exactly nothing to the policy gradient."""
    ones = (1,) * 8
    cfg, model, batch = prepared_batch(model_dir, tmp_path, "echo.enabled=false", rewards=ones)
    batch.in_policy = torch.ones(len(batch))
    assert (batch.advantages == 0).all()
    model.zero_grad(set_to_none=True)
    train.accumulate_gradients(model, batch, cfg)
    assert all((g == 0).all() for g in grads(model).values())

    cfg, model, batch = prepared_batch(model_dir, tmp_path, "echo.enabled=true", rewards=ones)
    batch.in_policy = torch.ones(len(batch))
    assert batch.clip_mask.sum() > 0
    model.zero_grad(set_to_none=True)
    train.accumulate_gradients(model, batch, cfg)
    assert sum(float(g.abs().sum()) for g in grads(model).values()) > 0


def test_echo_disabled_update_is_bit_identical_to_echo_with_zero_coef(model_dir, tmp_path):
    states = []
    for flags in (["echo.enabled=false"], ["echo.enabled=true", "echo.coef=0.0"]):
        cfg, model, batch = prepared_batch(model_dir, tmp_path, *flags)
        batch.in_policy = torch.ones(len(batch))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        train.update(model, opt, train.make_scheduler(opt, cfg), batch, cfg, {})
        states.append({k: v.clone() for k, v in model.state_dict().items()})
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


def test_config_errors_name_the_key_and_the_allowed_values(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'echo.coeff'.*'coef'"):
        load_config(None, ["echo.coeff=0.1"])
    with pytest.raises(ConfigError, match=r"'algo.name': 'ppo' is not allowed.*'grpo'.*'gspo'"):
        load_config(None, ["algo.name=ppo"])
    with pytest.raises(ConfigError, match=r"'echo.select': 'middle' is not allowed.*'peak'"):
        load_config(None, ["echo.select=middle"])
    with pytest.raises(ConfigError, match=r"'train.steps': expected an integer"):
        load_config(None, ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"'rollout.group_size' must be >= 2"):
        load_config(None, ["rollout.group_size=1"])
    with pytest.raises(ConfigError, match="expects key=value"):
        load_config(None, ["echo.coef"])
    with pytest.raises(FileNotFoundError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trian:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'"):
        load_config(bad)


def test_set_values_are_parsed_as_yaml_and_floats_accept_exponents_without_a_dot():
    c = load_config(None, ["train.lr=5e-4", "eval.benchmarks=[tiny, gsm8k]", "echo.clips_per_group=1",
                           "algo.dual_clip=null"])
    assert c.train.lr == 5e-4 and c.eval.benchmarks == ["tiny", "gsm8k"]
    assert c.echo.clips_per_group == "1" and c.algo.dual_clip is None


def test_presets_fill_unset_keys_and_explicit_keys_win():
    c = load_config(None, ["algo.name=dapo"])
    assert (c.algo.eps_low, c.algo.eps_high, c.algo.aggregation, c.algo.dynamic_sampling) == (0.2, 0.28, "token-mean", True)
    c = load_config(None, ["algo.name=dapo", "algo.eps_high=0.3"])
    assert c.algo.eps_high == 0.3


def test_missing_train_file_and_malformed_row_are_clear_errors(model_dir, tmp_path):
    cfg = small_cfg(model_dir, tmp_path, f"data.train={tmp_path}/missing.jsonl")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        train.train_stream(cfg)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "2+2?"\n')
    cfg = small_cfg(model_dir, tmp_path, f"data.train={bad}")
    with pytest.raises(ValueError, match=r"bad.jsonl.*2"):
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


def test_dapo_dynamic_sampling_drops_zero_std_groups_refills_and_keeps_success_groups_for_echo(
        model_dir, tmp_path, monkeypatch):
    """Round 1 (2 prompts): [1, 1] all-success -> dropped from the policy but kept for EchoRL,
    [1, 0] mixed -> kept. Round 2 asks for the 1 missing prompt: [1, 0] -> kept. The batch is the
    2 policy groups followed by the echo-only group (in_policy = 0)."""
    cfg = small_cfg(model_dir, tmp_path, "algo.name=dapo", "rollout.prompts_per_step=2", "rollout.group_size=2",
                    "echo.enabled=true", "echo.keep_dropped_groups=true", "algo.overlong_buffer=0",
                    "reward.truncated=score")  # a random model never stops: score truncated rows too
    rounds = iter([[1, 1, 1, 0], [1, 0]])

    def scripted(texts, golds, **kw):
        return [float(x) for x in next(rounds)]

    monkeypatch.setattr(train.reward, "score_batch", scripted)
    torch.manual_seed(0)
    model, tok = train.load_model(str(model_dir), cfg, "cpu")
    stats = {}
    batch = train.collect(model, tok, train.train_stream(cfg), cfg, {}, stats)
    assert stats["sampling_rounds"] == 2.0 and stats["frac_degenerate"] == 0.5
    assert batch.in_policy.tolist() == [1, 1, 1, 1, 0, 0]
    assert batch.correct.tolist() == [True, False, True, False, True, True]
    assert batch.group.tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("method", ["grpo", "dapo", "drgrpo", "rloo", "reinforce_pp", "gspo"])
def test_every_method_runs_a_training_step_with_echorl(model_dir, tmp_path, method):
    cfg = small_cfg(model_dir, tmp_path, f"algo.name={method}", "echo.enabled=true", "train.steps=1")
    hist = train.train(cfg)
    assert len(hist) == 1 and all(v == v for k, v in hist[0].items() if isinstance(v, float))  # no NaN
    assert "echo/n_clips" in hist[0] and "time/echo_select" in hist[0]


def test_dapo_step_with_only_degenerate_groups_trains_on_nothing_without_crashing(model_dir, tmp_path, monkeypatch):
    """Every round all-fail: nothing survives dynamic sampling; the step still runs and changes nothing."""
    cfg = small_cfg(model_dir, tmp_path, "algo.name=dapo", "echo.enabled=false", "algo.max_sampling_rounds=1",
                    "algo.overlong_buffer=0")  # no length shaping: all-fail groups are truly constant
    monkeypatch.setattr(train.reward, "score_batch", lambda texts, golds, **kw: [0.0] * len(texts))
    torch.manual_seed(0)
    model, tok = train.load_model(str(model_dir), cfg, "cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    stats, batch = train.train_step(model, None, opt, train.make_scheduler(opt, cfg), tok, train.train_stream(cfg),
                                    cfg, train.delimiter_table(tok), [0, 2], torch.Generator().manual_seed(0))
    assert len(batch) == 8 and batch.in_policy.sum() == 0 and stats["sampling_rounds"] == 2.0
    assert stats["frac_degenerate"] == 1.0 and stats["grad_norm"] == 0.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_old_logprobs_match_the_update_forward_exactly_with_several_mini_batches(model_dir, tmp_path):
    cfg, model, batch = prepared_batch(model_dir, tmp_path, "train.mini_batches=3", "train.micro_batch_size=2")
    model.train()
    for mini in train.update_slices(batch.in_policy, cfg):
        for idx in mini:
            mb = batch.select(idx)
            logp, _ = train.response_logprobs(model, mb, temperature=1.0, chunk_size=cfg.train.logprob_chunk)
            assert torch.equal(logp, mb.old_logprobs)


def test_mini_batches_split_policy_rows_and_echo_only_rows_separately(tmp_path):
    def rows(minis):
        return [(p.tolist(), e.tolist()) for p, e in minis]
    in_policy = torch.tensor([1.0] * 8 + [0.0] * 4)
    assert rows(train.mini_batch_rows(in_policy, 2)) == [([0, 1, 2, 3], [8, 9]), ([4, 5, 6, 7], [10, 11])]
    assert rows(train.mini_batch_rows(torch.ones(6), 3)) == [([0, 1], []), ([2, 3], []), ([4, 5], [])]
    assert rows(train.mini_batch_rows(torch.zeros(4), 2)) == [([], [0, 1]), ([], [2, 3])]
    # 4 policy rows in 3 mini-batches: chunk gives 2 pieces; the echo-only rows follow them, no third step
    assert rows(train.mini_batch_rows(torch.tensor([1.0] * 4 + [0.0] * 6), 3)) == \
        [([0, 1], [4, 5, 6]), ([2, 3], [7, 8, 9])]
    # micro-batches of 3: policy rows and echo-only rows never share one; `keep` drops echo-only
    # rows without a clip from the update (row 10 is the only one with a clip)
    cfg = load_config(None, ["train.mini_batches=2", "train.micro_batch_size=3"])
    keep = torch.tensor([True] * 8 + [False, False, True, False])
    assert [[i.tolist() for i in mini] for mini in train.update_slices(in_policy, cfg)] == \
        [[[0, 1, 2], [3], [8, 9]], [[4, 5, 6], [7], [10, 11]]]
    assert [[i.tolist() for i in mini] for mini in train.update_slices(in_policy, cfg, keep)] == \
        [[[0, 1, 2], [3]], [[4, 5, 6], [7], [10]]]


def test_echo_only_rows_at_zero_coef_leave_the_update_unchanged(model_dir, tmp_path):
    """DAPO + EchoRL appends dropped all-success groups (in_policy = 0). With coef 0 they must not
    change the policy update: each mini-batch keeps the policy rows it has without them."""
    states = []
    for extra in (False, True):
        cfg, model, batch = prepared_batch(model_dir, tmp_path, "echo.enabled=true", "echo.coef=0.0",
                                           "train.mini_batches=2")
        batch.in_policy = torch.ones(len(batch))
        if extra:  # 4 echo-only copies of rows 4..7 (group 1: all correct), appended as collect does
            echo = batch.select(torch.arange(4, 8))
            echo.in_policy = torch.zeros(4)
            batch = concat([batch, echo], 0)
            batch.group = torch.arange(len(batch) // 4).repeat_interleave(4)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        train.update(model, opt, train.make_scheduler(opt, cfg), batch, cfg, {})
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(torch.allclose(states[0][k], states[1][k], atol=1e-6) for k in states[0])
