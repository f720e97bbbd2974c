"""EchoRL's probes: the stakes of the peak step on a policy whose answer probabilities are known in closed
form, EchoRL's gradient on DAPO's echo-only rows, and the echo-only / policy-only optimizer steps, which
leave the real update bit-identical."""
import math
from types import SimpleNamespace

import pytest
import torch

import echorl
import tiny
import train
from config import load_config
from rollout import Rollout, eos_ids
from sampler import Sampler

from conftest import scripted, small_cfg, with_echo_only_groups

TOK = tiny.build_tokenizer()
ID = {t: TOK.convert_tokens_to_ids(t) for t in ("Answer", ":", " The", " 7", " 5", " apples")}
EOS = TOK.eos_token_id


class _OneHot(torch.nn.Module):
    def __init__(self, V):
        super().__init__()
        self.V = V

    def forward(self, input_ids, **_):
        return SimpleNamespace(last_hidden_state=torch.nn.functional.one_hot(input_ids, self.V).float())


class MarkovLM(torch.nn.Module):
    """A policy whose next token depends on the current token alone, with the interface the slot sampler
    drives (`model.model(...)`, an output embedding): the hidden state is the one-hot current token and the
    LM head holds the transition log-probabilities, so logits[j] = log T[current, j]."""

    def __init__(self, T: torch.Tensor):
        super().__init__()
        V = T.shape[0]
        self.config = SimpleNamespace(_attn_implementation="eager", num_hidden_layers=1, num_key_value_heads=1,
                                      num_attention_heads=1, hidden_size=V, head_dim=1)
        self.model = _OneHot(V)
        self.head = torch.nn.Linear(V, V, bias=False)
        with torch.no_grad():  # impossible transitions: -1e4, which softmax turns into exactly 0
            self.head.weight.copy_(T.clamp_min(1e-30).log().clamp_min(-1e4).T)

    def get_output_embeddings(self):
        return self.head


def markov(p_seven: float) -> MarkovLM:
    """'Answer:' -> ' The' -> ' 7' (p_seven) or ' 5' -> ' apples' -> EOS; every other token -> EOS."""
    V = len(TOK)
    T = torch.zeros(V, V)
    T[:, EOS] = 1.0
    for a, b in ((":", " The"), (" 7", " apples"), (" 5", " apples")):
        T[ID[a]] = 0.0
        T[ID[a], ID[b]] = 1.0
    T[ID[" The"]] = 0.0
    T[ID[" The"], ID[" 7"]], T[ID[" The"], ID[" 5"]] = p_seven, 1.0 - p_seven
    return MarkovLM(T)


def verifier(texts, golds):
    """Correct when the response names the gold number (plain substring test: model text is never evaluated)."""
    return [float(g in t.split()) for t, g in zip(texts, golds)]


def fake_run(p_seven, *extra):
    cfg = load_config(None, ["model.name_or_path=tiny", "data.train=tiny", "rollout.max_new_tokens=4",
                             "rollout.temperature=1.0", "reward.truncated=zero", *extra])
    model = markov(p_seven)
    return SimpleNamespace(cfg=cfg, tok=TOK, sampler=Sampler(model, TOK, slots=0, compile=False),
                           eos=eos_ids(TOK), reward_fn=verifier, step=0, model=model)


def one_row_batch(n_rows=1):
    """The correct response ' The 7 apples<eos>' to 'Answer:' (gold 7), steps [' The'], [' 7'],
    [' apples', EOS]; step entropies 0.1, 2.0, 0.5: the peak is step 1, the lowest step 0; EchoClip = steps 0-1."""
    B = n_rows
    resp = torch.tensor([[ID[" The"], ID[" 7"], ID[" apples"], EOS]] * B)
    b = Rollout(prompt_ids=torch.tensor([[ID["Answer"], ID[":"]]] * B), prompt_mask=torch.ones(B, 2, dtype=torch.long),
                response_ids=resp, response_mask=torch.ones(B, 4), truncated=torch.zeros(B, dtype=torch.bool),
                group=torch.arange(B), texts=[" The 7 apples"] * B, correct=torch.ones(B, dtype=torch.bool),
                entropies=torch.tensor([[0.1, 2.0, 0.5, 0.5]] * B), clip_mask=torch.tensor([[1.0, 1, 0, 0]] * B),
                extras={"golds": ["7"] * B, "row_keys": [f"p{i}/0" for i in range(B)],
                        "step_ids": torch.tensor([[0, 1, 2, 2]] * B)})
    return b


