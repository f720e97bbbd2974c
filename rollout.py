"""The batch record: G completions per prompt, the masks by position, and prompt templates.

The record (`Rollout`) is the object that flows through the whole loop: sampling fills the
token fields, then reward, advantages, old log-probs/entropies and EchoClips are added by
later stages. Conventions used everywhere:
  * prompts are LEFT-padded to P tokens, responses RIGHT-padded to R tokens;
  * `response_mask[b, t] = 1` on every generated token up to and including the first EOS,
    decided by position (so it is right even when pad id == eos id);
  * `position_ids` count real tokens only (the prompt's first token is 0, as HF `generate`
    builds them), so the training forward scores exactly the sequence that was sampled.

Sampling itself lives in sampler.py (`sampler.generate`, the slot engine) and hf_generate.py (`generate_hf`,
HF `generate`, the reference it is tested against); this module holds the record and its masks.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from metrics import Mean, Sum

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
    advantages: torch.Tensor | None = None     # [B] float, or [B, R] per token (algo.zvp_coef)
    in_policy: torch.Tensor | None = None      # [B] float, 0 for rows kept only to feed EchoClips
    old_logprobs: torch.Tensor | None = None   # [B, R]
    ref_logprobs: torch.Tensor | None = None   # [B, R]
    entropies: torch.Tensor | None = None      # [B, R]
    # Filled by the sampler: the distribution each token was drawn from (logits / temperature,
    # 1.0 at temperature 0), so no extra forward is needed to know them. 0 on padding.
    sample_logprobs: torch.Tensor | None = None   # [B, R] fp32 (fp64 models: fp64), log-prob of the sampled token
    sample_entropies: torch.Tensor | None = None  # [B, R] same dtype, full-vocabulary entropy
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


def batch_stats(batch: Rollout) -> dict:
    """Reward, accuracy, entropy and length over the policy rows of a batch, as means over their counts."""
    live = batch.in_policy > 0
    m = batch.response_mask[live]
    n_rows, n_tok = float(live.sum()), float(m.sum())
    out = {"batch_rows": Sum(len(batch)), "batch/policy_rows": Sum(n_rows), "batch/policy_tokens": Sum(n_tok)}
    if not live.any():
        return out | {k: Mean(0.0, 0) for k in ("reward", "accuracy", "entropy", "response_len", "truncated")}
    return out | {"reward": Mean(float(batch.rewards[live].mean()), n_rows),
                  "accuracy": Mean(float(batch.correct[live].float().mean()), n_rows),
                  "entropy": Mean(float((batch.entropies[live] * m).sum() / max(n_tok, 1.0)), n_tok),
                  "response_len": Mean(float(batch.response_lengths[live].mean()), n_rows),
                  "truncated": Mean(float(batch.truncated[live].float().mean()), n_rows)}


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
# Mini-batches and micro-batches: which rows each optimizer step and each forward takes


def micro_batches(n: int, size: int) -> list[torch.Tensor]:
    return [torch.arange(s, min(s + size, n)) for s in range(0, n, size)]


def global_groups(batch: Rollout) -> torch.Tensor:
    """[B] each row's group index in the step's global order, counted apart for policy rows and for
    rows outside the policy loss (train.collect records it; a hand-built batch numbers its own)."""
    if "global_group" in batch.extras:
        return torch.as_tensor(batch.extras["global_group"], dtype=torch.long)
    pol = (batch.in_policy > 0).cpu()
    _, dense = torch.unique(batch.group.cpu(), return_inverse=True)
    out = torch.empty(len(batch), dtype=torch.long)
    for flag in (True, False):
        rows = pol == flag
        if rows.any():
            out[rows] = torch.unique(dense[rows], return_inverse=True)[1]
    return out


def mini_batch_rows(in_policy: torch.Tensor, gid: torch.Tensor, k: int, total=None
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(policy rows, echo-only rows) of each of the (at most) k mini-batches.

    Policy group g (gid: its index in the step's global order) goes to mini-batch g mod k, so one
    process and N ranks (each holding some of the groups) form the same mini-batches. Echo-only rows
    (in_policy = 0: DAPO's dropped all-correct groups kept for EchoRL) are split apart from the policy
    rows, over the mini-batches that hold policy rows (all k if none does): each mini-batch holds the
    policy rows it holds with EchoRL off, and no echo-only extra step. Mini-batches empty on every
    rank are left out. `total` sums a tensor over ranks (World.sum; None: one process)."""
    total = total or (lambda x: x)
    pol, gid = (in_policy > 0).cpu(), gid.cpu()
    per = total(torch.bincount(gid[pol] % k, minlength=k).double())                 # [k] policy rows
    live = torch.nonzero(per > 0).squeeze(-1)
    targets = live if len(live) else torch.arange(k)
    piece = torch.where(pol, gid % k, targets[gid % len(targets)])                # [B]
    rows = torch.arange(len(pol))
    if not len(live):
        per = total(torch.bincount(piece, minlength=k).double())
    return [(rows[pol & (piece == j)], rows[~pol & (piece == j)]) for j in range(k) if per[j] > 0]


def update_slices(batch: Rollout, k: int, size: int, keep: torch.Tensor | None = None, total=None
                  ) -> list[list[torch.Tensor]]:
    """Row indices of each mini-batch's micro-batches (of `size` rows), in update order: the policy
    rows' micro-batches, then the echo-only rows'. The old-policy pass uses the same slices, so the
    first update sees bit-identical log-probs (ratio == 1 exactly). `keep` (bool [B]): the echo-only
    rows worth a forward in the update, those holding clip tokens (the others feed neither loss)."""
    out = []
    keep = keep.cpu() if keep is not None else None
    for pol, echo in mini_batch_rows(batch.in_policy, global_groups(batch), k, total):
        if keep is not None:
            echo = echo[keep[echo]]
        out.append([pol[i] for i in micro_batches(len(pol), size)] + [echo[i] for i in micro_batches(len(echo), size)])
    return out
