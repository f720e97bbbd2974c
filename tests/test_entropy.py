"""entropy.py as a specification: chunked log-probs/entropies, step segmentation, step reduction."""
import math
from pathlib import Path

import pytest
import torch

import tiny
from entropy import delimiter_table, step_ids, step_reduce, token_logprobs_entropy

QWEN_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "qwen2.5-math-1.5b"

# ----------------------------------------------------------------------------------------
# Chunked log-probs and entropies


def _naive(hidden, weight, targets, temperature):
    logp = torch.log_softmax((hidden @ weight.T).double() / temperature, dim=-1)   # [B, T, V]
    return logp.gather(-1, targets[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def _random_inputs(seed=0, B=2, T=5, H=4, V=11):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    return hidden, weight, targets


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_chunked_logprobs_and_entropy_equal_the_naive_full_softmax(chunk_size, temperature):
    hidden, weight, targets = _random_inputs()
    with torch.no_grad():
        lp, ent = token_logprobs_entropy(hidden, weight, targets, temperature=temperature, chunk_size=chunk_size)
    ref_lp, ref_ent = _naive(hidden, weight, targets, temperature)
    assert lp.shape == ent.shape == (2, 5) and lp.dtype == torch.float32
    assert torch.allclose(lp.double(), ref_lp, atol=1e-5)
    assert torch.allclose(ent.double(), ref_ent, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1000])
def test_chunked_gradients_wrt_hidden_and_lm_head_equal_the_naive_ones(chunk_size):
    hidden, weight, targets = _random_inputs(seed=1)
    g = torch.Generator().manual_seed(2)
    c_lp, c_ent = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)  # arbitrary loss weights

    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    lp, ent = token_logprobs_entropy(h1, w1, targets, temperature=0.8, chunk_size=chunk_size)
    ((lp * c_lp).sum() + (ent * c_ent).sum()).backward()

    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref_lp, ref_ent = _naive(h2, w2, targets, 0.8)
    ((ref_lp * c_lp).sum() + (ref_ent * c_ent).sum()).backward()

    assert torch.allclose(h1.grad, h2.grad, atol=1e-5)
    assert torch.allclose(w1.grad, w2.grad, atol=1e-5)


