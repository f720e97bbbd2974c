"""The sampler: per-row random streams, slots and refill, agreement with HF generate and with the
teacher-forced forward, the sampling copy."""
import json
import math
import random
from pathlib import Path

import pytest
import torch

import tiny
from config import ConfigError
from entropy import response_logprobs
from rollout import eos_ids, render_prompts
from hf_generate import generate_hf
from sampler import (M32, Sampler, _mul32, generate, refresh_sampling_copy, row_keys, sample_tokens,
                     sampling_copy, uniforms)

QWEN_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "qwen2.5-math-1.5b"


EOS = 0


def test_generate_groups_rows_and_masks(tok_model):
    tok, model = tok_model
    torch.manual_seed(0)
    prompts = render_prompts(["Ann has 3 pens.", "Ben has 12 coins. Ben loses 2. How many coins does Ben have now?"], tok)
    r = generate(model, tok, prompts, group_size=3, max_new_tokens=6, temperature=1.0)
    assert len(r) == 6 and r.group.tolist() == [0, 0, 0, 1, 1, 1]
    assert r.response_ids.shape == r.response_mask.shape and r.response_ids.shape[1] <= 6
    # left padding: the shorter prompt starts with padding, the longer one has none
    assert r.prompt_mask[0, 0] == 0 and r.prompt_mask[3].all()
    # each mask is a prefix of ones ending at the first EOS; truncated rows hold no EOS at all
    eos = eos_ids(tok, model)
    for i in range(len(r)):
        n = int(r.response_mask[i].sum())
        assert r.response_mask[i, :n].all() and not r.response_mask[i, n:].any()
        ids = r.response_ids[i, :n].tolist()
        if r.truncated[i]:
            assert n == 6 and not set(ids) & set(eos)
        else:
            assert ids[-1] in eos and not set(ids[:-1]) & set(eos)


@pytest.mark.parametrize("engine", ["slots", "hf"])
def test_training_forward_reproduces_generation_logprobs_on_left_padded_batch(tok_model, engine):
    """README pitfall 2: same weights, fp32 -> recomputed log-probs and entropies equal the
    sampling-time ones (atol 1e-5: fp32 rounding of differently shaped matmuls, ~1e-6 seen)."""
    tok, model = tok_model
    torch.manual_seed(3)
    qs = ["Ann has 3 pens.", "Ben has 12 coins. Ben loses 2. Ben finds 5 more. How many coins does Ben have now?",
          "Mia has 7 cards. Mia doubles them."]
    prompts = render_prompts(qs, tok)
    for temperature in (1.0, 0.7):
        r = generate(model, tok, prompts, group_size=2, max_new_tokens=10, temperature=temperature,
                     batch_size=4, engine=engine, return_logprobs=True)
        assert r.prompt_mask[0].sum() < r.prompt_mask.shape[1]  # the batch really is left-padded
        with torch.no_grad():
            lp, ent = response_logprobs(model, r, temperature=temperature, chunk_size=7, with_entropy=True)
        assert torch.allclose(lp, r.sample_logprobs, atol=1e-5), (lp - r.sample_logprobs).abs().max()
        assert torch.allclose(ent, r.sample_entropies, atol=1e-5), (ent - r.sample_entropies).abs().max()
        assert (lp[r.response_mask == 0] == 0).all() and (r.sample_logprobs[r.response_mask == 0] == 0).all()


QUESTIONS = ["Ann has 3 pens.",
             "Ben has 12 coins. Ben loses 2. Ben finds 5 more. Ben doubles them. Ben sells 4. Ben gets 1 more. "
             "Ben drops 3. How many coins does Ben have now?",
             "Mia has 7 cards. Mia doubles them.",
             "Leo has 9 books. Leo wins 2 more. How many books does Leo have now?",
             "Kim has 1 shells."]


def force_lengths(lengths: list[int], eos: int):
    """A sampler hook that makes row b end with EOS at exactly lengths[b] tokens (EOS is banned
    before). Idle slots carry row B (one past the last row), hence the padded table."""
    table = torch.tensor(list(lengths) + [1])

    def hook(logits, row, t):                                    # [S, V], [S], [S]
        stop = (t + 1 == table.to(row.device)[row])[:, None]     # [S, 1]
        is_eos = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        is_eos[eos] = True
        return logits.masked_fill((stop & ~is_eos) | (~stop & is_eos), float("-inf"))
    return hook


