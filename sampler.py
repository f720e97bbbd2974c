"""The sampling engine: the model's own forward over a KV cache of fixed slots (HF-native, no new
dependency), with continuous refill, per-row random streams, and the sampler's log-probs and
entropies at no extra cost.

    sampler = Sampler(model, tokenizer, slots=64)            # build once: the cache and compiled step are reused
    batch = sampler.generate(prompts, group_size=8, max_new_tokens=3072, temperature=1.0, seed=step)

  * Slots: each slot holds one sequence at its own length; when a row ends (EOS or its limit) its
    slot takes the next pending row of the call (prefill, then it decodes with the others), so the
    slots stay full whatever the length distribution (`stats["efficiency"]` = useful tokens /
    (decoding steps x slots)).
  * Randomness: every row has its own stream, a counter-based hash of (seed, row seed, position):
    a row's tokens do not depend on the slot count, the order of the rows, or who else is in the call.
  * Speed: the decoding step has fixed shapes; on CUDA it is compiled (torch.compile,
    "reduce-overhead": CUDA graphs), which removes the per-token launch overhead of Python. The
    host never waits for the GPU inside the loop: it reads a step's end-of-row flags one step late.
  * `sampling_copy`: the policy in the sampling dtype (bf16 on GPU), refreshed in place after
    every optimizer step, so sampling runs without autocast and caches keys and values in bf16.
"""
from __future__ import annotations

import copy
import os
import shutil
import sysconfig
import time
import zlib
from collections import deque
from pathlib import Path

import torch

from config import ConfigError
from entropy import chunk_logits
from hf_generate import generate_hf
from metrics import Max, Mean
from rollout import Rollout, eos_ids, response_mask_from_ids

# ----------------------------------------------------------------------------------------
# Per-row random streams: one uniform per (seed, row seed, token position), from a hash

M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32) held in int64: c is split in 16-bit halves so no
    product exceeds 2**48 (int64 overflow is not defined behaviour in the kernels)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & M32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons' integer hash, a bijection on 32 bits). Values stay non-negative, so
    torch's arithmetic right shift acts as the logical one."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_seed(key: str, sample: int) -> int:
    """A stable 31-bit row seed of (a problem's id, a sample index): crc32, not hash(), which changes
    per process. Training and evaluation key their rows on it, so a row draws the same tokens in one
    process or on any rank, in any batch."""
    return zlib.crc32(f"{key}\x00{sample}".encode()) & 0x7FFFFFFF


def row_keys(seed: int, row_seeds: torch.Tensor) -> torch.Tensor:
    """[B] int64 row seeds (any int64) -> [B] 32-bit stream keys, mixed with the call's seed."""
    s = hash32(torch.tensor(seed & M32) ^ hash32(torch.tensor((seed >> 32) & M32)))
    return hash32(hash32(row_seeds & M32) ^ hash32((row_seeds >> 32) & M32) ^ s)


