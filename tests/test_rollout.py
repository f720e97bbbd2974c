"""The batch record: masks by position, position ids, prompt templates, select/concat, the tokenizer."""
import pytest
import torch

from rollout import (Rollout, concat, load_tokenizer, position_ids_from_mask, render_prompts,
                     response_mask_from_ids)
from sampler import generate

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


def test_render_prompts_chat_and_plain(tok_model):
    tok, _ = tok_model
    chat = render_prompts(["Ann has 3 pens."], tok, "chat", system_prompt="Be brief.")
    assert chat == ["<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAnn has 3 pens.<|im_end|>\n"
                    "<|im_start|>assistant\n"]
    assert render_prompts(["Q?"], tok, "plain") == ["Question: Q?\nAnswer:"]
    with pytest.raises(ValueError, match="unknown prompt template 'fancy'"):
        render_prompts(["Q?"], tok, "fancy")


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
    # the sampler's log-probs and entropies travel with their tokens (zero-padded like the mask)
    for name in ("sample_logprobs", "sample_entropies"):
        assert getattr(c, name).shape == c.response_ids.shape
        assert torch.equal(getattr(back, name)[:, :getattr(b, name).shape[1]], getattr(b, name))
        assert (getattr(c, name)[c.response_mask == 0] == 0).all()


def test_saved_tiny_tokenizer_loads_back_with_identical_ids(tok_model, tmp_path):
    """A tiny model folder holds a qwen2 config; its tokenizer must still load as saved."""
    tok, model = tok_model
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    back = load_tokenizer(str(tmp_path))
    text = render_prompts(["Ann has 13 pens. Ann loses 4."], tok)[0] + "13 - 4 = 9\n\\boxed{9}"
    assert back(text)["input_ids"] == tok(text)["input_ids"]
    assert back.decode(tok(text)["input_ids"]) == text