def test_mul32_is_the_exact_product_modulo_2_to_32():
    xs = [0, 1, 2 ** 16 - 1, 2 ** 16, 2 ** 31, M32 - 1, M32] + [random.Random(0).getrandbits(32) for _ in range(50)]
    for c in (0x7FEB352D, 0x846CA68B, M32):
        got = _mul32(torch.tensor(xs), c).tolist()
        assert got == [(x * c) % 2 ** 32 for x in xs]


def test_uniforms_are_a_pure_function_of_key_and_position_and_look_uniform():
    keys = row_keys(7, torch.arange(20000))                      # [20000]
    assert keys.min() >= 0 and keys.max() <= M32 and keys.unique().numel() == 20000
    t = torch.arange(20000) % 37
    u = uniforms(keys, t)
    assert (u > 0).all() and (u < 1).all()
    # the same (key, position) pairs in another order and batch give the same numbers
    perm = torch.randperm(20000)[:500]
    assert torch.equal(uniforms(keys[perm], t[perm]), u[perm])
    # 10 equal bins: each within 5 standard deviations (sd = sqrt(2000 * 0.9) ~ 42) of 2000
    counts = torch.histc(u, bins=10, min=0, max=1)
    assert (counts - 2000).abs().max() < 5 * 42, counts
    # another seed gives another stream; any int64 row seed is accepted
    assert not torch.equal(uniforms(row_keys(8, torch.arange(20000)), t), u)
    big = row_keys(-3, torch.tensor([-(2 ** 63), -1, 2 ** 63 - 1, 2 ** 40]))
    assert big.min() >= 0 and big.max() <= M32 and big.unique().numel() == 4


def test_inverse_cdf_and_nucleus_pick_the_hand_computed_tokens():
    logits = torch.tensor([0.5, 0.3, 0.2]).log().expand(4, 3)            # probs 0.5, 0.3, 0.2
    u = torch.tensor([0.1, 0.6, 0.7, 0.99])
    # full distribution: cdf 0.5, 0.8, 1.0
    tok, lp, ent = sample_tokens(logits, u, 1.0)
    assert tok.tolist() == [0, 1, 1, 2]
    assert torch.allclose(lp, torch.tensor([0.5, 0.3, 0.3, 0.2]).log())
    assert torch.allclose(ent, torch.full((4,), -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))))
    # top_p 0.6 keeps {0, 1} (mass 0.8): renormalised cdf 0.625, 1.0
    tok, lp, _ = sample_tokens(logits, u, 1.0, top_p=0.6)
    assert tok.tolist() == [0, 0, 1, 1]
    assert torch.allclose(lp, torch.tensor([0.5, 0.5, 0.3, 0.3]).log())  # log-probs of the unfiltered distribution
    # top_p -> 0 is greedy; temperature 0 is greedy
    assert sample_tokens(logits, u, 1.0, top_p=1e-9)[0].tolist() == [0] * 4
    assert sample_tokens(logits, u, 0.0)[0].tolist() == [0] * 4


@pytest.fixture(scope="module")
def qwen_tok_model():
    if not QWEN_DIR.is_dir():
        pytest.skip(f"no {QWEN_DIR}")
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    tok = AutoTokenizer.from_pretrained(QWEN_DIR)
    cfg = json.loads((QWEN_DIR / "config.json").read_text())
    cfg.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=128, max_window_layers=2, torch_dtype="float32")
    torch.manual_seed(0)
    return tok, Qwen2ForCausalLM(Qwen2Config(**cfg)).eval()


@pytest.fixture(scope="module")
def eager_tok_model():
    tok = tiny.build_tokenizer()
    model = tiny.build_model(tok, seed=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=64).eval()
    model.set_attn_implementation("eager")  # additive float masks instead of sdpa's boolean ones
    return tok, model


