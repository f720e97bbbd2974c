"""Generation throughput: HF `generate` (static batches) vs the slot sampler (sampler.Sampler).

Workloads (CPU, the tiny default):
  tiny       the warm-started tiny model's own rollouts with configs/tiny.yaml's settings:
             32 prompts x G=8, max_new_tokens 48, temperature 1 (both engines stop where the model
             says EOS, so their token counts differ a little).
  long-tail  the same model and prompts, max_new_tokens 256, EOS forced at lengths drawn from a
             log-normal (median 24: most rows stop early, a few run to the limit), identically for
             both engines (HF through a LogitsProcessor, the sampler through its hook): the same
             useful tokens, so tokens/s compare the engines alone.
Every variant runs in a fresh process (peak memory = its own); a warm-up call (compiled variants:
the full call, i.e. compilation and CUDA graph capture; others: 8 tokens), then the median of
--repeats calls. Decode efficiency = useful tokens / (steps x rows decoded at once), where a
step is one forward that draws a token for every row in the batch (HF: one per response column;
the sampler: decode steps plus (re)fill prefills). ms/step = wall time / steps.

--gpu-check: the Qwen2.5-Math-1.5B shape (random init, bf16, real tokenizer), 128 rows, 1,024 new
tokens, long-tailed stops: HF generate vs the sampler eager / compiled (CUDA graphs), static and
with refill. About 5 minutes on one H200; --budget-s skips what would not fit. What it checks
besides speed: the forced lengths are reproduced, the sampler's log-probs match the trainer's
teacher-forced pass (bf16 noise, ~1e-2), "cudagraph skips 0", a few unique graphs (one per slot
count), and the compiled step's ms/step far below the eager one's.

Usage (from the repo root):
    python benchmarks/bench_generate.py [--quick] [--threads 2] [--repeats 3]
    python benchmarks/bench_generate.py --gpu-check
    python benchmarks/bench_generate.py --gpu-check --device cpu --layers 2 --rows 8 --max-new-tokens 16  # smoke
"""
from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from _common import (ROOT, PeakMemory, cached_warm_model, clock, isolated, machine, median,  # noqa: E402
                     resolve_device, table, tiny_config)

HEADERS = ["workload", "engine", "rows at once", "compile", "tokens", "tok/s", "x HF", "efficiency",
           "ms/step", "steps", "peak MiB", "warm-up s"]

# ----------------------------------------------------------------------------------------
# Forced stops: the same lengths for both engines


