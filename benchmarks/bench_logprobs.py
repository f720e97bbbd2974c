"""Peak memory and time of chunked log-probs/entropy vs the naive full-logits computation.

README pitfall 6: the logits tensor [N, V] dominates memory (V = 151,936 for Qwen2.5).
`entropy.token_logprobs_entropy` runs the LM head + log-softmax over chunks of tokens (and
recomputes each chunk in the backward), so only one chunk of logits is alive at a time. The
naive baseline builds the whole thing: `logits = hidden @ W.T`, `.float()`, `log_softmax`,
gather, `-(p * logp).sum(-1)`.

Two passes, as the training loop runs them:
  fwd      no grad, log-probs + entropies (the old-policy pass)
  fwd+bwd  log-probs only, backward to hidden and W (the training pass)

Usage (from the repo root):
    python benchmarks/bench_logprobs.py [--quick] [--device cpu|cuda] [--dtype fp32|bf16] [--chunk 256,1024]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from _common import PeakMemory, clock, isolated, machine, median, resolve_device, table  # noqa: E402
from entropy import token_logprobs_entropy  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def inputs(s: dict):
    """hidden [B, T, H], W [V, H], targets [B, T]; the same for every variant (seeded)."""
    g = torch.Generator().manual_seed(s["seed"])
    dt = DTYPES[s["dtype"]]
    hidden = torch.randn(s["B"], s["T"], s["H"], generator=g).to(s["device"], dt)
    weight = (0.02 * torch.randn(s["V"], s["H"], generator=g)).to(s["device"], dt)  # logits std ~ 0.8 at H=1536
    targets = torch.randint(0, s["V"], (s["B"], s["T"]), generator=g).to(s["device"])
    return hidden, weight, targets


def naive(hidden, weight, targets, with_entropy: bool):
    logits = (hidden @ weight.T).float()                                         # [B, T, V]
    logp = torch.log_softmax(logits, dim=-1)
    tok = logp.gather(-1, targets[..., None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1) if with_entropy else torch.zeros_like(tok)
    return tok, ent


def compute(s: dict, hidden, weight, targets, train: bool):
    """One pass of variant s; for the training pass, backward of the mean log-prob."""
    if s["variant"] == "naive":
        fn = lambda: naive(hidden, weight, targets, with_entropy=not train)
    else:
        fn = lambda: token_logprobs_entropy(hidden, weight, targets, chunk_size=s["chunk"], with_entropy=not train)
    if not train:
        with torch.no_grad():
            return fn()
    logp, ent = fn()
    logp.mean().backward()
    return logp.detach(), ent


def run_variant(s: dict) -> dict:
    """Warm-up + timed repeats of one (variant, pass); peak memory above the allocated inputs."""
    if s["threads"]:
        torch.set_num_threads(s["threads"])
    hidden, weight, targets = inputs(s)
    train = s["pass"] == "fwd+bwd"
    hidden.requires_grad_(train)
    weight.requires_grad_(train)
    times = []
    try:
        for _ in range(s["warmup"]):  # first calls load code and set up autograd: outside the probe
            compute(s, hidden, weight, targets, train)
            hidden.grad = weight.grad = None
        with PeakMemory(s["device"]) as pm:  # the peak includes the grads of hidden and W
            for _ in range(s["repeats"]):
                t0 = clock(s["device"])
                compute(s, hidden, weight, targets, train)
                times.append(clock(s["device"]) - t0)
                hidden.grad = weight.grad = None
    except torch.OutOfMemoryError:
        return {"oom": True}
    return {"oom": False, "times": times, "peak_mib": pm.peak_mib}


def agreement(base: dict, chunk: int) -> dict:
    """Max abs differences chunked - naive: log-probs and entropies (fwd), grads of hidden and W (fwd+bwd)."""
    hidden, weight, targets = inputs(base)
    out = {}
    c = {**base, "variant": "chunked", "chunk": chunk}
    n = {**base, "variant": "naive"}
    (lp_c, ent_c), (lp_n, ent_n) = compute(c, hidden, weight, targets, False), compute(n, hidden, weight, targets, False)
    out["logp"], out["entropy"] = (lp_c - lp_n).abs().max().item(), (ent_c - ent_n).abs().max().item()
    del lp_n, ent_n
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    compute(c, hidden, weight, targets, True)
    gh, gw = hidden.grad, weight.grad
    hidden.grad = weight.grad = None
    compute(n, hidden, weight, targets, True)
    out["grad_hidden"] = (gh.float() - hidden.grad.float()).abs().max().item()
    out["grad_W"] = (gw.float() - weight.grad.float()).abs().max().item()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds (smoke test)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--dtype", choices=list(DTYPES), help="hidden and W dtype (default: bf16 on cuda, fp32 on cpu)")
    ap.add_argument("--vocab", type=int, default=151936, help="Qwen2.5's vocabulary")
    ap.add_argument("--hidden", type=int, default=1536, help="Qwen2.5-1.5B's hidden size")
    ap.add_argument("--batch", type=int, help="sequences (default: 4 on cpu, 8 on cuda)")
    ap.add_argument("--seq", type=int, help="tokens per sequence (default: 512 on cpu, 1024 on cuda)")
    ap.add_argument("--chunk", default="1024", help="comma-separated chunk sizes of the chunked variant")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch default")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    B = args.batch or (8 if device == "cuda" else 4)
    T = args.seq or (1024 if device == "cuda" else 512)
    V, H, chunks, repeats = args.vocab, args.hidden, [int(c) for c in args.chunk.split(",")], args.repeats
    if args.quick:
        B, T, V, H, chunks, repeats = 2, 64, 32000, 256, [32], 2
    base = dict(device=device, dtype=dtype, B=B, T=T, V=V, H=H, repeats=repeats, warmup=args.warmup,
                threads=args.threads, seed=args.seed)

    print(machine(device))
    N = B * T
    print(f"sizes: {B} x {T} = {N} tokens, vocab {V}, hidden {H}, hidden/W dtype {dtype} (log-softmax in fp32); "
          f"one fp32 [N, V] tensor = {N * V * 4 / 2**20:.0f} MiB, one chunk = "
          + ", ".join(f"{min(c, N) * V * 4 / 2**20:.0f} MiB (chunk {c})" for c in chunks))
    print(f"peak MiB = peak {'allocated CUDA memory' if device == 'cuda' else 'resident set (fresh process per row, malloc set to unmap freed blocks)'}"
          f" above the allocated inputs; median of {repeats} repeats after {args.warmup} warm-up")

    specs = [{**base, "variant": "naive", "chunk": 0, "pass": p} for p in ("fwd", "fwd+bwd")]
    specs += [{**base, "variant": "chunked", "chunk": c, "pass": p} for c in chunks for p in ("fwd", "fwd+bwd")]
    results = []
    for s in tqdm(specs, desc="variants"):
        results.append(run_variant(s) if device == "cuda" else isolated(run_variant, s))

    ref = {s["pass"]: r for s, r in zip(specs, results) if s["variant"] == "naive"}
    rows = []
    for s, r in zip(specs, results):
        name = "naive" if s["variant"] == "naive" else f"chunked ({s['chunk']})"
        if r["oom"]:
            rows.append([name, s["pass"], "OOM", "OOM", "-", "-"])
            continue
        t, m, nv = median(r["times"]), r["peak_mib"], ref[s["pass"]]
        rt = f"{t / median(nv['times']):.3f}" if not nv["oom"] else "-"
        rm = f"{m / nv['peak_mib']:.3f}" if not nv["oom"] and nv["peak_mib"] > 0 else "-"
        rows.append([name, s["pass"], t, round(m, 1), rt, rm])
    print()
    print(table(["variant", "pass", "median s", "peak MiB", "time vs naive", "memory vs naive"], rows))

    print()
    try:
        for c in chunks:
            d = agreement(base, c)
            print(f"agreement chunked ({c}) vs naive, max abs diff: " + ", ".join(f"{k} {v:.3g}" for k, v in d.items()))
    except torch.OutOfMemoryError:
        print("agreement: skipped, the naive computation does not fit in device memory")


if __name__ == "__main__":
    main()
