"""HF `generate` under the sampler's contract: the reference the slot sampler (sampler.py) is tested
against, and `rollout.engine: hf`. Static batches, the global torch RNG; with `return_logprobs` each
token's log-prob and entropy are scored as it is drawn (StepLogprobs), never from every step's logits.
"""
from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from rollout import Rollout, concat, eos_ids, response_mask_from_ids


class StepLogprobs(LogitsProcessor):
    """An HF logits processor that scores tokens as `generate` draws them, one step kept at a time.

    Called with each step's scores (after the caller's processors, before HF's temperature and top-p
    warpers), it keeps that step's log-softmax(scores / T) [b, V] and its entropy [b]; at the next
    step the last column of input_ids is the token drawn from it, whose log-prob it keeps; `finish`
    scores the last step's token. HF's output_logits would hold every step instead: 128 rows x
    3,072 steps x 151,936 x 4 bytes = 239 GB for one Qwen2.5 batch.
    """

    def __init__(self, temperature: float):
        self.temperature, self.logp, self.lp, self.ent = temperature, None, [], []

    def __call__(self, input_ids, scores):                     # [b, P + t], [b, V]
        self._score(input_ids[:, -1])
        self.logp = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        self.ent.append(-(self.logp.exp() * self.logp.clamp_min(torch.finfo(self.logp.dtype).min)).sum(-1))
        return scores

    def _score(self, drawn):
        if self.logp is not None:
            self.lp.append(self.logp.gather(-1, drawn[:, None]).squeeze(-1))
            self.logp = None

    def finish(self, last) -> tuple[torch.Tensor, torch.Tensor]:
        """last [b]: the final step's tokens -> log-probs and entropies [b, steps]."""
        self._score(last)
        return torch.stack(self.lp, dim=1), torch.stack(self.ent, dim=1)


@torch.no_grad()
def generate_hf(model, tokenizer, prompts: list[str], *, group_size: int, max_new_tokens: int,
                temperature: float, top_p: float = 1.0, batch_size: int | None = None,
                return_logprobs: bool = False, logits_processor=None) -> Rollout:
    """The same contract with HF `generate` (static batches of `batch_size`, global torch RNG).

    With `return_logprobs`, `sample_logprobs`/`sample_entropies` [B, R] hold those of the
    temperature-scaled distribution after `logits_processor` (an HF LogitsProcessorList), as the
    slot sampler's; they are computed step by step (StepLogprobs), no [B, R, V] logits are kept.
    """
    device = next(model.parameters()).device
    rows = [p for p in prompts for _ in range(group_size)]
    batch_size = batch_size or len(rows)
    eos = eos_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    parts = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        enc = {k: v.to(device) for k, v in enc.items()}
        sample = temperature > 0
        procs = LogitsProcessorList(logits_processor or [])
        scorer = StepLogprobs(temperature if sample else 1.0)
        if return_logprobs:  # last of the caller's processors; HF's warpers come after them (transformers 5)
            procs.append(scorer)
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=sample,
            temperature=temperature if sample else None, top_p=top_p if sample else None, top_k=None,
            eos_token_id=eos, pad_token_id=pad_id, use_cache=True, logits_processor=procs,
            return_dict_in_generate=True)
        P = enc["input_ids"].shape[1]
        resp = out.sequences[:, P:]                                               # [b, R]
        if resp.shape[1] == 0:  # max_new_tokens == 0
            resp = resp.new_full((resp.shape[0], 1), pad_id)
        mask, truncated = response_mask_from_ids(resp, eos)
        lp = ent = None
        if return_logprobs:
            lp, ent = scorer.finish(out.sequences[:, -1])                         # [b, R]
            assert lp.shape == resp.shape, (lp.shape, resp.shape)
            # after its EOS a row draws padding, which a caller's processor may have banned (-inf): zeros
            lp, ent = lp.masked_fill(mask == 0, 0.0), ent.masked_fill(mask == 0, 0.0)
        parts.append(Rollout(
            prompt_ids=enc["input_ids"], prompt_mask=enc["attention_mask"],
            response_ids=resp.masked_fill(mask == 0, pad_id), response_mask=mask, truncated=truncated,
            group=torch.arange(s, s + len(chunk), device=device) // group_size,
            texts=tokenizer.batch_decode(resp.masked_fill(mask == 0, pad_id), skip_special_tokens=True),
            sample_logprobs=lp, sample_entropies=ent))
    return parts[0] if len(parts) == 1 else concat(parts, pad_id)