@pytest.mark.parametrize("which", ["tiny", "tiny-eager", "qwen"])
def test_greedy_sampler_gives_hf_generate_tokens_for_every_slot_count(which, request):
    fixture = {"tiny": "tok_model", "tiny-eager": "eager_tok_model", "qwen": "qwen_tok_model"}[which]
    tok, model = request.getfixturevalue(fixture)
    prompts = render_prompts(QUESTIONS, tok, "plain" if which == "qwen" else "chat")
    N = 12 if which == "qwen" else 24  # Qwen's 151,936-token vocabulary makes each step slower
    ref = generate_hf(model, tok, prompts, group_size=1, max_new_tokens=N, temperature=0)
    ref_ids = [ids[m.bool()].tolist() for ids, m in zip(ref.response_ids, ref.response_mask)]
    for slots in (1, 3, 8, 0):  # 10 rows: refill at 1, 3 and 8 slots; 0 = all rows at once
        r = Sampler(model, tok, slots=slots).generate(prompts, group_size=2, max_new_tokens=N, temperature=0)
        got = [ids[m.bool()].tolist() for ids, m in zip(r.response_ids, r.response_mask)]
        assert got == [x for x in ref_ids for _ in range(2)], slots
        assert r.truncated.tolist() == [x for x in ref.truncated.tolist() for _ in range(2)]
        assert r.texts[::2] == ref.texts


def test_sampled_rows_do_not_depend_on_slot_count_or_batch_order(tok_model):
    """Row streams are keyed on (seed, row seed, position), so with row seeds tied to the prompt
    the same tokens come out whatever the slots and order. (A token could flip only if fp32
    noise between batch shapes, ~1e-7 on the cdf, straddled its uniform: not seen.)"""
    tok, model = tok_model
    prompts = render_prompts(QUESTIONS, tok)
    G = 3

    def by_prompt(order, slots):
        ps = [prompts[i] for i in order]
        seeds = [1000 * i + g for i in order for g in range(G)]
        r = Sampler(model, tok, slots=slots).generate(ps, group_size=G, max_new_tokens=16, temperature=1.0,
                                                      seed=5, row_seeds=seeds)
        rows = [ids[m.bool()].tolist() for ids, m in zip(r.response_ids, r.response_mask)]
        return {(i, g): rows[j * G + g] for j, i in enumerate(order) for g in range(G)}

    base = by_prompt(list(range(5)), 0)
    assert len({tuple(v) for v in base.values()}) > 10  # really sampled: rows differ
    for slots in (1, 3, 8):
        assert by_prompt(list(range(5)), slots) == base, slots
    shuffled = [3, 0, 4, 2, 1]
    for slots in (1, 3, 8, 0):
        assert by_prompt(shuffled, slots) == base, slots
    # without explicit row seeds the stream follows the row index: another seed, other tokens
    r1 = Sampler(model, tok).generate(prompts, group_size=G, max_new_tokens=16, temperature=1.0, seed=5)
    r2 = Sampler(model, tok).generate(prompts, group_size=G, max_new_tokens=16, temperature=1.0, seed=6)
    assert not torch.equal(r1.response_ids[:, :4], r2.response_ids[:, :4])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_and_entropies_equal_the_teacher_forced_forward(tok_model, temperature):
    """entropy.response_logprobs on the returned Rollout (its prompt mask and position ids) scores
    the sampled tokens as they were drawn; atol 1e-5 covers fp32 rounding (~1e-6 seen)."""
    tok, model = tok_model
    r = Sampler(model, tok, slots=4).generate(render_prompts(QUESTIONS, tok), group_size=2, max_new_tokens=20,
                                              temperature=temperature, seed=1)
    with torch.no_grad():
        lp, ent = response_logprobs(model, r, temperature=temperature, with_entropy=True)
    assert r.sample_logprobs.dtype == r.sample_entropies.dtype == torch.float32
    assert torch.allclose(lp, r.sample_logprobs, atol=1e-5), (lp - r.sample_logprobs).abs().max()
    assert torch.allclose(ent, r.sample_entropies, atol=1e-5), (ent - r.sample_entropies).abs().max()
    pad = r.response_mask == 0
    assert pad.any() and (r.sample_logprobs[pad] == 0).all() and (r.sample_entropies[pad] == 0).all()
    assert (r.sample_entropies[~pad] > 0).all()


def test_an_fp64_model_samples_fp64_log_probs_equal_to_its_teacher_forced_pass(tok_model):
    """In fp64 the sampler keeps fp64 numbers, so the trainer may take them as the old policy's: the
    first update's ratio is then 1 to fp64 rounding, as with a recomputed pass."""
    import copy
    tok, model = tok_model
    model64 = copy.deepcopy(model).double()
    r = Sampler(model64, tok, slots=4).generate(render_prompts(QUESTIONS, tok), group_size=2, max_new_tokens=12,
                                                temperature=1.0, seed=3)
    with torch.no_grad():
        lp, ent = response_logprobs(model64, r, temperature=1.0, with_entropy=True)
    assert r.sample_logprobs.dtype == r.sample_entropies.dtype == torch.float64
    assert (lp - r.sample_logprobs).abs().max() < 1e-12 and (ent - r.sample_entropies).abs().max() < 1e-12


