"""Token log-probs, token entropies and step segmentation: pure tensor functions.

The logits tensor [B, T, V] dominates memory (V = 151,936 for Qwen2.5: an fp32 [8, 4096, V]
is 20 GB). So we never build it: the model returns hidden states, and the LM head plus
log-softmax run over chunks of tokens. Under autograd each chunk is recomputed in the
backward pass (activation checkpointing), so only one chunk of logits is alive at a time.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _chunk_stats(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                 with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """h [N, H], weight [V, H], targets [N] -> log p(target) [N], entropy [N] (fp32)."""
    logits = (h @ weight.T).float() / temperature                                 # [N, V]
    logp = torch.log_softmax(logits, dim=-1)
    tok_logp = logp.gather(-1, targets[:, None]).squeeze(-1)
    if not with_entropy:
        return tok_logp, torch.zeros_like(tok_logp)
    ent = -(logp.exp() * logp).sum(-1)                                            # H = -sum p log p
    return tok_logp, ent


def token_logprobs_entropy(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor, *,
                           temperature: float = 1.0, chunk_size: int = 1024, with_entropy: bool = True
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked log p(target) and full-vocabulary entropy.

    hidden [B, T, H] (the state that predicts token t), targets [B, T] -> ([B, T], [B, T]) fp32.
    Equal to the naive `log_softmax(hidden @ W.T)` up to float rounding, at O(chunk * V) memory.
    """
    B, T, H = hidden.shape
    assert targets.shape == (B, T), (targets.shape, hidden.shape)
    h, y = hidden.reshape(B * T, H), targets.reshape(B * T)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or lm_head_weight.requires_grad)
    lps, ents = [], []
    for s in range(0, B * T, chunk_size):
        args = (h[s:s + chunk_size], lm_head_weight, y[s:s + chunk_size], temperature, with_entropy)
        lp, ent = checkpoint(_chunk_stats, *args, use_reentrant=False) if grad else _chunk_stats(*args)
        lps.append(lp)
        ents.append(ent)
    return torch.cat(lps).view(B, T), torch.cat(ents).view(B, T)


def response_logprobs(model, batch, *, temperature: float = 1.0, chunk_size: int = 1024,
                      with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward a Rollout (prompt + response) and score its response tokens: ([B, R], [B, R]).

    Uses the same attention mask and position ids as generation, so for the same weights the
    result equals the sampling-time log-probs (method.md pitfall 2). Logits are divided by the
    sampling temperature: the ratio compares the distributions the tokens were drawn from.
    """
    P, R = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
    out = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      position_ids=batch.position_ids, use_cache=False)
    hidden = out.last_hidden_state[:, P - 1:P + R - 1]                          # [B, R, H] predicts response
    logp, ent = token_logprobs_entropy(hidden, model.get_output_embeddings().weight, batch.response_ids,
                                       temperature=temperature, chunk_size=chunk_size, with_entropy=with_entropy)
    mask = batch.response_mask
    return logp * mask, ent * mask


# ----------------------------------------------------------------------------------------
# Step segmentation (method.md section 2.1)

def delimiter_table(tokenizer, mode: str = "newline") -> dict[str, torch.Tensor]:
    """Per-vocabulary boolean tables, derived once from the token strings (no hard-coded ids).

    newline: the token's text contains '\\n'.  punct_end: text ends with . ? or ! (optionally
    followed by whitespace); it ends a sentence only if the next token starts with whitespace
    or the response ends (so '3.5' is not split).  starts_space: text begins with whitespace.
    """
    if mode not in ("newline", "sentence"):
        raise ValueError(f"unknown step delimiter {mode!r}; allowed: 'newline', 'sentence'")
    V = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
    texts = [""] * V
    for tok, i in tokenizer.get_vocab().items():
        texts[i] = tokenizer.convert_tokens_to_string([tok])
    special = set(tokenizer.all_special_ids)
    newline = torch.tensor([("\n" in t) and i not in special for i, t in enumerate(texts)])
    stripped = [t.rstrip(" \t") for t in texts]
    punct_end = torch.tensor([bool(s) and s[-1] in ".?!" and i not in special for i, s in enumerate(stripped)])
    trailing_space = torch.tensor([t != s for t, s in zip(texts, stripped)])
    starts_space = torch.tensor([t[:1].isspace() for t in texts])
    return {"mode": mode, "newline": newline, "punct_end": punct_end & ~trailing_space,
            "punct_space": punct_end & trailing_space, "starts_space": starts_space}


def step_ids(response_ids: torch.Tensor, response_mask: torch.Tensor, table: dict, eos_ids: list[int]
             ) -> torch.Tensor:
    """Step index of every response token [B, R] (long; -1 on padding).

    A step ends at a delimiter token that is followed by content (a non-delimiter, non-EOS
    response token): runs of newlines stay in one step, and a final EOS belongs to the last
    step, which runs to the end of the response.
    """
    ids = response_ids.clamp_max(table["newline"].numel() - 1)
    valid = response_mask.bool()
    nxt_valid = torch.cat([valid[:, 1:], torch.zeros_like(valid[:, :1])], dim=1)
    nxt = lambda x: torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], dim=1)
    delim = table["newline"][ids]
    if table["mode"] == "sentence":
        ends_here = ~nxt_valid | nxt(table["starts_space"][ids])
        delim = delim | table["punct_space"][ids] | (table["punct_end"][ids] & ends_here)
    delim = delim & valid
    is_eos = torch.isin(response_ids, torch.tensor(eos_ids, device=response_ids.device))
    nxt_content = nxt_valid & ~nxt(delim) & ~nxt(is_eos)
    boundary = delim & nxt_content                                                 # [B, R]
    sid = boundary.long().cumsum(-1) - boundary.long()                            # steps before t
    return sid.masked_fill(~valid, -1)


def step_reduce(values: torch.Tensor, sids: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """Reduce per-token values over each step: values [B, R], sids [B, R] -> [B, S] (S = max steps).

    Steps that do not exist in a row are -inf, so argmax never picks them.
    """
    if reduce not in ("mean", "max", "sum"):
        raise ValueError(f"unknown step reduction {reduce!r}; allowed: 'mean', 'max', 'sum'")
    B = values.shape[0]
    S = int(sids.max().item()) + 1 if sids.numel() and sids.max() >= 0 else 1
    valid = sids >= 0
    idx = sids.clamp_min(0)
    count = torch.zeros(B, S, device=values.device).scatter_add_(1, idx, valid.float())
    v = values.float().masked_fill(~valid, 0.0)
    if reduce == "max":
        out = torch.full((B, S), float("-inf"), device=values.device)
        out = out.scatter_reduce(1, idx, v.masked_fill(~valid, float("-inf")), "amax")
    else:
        out = torch.zeros(B, S, device=values.device).scatter_add_(1, idx, v)
        if reduce == "mean":
            out = out / count.clamp_min(1)
    return out.masked_fill(count == 0, float("-inf"))