def test_under_bf16_autocast_the_chunk_gradient_is_autograds_of_the_same_bf16_logits():
    """One precision policy for the forward and the custom backward: under autocast both take the LM
    head's logits from bf16 inputs, so the gradient is autograd's through `h @ W.T` under the same
    autocast. Bound: two bf16 roundings (2 x 2^-8) of the largest entry (per-chunk bf16 products of
    the head's gradient, summed in fp32). Logits of scale ~4: recomputing them in fp32 in the backward
    moves the softmax by a few percent, several times the bound (checked below)."""
    g = torch.Generator().manual_seed(3)
    N, H, V, T = 24, 64, 300, 0.7
    hidden, weight = torch.randn(1, N, H, generator=g), 0.5 * torch.randn(V, H, generator=g)
    targets = torch.randint(0, V, (1, N), generator=g)
    c_lp, c_ent = torch.randn(1, N, generator=g), torch.randn(1, N, generator=g)

    def grads(fn):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        lp, ent = fn(h, w)
        ((lp * c_lp).sum() + (ent * c_ent).sum()).backward()
        return lp.detach(), h.grad, w.grad

    def chunked(h, w, autocast=True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return token_logprobs_entropy(h, w, targets, temperature=T, chunk_size=7)

    def reference(h, w):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = h @ w.T                                                     # [1, N, V] bf16
        logp = torch.log_softmax(logits.float() / T, dim=-1)
        return logp.gather(-1, targets[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)

    rel = lambda a, b: float((a - b).abs().max() / b.abs().max())
    bound = 2 * 2 ** -8
    lp, gh, gw = grads(chunked)
    ref_lp, ref_gh, ref_gw = grads(reference)
    assert torch.allclose(lp, ref_lp, atol=1e-6)  # the same bf16 logits, the same fp32 log-softmax
    assert rel(gh, ref_gh) < bound and rel(gw, ref_gw) < bound, (rel(gh, ref_gh), rel(gw, ref_gw))
    _, gh32, gw32 = grads(lambda h, w: chunked(h, w, autocast=False))  # fp32 logits: another function
    assert rel(gh32, ref_gh) > 2 * bound and rel(gw32, ref_gw) > 2 * bound


def test_uniform_distribution_has_entropy_log_v_and_logprob_minus_log_v():
    # a zero LM head gives equal logits over V = 7 tokens: H = log 7 = 1.94591, log p = -1.94591
    V = 7
    hidden = torch.randn(1, 3, 4)
    lp, ent = token_logprobs_entropy(hidden, torch.zeros(V, 4), torch.tensor([[0, 3, 6]]), chunk_size=2)
    assert torch.allclose(ent, torch.full((1, 3), math.log(V)), atol=1e-6)
    assert torch.allclose(lp, torch.full((1, 3), -math.log(V)), atol=1e-6)


def test_logits_are_divided_by_the_temperature():
    # V = 2, W = [[0], [1]], hidden = 2 ln 3, T = 2: logits / T = [0, ln 3] -> p = [1/4, 3/4]
    # log p(1) = ln 0.75 = -0.287682 ; H = 0.25 ln 4 + 0.75 ln(4/3) = 0.346574 + 0.215762 = 0.562335
    hidden = torch.tensor([[[2 * math.log(3.0)]]])
    weight = torch.tensor([[0.0], [1.0]])
    lp, ent = token_logprobs_entropy(hidden, weight, torch.tensor([[1]]), temperature=2.0)
    assert lp.item() == pytest.approx(-0.287682, abs=1e-5)
    assert ent.item() == pytest.approx(0.562335, abs=1e-5)
    # at T = 1 the same logits are [0, 2 ln 3] -> p = [1/10, 9/10], log p(1) = ln 0.9 = -0.105361
    lp1, _ = token_logprobs_entropy(hidden, weight, torch.tensor([[1]]), temperature=1.0)
    assert lp1.item() == pytest.approx(-0.105361, abs=1e-5)


# ----------------------------------------------------------------------------------------
# Step segmentation with the tiny word-level tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny.build_tokenizer()


def _encode(tok, text, pieces, eos=True):
    """Token ids of `text` (+ EOS), checking the tokenizer splits it into the pieces written by hand."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == pieces
    return ids + ([tok.eos_token_id] if eos else [])


def _batch(rows, R, pad_id, left=False):
    """Pad id lists to [B, R] (right, or left) and build the response mask."""
    ids = torch.full((len(rows), R), pad_id)
    mask = torch.zeros(len(rows), R, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(R - len(r), R) if left else slice(0, len(r))
        ids[i, sl], mask[i, sl] = torch.tensor(r), 1
    return ids, mask


def test_delimiter_table_marks_exactly_the_newline_token_and_no_special_token(tok):
    table = delimiter_table(tok, "newline")
    nl = tok.convert_tokens_to_ids("\n")
    assert table["newline"].numel() >= len(tok)
    assert table["newline"].nonzero().flatten().tolist() == [nl]
    assert not table["newline"][tok.all_special_ids].any()
    with pytest.raises(ValueError, match="newline"):
        delimiter_table(tok, "paragraph")


def test_step_ids_split_after_each_newline_and_keep_eos_in_the_last_step(tok):
    text = "1 + 2 = 3\n3 * 2 = 6\n\\boxed{6}"
    ids = _encode(tok, text, ["1", " +", " 2", " =", " 3", "\n",
                              "3", " *", " 2", " =", " 6", "\n",
                              "\\boxed", "{", "6", "}"])
    # newlines at positions 5 and 11; EOS at 16 joins the last step
    expected = [0] * 6 + [1] * 6 + [2] * 5
    resp, mask = _batch([ids], 17, tok.pad_token_id)
    sids = step_ids(resp, mask, delimiter_table(tok), [tok.eos_token_id])
    assert sids.tolist() == [expected]


def test_step_ids_keep_consecutive_newlines_in_one_step_and_mark_padding_minus_one(tok):
    rows = [
        # '\n\n' at 5, 6: one boundary after the run -> 7 tokens in step 0, then 5 (incl. EOS)
        _encode(tok, "2 + 2 = 4\n\n\\boxed{4}", ["2", " +", " 2", " =", " 4", "\n", "\n",
                                                "\\boxed", "{", "4", "}"]),
        # newline right before EOS: nothing follows it, so a single step (7 tokens)
        _encode(tok, "3 + 4 = 7\n", ["3", " +", " 4", " =", " 7", "\n"]),
        # no newline at all: one step of 5 tokens
        _encode(tok, "\\boxed{5}", ["\\boxed", "{", "5", "}"]),
        # cut at the length limit: no EOS, last step still runs to the end (6 + 5 tokens)
        _encode(tok, "1 + 1 = 2\n2 + 1 = 3", ["1", " +", " 1", " =", " 2", "\n", "2", " +", " 1", " =", " 3"],
                eos=False),
    ]
    resp, mask = _batch(rows, 12, tok.pad_token_id)   # pad id == eos id here: masked by position
    sids = step_ids(resp, mask, delimiter_table(tok), [tok.eos_token_id])
    assert sids.tolist() == [
        [0] * 7 + [1] * 5,
        [0] * 7 + [-1] * 5,
        [0] * 5 + [-1] * 7,
        [0] * 6 + [1] * 5 + [-1],
    ]


def test_step_ids_on_left_padded_responses_match_the_right_padded_ones(tok):
    rows = [_encode(tok, "1 + 2 = 3\n\\boxed{3}", ["1", " +", " 2", " =", " 3", "\n", "\\boxed", "{", "3", "}"]),
            _encode(tok, "\\boxed{5}", ["\\boxed", "{", "5", "}"])]
    table = delimiter_table(tok)
    resp, mask = _batch(rows, 13, tok.pad_token_id, left=True)
    sids = step_ids(resp, mask, table, [tok.eos_token_id])
    # row 0: 2 pads, then 6 tokens of step 0 and 5 of step 1 (incl. EOS); row 1: 8 pads, 5 tokens
    assert sids.tolist() == [[-1] * 2 + [0] * 6 + [1] * 5, [-1] * 8 + [0] * 5]


def test_sentence_mode_splits_at_period_space_but_not_inside_a_decimal(tok):
    text = "Ann has 3.5 coins. Ben has 2. How many?"
    ids = _encode(tok, text, ["Ann", " has", " 3", ".", "5", " coins", ".",
                              " Ben", " has", " 2", ".", " How", " many", "?"])
    resp, mask = _batch([ids], 15, tok.pad_token_id)
    eos = [tok.eos_token_id]
    # '.' at 3 is followed by '5' (no space): no split. '.' at 6 and 10 are followed by ' Ben' / ' How'.
    # steps: 0..6 (7 tokens), 7..10 (4), 11..14 (4, incl. EOS)
    assert step_ids(resp, mask, delimiter_table(tok, "sentence"), eos).tolist() == [[0] * 7 + [1] * 4 + [2] * 4]
    # newline mode ignores sentence ends: one step
    assert step_ids(resp, mask, delimiter_table(tok, "newline"), eos).tolist() == [[0] * 15]


def test_sentence_mode_merges_a_period_and_the_following_newline_into_one_boundary(tok):
    ids = _encode(tok, "Ann has 2.\n3 + 1 = 4", ["Ann", " has", " 2", ".", "\n", "3", " +", " 1", " =", " 4"])
    resp, mask = _batch([ids], 11, tok.pad_token_id)
    sids = step_ids(resp, mask, delimiter_table(tok, "sentence"), [tok.eos_token_id])
    # '.' (3) and '\n' (4) are consecutive delimiters: one boundary after 4 -> 5 + 6 tokens
    assert sids.tolist() == [[0] * 5 + [1] * 6]


def test_leading_newlines_and_spaces_belong_to_the_first_content_step(tok):
    """A response that opens with blank tokens must not get a whitespace-only first step (which, holding
    the often uncertain first token, would win the entropy argmax and make a one-token EchoClip)."""
    ids = _encode(tok, "\n \n1 + 2 = 3\n\\boxed{3}", ["\n", " ", "\n", "1", " +", " 2", " =", " 3", "\n",
                                                    "\\boxed", "{", "3", "}"])
    resp, mask = _batch([ids], 14, tok.pad_token_id)
    sids = step_ids(resp, mask, delimiter_table(tok), [tok.eos_token_id])
    # blanks 0..2 join the content of step 0 (3..8, ending at the newline); then \boxed{3} + EOS
    assert sids.tolist() == [[0] * 9 + [1] * 5]


def test_steps_shorter_than_min_tokens_merge_into_the_next_step(tok):
    """Sentence mode splits a list marker "1." into a 2-token step; with min_tokens=3 it joins the sentence
    after it. A run of short steps joins the next long one; the last step stays whatever its length."""
    text = "1. Ann has 3. 2. Ben has 4. Ann has 7."
    ids = _encode(tok, text, ["1", ".", " Ann", " has", " 3", ".", " 2", ".", " Ben", " has", " 4", ".",
                              " Ann", " has", " 7", "."])
    resp, mask = _batch([ids], 17, tok.pad_token_id)
    table, eos = delimiter_table(tok, "sentence"), [tok.eos_token_id]
    # plain split: "1." | " Ann has 3." | " 2." | " Ben has 4." | " Ann has 7." + EOS
    assert step_ids(resp, mask, table, eos).tolist() == [[0] * 2 + [1] * 4 + [2] * 2 + [3] * 4 + [4] * 5]
    # min 3: "1." (2 tokens) and " 2." (2) merge forward; the 4-token sentences stay
    assert step_ids(resp, mask, table, eos, min_tokens=3).tolist() == [[0] * 6 + [1] * 6 + [2] * 5]
    # min 5: every step but the last is short; each merges into the next
    assert step_ids(resp, mask, table, eos, min_tokens=5).tolist() == [[0] * 17]


# ----------------------------------------------------------------------------------------
# Step reduction

STEP_VALUES = torch.tensor([[1.0, 3.0, 2.0, 4.0, 0.5, 7.0],
                            [5.0, 1.0, 1.0, 1.0, 9.0, 9.0]])
STEP_IDS = torch.tensor([[0, 0, 1, 1, 2, -1],
                         [0, 0, 0, 0, -1, -1]])
INF = float("-inf")


@pytest.mark.parametrize("reduce, expected", [
    # row 0: step 0 = {1, 3}, step 1 = {2, 4}, step 2 = {0.5}; padding 7 ignored
    # row 1: step 0 = {5, 1, 1, 1}; padding 9s ignored; steps 1, 2 do not exist
    ("mean", [[2.0, 3.0, 0.5], [2.0, INF, INF]]),
    ("max", [[3.0, 4.0, 0.5], [5.0, INF, INF]]),
    ("sum", [[4.0, 6.0, 0.5], [8.0, INF, INF]]),
])
def test_step_reduce_hand_values_and_missing_steps_are_minus_inf(reduce, expected):
    out = step_reduce(STEP_VALUES, STEP_IDS, reduce)
    assert out.tolist() == expected


def test_step_reduce_rejects_an_unknown_reduction():
    with pytest.raises(ValueError, match="mean"):
        step_reduce(STEP_VALUES, STEP_IDS, "median")


@pytest.mark.skipif(not QWEN_DIR.is_dir(), reason="needs ../shared/models (present in CI)")
def test_abbreviations_never_end_a_sentence_step_and_a_single_letter_answer_still_does():
    """Qwen2.5's tokenizer: "e.g." and "i.e." are followed by a space like a sentence end, but end no
    step; "A." at the end of a sentence does. Steps: "Take x = 2, e.g. the least one, i.e. x = 2." |
    " The answer is A." | " Done." (+ EOS)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(QWEN_DIR)
    text = "Take x = 2, e.g. the least one, i.e. x = 2. The answer is A. Done."
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    resp, mask = _batch([ids], len(ids), tok.pad_token_id)
    sids = step_ids(resp, mask, delimiter_table(tok, "sentence"), [tok.eos_token_id])[0].tolist()
    steps = [tok.decode([t for t, s in zip(ids, sids) if s == k], skip_special_tokens=True) for k in range(max(sids) + 1)]
    assert steps == ["Take x = 2, e.g. the least one, i.e. x = 2.", " The answer is A.", " Done."]