def test_rows_at_the_length_limit_are_truncated_and_hold_no_eos(tok_model):
    tok, model = tok_model
    eos = eos_ids(tok, model)
    never = force_lengths([10 ** 6] * 4, eos)  # EOS banned at every position
    r = Sampler(model, tok, slots=3).generate(render_prompts(QUESTIONS[:2], tok), group_size=2, max_new_tokens=5,
                                              temperature=1.0, seed=0, logits_processor=never)
    assert r.response_ids.shape == (4, 5) and r.response_mask.all() and r.truncated.all()
    assert not torch.isin(r.response_ids, torch.tensor(eos)).any()


def test_eos_as_first_token_gives_a_one_token_response(tok_model):
    tok, model = tok_model
    eos = tok.eos_token_id
    lengths = [1, 4, 1, 1, 2, 1]  # rows 0, 2, 3, 5 stop at once (their slot is refilled right after prefill)
    r = Sampler(model, tok, slots=2).generate(render_prompts(QUESTIONS[:3], tok), group_size=2, max_new_tokens=6,
                                              temperature=1.0, seed=0, logits_processor=force_lengths(lengths, [eos]))
    assert r.response_lengths.long().tolist() == lengths and not r.truncated.any()
    assert r.response_ids.shape == (6, 4) and r.response_ids[[0, 2, 3, 5], 0].tolist() == [eos] * 4
    assert r.texts[0] == "" and r.sample_logprobs[0, 0] == 0.0  # forced: probability 1


def test_group_size_one_and_a_single_new_token(tok_model):
    tok, model = tok_model
    prompts = render_prompts(QUESTIONS, tok)
    r = generate(model, tok, prompts, group_size=1, max_new_tokens=1, temperature=0, batch_size=2)
    ref = generate_hf(model, tok, prompts, group_size=1, max_new_tokens=1, temperature=0)
    assert r.response_ids.shape == (5, 1) and r.group.tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(r.response_ids, ref.response_ids) and torch.equal(r.truncated, ref.truncated)
    assert torch.equal(r.prompt_ids, ref.prompt_ids) and torch.equal(r.prompt_mask, ref.prompt_mask)


def test_decode_efficiency_counts_idle_slot_steps(tok_model):
    """Forced lengths 3, 9, 1, 5, 7, 2 (27 tokens). One slot never idles: efficiency 1 in 27
    steps. All six at once run 9 steps (the longest row): 27 / (9 x 6)."""
    tok, model = tok_model
    lengths = [3, 9, 1, 5, 7, 2]
    hook = force_lengths(lengths, eos_ids(tok, model))
    prompts = render_prompts(QUESTIONS[:3], tok)
    for slots, steps, eff in [(1, 27, 1.0), (0, 9, 27 / 54)]:
        s = Sampler(model, tok, slots=slots)
        r = s.generate(prompts, group_size=2, max_new_tokens=12, temperature=1.0, seed=0, logits_processor=hook)
        assert r.response_lengths.long().tolist() == lengths
        assert s.stats["tokens"] == 27 and s.stats["steps"] == steps and s.stats["efficiency"] == pytest.approx(eff)
    s = Sampler(model, tok, slots=3)
    s.generate(prompts, group_size=2, max_new_tokens=12, temperature=1.0, seed=0, logits_processor=hook)
    assert 27 / 54 < s.stats["efficiency"] < 1.0 and s.stats["slots"] == 3


def test_sampling_copy_is_the_policy_in_its_own_dtype(tok_model):
    _, model = tok_model
    assert sampling_copy(model, torch.float32) is model
    assert refresh_sampling_copy(model, model) is model