def uniforms(keys: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The uniform in (0, 1) of each (stream key, token position): keys and t broadcast -> float32.

    Counter-based (a pure function of key and position, SplitMix-style: the hash of a Weyl
    sequence), so a row draws the same numbers whatever batch, slot or order it is sampled in.
    24 bits, exact in float32, never 0 or 1.
    """
    h = hash32((keys + _mul32(t & M32, 0x9E3779B9)) & M32)
    return ((h >> 8).float() + 0.5) * 2.0 ** -24


def sample_tokens(logits: torch.Tensor, u: torch.Tensor, temperature, top_p=1.0):
    """Inverse-CDF sampling: logits [S, V] (fp32), u [S] -> tokens, log-probs, entropies, each [S].

    Log-prob and entropy are those of softmax(logits / T) over the full vocabulary (T = 1 when
    greedy), the same definition as entropy.response_logprobs, so the trainer can use them as is.
    top_p keeps the smallest set of most likely tokens whose mass reaches top_p (nucleus).
    `temperature` and `top_p` are floats or 0-d tensors: a tensor is read on the device when the
    kernels run, so a compiled step follows its value without recompiling (greedy is the float
    0.0, and a float top_p of 1.0 skips the nucleus, both decided when the step is traced).
    """
    greedy = not torch.is_tensor(temperature) and temperature <= 0
    nucleus = torch.is_tensor(top_p) or top_p < 1.0
    logp = torch.log_softmax(logits / (1.0 if greedy else temperature), dim=-1)          # [S, V]
    p = logp.exp()
    ent = -(p * logp.clamp_min(torch.finfo(logp.dtype).min)).sum(-1)  # 0 * -inf -> 0 for masked-out tokens
    if greedy:
        tok = logits.argmax(-1)
    elif nucleus:
        ps, order = p.sort(-1, descending=True)                                            # [S, V]
        ps = ps.masked_fill(ps.cumsum(-1) - ps >= top_p, 0.0)  # mass before the token already >= top_p
        cdf = ps.cumsum(-1)
        idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_max(p.shape[-1] - 1)
        tok = order.gather(-1, idx).squeeze(-1)
    else:
        cdf = p.cumsum(-1)                                                                  # [S, V]
        tok = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_max(p.shape[-1] - 1).squeeze(-1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1), ent

# ----------------------------------------------------------------------------------------
# torch.compile's build tools


def compile_toolchain_missing(device_type: str) -> str | None:
    """What torch.compile lacks on this machine to build its kernels (None: nothing). Inductor builds
    C++ for CPU kernels; on CUDA, Triton builds a small C launcher per kernel. Both compile against
    Python's headers, so an image without a compiler or python3-dev fails at the first compiled call."""
    if device_type == "cuda":  # Triton's own search: $CC, else gcc, else clang
        names, what = ("gcc", "clang"), "a C compiler (gcc or clang, or $CC), which Triton builds its launchers with"
        env = os.environ.get("CC")
    else:  # Inductor's C++ kernels
        names, what = ("g++", "clang++", "c++"), "a C++ compiler (g++ or clang++, or $CXX) for Inductor's CPU kernels"
        env = os.environ.get("CXX")
    if not (env and shutil.which(env)) and not any(shutil.which(n) for n in names):
        return f"no {what}"
    include = Path(sysconfig.get_paths()["include"])
    if not (include / "Python.h").is_file():
        return f"no Python headers ({include}/Python.h; install python3-dev or python3.X-dev)"
    return None


def resolve_compile(compile: bool | str, device: torch.device) -> bool:
    """Whether the decoding step is compiled. "auto": on CUDA when the build tools are there, else
    eager with one line saying why (the same numbers, slower decoding). True: compile, or a
    ConfigError naming what is missing, before any work rather than at the first decoding call."""
    if compile == "auto":
        if device.type != "cuda":
            return False
        missing = compile_toolchain_missing(device.type)
        if missing:
            print(f"rollout.compile auto: {missing}; the sampler runs eager (same numbers, slower decoding)",
                  flush=True)
        return missing is None
    if compile:
        missing = compile_toolchain_missing(device.type)
        if missing:
            raise ConfigError(f"rollout.compile on: torch.compile needs {missing.removeprefix('no ')}; install it, "
                              f"or sample eager (rollout.compile: auto or off)")
    return bool(compile)

# ----------------------------------------------------------------------------------------
# The slot sampler


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class SlotCache:
    """KV cache of `slots` sequences, each at its own length, preallocated once.

    Per layer: keys and values [slots, kv_heads, length, head_dim] in the sampling dtype. Column c
    of a slot holds position c (no padding). It duck-types the one Cache method attention layers
    call, `update(k, v, layer_idx)`, which returns the keys/values to attend to:
      * prefill (`fill` = [n] slot ids, `src` = [n] prompt of each): the new prompts [m, kv, T, d]
        go to columns 0..T-1 of those slots; a fresh prompt attends to itself only;
      * decode (`fill` is None): one column per slot, at `cols` [S]; attention reads columns
        0..window-1 (the longest live sequence, rounded up).
    """

    def __init__(self, layers: int, slots: int, kv_heads: int, length: int, head_dim: int, dtype, device):
        shape = (slots, kv_heads, length, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        for buf in self.k + self.v:  # a CUDA graph may write them in place (as HF's StaticCache)
            torch._dynamo.mark_static_address(buf)
        self.fill, self.src, self.cols, self.window = None, None, None, length

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self.k[layer_idx], self.v[layer_idx]
        key_states, value_states = key_states.to(k.dtype), value_states.to(v.dtype)
        if self.fill is not None:
            T = key_states.shape[2]
            k[self.fill, :, :T] = key_states[self.src]
            v[self.fill, :, :T] = value_states[self.src]
            return key_states, value_states
        # slot s writes column cols[s]: an index_put_, which compiled graphs keep in place
        # (a scatter_ would be compiled as a copy of the whole buffer)
        slot = torch.arange(k.shape[0], device=k.device)
        k[slot, :, self.cols] = key_states[:, :, 0]                             # [S, kv, d]
        v[slot, :, self.cols] = value_states[:, :, 0]
        return k[:, :, :self.window], v[:, :, :self.window]


def slot_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """HF attention function ("echorl_sdpa") used while the sampler runs an "sdpa" model.

    Decoding (one query per slot): the H / kv query heads that share a kv head are handed to sdpa
    as that head's queries, [S, H, 1, d] -> [S, kv, H / kv, d], so the cached keys and values are
    read as stored. HF's own sdpa does the same, but not under torch.compile, where it repeats
    them per query head: a copy of the whole attended window, 6x the cache reads for Qwen2.5.
    Prefill (several queries) is HF's sdpa unchanged.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    S, H, T, d = query.shape
    if T > 1 or key.shape[1] == H:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(S, key.shape[1], H // key.shape[1], d), key, value, attn_mask=attention_mask,
        scale=scaling)                                                          # [S, kv, H / kv, d]
    return out.reshape(S, 1, H, d), None                                        # [S, T=1, H, d]


def _register_slot_sdpa():
    from transformers import AttentionInterface
    AttentionInterface.register("echorl_sdpa", slot_sdpa)


class Sampler:
    """Batched sampling with the model's own forward, a slot KV cache and continuous refill.

    `slots` sequences decode together (0, or >= rows: all rows at once, i.e. static batching).
    When a row ends (EOS or max_new_tokens) its slot takes the next pending row of the call: a
    prefill of that prompt, then it decodes alongside the others. Refills wait until `refill`
    slots are free (default slots // 8, at least 1): each prefill is one more forward.

    Each row draws from its own counter-based stream (seed, row seed, position), so its tokens do
    not depend on the slot count, the other rows, or the order in which rows finish.

    `compile` ("auto": on CUDA, when the build tools are there; see `resolve_compile`) runs the
    decoding step through `torch.compile(mode="reduce-overhead")`: CUDA graphs replay the ~1,000
    kernels of a step with one launch instead of launching each from Python. Temperature and top-p
    live in device tensors that each call overwrites in place, so a captured graph samples at the
    call's temperature (training at 1.0, evaluation at 0.6) without recompiling.

    The cache stays allocated between calls (CUDA graphs hold its address): slots x columns x
    layers x 2 x kv_heads x head_dim x bytes (Qwen2.5-1.5B in bf16, 128 slots x 3,329 columns:
    12 GB); `release()` frees it. `max_len` (the longest prompt plus the most new tokens the
    sampler will be asked for; train.setup reads it from the data) sizes it once, and every call
    then decodes with all `slots`, as a compiled sampler always does; a call that needs more
    columns, or another slot count, reallocates it (and compiles again), counted in `allocations`.
    Sample without autocast, from weights in the sampling dtype (`sampling_copy`): under autocast
    an fp32 cache would be cast to bf16 at every step.

    `lag` (default: 1 on CUDA, 0 elsewhere): the host learns which rows ended this many steps late,
    from a non-blocking copy of the flags, so it queues the next step while the GPU still runs this
    one; an ended row's slot idles for those steps (its writes go to the sink row) before a refill.

    Model: an HF causal LM whose attention calls `cache.update(k, v, layer_idx)` and uses a 4D
    mask as given (Qwen2, Llama, ...), attention "sdpa" or "eager", no sliding-window layers.
    `logits_processor(logits [S, V], row [S], t [S]) -> logits` may change the logits of row
    `row` before its token `t` is drawn (constraints, forced stops); the stored log-probs are
    those of the processed distribution. Idle slots carry row = B (one past the last row). It
    runs inside the compiled step: tensor ops only, and the same function object across calls
    (a new one compiles again).
    """

    def __init__(self, model, tokenizer, *, slots: int = 0, compile: bool | str = "auto",
                 refill: int | None = None, window: int | None = None, max_len: int | None = None,
                 lag: int | None = None):
        cfg = model.config
        if cfg._attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"Sampler: attention {cfg._attn_implementation!r} is not supported; use 'sdpa' or 'eager'")
        if "sliding_attention" in (getattr(cfg, "layer_types", None) or []):
            raise ValueError("Sampler: sliding-window layers are not supported (the mask is a full causal one)")
        self.model, self.tokenizer, self.slots, self.refill = model, tokenizer, slots, refill
        self.head = model.get_output_embeddings()
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        # logits, log-probs and entropies in fp32, or fp64 for an fp64 model: then the trainer's own
        # pass (entropy.py accumulates the same way) and the sampler agree to fp64 rounding
        self.acc = torch.promote_types(p.dtype, torch.float32)
        self.compiled = resolve_compile(compile, self.device)
        self.max_len, self.allocations = max_len, 0
        self.lag = (1 if self.device.type == "cuda" else 0) if lag is None else lag
        # read by the compiled step as device tensors (their values are not baked into a graph);
        # greedy and nucleus are Python flags: a change there is another graph
        self.temperature = torch.ones((), dtype=self.acc, device=self.device)
        self.top_p = torch.ones((), dtype=self.acc, device=self.device)
        self.greedy = self.nucleus = False
        torch._dynamo.mark_static_address(self.temperature)
        torch._dynamo.mark_static_address(self.top_p)
        # decode attends to the longest live sequence rounded up to this: few distinct shapes (graphs)
        # for the compiled step; eager attends to exactly that length
        self.window = window or (256 if self.compiled else 1)
        self.eos = torch.tensor(eos_ids(tokenizer, model), device=self.device)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(self.eos[0])
        self.cache, self.stats, self.logits_processor = None, {}, None
        self.step = self._decode_step
        if self.compiled:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self.step = torch.compile(self._decode_step, mode=mode)

    def release(self):
        """Free the KV cache (the next call allocates it again)."""
        self.cache = None

    def _attn_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """Bool mask (True = attend) as the attention implementation takes it: as is for sdpa,
        additive (0 / dtype min) for eager."""
        if self.model.config._attn_implementation != "eager":
            return allowed
        return torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device).masked_fill_(
            ~allowed, torch.finfo(self.dtype).min)

    def _sample(self, logits, u, t, row):
        """logits [n, V] (fp32; fp64 for an fp64 model) of rows `row` [n] before their token t [n], uniforms u [n]
        -> tokens, log-probs, entropies [n]."""
        if self.logits_processor is not None:
            logits = self.logits_processor(logits, row, t)
        return sample_tokens(logits, u, 0.0 if self.greedy else self.temperature,
                             self.top_p if self.nucleus else 1.0)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """[n, H] -> [n, V] logits in fp32 (fp64 for an fp64 model), computed as the trainer's LM head
        computes them (entropy.chunk_logits: the same inputs, accumulation and output dtype)."""
        if getattr(self.head, "bias", None) is not None:
            return self.head(h).to(self.acc)
        return chunk_logits(h, self.head.weight, 1.0, h.dtype)

    def _decode_step(self, cur, pos, mask, u, t, row):
        """One token for every slot: input tokens cur [S] at positions pos [S] (= cache columns),
        mask [S, 1, 1, W]. Fixed shapes, no host sync, no data-dependent branch: compiled, one CUDA
        graph per window size W."""
        self.cache.cols, self.cache.window = pos, mask.shape[-1]
        h = self.model.model(input_ids=cur[:, None], attention_mask=mask, position_ids=pos[:, None],
                             cache=self.cache, use_cache=True).last_hidden_state[:, -1]   # [S, H]
        return self._sample(self._logits(h), u, t, row)

    def _prefill(self, slot_ids: list[int], seqs: list[list[int]], src: list[int]) -> torch.Tensor:
        """Write prompt seqs[src[i]] into slot slot_ids[i]; the logits [len(slot_ids), V] of each
        slot's first token. A prompt is run once however many rows (a GRPO group) it starts."""
        n, dev = len(seqs), self.device
        lens = torch.tensor([len(s) for s in seqs], device=dev)                             # [n]
        T = max(len(s) for s in seqs)
        ids = torch.tensor([s + [self.pad_id] * (T - len(s)) for s in seqs], device=dev)    # [n, T] right-padded
        ar = torch.arange(T, device=dev)
        # causal, and keys inside the prompt (pad queries still see the prompt: no empty softmax row)
        allowed = (ar[:, None] >= ar[None, :])[None] & (ar[None, None, :] < lens[:, None, None])  # [n, T, T]
        self.cache.fill, self.cache.src = torch.tensor(slot_ids, device=dev), torch.tensor(src, device=dev)
        h = self.model.model(input_ids=ids, attention_mask=self._attn_mask(allowed[:, None]),
                             position_ids=ar.expand(n, T), cache=self.cache, use_cache=True).last_hidden_state
        logits = self._logits(h[torch.arange(n, device=dev), lens - 1])                       # [n, V]
        self.cache.fill = None
        return logits[self.cache.src]                                                        # [len(slot_ids), V]

    def _cache_for(self, slots: int, length: int) -> SlotCache:
        c = self.cache
        if c is None or c.k[0].shape[0] != slots or c.k[0].shape[2] < length:
            self.cache = None  # free the old one first
            cfg = self.model.config
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            self.cache = SlotCache(cfg.num_hidden_layers, slots, cfg.num_key_value_heads, length, head_dim,
                                   self.dtype, self.device)
            self.allocations += 1
        return self.cache

    @torch.no_grad()
    def generate(self, prompts: list[str] | list[list[int]], **kw) -> Rollout:
        """Sample `group_size` completions of each prompt; rows i*G .. i*G+G-1 answer prompt i.

        A prompt is a text or its token ids (as given: a prefix continued exactly as sampled).
        Arguments: group_size, max_new_tokens (one bound, or one per prompt), temperature (0: greedy),
        top_p, seed, row_seeds, logits_processor. A row's tokens do not depend on its bound, which
        only ends it earlier. Row b's stream is keyed on (seed, row_seeds[b]); row_seeds defaults to
        the row index, and seed to a draw from torch's global RNG (torch.manual_seed fixes it;
        successive calls differ). Key rows on what identifies them (problem id, sample index) to
        make a row's tokens independent of batching and resuming. `stats` then describes the call.
        """
        cfg = self.model.config
        impl = cfg._attn_implementation
        if impl == "sdpa":  # the model attends with slot_sdpa for the duration of the call
            _register_slot_sdpa()
            cfg._attn_implementation = "echorl_sdpa"
        try:
            return self._generate(prompts, **kw)
        finally:
            cfg._attn_implementation = impl

    def _generate(self, prompts: list, *, group_size: int = 1, max_new_tokens: int | list[int], temperature: float,
                  top_p: float = 1.0, seed: int | None = None, row_seeds=None, logits_processor=None) -> Rollout:
        bound = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(bound) != len(prompts) or min(bound, default=1) < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (one bound, or one per prompt), got {max_new_tokens}")
        from torch._dynamo.utils import counters
        graphs0, skips0 = counters["stats"]["unique_graphs"], counters["inductor"]["cudagraph_skips"]
        dev, G, N = self.device, group_size, max(bound, default=1)
        ids = [list(map(int, p)) for p in prompts] if prompts and not isinstance(prompts[0], str) else \
            self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        seqs = [ids[b // G] for b in range(len(prompts) * G)]                # prompt tokens of row b
        B = len(seqs)
        limit = torch.tensor([bound[b // G] for b in range(B)] + [N], device=dev)  # [B + 1] (row B: the sink)
        # compiled or sized (max_len): always `slots` (idle ones write to the sink row), so a smaller call (a
        # DAPO refill, the last eval chunk) reuses the cache and the captured graphs instead of allocating anew
        fixed = self.compiled or self.max_len is not None
        S = B if self.slots <= 0 or (self.slots >= B and not fixed) else self.slots
        refill = self.refill or max(1, S // 8)
        # one spare column: a window never spans the whole buffer, so the compiled step always sees
        # the same memory layout (a window equal to the buffer would be contiguous: a second graph)
        need = max(max(len(s) + bound[b // G] for b, s in enumerate(seqs)), self.max_len or 0)
        cache = self._cache_for(S, _round_up(need, self.window) + 1)
        seed = int(torch.randint(0, 2 ** 62, ()).item()) if seed is None else seed
        keys = row_keys(seed, torch.as_tensor(row_seeds if row_seeds is not None else range(B), dtype=torch.long))
        # every uniform of the call at once, [B + 1, N] (row B: idle slots); a step gathers its [S]
        U = uniforms(torch.cat([keys, keys[:1]]).to(dev)[:, None], torch.arange(N, device=dev)[None, :])
        self.greedy, self.nucleus, self.logits_processor = temperature <= 0, top_p < 1.0, logits_processor
        self.temperature.fill_(temperature if temperature > 0 else 1.0)  # in place: the graphs read this memory
        self.top_p.fill_(top_p)

        # Outputs by row; row B is a sink that idle slots write to, so every step has the same shapes.
        out_tok = torch.full((B + 1, N), self.pad_id, dtype=torch.long, device=dev)
        out_lp = torch.zeros(B + 1, N, device=dev, dtype=self.acc)
        out_ent = torch.zeros(B + 1, N, device=dev, dtype=self.acc)
        # Per-slot state on the device: input token, its position (= its cache column), index of the
        # token to draw next, row (B = idle). Updated in place, never read by the host.
        cur, pos, t = (torch.zeros(S, dtype=torch.long, device=dev) for _ in range(3))
        row = torch.full((S,), B, dtype=torch.long, device=dev)
        cols = torch.arange(cache.k[0].shape[2], device=dev)
        # Host side: which slots hold a row, and where: live slot s is at position offset[s] + n_decode.
        live, offset, free, pending = [False] * S, [0] * S, list(range(S)), deque(range(B))
        n_live = n_fill = n_decode = 0
        t_fill = t_decode = 0.0
        # End-of-row flags of the last `lag` decoding steps, copied to the host without waiting (pinned
        # memory on CUDA); the host reads a step's flags once the next step is queued.
        flags = deque()
        pin = dev.type == "cuda"

        def record(r, tt, tok, lp, ent):  # store the drawn tokens of rows r [n] at positions tt [n]
            out_tok[r, tt], out_lp[r, tt], out_ent[r, tt] = tok, lp, ent
            return torch.isin(tok, self.eos) | (tt + 1 >= limit[r])          # [n] row ends here

        def read_flags(k: int) -> None:  # the host takes note of the rows that ended, oldest step first
            nonlocal n_live, max_off
            for _ in range(k):
                host, ready = flags.popleft()
                if ready is not None:
                    ready.synchronize()
                ended = host.tolist()
                if any(ended):
                    for s in range(S):
                        if ended[s] and live[s]:
                            live[s], n_live = False, n_live - 1
                            free.append(s)
                    max_off = max(o for o, a in zip(offset, live) if a) if n_live else 0

        max_off = 0
        while pending or n_live:
            k = min(len(pending), len(free))
            if k and (len(free) >= min(refill, len(pending)) or not n_live):   # (re)fill k slots
                t0 = time.perf_counter()
                read_flags(len(flags))  # a refilled slot must not be freed by flags of its previous row
                k = min(len(pending), len(free))
                sl, rows = free[:k], [pending.popleft() for _ in range(k)]
                del free[:k]
                s_, r = torch.tensor(sl, device=dev), torch.tensor(rows, device=dev)
                first = {i: j for j, i in enumerate(dict.fromkeys(b // G for b in rows))}  # prompt -> index
                logits = self._prefill(sl, [ids[i] for i in first], [first[b // G] for b in rows])  # [k, V]
                zero = torch.zeros_like(r)
                tok, lp, ent = self._sample(logits, U[r, 0], zero, r)
                done = record(r, zero, tok, lp, ent)
                cur[s_] = tok
                pos[s_] = torch.tensor([len(seqs[b]) for b in rows], device=dev).masked_fill(done, 0)
                t[s_], row[s_] = (~done).long(), r.masked_fill(done, B)
                for s, b, d in zip(sl, rows, done.tolist()):
                    if d:
                        free.append(s)
                    else:
                        live[s], offset[s], n_live = True, len(seqs[b]) - n_decode, n_live + 1
                max_off = max(o for o, a in zip(offset, live) if a) if n_live else 0
                n_fill += 1
                t_fill += time.perf_counter() - t0
                continue
            t0 = time.perf_counter()
            W = _round_up(max_off + n_decode + 1, self.window)
            mask = self._attn_mask((cols[:W][None, :] <= pos[:, None])[:, None, None, :])   # [S, 1, 1, W]
            if self.compiled:
                torch._dynamo.maybe_mark_dynamic(mask, 3)  # one graph for every window size
                torch.compiler.cudagraph_mark_step_begin()
            tok, lp, ent = self.step(cur, pos, mask, U[row, t], t, row)
            done = record(row, t, tok, lp, ent)
            cur.copy_(tok)
            row.masked_fill_(done, B)
            idle = row == B
            pos.add_(1).masked_fill_(idle, 0)
            t.add_(1).masked_fill_(idle, 0)
            n_decode += 1
            if pin:
                host = torch.empty(S, dtype=torch.bool, pin_memory=True).copy_(done, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record()
            else:
                host, ready = done, None
            flags.append((host, ready))
            read_flags(len(flags) - self.lag)
            t_decode += time.perf_counter() - t0
        flags.clear()

        resp = out_tok[:B]
        beyond = torch.arange(N, device=dev)[None, :] >= limit[:B, None]       # past a row's own bound: padding,
        mask, truncated = response_mask_from_ids(resp.masked_fill(beyond, -1), self.eos.tolist())  # never an EOS
        mask = mask.masked_fill(beyond, 0.0)
        R = int(mask.sum(-1).max())
        resp, mask = resp[:, :R], mask[:, :R]
        P = max(map(len, seqs))
        prompt_ids = torch.tensor([[self.pad_id] * (P - len(s)) + s for s in seqs], device=dev)   # [B, P] left-padded
        prompt_mask = torch.tensor([[0] * (P - len(s)) + [1] * len(s) for s in seqs], device=dev)
        tokens = int(mask.sum())
        steps = n_fill + n_decode
        self.stats = {"rows": B, "slots": S, "steps": steps, "prefills": n_fill, "decode_steps": n_decode,
                      "tokens": tokens, "efficiency": tokens / (steps * S), "prefill_s": t_fill,
                      "decode_s": t_decode, "tokens_per_s": tokens / max(t_fill + t_decode, 1e-9),
                      "ms_per_step": 1000 * t_decode / max(n_decode, 1),
                      # torch's own counters: graphs compiled by this call (0 once warm) and CUDA graph
                      # captures skipped (anything but 0: the compiled step runs without CUDA graphs)
                      "recompiles": counters["stats"]["unique_graphs"] - graphs0,
                      "cudagraph_skips": counters["inductor"]["cudagraph_skips"] - skips0}
        return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=resp, response_mask=mask,
                       truncated=truncated, group=torch.arange(B, device=dev) // G,
                       texts=self.tokenizer.batch_decode(resp, skip_special_tokens=True),
                       sample_logprobs=out_lp[:B, :R], sample_entropies=out_ent[:B, :R])

# ----------------------------------------------------------------------------------------
# Sampling weights: a low-precision twin of the policy, refreshed in place after each update


def sampler_mismatch(batch: Rollout) -> dict:
    """How far the sampler's log-probs are from the old policy's (policy tokens): mean and max |diff|
    and the k3 estimate of KL(sampler || trainer) with r = pi_old / pi_sampler: mean(r - 1 - log r)."""
    m = batch.policy_mask.bool()
    if not m.any():
        return {}
    d = (batch.old_logprobs - batch.sample_logprobs)[m]                              # log r
    n = float(m.sum())
    return {"sampler/logprob_abs_diff": Mean(float(d.abs().mean()), n), "sampler/logprob_max_diff": Max(d.abs().max()),
            "sampler/kl_k3": Mean(float((d.exp() - 1 - d).mean()), n)}


def sampling_copy(model, dtype: torch.dtype, always: bool = False):
    """The weights to sample with: `model` itself when its parameters already have `dtype` (and not
    `always`: under torchrun the policy is about to be sharded, sampling needs full weights), else a
    copy with parameters cast to `dtype` (buffers such as RoPE frequencies keep their dtype).

    Memory: one more set of parameters at dtype's width, i.e. 2 bytes per parameter for bf16
    (3.1 GB for Qwen2.5-1.5B) next to the fp32 policy's 4 (+ 8 for AdamW states, + 4 for
    gradients); no gradients or optimizer states for the copy. Sampling then runs without
    autocast, and the KV cache is in the copy's dtype.
    """
    if not always and all(p.dtype == dtype for p in model.parameters()):
        return model
    with torch.device("meta"):
        twin = type(model)(copy.deepcopy(model.config))
    twin = twin.to(dtype).to_empty(device=next(model.parameters()).device)
    src = dict(model.named_modules())
    for name, mod in twin.named_modules():
        for b, buf in src[name]._buffers.items():
            mod._buffers[b] = None if buf is None else buf.clone()
    twin.tie_weights()
    twin.eval().requires_grad_(False)
    return refresh_sampling_copy(twin, model)


@torch.no_grad()
def refresh_sampling_copy(twin, model):
    """Copy the policy's current parameters into `twin` in place (cast, device to device); the
    addresses stay the same, so captured CUDA graphs stay valid. Call after each update (before the next rollout)."""
    if twin is model:
        return twin
    src = dict(model.named_parameters())
    for name, p in twin.named_parameters():
        p.copy_(src[name])
    return twin


# ----------------------------------------------------------------------------------------
# One-off generation: the slot sampler (default) or HF generate (the reference, hf_generate.py)

@torch.no_grad()
def generate(model, tokenizer, prompts: list[str] | list[list[int]], *, group_size: int,
             max_new_tokens: int | list[int], temperature: float, top_p: float = 1.0, batch_size: int | None = None,
             engine: str = "slots", seed: int | None = None, row_seeds=None, logits_processor=None,
             compile: bool | str = False, return_logprobs: bool = False) -> Rollout:
    """Sample `group_size` completions of each prompt; rows i*G .. i*G+G-1 answer prompt i.

    temperature == 0 -> greedy. `batch_size` bounds the sequences decoded at once (the slot
    count of the "slots" engine; the batch of each call of the "hf" engine). A one-off `Sampler`
    is built per call, so compilation is off by default here: a caller that samples repeatedly
    on a GPU should hold a `Sampler` (compiled once, its CUDA graphs reused across calls).
    `seed`, `row_seeds`, `logits_processor` and `compile` are the sampler's (see
    `Sampler.generate`), as are token-id prompts and one `max_new_tokens` per prompt;
    `return_logprobs` is the "hf" engine's (the sampler always returns them).
    """
    if engine == "hf":
        return generate_hf(model, tokenizer, prompts, group_size=group_size, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p, batch_size=batch_size,
                           return_logprobs=return_logprobs)
    if engine != "slots":
        raise ValueError(f"unknown generation engine {engine!r}; allowed: 'slots', 'hf'")
    sampler = Sampler(model, tokenizer, slots=batch_size or 0, compile=compile)
    return sampler.generate(prompts, group_size=group_size, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p, seed=seed, row_seeds=row_seeds, logits_processor=logits_processor)
