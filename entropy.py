"""Token log-probs, token entropies and step segmentation: pure tensor functions.

The logits tensor [B, T, V] dominates memory (V = 151,936 for Qwen2.5: an fp32 [8, 4096, V]
is 20 GB). So we never build it: the model returns hidden states, and the LM head plus
log-softmax run over chunks of tokens. Under autograd a custom backward recomputes each chunk's
logits and adds its gradient into ONE [V, H] buffer for the LM head (as fused linear
cross-entropy kernels do), so only one chunk of logits is ever alive.
"""
from __future__ import annotations

import re

import torch


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for fp32/bf16/fp16 models, fp64 for fp64 ones (exactness checks)."""
    return torch.promote_types(dtype, torch.float32)


def compute_dtype(h: torch.Tensor) -> torch.dtype:
    """The dtype the LM-head matmuls take their inputs in: autocast's (bf16) where autocast is on for
    h's device and would cast h, else h's own. The forward records it and the backward reuses it:
    autograd runs a custom backward outside autocast, and logits recomputed at another precision than
    the forward's would give the gradient of a different function."""
    dev = h.device.type
    if torch.is_autocast_enabled(dev) and h.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(dev)
    return h.dtype


def chunk_logits(h: torch.Tensor, weight: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """[N, H] x [V, H] -> logits [N, V] of the temperature-scaled distribution, in at least fp32.

    One precision policy, shared with the sampler: inputs cast to `dtype` (compute_dtype), products
    accumulated in fp32 and returned in fp32. On CUDA a bf16 matmul hands over its fp32 accumulator
    (torch.mm out_dtype); CPU has no such kernel, and rounds the product to bf16 first. fp32 and
    fp64 inputs stay exact."""
    acc = _acc(h.dtype)
    a, b = h.to(dtype), weight.to(dtype).T
    with torch.autocast(h.device.type, enabled=False):
        logits = torch.mm(a, b, out_dtype=acc) if a.is_cuda and dtype != acc else (a @ b).to(acc)
    return logits.div_(temperature) if temperature != 1.0 else logits


class _ChunkedLogprobEntropy(torch.autograd.Function):
    """(log p(target) [N], entropy [N]) from hidden [N, H] and LM head [V, H], chunk by chunk.

    With z the scaled logits, p = softmax(z) and H = -sum p log p:
      d logp_n / dz = onehot(y_n) - p,     dH / dz = -p * (log p + H);     dz / dlogits = 1 / T.
    Precision (chunk_logits): the backward recomputes the forward's logits exactly, and its two
    matmuls take their inputs in the same dtype (bf16 under autocast: tensor-core speed, fp32
    accumulation, as autograd's own backward of a bf16 matmul; fp32/fp64 stay exact).
    """

    @staticmethod
    def forward(ctx, h, weight, targets, temperature, chunk_size, with_entropy):
        N, cd = h.shape[0], compute_dtype(h)
        lp = torch.empty(N, device=h.device, dtype=_acc(h.dtype))
        ent = torch.zeros(N, device=h.device, dtype=_acc(h.dtype))
        w = weight.to(cd)  # cast once, not per chunk
        for s in range(0, N, chunk_size):
            logp = torch.log_softmax(chunk_logits(h[s:s + chunk_size], w, temperature, cd), dim=-1)
            lp[s:s + chunk_size] = logp.gather(-1, targets[s:s + chunk_size, None]).squeeze(-1)
            if with_entropy:
                ent[s:s + chunk_size] = -(logp.exp() * logp).sum(-1)
        ctx.save_for_backward(h, weight, targets, ent)
        ctx.temperature, ctx.chunk_size, ctx.cd = temperature, chunk_size, cd
        return lp, ent

    @staticmethod
    def backward(ctx, grad_lp, grad_ent):
        h, weight, targets, ent = ctx.saved_tensors
        cd, acc = ctx.cd, _acc(h.dtype)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=acc) if ctx.needs_input_grad[1] else None
        w = weight.to(cd)
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, h.shape[0], ctx.chunk_size):
                sl = slice(s, s + ctx.chunk_size)
                hc = h[sl].to(cd)
                logp = torch.log_softmax(chunk_logits(h[sl], w, ctx.temperature, cd), dim=-1)         # [n, V]
                p = logp.exp()
                g_lp = grad_lp[sl].to(acc)[:, None]
                d = -p * g_lp                                                            # (onehot - p) g_lp
                d.scatter_add_(-1, targets[sl, None], g_lp)
                if grad_ent is not None and bool((grad_ent[sl] != 0).any()):
                    d -= p * (logp + ent[sl, None]) * grad_ent[sl].to(acc)[:, None]
                d = d.div_(ctx.temperature).to(cd)
                if grad_h is not None:
                    grad_h[sl] = (d @ w).to(h.dtype)
                if grad_w is None:
                    continue
                if cd == acc:
                    grad_w.addmm_(d.T, hc)
                else:  # a low-precision product of this chunk, summed over chunks in fp32
                    grad_w += d.T @ hc
        return grad_h, (grad_w.to(weight.dtype) if grad_w is not None else None), None, None, None, None


