"""Sampling: G completions per prompt, packed into one batch record.

The record (`Rollout`) is the object that flows through the whole loop: sampling fills the
token fields, then reward, advantages, old log-probs/entropies and EchoClips are added by
later stages. Conventions used everywhere:
  * prompts are LEFT-padded to P tokens, responses RIGHT-padded to R tokens;
  * `response_mask[b, t] = 1` on every generated token up to and including the first EOS,
    decided by position (so it is right even when pad id == eos id);
  * `position_ids` count real tokens only (the prompt's first token is 0, as HF `generate`
    builds them), so the training forward scores exactly the sequence that was sampled.

`generate` samples with the slot engine of sampler.py (the model's own forward over a KV cache of
fixed slots, continuous refill, per-row random streams); HF `generate` (`generate_hf`) stays as
the reference it is tested against.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

PLAIN_TEMPLATE = "Question: {question}\nAnswer:"


@dataclass
class Rollout:
    """One step's batch of rollouts. Every tensor lives on the device the rollouts were sampled on
    (the model's); tensors leave it only for the verifier (texts) and for logging."""
    prompt_ids: torch.Tensor       # [B, P] left-padded
    prompt_mask: torch.Tensor      # [B, P] 1 on real prompt tokens
    response_ids: torch.Tensor     # [B, R] right-padded
    response_mask: torch.Tensor    # [B, R] float, 1 on response tokens incl. EOS
    truncated: torch.Tensor        # [B] bool, no EOS within max_new_tokens
    group: torch.Tensor            # [B] long, index of the prompt this row answers
    texts: list[str]               # [B] decoded responses (special tokens dropped)
    # Filled by later stages of the loop (train.py); None until then.
    correct: torch.Tensor | None = None        # [B] bool, verifier said yes
    rewards: torch.Tensor | None = None        # [B] float, after shaping
    advantages: torch.Tensor | None = None     # [B] float
    in_policy: torch.Tensor | None = None      # [B] float, 0 for rows kept only to feed EchoClips
    old_logprobs: torch.Tensor | None = None   # [B, R]
    ref_logprobs: torch.Tensor | None = None   # [B, R]
    entropies: torch.Tensor | None = None      # [B, R]
    # Filled by the sampler: the distribution each token was drawn from (logits / temperature,
    # 1.0 at temperature 0), so no extra forward is needed to know them. 0 on padding.
    sample_logprobs: torch.Tensor | None = None   # [B, R] float32, log-prob of the sampled token
    sample_entropies: torch.Tensor | None = None  # [B, R] float32, full-vocabulary entropy
    clip_mask: torch.Tensor | None = None      # [B, R] float, EchoClip tokens
    extras: dict = field(default_factory=dict)  # golds, prompts, ... (non-tensor metadata)

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    @property
    def input_ids(self) -> torch.Tensor:       # [B, P + R]
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:  # [B, P + R]
        return torch.cat([self.prompt_mask, self.response_mask.to(self.prompt_mask.dtype)], dim=1)

    @property
    def position_ids(self) -> torch.Tensor:    # [B, P + R], as HF generate builds them
        return position_ids_from_mask(self.attention_mask)

    @property
    def response_lengths(self) -> torch.Tensor:  # [B]
        return self.response_mask.sum(-1)

    @property
    def policy_mask(self) -> torch.Tensor:      # [B, R] response tokens of the rows in the policy loss
        return self.response_mask * self.in_policy[:, None].to(self.response_mask)

    def select(self, idx) -> "Rollout":
        """Rows `idx` of every per-row field (tensors, lists and per-row `extras`)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        out = {f.name: _take(getattr(self, f.name), idx) for f in fields(self) if f.name != "extras"}
        return Rollout(**out, extras={k: _take(v, idx) for k, v in self.extras.items()})


def _take(v, idx: torch.Tensor):
    if isinstance(v, torch.Tensor):
        return v[idx.to(v.device)]
    if isinstance(v, list):
        return [v[i] for i in idx.tolist()]
    return v


def concat(parts: list[Rollout], pad_id: int) -> Rollout:
    """Stack rollouts row-wise: prompts re-left-padded, [B, R] tensors re-right-padded."""
    P = max(r.prompt_ids.shape[1] for r in parts)
    R = max(r.response_ids.shape[1] for r in parts)

    def cat(vals, name):
        if vals[0] is None:
            return None
        if isinstance(vals[0], list):
            return sum(vals, [])
        if not isinstance(vals[0], torch.Tensor):
            return vals[0]
        if vals[0].dim() == 1:
            return torch.cat(vals)
        fill = pad_id if name in ("prompt_ids", "response_ids") else 0
        width, left = (P, True) if name.startswith("prompt") else (R, False)
        pad = lambda v: (width - v.shape[1], 0) if left else (0, width - v.shape[1])
        return torch.cat([torch.nn.functional.pad(v, pad(v), value=fill) for v in vals])

    out = {f.name: cat([getattr(r, f.name) for r in parts], f.name) for f in fields(Rollout) if f.name != "extras"}
    extras = {k: cat([r.extras[k] for r in parts], k) for k in parts[0].extras}
    return Rollout(**out, extras=extras)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count real tokens only, so left padding does not shift them (same rule as HF generate)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def load_tokenizer(path: str):
    """AutoTokenizer, except for a folder saved from a plain `tokenizers` backend (tiny.py's):
    transformers 5 maps a qwen2 model folder to Qwen2Tokenizer, which would swap in Qwen's
    pre-tokenizer and silently change every token id."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    conf = Path(path) / "tokenizer_config.json"
    plain = conf.is_file() and json.loads(conf.read_text()).get("tokenizer_class") in (
        "TokenizersBackend", "PreTrainedTokenizerFast")
    tok = (PreTrainedTokenizerFast if plain else AutoTokenizer).from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def eos_ids(tokenizer, model=None) -> list[int]:
    """All ids that end a response: the tokenizer's EOS, the generation config's, and a chat end token."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    if im_end is not None:
        ids.add(im_end)
    return sorted(ids)


def response_mask_from_ids(response_ids: torch.Tensor, eos: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask by position: 1 up to and including the first EOS; rows without EOS are truncated.

    README pitfall 1: masking `ids != pad` drops the EOS itself when pad == eos.
    """
    B, R = response_ids.shape
    is_eos = torch.isin(response_ids, torch.tensor(eos, device=response_ids.device))  # [B, R]
    has_eos = is_eos.any(-1)                                                          # [B]
    first = torch.where(has_eos, is_eos.float().argmax(-1), torch.full_like(has_eos, R, dtype=torch.long))
    pos = torch.arange(R, device=response_ids.device)
    mask = (pos[None, :] <= first[:, None]) & (pos[None, :] < R)
    return mask.float(), ~has_eos


def render_prompts(questions: list[str], tokenizer, template: str = "chat",
                   system_prompt: str | None = None) -> list[str]:
    """`chat`: the tokenizer's chat template (+ optional system message); `plain`: PLAIN_TEMPLATE."""
    if template == "plain":
        pre = f"{system_prompt}\n\n" if system_prompt else ""
        return [pre + PLAIN_TEMPLATE.format(question=q) for q in questions]
    if template != "chat":
        raise ValueError(f"unknown prompt template {template!r}; allowed: 'chat', 'plain'")
    if tokenizer.chat_template is None:
        raise ValueError("template 'chat' needs a tokenizer with a chat template; use template 'plain'")
    out = []
    for q in questions:
        msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": q}]
        out.append(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    return out


# ----------------------------------------------------------------------------------------
# Generation entry points: the slot sampler (default) and HF generate (the reference)

@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, group_size: int, max_new_tokens: int,
             temperature: float, top_p: float = 1.0, batch_size: int | None = None,
             engine: str = "slots", seed: int | None = None, row_seeds=None, logits_processor=None,
             compile: bool | str = False, return_logprobs: bool = False) -> Rollout:
    """Sample `group_size` completions of each prompt; rows i*G .. i*G+G-1 answer prompt i.

    temperature == 0 -> greedy. `batch_size` bounds the sequences decoded at once (the slot
    count of the "slots" engine; the batch of each call of the "hf" engine). A one-off `Sampler`
    is built per call, so compilation is off by default here: a caller that samples repeatedly
    on a GPU should hold a `Sampler` (compiled once, its CUDA graphs reused across calls).
    `seed`, `row_seeds`, `logits_processor` and `compile` are the sampler's (see
    `Sampler.generate`); `return_logprobs` is the "hf" engine's (the sampler always returns them).
    """
    if engine == "hf":
        return generate_hf(model, tokenizer, prompts, group_size=group_size, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p, batch_size=batch_size,
                           return_logprobs=return_logprobs)
    if engine != "slots":
        raise ValueError(f"unknown generation engine {engine!r}; allowed: 'slots', 'hf'")
    from sampler import Sampler
    sampler = Sampler(model, tokenizer, slots=batch_size or 0, compile=compile)
    return sampler.generate(prompts, group_size=group_size, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p, seed=seed, row_seeds=row_seeds, logits_processor=logits_processor)


@torch.no_grad()
def generate_hf(model, tokenizer, prompts: list[str], *, group_size: int, max_new_tokens: int,
                temperature: float, top_p: float = 1.0, batch_size: int | None = None,
                return_logprobs: bool = False, logits_processor=None) -> Rollout:
    """The same contract with HF `generate` (static batches of `batch_size`, global torch RNG).

    With `return_logprobs`, `sample_logprobs`/`sample_entropies` [B, R] hold those of the
    temperature-scaled distribution. `logits_processor`: an HF LogitsProcessorList.
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
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=sample,
            temperature=temperature if sample else None, top_p=top_p if sample else None, top_k=None,
            eos_token_id=eos, pad_token_id=pad_id, use_cache=True, logits_processor=logits_processor,
            return_dict_in_generate=True, output_logits=return_logprobs)
        P = enc["input_ids"].shape[1]
        resp = out.sequences[:, P:]                                               # [b, R]
        if resp.shape[1] == 0:  # max_new_tokens == 0
            resp = resp.new_full((resp.shape[0], 1), pad_id)
        mask, truncated = response_mask_from_ids(resp, eos)
        lp = ent = None
        if return_logprobs:
            logits = torch.stack(out.logits, dim=1).float() / (temperature if sample else 1.0)  # [b, R, V]
            logp = torch.log_softmax(logits, -1)
            lp = logp.gather(-1, resp[..., None]).squeeze(-1) * mask
            ent = -(logp.exp() * logp).sum(-1) * mask
        parts.append(Rollout(
            prompt_ids=enc["input_ids"], prompt_mask=enc["attention_mask"],
            response_ids=resp.masked_fill(mask == 0, pad_id), response_mask=mask, truncated=truncated,
            group=torch.arange(s, s + len(chunk), device=device) // group_size,
            texts=tokenizer.batch_decode(resp.masked_fill(mask == 0, pad_id), skip_special_tokens=True),
            sample_logprobs=lp, sample_entropies=ent))
    return parts[0] if len(parts) == 1 else concat(parts, pad_id)