def test_refreshed_sampling_copy_equals_the_policy_cast_after_an_update(tok_model):
    tok, _ = tok_model
    policy = tiny.build_model(tok, seed=2, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=64)
    twin = sampling_copy(policy, torch.bfloat16)
    params = dict(policy.named_parameters())

    def same():
        return all(torch.equal(p, params[n].to(torch.bfloat16)) for n, p in twin.named_parameters())
    assert twin is not policy and same()
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in twin.parameters())
    assert twin.get_output_embeddings().weight is twin.get_input_embeddings().weight  # still tied
    inv = twin.model.rotary_emb.inv_freq
    assert inv.dtype == torch.float32 and torch.equal(inv, policy.model.rotary_emb.inv_freq)
    ptrs = [p.data_ptr() for p in twin.parameters()]
    with torch.no_grad():  # an "optimizer step"
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    assert not same()
    refresh_sampling_copy(twin, policy)
    assert same() and [p.data_ptr() for p in twin.parameters()] == ptrs  # in place: graphs stay valid
    r = Sampler(twin, tok).generate(render_prompts(QUESTIONS[:2], tok), max_new_tokens=3, temperature=0)
    assert r.response_ids.shape[0] == 2


# ----------------------------------------------------------------------------------------
# The GPU path, as far as a CPU shows it