def stop_lengths(n: int, max_new: int, median_len: float, seed: int = 0) -> list[int]:
    """n response lengths, log-normal (sigma 1) around `median_len`, clipped to [1, max_new]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.exp(math.log(median_len) + torch.randn(n, generator=g))
    return x.round().clamp(1, max_new).long().tolist()


def _force(logits, t, stop_at, is_eos):
    """EOS only at t + 1 == stop_at, banned before: logits [n, V], t and stop_at [n], is_eos [V]."""
    stop = (t + 1 == stop_at)[:, None]
    return logits.masked_fill((stop & ~is_eos) | (~stop & is_eos), float("-inf"))


def sampler_hook(lengths: list[int], eos: list[int], vocab: int, device):
    """sampler.Sampler logits_processor: row b ends at lengths[b] (idle slots carry row B)."""
    table_ = torch.tensor(lengths + [1], device=device)
    is_eos = torch.zeros(vocab, dtype=torch.bool, device=device)
    is_eos[eos] = True
    return lambda logits, row, t: _force(logits, t, table_[row], is_eos)


class HFForcedStop:
    """The same rule as an HF LogitsProcessor for rows `lengths` of one generate call."""

    def __init__(self, lengths: list[int], eos: list[int], vocab: int, device):
        self.stop_at = torch.tensor(lengths, device=device)
        self.is_eos = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.is_eos[eos] = True
        self.P = None

    def __call__(self, input_ids, scores):          # [b, P + t], [b, V]
        self.P = self.P or input_ids.shape[1]        # the first call sees the prompts only
        t = torch.full_like(self.stop_at, input_ids.shape[1] - self.P)
        return _force(scores, t, self.stop_at, self.is_eos)

# ----------------------------------------------------------------------------------------
# One generation call of each engine -> tokens, steps, slot-steps


def run_hf(model, tok, prompts, G, max_new, temperature, batch, lengths):
    from transformers import LogitsProcessorList

    from rollout import eos_ids
    from hf_generate import generate_hf
    eos, V = eos_ids(tok, model), model.config.vocab_size
    tokens = steps = slot_steps = 0
    per = max(1, batch // G)                      # whole groups per call
    for i in range(0, len(prompts), per):
        rows = range(i * G, min(i + per, len(prompts)) * G)
        proc = None if lengths is None else LogitsProcessorList(
            [HFForcedStop([lengths[b] for b in rows], eos, V, model.device)])
        r = generate_hf(model, tok, prompts[i:i + per], group_size=G, max_new_tokens=max_new,
                        temperature=temperature, logits_processor=proc)
        tokens += int(r.response_mask.sum())
        steps += r.response_ids.shape[1]
        slot_steps += r.response_ids.shape[1] * len(r)
    return {"tokens": tokens, "steps": steps, "efficiency": tokens / slot_steps}, r


def run_slots(sampler, prompts, G, max_new, temperature, hook):
    r = sampler.generate(prompts, group_size=G, max_new_tokens=max_new, temperature=temperature, seed=0,
                         logits_processor=hook)
    s = sampler.stats
    return {"tokens": s["tokens"], "steps": s["steps"], "efficiency": s["efficiency"]}, r


def measure(call, warm, device: str, repeats: int) -> dict:
    """A warm-up call `warm()`, then the median of `repeats` calls. Peak memory: CPU, above the
    process's resident set before the calls; CUDA, all allocated tensors (weights included)."""
    t0 = clock(device)
    warm()
    first = clock(device) - t0
    times = []
    with PeakMemory(device) as pm:
        for _ in range(repeats):
            t0 = clock(device)
            out, r = call()
            times.append(clock(device) - t0)
    wall = median(times)
    return {**out, "tok/s": out["tokens"] / wall, "ms/step": 1000 * wall / out["steps"],
            "peak MiB": pm.peak_mib if device == "cpu" else pm.total_mib, "warm-up s": first, "rollout": r}

# ----------------------------------------------------------------------------------------
# CPU: the tiny default


def tiny_variant(spec: dict) -> dict:
    """One (workload, engine, rows at once, compile) cell, in its own process."""
    import train
    from models import load_policy
    from rollout import eos_ids, render_prompts
    from sampler import Sampler
    torch.set_num_threads(spec["threads"])
    cfg = tiny_config()
    model, tok = load_policy(spec["model"], cfg, torch.device("cpu"))
    model.eval()
    problems = train.train_stream(cfg).next(cfg.rollout.prompts_per_step)
    prompts = render_prompts([p.question for p in problems], tok, cfg.data.template, cfg.data.system_prompt)
    G, T = cfg.rollout.group_size, cfg.rollout.temperature
    max_new = cfg.rollout.max_new_tokens if spec["workload"] == "tiny" else 256
    lengths = None if spec["workload"] == "tiny" else stop_lengths(len(prompts) * G, max_new, 24.0)
    B = len(prompts) * G
    batch = spec["batch"] or B
    torch.manual_seed(0)
    if spec["engine"] == "hf":
        call = lambda n=max_new: run_hf(model, tok, prompts, G, n, T, batch, lengths and [min(x, n) for x in lengths])
    else:
        sampler = Sampler(model, tok, slots=batch, compile=spec["compile"])
        hook = None if lengths is None else sampler_hook(lengths, eos_ids(tok, model), model.config.vocab_size, "cpu")
        call = lambda n=max_new: run_slots(sampler, prompts, G, n, T, hook)

    def warm():
        if not spec["compile"]:
            return call(8)
        call()
        sampler.release()  # no CUDA graphs on CPU: the measured calls allocate (and count) the cache
    out = measure(call, warm, "cpu", spec["repeats"])
    r = out.pop("rollout")
    out["digest"] = hashlib.sha1(r.response_ids.numpy().tobytes()).hexdigest()[:12]
    return out