# ----------------------------------------------------------------------------------------
# Stakes: P(correct | through step k) - P(correct | before step k)


def test_stakes_of_each_step_match_the_closed_form_within_four_binomial_sds():
    """P(' 7' after ' The') = 0.3, then always right. Before step 0 (prompt only) and through it (' The'):
    0.3, stakes 0. Step 1 (' 7'): before 0.3, through 1 -> stakes 0.7. Step 2 (' apples' EOS): before 1,
    through = the finished response, 1 -> stakes 0. K = 4000: one estimate of 0.3 has SD sqrt(0.21 / 4000)
    = 0.0072; a difference of two such estimates sqrt(2) x that."""
    run, batch, K = fake_run(0.3), one_row_batch(), 4000
    sd = math.sqrt(0.3 * 0.7 / K)
    before, through = echorl.stakes(lambda p, k: echorl.continue_and_verify(run, batch, p, k), batch.response_ids,
                                    batch.extras["step_ids"], torch.tensor([[0, 1, 2]]), K)
    assert before[0].tolist() == pytest.approx([0.3, 0.3, 1.0], abs=4 * sd)
    assert through[0].tolist() == pytest.approx([0.3, 1.0, 1.0], abs=4 * sd)
    assert through[0, 1] == 1.0 and before[0, 2] == 1.0 and through[0, 2] == 1.0     # no randomness left there
    assert (through - before)[0].tolist() == pytest.approx([0.0, 0.7, 0.0], abs=4 * math.sqrt(2) * sd)
    assert before[0, 1] == through[0, 0]                     # the prefix ' The' is the same prefix twice


@pytest.mark.parametrize("p_seven, p_before, expected", [(0.0, 0.0, 1.0), (1.0, 1.0, 0.0)])
def test_a_deterministic_policy_gives_exact_stakes(p_seven, p_before, expected):
    """A policy that always says ' 5' after ' The' never finds the answer before step 1 and always keeps it
    after: stakes exactly 1. One that always says ' 7': 0."""
    run, batch = fake_run(p_seven), one_row_batch()
    before, through = echorl.stakes(lambda p, k: echorl.continue_and_verify(run, batch, p, k), batch.response_ids,
                                    batch.extras["step_ids"], torch.tensor([1]), 16)
    assert before.tolist() == [p_before] and through.tolist() == [1.0]
    assert (through - before).tolist() == [expected]


@pytest.mark.parametrize("truncated, p_through", [("zero", 0.0), ("score", 1.0)])
def test_continuations_get_the_rest_of_the_response_budget_and_the_truncation_rule(truncated, p_through):
    """max_new_tokens 3: through step 1 (' The 7', 2 tokens) one token is left, ' apples', and no room for the
    EOS: the response is cut, wrong under reward.truncated zero, verified under score."""
    run, batch = fake_run(1.0, "rollout.max_new_tokens=3", f"reward.truncated={truncated}"), one_row_batch()
    _, through = echorl.stakes(lambda p, k: echorl.continue_and_verify(run, batch, p, k), batch.response_ids,
                               batch.extras["step_ids"], torch.tensor([1]), 4)
    assert through.tolist() == [p_through]


