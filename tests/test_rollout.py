"""Sampling and the batch record: masks, positions, and log-prob agreement with generation."""
import pytest
import torch

import tiny
from entropy import response_logprobs
from rollout import (Rollout, concat, eos_ids, generate, position_ids_from_mask, render_prompts,
                     response_mask_from_ids)

EOS = 0


def test_response_mask_keeps_eos_and_drops_padding_when_pad_equals_eos():
    # pad id == eos id == 0: rows are [5 6 EOS pad pad], [EOS pad ...], [7 8 9 4 3] (no EOS)
    ids = torch.tensor([[5, 6, 0, 0, 0], [0, 0, 0, 0, 0], [7, 8, 9, 4, 3]])
    mask, truncated = response_mask_from_ids(ids, [EOS])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]


def test_response_mask_uses_the_first_of_several_eos_ids():
    ids = torch.tensor([[5, 2, 6, 0, 0]])  # 2 = <|im_end|>, 0 = <|endoftext|>
    mask, truncated = response_mask_from_ids(ids, [0, 2])
    assert mask.tolist() == [[1, 1, 0, 0, 0]] and truncated.tolist() == [False]


def test_position_ids_ignore_left_padding():
    am = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    pos = position_ids_from_mask(am)
    # real tokens count 0, 1, 2, ...; masked slots get the filler 1 (as HF generate does)
    assert pos.tolist() == [[1, 1, 0, 1, 2, 1], [0, 1, 2, 3, 4, 5]]


@pytest.fixture(scope="module")
def tok_model():
    tok = tiny.build_tokenizer()
    model = tiny.build_model(tok, seed=1, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=64).eval()
    return tok, model


def test_render_prompts_chat_and_plain(tok_model):
    tok, _ = tok_model
    chat = render_prompts(["Ann has 3 pens."], tok, "chat", system_prompt="Be brief.")
    assert chat == ["<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAnn has 3 pens.<|im_end|>\n"
                    "<|im_start|>assistant\n"]
    assert render_prompts(["Q?"], tok, "plain") == ["Question: Q?\nAnswer:"]
    with pytest.raises(ValueError, match="unknown prompt template 'fancy'"):
        render_prompts(["Q?"], tok, "fancy")


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


def test_training_forward_reproduces_generation_logprobs_on_left_padded_batch(tok_model):
    """method.md pitfall 2: same weights, fp32 -> recomputed log-probs equal sampling-time ones."""
    tok, model = tok_model
    torch.manual_seed(3)
    qs = ["Ann has 3 pens.", "Ben has 12 coins. Ben loses 2. Ben finds 5 more. How many coins does Ben have now?",
          "Mia has 7 cards. Mia doubles them."]
    prompts = render_prompts(qs, tok)
    for temperature in (1.0, 0.7):
        r = generate(model, tok, prompts, group_size=2, max_new_tokens=10, temperature=temperature,
                     return_logprobs=True)
        assert r.prompt_mask[0].sum() < r.prompt_mask.shape[1]  # the batch really is left-padded
        with torch.no_grad():
            lp, _ = response_logprobs(model, r, temperature=temperature, chunk_size=7)
        gen = r.extras["gen_logprobs"]
        assert torch.allclose(lp, gen, atol=1e-5), (lp - gen).abs().max()
        assert (lp[r.response_mask == 0] == 0).all()


def test_select_and_concat_round_trip(tok_model):
    tok, model = tok_model
    torch.manual_seed(0)
    a = generate(model, tok, render_prompts(["Ann has 3 pens."], tok), group_size=2, max_new_tokens=4, temperature=1.0)
    b = generate(model, tok, render_prompts(["Ben has 12 coins. Ben loses 2."], tok), group_size=2,
                 max_new_tokens=7, temperature=1.0)
    c = concat([a, b], tok.pad_token_id)
    assert len(c) == 4 and c.texts == a.texts + b.texts
    back = c.select(torch.tensor([2, 3]))
    # the same tokens and masks come back once padding is stripped
    for i in range(2):
        n = int(b.response_mask[i].sum())
        assert back.response_ids[i, :n].tolist() == b.response_ids[i, :n].tolist()
        assert back.response_mask[i].sum() == n
        pm = back.prompt_mask[i].bool()
        assert back.prompt_ids[i][pm].tolist() == b.prompt_ids[i][b.prompt_mask[i].bool()].tolist()
    assert isinstance(back, Rollout) and back.texts == b.texts


def test_saved_tiny_tokenizer_loads_back_with_identical_ids(tok_model, tmp_path):
    """A tiny model folder holds a qwen2 config; its tokenizer must still load as saved."""
    from rollout import load_tokenizer
    tok, model = tok_model
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    back = load_tokenizer(str(tmp_path))
    text = render_prompts(["Ann has 13 pens. Ann loses 4."], tok)[0] + "13 - 4 = 9\n\\boxed{9}"
    assert back(text)["input_ids"] == tok(text)["input_ids"]
    assert back.decode(tok(text)["input_ids"]) == text