def cpu_main(args):
    cfg = tiny_config()
    path = cached_warm_model(cfg)
    if path is None:
        import models
        print("warm start not cached: building it (models.model_source, 1-2 minutes)", flush=True)
        path = models.model_source(cfg)
    B = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    cells = [("hf", B, False), ("hf", 64, False), ("slots", B, False), ("slots", 64, False), ("slots", 32, False)]
    if args.quick:
        cells, args.repeats = [cells[0], cells[2], cells[3]], 1
    elif not args.no_compile:
        cells += [("slots", B, True), ("slots", 64, True)]
    threads = args.threads or cfg.train.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    print(machine("cpu"))
    print(f"model: warm-started tiny {path}; {cfg.rollout.prompts_per_step} prompts x G={cfg.rollout.group_size} "
          f"= {B} rows, temperature {cfg.rollout.temperature}; median of {args.repeats} calls after a warm-up",
          flush=True)
    rows, digests = [], {}
    for workload in ("tiny", "long-tail"):
        base = None
        for engine, batch, comp in cells:
            spec = {"model": str(path), "workload": workload, "engine": engine, "batch": batch, "compile": comp,
                    "threads": threads, "repeats": args.repeats}
            out = isolated(tiny_variant, spec)
            if engine == "slots":
                label = f"{'all' if batch == B else batch} slots, compile {'on' if comp else 'off'}"
                digests.setdefault(workload, {}).setdefault(out["digest"], []).append(label)
            base = base or out["tok/s"]
            rows.append([workload, engine, "all" if batch == B else batch, "on" if comp else "off", out["tokens"],
                         out["tok/s"], out["tok/s"] / base, out["efficiency"], out["ms/step"], out["steps"],
                         out["peak MiB"], out["warm-up s"]])
            print(" | ".join(map(str, rows[-1])), flush=True)
    print()
    print(table(HEADERS, rows))
    for workload, d in digests.items():  # per-row streams: the slot count must not change a token
        groups = "; ".join(f"{digest}: {', '.join(labels)}" for digest, labels in d.items())
        print(f"{workload}: {len(d)} distinct token digest(s) over the sampler variants ({groups})")

# ----------------------------------------------------------------------------------------
# GPU check: the real Qwen2.5-Math-1.5B shape