def test_probe_stakes_logs_peak_random_and_lowest_step_stakes_reproducibly():
    """Peak = step 1 (stakes 0.7), lowest = step 0 (stakes 0); the random step of a row is floor(3 u), u the
    hash uniform of (seed, step, row key + '/stakes'), stakes 0.7 at step 1 and 0 elsewhere. Two rows (two
    keys); at most `clips` of them are measured, a fixed choice."""
    run, batch, K = fake_run(0.3), one_row_batch(2), 4000
    sd = math.sqrt(0.3 * 0.7 / K)
    st = echorl.probe_stakes(run, batch, samples=K)
    assert st["probe/stakes_clips"] == 2
    assert st["probe/peak_stakes"] == pytest.approx(0.7, abs=4 * sd)
    assert st["probe/peak_p_before"] == pytest.approx(0.3, abs=4 * sd) and st["probe/peak_p_through"] == 1.0
    assert st["probe/lowest_stakes"] == pytest.approx(0.0, abs=4 * math.sqrt(2) * sd)
    u = echorl.row_uniforms(run.cfg.train.seed, 0, ["p0/0/stakes", "p1/0/stakes"])
    want = sum(0.7 if int(3 * x) == 1 else 0.0 for x in u.tolist()) / 2
    assert st["probe/random_stakes"] == pytest.approx(want, abs=4 * math.sqrt(2) * sd)
    again = echorl.probe_stakes(run, batch, samples=K)
    assert {k: v for k, v in again.items() if not k.startswith("time/")} == \
        {k: v for k, v in st.items() if not k.startswith("time/")}
    one = echorl.probe_stakes(run, batch, samples=8, clips=1)
    assert one["probe/stakes_clips"] == 1 and one == {**echorl.probe_stakes(run, batch, samples=8, clips=1),
                                                       "time/probe_stakes": one["time/probe_stakes"]}
    assert echorl.probe_stakes(run, batch, samples=0) == {}


def test_per_prompt_bounds_and_token_id_prompts_draw_the_same_tokens_as_one_bound():
    """A row's tokens do not depend on its bound, which only ends it earlier (truncated when it ends there)."""
    tok, model = TOK, tiny.build_model(TOK, seed=1, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=64).eval()
    s = Sampler(model, tok, slots=3, compile=False)
    prompts = ["Question: 3 + 4\nAnswer:", "Question: 1\nAnswer:"]
    full = s.generate(prompts, group_size=2, max_new_tokens=6, temperature=1.0, seed=5)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    cut = s.generate(ids, group_size=2, max_new_tokens=[2, 6], temperature=1.0, seed=5)
    for r in range(4):
        n = int(cut.response_mask[r].sum())
        assert torch.equal(cut.response_ids[r, :n], full.response_ids[r, :n])
        assert n == (min(2, int(full.response_mask[r].sum())) if r < 2 else int(full.response_mask[r].sum()))
    assert cut.truncated[:2].tolist() == [not bool((full.response_ids[r, :2] == EOS).any()) for r in range(2)]


# ----------------------------------------------------------------------------------------
# The gradient probe on DAPO's echo-only rows


def test_echo_gradient_probe_sums_the_echo_only_rows_of_dapo(model_dir, tmp_path):
    """DAPO: both policy groups mixed (no clip there); two all-correct groups dropped by dynamic sampling
    and kept as echo-only rows hold every clip. The probe's echo gradient norm is > 0 and equals the norm
    of autograd's gradient of -coef * mean log p(clip tokens) over those rows, taken directly."""
    cfg = small_cfg(model_dir, tmp_path, "algo.name=dapo", "echo.coef=0.5", "reward.truncated=score",
                    "train.micro_batch_size=4", "train.old_logprobs=recompute", "algo.overlong_buffer=0")
    run = train.setup(cfg, reward_fn=scripted((1, 0, 1, 0, 0, 1, 1, 0), (1,) * 8))
    batch, _ = train.collect(run)
    batch = with_echo_only_groups(run, batch, 2)
    train.compute_advantages(run, batch)
    train.old_policy(run, batch)
    echorl.echo_clips(run, batch)
    clip_rows = (batch.clip_mask.sum(-1) > 0)
    assert clip_rows.any() and not (clip_rows & (batch.in_policy > 0)).any()     # clips on echo-only rows only
    first = train.slices_of(run, batch, echorl.rows_to_update(batch))[0]
    st = echorl.probe_gradients(run, batch, first, train.forward, train.rl_loss)
    assert st["probe/grad_norm_echo"] > 0 and st["probe/grad_norm_policy"] > 0

    rows = torch.nonzero(clip_rows).squeeze(-1)
    mb = batch.select(rows)
    run.model.train()
    logp, _ = train.forward(run, run.model, mb)
    loss = -0.5 * (logp * mb.clip_mask).sum() / mb.clip_mask.sum()
    params = [p for p in run.model.parameters() if p.requires_grad]
    g = torch.autograd.grad(loss, params, allow_unused=True)
    by_hand = math.sqrt(sum(float((x ** 2).sum()) for x in g if x is not None))
    assert st["probe/grad_norm_echo"] == pytest.approx(by_hand, rel=1e-5)