def token_logprobs_entropy(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor, *,
                           temperature: float = 1.0, chunk_size: int = 1024, with_entropy: bool = True
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked log p(target) and full-vocabulary entropy (both differentiable).

    hidden [B, T, H] (the state that predicts token t), targets [B, T] -> ([B, T], [B, T]) in at least fp32.
    Equal to the naive `log_softmax(hidden @ W.T)` up to float rounding, at O(chunk * V) memory.
    The entropy is zeros when `with_entropy` is False.
    """
    B, T, H = hidden.shape
    assert targets.shape == (B, T), (targets.shape, hidden.shape)
    lp, ent = _ChunkedLogprobEntropy.apply(hidden.reshape(B * T, H), lm_head_weight, targets.reshape(B * T),
                                           float(temperature), int(chunk_size), bool(with_entropy))
    return lp.view(B, T), ent.view(B, T)


def response_logprobs(model, batch, *, temperature: float = 1.0, chunk_size: int = 1024,
                      with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward a Rollout (prompt + response) and score its response tokens: ([B, R], [B, R]).

    Uses the same attention mask and position ids as generation, so for the same weights the
    result equals the sampling-time log-probs (README pitfall 2). Logits are divided by the
    sampling temperature: the ratio compares the distributions the tokens were drawn from.
    """
    P, R = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
    # The full model's forward (so wrappers such as FSDP run their hooks), keeping the logits of one
    # position only; the decoder's final hidden states are taken with a hook on the inner model.
    captured = []
    hook = model.model.register_forward_hook(lambda module, args, out: captured.append(out.last_hidden_state))
    try:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
              use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    hidden = captured[0][:, P - 1:P + R - 1]                                     # [B, R, H] predicts response
    logp, ent = token_logprobs_entropy(hidden, model.get_output_embeddings().weight, batch.response_ids,
                                       temperature=temperature, chunk_size=chunk_size, with_entropy=with_entropy)
    mask = batch.response_mask
    return logp * mask, ent * mask


# ----------------------------------------------------------------------------------------
# Step segmentation (README: "Design choices", Steps)

def delimiter_table(tokenizer, mode: str = "newline", ids: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Per-vocabulary boolean tables, derived once from the token strings (no hard-coded ids but mode "ids"'s).

    newline: the token's text contains '\\n'.  ids: the delimiters are exactly the token ids `ids` (the EchoRL
    authors' rule, Qwen2.5's 198 "\\n" and 271 "\\n\\n"); an id outside the vocabulary is a ValueError.
    punct_end: text ends with . ? or ! (optionally followed by whitespace); it ends a sentence only if the next
    token starts with whitespace or the response ends (so '3.5' is not split), and not after an ABBREVIATION ("e.g.").
    starts_space: text begins with whitespace.
    blank: the text is whitespace only (not content: leading blanks join the first content step).
    """
    if mode not in ("newline", "sentence", "ids"):
        raise ValueError(f"unknown step delimiter {mode!r}; allowed: 'newline', 'sentence', 'ids'")
    V = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
    if mode == "ids":
        bad = [i for i in (ids or []) if not 0 <= i < V]
        if bad or not ids:
            raise ValueError(f"token ids {bad or ids} are not in the tokenizer's vocabulary (ids 0..{V - 1})")
    texts = [""] * V
    for tok, i in tokenizer.get_vocab().items():
        texts[i] = tokenizer.convert_tokens_to_string([tok])
    special = set(tokenizer.all_special_ids)
    newline = torch.tensor([("\n" in t) and i not in special for i, t in enumerate(texts)])
    if mode == "ids":
        newline = torch.zeros(V, dtype=torch.bool).index_fill(0, torch.tensor(ids, dtype=torch.long), True)
    stripped = [t.rstrip(" \t") for t in texts]
    punct_end = torch.tensor([bool(s) and s[-1] in ".?!" and i not in special for i, s in enumerate(stripped)])
    trailing_space = torch.tensor([t != s for t, s in zip(texts, stripped)])
    starts_space = torch.tensor([t[:1].isspace() for t in texts])
    blank = torch.tensor([not t.strip() and i not in special for i, t in enumerate(texts)])
    return {"mode": mode, "newline": newline, "punct_end": punct_end & ~trailing_space,
            "punct_space": punct_end & trailing_space, "starts_space": starts_space, "blank": blank, "texts": texts}


# A period that closes an abbreviation ends no sentence: dotted initialisms ("e.g.", "i.e.", "a.m.") and a
# few short forms common in worked solutions. A single capital ("... is A.") still ends one.
ABBREVIATION = re.compile(r"(?:^|[\s(])(?:(?:[A-Za-z]\.){2,}|(?:vs|cf|approx|resp|eq|Eq|fig|Fig|Mr|Mrs|Ms|Dr)\.)$")


def _abbreviation_ends(ids: torch.Tensor, candidates: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """[B, R] bool: the candidate sentence ends whose word (the tokens back to the last whitespace, at
    most 8) is an ABBREVIATION. A loop over the candidates only: a few per sentence."""
    out = torch.zeros_like(candidates)
    where = candidates.nonzero()                                                   # [n, 2]
    back = (where[:, 1:] - torch.arange(7, -1, -1, device=ids.device)).clamp_min(-1)  # [n, 8] positions
    window = torch.where(back >= 0, ids[where[:, :1], back.clamp_min(0)], -1).tolist()
    for (b, t), toks in zip(where.tolist(), window):
        word = ""
        for tid in reversed(toks):
            piece = texts[tid] if 0 <= tid < len(texts) else ""
            word = piece + word
            if not piece or piece[:1].isspace():
                break
        out[b, t] = bool(ABBREVIATION.search(word.rstrip()))
    return out


def step_ids(response_ids: torch.Tensor, response_mask: torch.Tensor, table: dict, eos_ids: list[int],
             min_tokens: int = 1) -> torch.Tensor:
    """Step index of every response token [B, R] (long; -1 on padding).

    A step ends at a delimiter token that is followed by content (a non-delimiter, non-EOS
    response token): runs of newlines stay in one step, and a final EOS belongs to the last
    step, which runs to the end of the response. Blank tokens before the first content token
    (a response that opens with newlines or spaces) belong to the first content step, never to a
    step of their own. A step of fewer than `min_tokens` tokens (a list marker "1." or an
    abbreviation "e.g." in sentence mode, a "\\[" line in newline mode) is merged into the step
    after it; the rule looks at the steps as split, so a run of short steps joins the next long one.
    """
    table = {k: (v.to(response_ids.device) if torch.is_tensor(v) else v) for k, v in table.items()}
    ids = response_ids.clamp_max(table["newline"].numel() - 1)
    valid = response_mask.bool()
    nxt_valid = torch.cat([valid[:, 1:], torch.zeros_like(valid[:, :1])], dim=1)
    nxt = lambda x: torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], dim=1)
    delim = table["newline"][ids]
    if table["mode"] == "sentence":
        ends_here = ~nxt_valid | nxt(table["starts_space"][ids])
        punct = (table["punct_space"][ids] | (table["punct_end"][ids] & ends_here)) & valid & ~delim
        if punct.any():
            punct &= ~_abbreviation_ends(response_ids, punct, table["texts"])
        delim = delim | punct
    delim = delim & valid
    is_eos = torch.isin(response_ids, torch.tensor(eos_ids, device=response_ids.device))
    nxt_content = nxt_valid & ~nxt(delim) & ~nxt(is_eos)
    seen_content = (valid & ~is_eos & ~table["blank"][ids]).long().cumsum(-1) > 0   # content at or before t
    boundary = delim & nxt_content & seen_content                                  # [B, R]
    if min_tokens > 1:
        pos = torch.arange(boundary.shape[1], device=boundary.device).expand_as(boundary)
        last = torch.where(boundary, pos, -1).cummax(-1).values                   # last boundary <= t
        prev = torch.cat([torch.full_like(last[:, :1], -1), last[:, :-1]], dim=1)  # last boundary < t
        boundary = boundary & (pos - prev >= min_tokens)
    sid = boundary.long().cumsum(-1) - boundary.long()                            # steps before t
    return sid.masked_fill(~valid, -1)


def step_reduce(values: torch.Tensor, sids: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """Reduce per-token values over each step: values [B, R], sids [B, R] -> [B, S] (S = max steps).

    Steps that do not exist in a row are -inf, so argmax never picks them.
    """
    if reduce not in ("mean", "max", "sum"):
        raise ValueError(f"unknown step reduction {reduce!r}; allowed: 'mean', 'max', 'sum'")
    B = values.shape[0]
    S = max(int(sids.amax()) + 1, 1) if sids.numel() else 1
    valid = sids >= 0
    idx = sids.clamp_min(0)
    acc = _acc(values.dtype)  # fp32, or fp64 for fp64 entropies
    count = torch.zeros(B, S, device=values.device, dtype=acc).scatter_add_(1, idx, valid.to(acc))
    v = values.to(acc).masked_fill(~valid, 0.0)
    if reduce == "max":
        out = torch.full((B, S), float("-inf"), device=values.device, dtype=acc)
        out = out.scatter_reduce(1, idx, v.masked_fill(~valid, float("-inf")), "amax")
    else:
        out = torch.zeros(B, S, device=values.device, dtype=acc).scatter_add_(1, idx, v)
        if reduce == "mean":
            out = out / count.clamp_min(1)
    return out.masked_fill(count == 0, float("-inf"))