def test_generate_hf_with_logprobs_never_holds_the_logits_of_every_step(tok_model):
    """Log-probs and entropies are taken as each token is drawn: no tensor the size of [rows, steps, V]
    (HF's output_logits stacked: 239 GB for a Qwen2.5 batch of 128 x 3,072) is ever built. Every
    tensor an op returns during the call is measured; 64 steps from prompts of at most 12 tokens, so a
    [rows, V] step or even a [rows, P, V] prefill stays below a quarter of [rows, steps, V]."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for x in torch.utils._pytree.tree_leaves(out):
                if torch.is_tensor(x):
                    Largest.numel = max(Largest.numel, x.numel())
            return out
    tok, model = tok_model
    prompts = render_prompts(["Ann has 3 pens.", "Kim has 1 shells."], tok, "plain")
    steps, V = 64, model.config.vocab_size
    eos = torch.tensor(eos_ids(tok, model))
    no_eos = [lambda ids, scores: scores.index_fill(-1, eos, float("-inf"))]    # every row runs all 64 steps
    torch.manual_seed(0)
    with Largest():
        r = generate_hf(model, tok, prompts, group_size=2, max_new_tokens=steps, temperature=1.0,
                        return_logprobs=True, logits_processor=no_eos)
    assert r.response_ids.shape == (4, steps) and r.prompt_ids.shape[1] <= 12
    assert 0 < Largest.numel < 4 * steps * V / 4, (Largest.numel, 4 * steps * V)
    # and they are the numbers: the drawn tokens under the processed distribution (EOS banned), from a
    # teacher-forced pass of the whole sequences
    P = r.prompt_ids.shape[1]
    with torch.no_grad():
        logits = model(input_ids=r.input_ids, attention_mask=r.attention_mask, position_ids=r.position_ids).logits
    logp = torch.log_softmax(logits[:, P - 1:-1].index_fill(-1, eos, float("-inf")), dim=-1)   # [4, steps, V]
    assert torch.allclose(r.sample_logprobs, logp.gather(-1, r.response_ids[..., None]).squeeze(-1), atol=1e-5)
    ent = -(logp.exp() * logp.clamp_min(torch.finfo(logp.dtype).min)).sum(-1)
    assert torch.allclose(r.sample_entropies, ent, atol=1e-5)


def test_compiled_sampler_follows_a_temperature_change_without_recompiling(tok_model):
    """Temperature lives in a device tensor the compiled step reads (a float would be baked into the
    graph, or lifted to an input a CUDA graph replays): compiled (Inductor on CPU) and eager samplers
    draw the same tokens with the same log-probs at T = 1, then 0.6, then 1 again, and once the
    first call has compiled, a temperature change compiles nothing."""
    tok, model = tok_model
    prompts = render_prompts(QUESTIONS[:3], tok)
    compiled = Sampler(model, tok, slots=4, compile=True)
    eager = Sampler(model, tok, slots=4, compile=False)
    assert compiled.compiled and not eager.compiled
    for i, T in enumerate((1.0, 0.6, 1.0)):
        rc = compiled.generate(prompts, group_size=2, max_new_tokens=12, temperature=T, seed=3)
        re_ = eager.generate(prompts, group_size=2, max_new_tokens=12, temperature=T, seed=3)
        assert torch.equal(rc.response_ids, re_.response_ids), T
        assert torch.allclose(rc.sample_logprobs, re_.sample_logprobs, atol=1e-5), T
        with torch.no_grad():  # the distribution at this call's temperature, scored apart from both samplers
            lp, _ = response_logprobs(model, rc, temperature=T)
        assert torch.allclose(rc.sample_logprobs, lp, atol=1e-5), T
        if i > 0:
            assert compiled.stats["recompiles"] == 0 and compiled.stats["cudagraph_skips"] == 0, (T, compiled.stats)


@pytest.mark.parametrize("slots", [1, 3, 0])
def test_reading_end_flags_a_step_late_draws_the_same_rows(tok_model, slots):
    """lag=1 (the CUDA default: the host reads a step's end flags after queuing the next step) changes
    when slots are refilled, never what a row draws: per-row streams make tokens and lengths identical
    to lag=0; each ended row costs its slot at most one idle step more."""
    tok, model = tok_model
    lengths = [3, 9, 1, 5, 7, 2]
    hook = force_lengths(lengths, eos_ids(tok, model))
    prompts = render_prompts(QUESTIONS[:3], tok)
    out = {}
    for lag in (0, 1):
        s = Sampler(model, tok, slots=slots, lag=lag)
        r = s.generate(prompts, group_size=2, max_new_tokens=12, temperature=1.0, seed=4, logits_processor=hook)
        out[lag] = (r, s.stats)
    (r0, s0), (r1, s1) = out[0], out[1]
    assert r1.response_lengths.long().tolist() == lengths
    # tokens identical; log-probs to fp32 rounding (eager attention spans the longest live row, so the
    # two schedules multiply matrices of other widths)
    assert torch.equal(r0.response_ids, r1.response_ids)
    assert torch.allclose(r0.sample_logprobs, r1.sample_logprobs, atol=1e-5, rtol=0)
    assert s0["tokens"] == s1["tokens"] == 27
    assert s0["decode_steps"] <= s1["decode_steps"] <= s0["decode_steps"] + len(lengths)


def test_kv_cache_sized_at_construction_is_allocated_once_across_calls(tok_model):
    """max_len (the longest prompt plus max_new_tokens, which train.setup reads from the data) sizes
    the cache once: training-like and evaluation-like calls with other prompts, lengths and
    temperatures reuse it; a call that needs more columns grows it (one more allocation)."""
    tok, model = tok_model
    prompts = render_prompts(QUESTIONS, tok)
    longest = max(len(x) for x in tok(prompts, add_special_tokens=False)["input_ids"])
    s = Sampler(model, tok, slots=3, max_len=longest + 20)
    calls = [(QUESTIONS[:2], 20, 1.0), (QUESTIONS, 12, 0.6), (QUESTIONS[2:], 20, 0.0), (QUESTIONS[:1], 5, 1.0)]
    for qs, n, T in calls:
        s.generate(render_prompts(qs, tok), group_size=2, max_new_tokens=n, temperature=T, seed=0)
        assert s.allocations == 1 and s.cache.k[0].shape[2] > longest + 20
    s.generate(prompts, group_size=2, max_new_tokens=40, temperature=1.0, seed=0)
    assert s.allocations == 2


def test_compile_without_build_tools_falls_back_or_stops_with_the_reason(monkeypatch, capsys, tmp_path):
    """No compiler on PATH, or no Python.h: "auto" on CUDA samples eager with one line naming what is
    missing; compile=True stops before any work with the same reason."""
    import sampler
    monkeypatch.setenv("PATH", str(tmp_path))        # an empty folder: no gcc, clang, g++
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    assert "C compiler" in sampler.compile_toolchain_missing("cuda")
    assert "C++ compiler" in sampler.compile_toolchain_missing("cpu")
    assert sampler.resolve_compile("auto", torch.device("cuda")) is False
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and "C compiler" in line and "eager" in line
    with pytest.raises(ConfigError, match="C\\+\\+ compiler"):
        sampler.resolve_compile(True, torch.device("cpu"))
    assert sampler.resolve_compile("auto", torch.device("cpu")) is False  # auto never compiles on CPU
    monkeypatch.undo()
    monkeypatch.setattr(sampler.sysconfig, "get_paths", lambda: {"include": str(tmp_path)})
    assert "Python headers" in sampler.compile_toolchain_missing("cuda")