def qwen_model(model_dir: str, device: str, dtype, layers: int = 0):
    """Random-init Qwen2 from the folder's config.json, built on `device` in `dtype` (`layers` > 0
    keeps that many layers: a CPU smoke test); the folder's real tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from rollout import load_tokenizer
    cfg = AutoConfig.from_pretrained(model_dir)
    cfg._attn_implementation = "sdpa"
    if layers:
        cfg.num_hidden_layers = layers
        cfg.layer_types = cfg.layer_types[:layers] if getattr(cfg, "layer_types", None) else None
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval(), load_tokenizer(model_dir)


def gpu_main(args):
    import tiny
    from entropy import response_logprobs
    from rollout import eos_ids, render_prompts
    from sampler import Sampler
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t_start = time.perf_counter()
    print(machine(device), flush=True)
    model, tok = qwen_model(args.model_dir, device, dtype, args.layers)
    n_params = sum(p.numel() for p in model.parameters())
    G = 8
    questions = [p.question for p in tiny.make_split(tiny.TinyConfig(), args.rows // G, "heldout")]
    prompts = render_prompts(questions, tok, "chat", "Please reason step by step, and put your final answer "
                                                      "within \\boxed{}.")
    B, N = len(prompts) * G, args.max_new_tokens
    lengths = stop_lengths(B, N, args.median or N / 8)
    eos, V = eos_ids(tok, model), model.config.vocab_size
    print(f"random-init {n_params / 1e9:.3f} B parameters ({model.config.num_hidden_layers} layers), {dtype}, "
          f"{B} rows, max_new_tokens {N}, forced lengths: median {median(lengths):.0f}, mean "
          f"{sum(lengths) / B:.0f}, {sum(x == N for x in lengths)} at the limit", flush=True)

    cells = [("hf", B, False), ("slots", B, True), ("slots", B // 2, True), ("slots", B, False)]
    rows, base, ref = [], None, {}
    for engine, slots, comp in cells:
        if time.perf_counter() - t_start > args.budget_s:
            print(f"budget of {args.budget_s} s spent: skipping {engine} slots={slots} compile={comp}", flush=True)
            continue
        torch.manual_seed(0)
        if engine == "hf":
            def call(n=N):
                return run_hf(model, tok, prompts, G, n, 1.0, B, [min(x, n) for x in lengths])
        else:
            engine_ = Sampler(model, tok, slots=slots, compile=comp)
            hook = sampler_hook(lengths, eos, V, device)  # one hook object: no recompilation per call

            def call(n=N, engine_=engine_, hook=hook):
                return run_slots(engine_, prompts, G, n, 1.0, hook)
        # compiled: the full call, so that every window size is compiled and captured before timing
        def short(call=call):
            return call(8)
        out = measure(call, call if comp else short, device, args.repeats)
        r = out.pop("rollout")
        assert r.response_lengths.long().tolist() == lengths, "forced lengths not reproduced"
        base = base or out["tok/s"]
        rows.append(["long-tail", engine, "all" if slots == B else slots, "on" if comp else "off", out["tokens"],
                     out["tok/s"], out["tok/s"] / base, out["efficiency"], out["ms/step"], out["steps"],
                     out["peak MiB"], out["warm-up s"]])
        print(" | ".join(map(str, rows[-1])), flush=True)
        if engine == "slots":
            ref[(slots, comp)] = r
            sub = r.select(torch.arange(min(B, 16)))
            with torch.no_grad():  # the trainer's teacher-forced pass scores what the sampler drew
                lp, _ = response_logprobs(model, sub, chunk_size=2048)
            # tokens the hook left alone (it forced each row's last one; banning EOS moves the rest by ~p(EOS))
            free = sub.response_mask.clone()
            free[torch.arange(len(sub)), sub.response_lengths.long() - 1] = 0
            d = ((lp - sub.sample_logprobs) * free).abs().max().item()
            print(f"  max |sample log-prob - teacher-forced| over 16 rows: {d:.3g} ({dtype})", flush=True)
            engine_.release()
        del call, r
        if device == "cuda":
            torch.cuda.empty_cache()
    print()
    print(table(HEADERS, rows))
    a, b = ref.get((B, True)), ref.get((B, False))
    if a is not None and b is not None:
        same = sum(torch.equal(x, y) for x, y in zip(a.response_ids, b.response_ids))
        print(f"rows with identical tokens, compiled vs eager: {same}/{B} (they may drift apart after a low-"
              f"precision near-tie; their lengths are forced)")
    from torch._dynamo.utils import counters
    print(f"dynamo: unique graphs {counters['stats']['unique_graphs']}, "
          f"cudagraph skips {counters['inductor']['cudagraph_skips']} (0 expected: a skip means no CUDA graphs)")
    print(f"total {time.perf_counter() - t_start:.0f} s")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU: HF vs sampler static and 64 slots, 1 call (smoke)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (default: configs/tiny.yaml's)")
    ap.add_argument("--no-compile", action="store_true", help="CPU: skip the compiled sampler variants")
    ap.add_argument("--gpu-check", action="store_true", help="Qwen2.5-Math-1.5B shape on a GPU (see above)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="--gpu-check device")
    ap.add_argument("--model-dir", default=str(ROOT.parent / "shared" / "models" / "qwen2.5-math-1.5b"))
    ap.add_argument("--layers", type=int, default=0, help="--gpu-check: keep this many layers (smoke test)")
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--median", type=float, default=0, help="median forced length (default max_new_tokens / 8)")
    ap.add_argument("--budget-s", type=float, default=420, help="--gpu-check: skip variants once this is spent")
    args = ap.parse_args(argv)
    if args.gpu_check:
        args.repeats = min(args.repeats, 1)
        gpu_main(args)
    else:
        cpu_main(args)


if __name__ == "__main__":
    main()
