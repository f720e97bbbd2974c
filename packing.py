"""The update's forward over real tokens only: each distinct prompt of a micro-batch once, no padding.

entropy.response_logprobs (the reference) forwards every row as prompt + response padded to
[B, P + R]: a group's prompt G times, and every padded position through every projection and MLP.
Here a micro-batch becomes one packed sequence [1, N] of the tokens the log-probs need:

    prompt 0 | prompt 1 | ... | response of row 0 but its last token | response of row 1 | ...

Each token keeps its reference position id (a prompt counts from 0, a response from its prompt's
length), so the rotary embeddings are the reference's. Embedding, norms, projections and MLPs act
token by token, so they run on the N real tokens alone; the LM head runs on the response tokens'
predictors alone. Attention is the one place tokens meet: `segment_attention` (behind transformers'
"sdpa" attention, taken when a forward passes the layout) gathers each segment's queries and keys
into a padded block: a response attends to its prompt and to its own earlier tokens, a prompt
to itself. Segments of similar length share a block (`BUCKET_RATIO`), so attention pads little too.
A prompt's keys and values are gathered into every row of its group, and autograd sums their
gradients back (index_select's backward is index_add): the same sum over the group's rows that the
reference computes from G copies. A response's last token predicts nothing, so it is not forwarded.

Log-probs, entropies and gradients are the reference's up to float summation order
(tests/test_packing.py: 1e-12 in fp64). Supported: HF decoder-only models with SDPA attention that
call ALL_ATTENTION_FUNCTIONS with full causal attention and RoPE from position ids (Qwen2, Qwen3,
Llama); `unsupported` says why another model (or attn_implementation eager, or sliding-window
layers) falls back to the reference path.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from entropy import response_logprobs as reference_logprobs
from entropy import token_logprobs_entropy

BUCKET_RATIO = 0.6   # a segment joins the current attention block while its length is >= 0.6 x the block's longest
FAMILIES = ("qwen2", "qwen3", "llama")


class CallCount:
    """A plain counter object: FSDP2's input casting (MixedPrecisionPolicy) rebuilds dataclasses and
    containers passed to a layer, never this, so every copy of a Layout counts into the same one."""

    def __init__(self):
        self.n = 0


@dataclass
class Layout:
    """A micro-batch as one packed sequence, and how attention reads it."""
    input_ids: torch.Tensor      # [N] real tokens: distinct prompts, then each row's response but its last token
    position_ids: torch.Tensor   # [N] the reference's position of each token
    blocks: list                 # per attention block: (q_idx [n, L], k_idx [n, K], allowed [n, 1, L, K])
    inverse: torch.Tensor        # [N] row of each packed token in the blocks' concatenated outputs
    predict: torch.Tensor        # [M] packed index of the state that predicts each real response token
    calls: CallCount = field(default_factory=CallCount)  # attention calls (one per decoder layer)


def layout(batch, prompt_once: bool = True, bucket_ratio: float = BUCKET_RATIO) -> Layout:
    """The packed layout of a Rollout's rows (prompts: any padding; responses: right-padded).
    `prompt_once`: rows with the same prompt tokens (a group) share one copy of them."""
    pm, rm = batch.prompt_mask.bool(), batch.response_mask.bool()                # [B, P], [B, R]
    B, R = rm.shape
    dev = rm.device
    t = torch.arange(R, device=dev)
    L = rm.sum(-1)                                                               # [B] response lengths
    if not torch.equal(rm, t < L[:, None]):
        raise ValueError("response_mask must be a prefix of each row (right-padded responses)")
    key = batch.prompt_ids.masked_fill(~pm, -1)                                  # [B, P] real tokens, -1 elsewhere
    if prompt_once:
        uniq, inv = torch.unique(key, dim=0, return_inverse=True)               # [U, P], [B]
    else:
        uniq, inv = key, torch.arange(B, device=dev)
    real = uniq >= 0
    p = real.sum(-1)                                                             # [U] prompt lengths
    if bool((p == 0).any()):
        raise ValueError("a row has an empty prompt: nothing predicts its first response token")
    ps = p.cumsum(0) - p                                                         # [U] where each prompt starts
    m = (L - 1).clamp_min(0)                                                     # [B] response tokens forwarded
    fwd = t < m[:, None]                                                         # [B, R]
    rs = int(p.sum()) + m.cumsum(0) - m                                          # [B] where each response starts
    input_ids = torch.cat([uniq[real], batch.response_ids[fwd]])                  # [N]
    position_ids = torch.cat([(real.cumsum(-1) - 1)[real], (p[inv][:, None] + t)[fwd]])
    # The state before response token t: the prompt's last token for t = 0, else response token t - 1.
    predict = torch.where(t == 0, (ps + p - 1)[inv][:, None], rs[:, None] + t - 1)[rm]   # [M]

    # Segments: each prompt (no context), then each row with forwarded tokens (context: its prompt).
    has = m > 0
    start = torch.cat([ps, rs[has]])                                             # [S]
    qlen = torch.cat([p, m[has]])
    cstart = torch.cat([torch.zeros_like(p), ps[inv][has]])
    clen = torch.cat([torch.zeros_like(p), p[inv][has]])
    order = torch.argsort(qlen, descending=True, stable=True)
    lengths = qlen[order].tolist()
    blocks, inverse, off, i = [], torch.empty(len(input_ids), dtype=torch.long, device=dev), 0, 0
    while i < len(lengths):
        j = i + 1
        while j < len(lengths) and lengths[j] >= bucket_ratio * lengths[i]:
            j += 1
        seg = order[i:j]
        s, q, cs, c = start[seg, None], qlen[seg, None], cstart[seg, None], clen[seg, None]   # [n, 1]
        Lb, Kb = lengths[i], int((c + q).max())
        qi = torch.arange(Lb, device=dev).minimum(q - 1)                         # [n, Lb] padding repeats the last query
        kj = torch.arange(Kb, device=dev)[None]                                  # [1, Kb]
        k_idx = torch.where(kj < c, cs + kj, s + (kj - c).clamp(0).minimum(q - 1))     # [n, Kb]
        allowed = kj[:, None, :] <= (c[:, :, None] + qi[:, :, None])             # [n, Lb, Kb] causal after the context
        real_q = torch.arange(Lb, device=dev) < q                                # [n, Lb]
        flat = off + torch.arange(len(seg) * Lb, device=dev).view(len(seg), Lb)
        inverse[(s + qi)[real_q]] = flat[real_q]
        blocks.append((s + qi, k_idx, allowed[:, None]))
        off += len(seg) * Lb
        i = j
    return Layout(input_ids, position_ids, blocks, inverse, predict)


def segment_attention(module, query, key, value, attention_mask=None, dropout: float = 0.0, scaling=None,
                      sliding_window=None, segments: Layout | None = None, **kwargs):
    """An AttentionInterface function over a packed Layout: query [1, h, N, d], key/value [1, h_kv, N, d]
    -> ([1, N, h, d], None). SDPA runs per block of segments; the output of every real query is
    gathered back into packed order."""
    if segments is None:
        raise ValueError("segment_attention needs the packed layout (packing.packed_response_logprobs)")
    if sliding_window is not None or kwargs.get("softcap") is not None:
        raise ValueError("packed forward: sliding-window or soft-capped attention is not supported; set train.pack=false")
    segments.calls.n += 1
    q, k, v = query[0], key[0], value[0]                                         # [h, N, d], [h_kv, N, d]
    outs = []
    for q_idx, k_idx, allowed in segments.blocks:
        n, L, K = *q_idx.shape, k_idx.shape[1]
        qb = q.index_select(1, q_idx.flatten()).unflatten(1, (n, L)).transpose(0, 1)   # [n, h, L, d]
        kb = k.index_select(1, k_idx.flatten()).unflatten(1, (n, K)).transpose(0, 1)   # [n, h_kv, K, d]
        vb = v.index_select(1, k_idx.flatten()).unflatten(1, (n, K)).transpose(0, 1)
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=allowed, dropout_p=dropout, scale=scaling,
                                           enable_gqa=qb.shape[1] != kb.shape[1])  # [n, h, L, d]
        outs.append(o.transpose(1, 2).flatten(0, 1))                              # [n * L, h, d]
    return torch.cat(outs).index_select(0, segments.inverse)[None], None           # [1, N, h, d]


def sdpa_or_segments(module, query, key, value, attention_mask, segments: Layout | None = None, **kwargs):
    """transformers' "sdpa" attention, or `segment_attention` when a forward passes a packed layout. The
    layout travels as a keyword argument, so a recomputed forward (gradient checkpointing) takes the same
    path, and every forward without it is plain SDPA."""
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return segment_attention(module, query, key, value, attention_mask, segments=segments, **kwargs)


AttentionInterface.register("sdpa", sdpa_or_segments)


def unsupported(model) -> str | None:
    """Why the packed forward cannot run this model (None: it can)."""
    conf = model.config
    if conf.model_type not in FAMILIES:
        return f"model type {conf.model_type!r} (packed forward: {', '.join(FAMILIES)})"
    if conf._attn_implementation != "sdpa":
        return f"attention implementation {conf._attn_implementation!r} (packed forward: 'sdpa')"
    if any(lt != "full_attention" for lt in getattr(conf, "layer_types", None) or ()):
        return "sliding-window attention layers"
    return None


def packed_response_logprobs(model, batch, *, prompt_once: bool = True, temperature: float = 1.0,
                             chunk_size: int = 1024, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """entropy.response_logprobs over the packed layout: ([B, R], [B, R]), 0 on padding."""
    lay = layout(batch, prompt_once)
    rm = batch.response_mask.bool()                                              # [B, R]
    captured = []
    hook = model.model.register_forward_hook(lambda module, args, out: captured.append(out.last_hidden_state))
    try:
        # A 4D mask is taken as prepared, so transformers builds no [N, N] mask; attention reads the layout.
        placeholder = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=rm.device)
        model(input_ids=lay.input_ids[None], position_ids=lay.position_ids[None], attention_mask=placeholder,
              use_cache=False, logits_to_keep=1, segments=lay)
    finally:
        hook.remove()
    if lay.calls.n != model.config.num_hidden_layers:
        raise RuntimeError(f"packed forward: {lay.calls.n} of {model.config.num_hidden_layers} attention layers used "
                           f"the packed layout; set train.pack=false for this model")
    hidden = captured[0][0].index_select(0, lay.predict)                         # [M, H]
    lp, ent = token_logprobs_entropy(hidden[None], model.get_output_embeddings().weight, batch.response_ids[rm][None],
                                     temperature=temperature, chunk_size=chunk_size, with_entropy=with_entropy)
    dtype = torch.promote_types(lp.dtype, batch.response_mask.dtype)
    logp = torch.zeros(rm.shape, dtype=dtype, device=rm.device).masked_scatter(rm, lp[0].to(dtype))
    ent = torch.zeros(rm.shape, dtype=dtype, device=rm.device).masked_scatter(rm, ent[0].to(dtype))
    return logp, ent


def response_logprobs(model, batch, *, pack: bool = True, prompt_once: bool = True, temperature: float = 1.0,
                      chunk_size: int = 1024, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The trainer's forward (update, old-policy pass, probes): packed where `pack` and the model allow
    (train.pack, train.prompt_once), else entropy.response_logprobs, the reference it is tested against.

    fp64 weights (exactness checks) forward each row's prompt: transformers' RMSNorm rounds to fp32, and
    a shared prompt's gradient, summed over the rows of a micro-batch before that rounding, would then
    depend on how micro-batches cut the groups (1e-7, not 1e-12, between one process and two)."""
    if pack and unsupported(model) is None:
        prompt_once = prompt_once and next(model.parameters()).dtype != torch.float64
        return packed_response_logprobs(model, batch, prompt_once=prompt_once, temperature=temperature,
                                        chunk_size=chunk_size, with_entropy=with_entropy)
    return reference_logprobs(model, batch, temperature=temperature, chunk_size=chunk_size, with_entropy=with_entropy)