# ----------------------------------------------------------------------------------------
# Echo-only and policy-only steps: EchoRL's own effect, on copies


def first_then_by_text(rewards):
    """The given rewards on the first call (a step's batch), then a reward read off the text."""
    calls = []

    def fn(texts, golds):
        calls.append(len(texts))
        return [float(x) for x in rewards] if len(calls) == 1 else [float(len(t) % 2) for t in texts]
    return fn


def test_the_real_update_is_bit_identical_with_probes_on_or_off(model_dir, tmp_path):
    """Gradient, echo-only / policy-only and stakes probes on a batch with an all-correct group (clips) and a
    mixed one (policy gradient): two steps' weights, Adam states and global RNG state equal those with
    probes off."""
    out = {}
    for every in (1, 0):
        cfg = small_cfg(model_dir, tmp_path / str(every), f"log.probe_every={every}", "log.stakes_samples=4",
                        "echo.coef=0.5", "reward.truncated=score")
        run = train.setup(cfg, reward_fn=first_then_by_text((1, 1, 1, 1, 1, 0, 0, 1)))
        stats = [train.train_step(run)[0] for _ in range(2)]
        out[every] = (run, stats, torch.get_rng_state())
    (on, st_on, rng_on), (off, st_off, rng_off) = out[1], out[0]
    assert "probe/peak_entropy_change_echo" in st_on[0] and "probe/peak_stakes" in st_on[0]
    assert "probe/grad_norm_echo" not in st_off[0]
    assert all(torch.equal(a, b) for a, b in zip(on.model.state_dict().values(), off.model.state_dict().values()))
    for a, b in zip(on.opt.state.values(), off.opt.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(rng_on, rng_off)
    assert st_on[0]["loss_pg"] == st_off[0]["loss_pg"] and st_on[1]["reward"] == st_off[1]["reward"]


def test_on_an_all_correct_batch_the_echo_only_step_is_the_whole_update(model_dir, tmp_path):
    """Every group correct: no policy token, so the update's one optimizer step is the echo step; the
    echo-only step taken on a copy moves the peak steps' entropy as the update does (to float rounding:
    the update's baseline is the sampler's entropies), and the policy-only step is not taken (0)."""
    run = train.setup(small_cfg(model_dir, tmp_path, "log.probe_every=1", "log.stakes_samples=0", "echo.coef=1.0",
                                "reward.truncated=score"), reward_fn=lambda texts, golds: [1.0] * len(texts))
    stats, _ = train.train_step(run)
    assert stats["probe/peak_entropy_change"] < 0
    assert stats["probe/peak_entropy_change_echo"] == pytest.approx(stats["probe/peak_entropy_change"], abs=1e-5)
    assert stats["probe/peak_entropy_change_policy"] == 0.0
    assert "probe/peak_stakes" not in stats


def test_with_a_zero_echo_coefficient_the_policy_only_step_is_the_whole_update(model_dir, tmp_path):
    """echo.coef 0: L_echo has no gradient, so the update's step is the policy-only step (the same change of
    the peak steps' entropy) and the echo-only step, a zero gradient on fresh Adam moments without weight
    decay, moves nothing (exactly 0)."""
    run = train.setup(small_cfg(model_dir, tmp_path, "log.probe_every=1", "log.stakes_samples=0", "echo.coef=0.0",
                                "reward.truncated=score"), reward_fn=scripted((1, 1, 1, 1, 1, 0, 0, 1)))
    stats, _ = train.train_step(run)
    assert stats["probe/grad_norm_policy"] > 0 and stats["probe/peak_entropy_change"] != 0
    assert stats["probe/peak_entropy_change_policy"] == pytest.approx(stats["probe/peak_entropy_change"], abs=1e-5)
    assert stats["probe/peak_entropy_change_echo"] == 0.0


def test_the_stakes_probe_needs_the_slot_sampler():
    from config import ConfigError
    base = ["model.name_or_path=tiny", "data.train=tiny", "rollout.engine=hf", "log.probe_every=4"]
    with pytest.raises(ConfigError, match="log.stakes_samples"):
        load_config(None, base)
    assert load_config(None, base + ["log.stakes_samples=0"]).log.stakes_samples == 0
