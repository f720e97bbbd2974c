"""The update alone (forward + backward of every micro-batch of a step), padded reference vs packed forward.

    tiny       the tiny default's batch (configs/tiny.yaml: 32 prompts x G = 8, max_new_tokens 48), sampled
               and scored by the warm start, with its old log-probs and EchoClips: train.update's work
               without the optimizer step (weights stay fixed, so every round does the same work)
    long-tail  the same prompts and model, responses of random tokens whose lengths are log-normal
               (sigma 1) around a median of 32, clipped to [1, 8 x median] (as bench_generate.py's)

Per workload the two paths alternate for --rounds rounds in one process (reference, packed, reference,
...) and the table gives each one's median seconds, the ratio, and the share of padded positions:
the reference forwards [b, P + R] per micro-batch; the packed forward runs the dense layers on real
tokens only (each distinct prompt once) and pads only inside attention blocks.

    python benchmarks/bench_update.py [--rounds 5] [--threads 2] [--quick]
--quick: a random tiny model (no warm start needed) and 2 rounds.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from _common import cached_warm_model, machine, median, random_model_dir, table, tiny_config  # noqa: E402


def long_tail(batch, tok, median_len: int, seed: int = 0):
    """The batch's prompts with random responses of log-normal lengths (median `median_len`, at most 8x)."""
    g = torch.Generator().manual_seed(seed)
    B, R = len(batch), 8 * median_len
    L = torch.exp(math.log(median_len) + torch.randn(B, generator=g)).round().clamp(1, R).long()   # [B]
    mask = (torch.arange(R)[None] < L[:, None]).float()                                           # [B, R]
    ids = torch.randint(len(tok.get_vocab()) // 4, len(tok.get_vocab()), (B, R), generator=g)
    out = batch.select(torch.arange(B))
    out.response_ids, out.response_mask = ids.masked_fill(mask == 0, tok.pad_token_id), mask
    out.truncated = L == R
    for k in ("old_logprobs", "entropies", "sample_logprobs", "sample_entropies", "clip_mask", "ref_logprobs"):
        setattr(out, k, None)
    out.old_logprobs = torch.full((B, R), -2.0) * mask
    return out


def padding(batch, slices) -> tuple[float, float, float]:
    """(padded share of the reference's positions, packed positions / reference positions, padded share of
    the packed attention blocks' query slots)."""
    import packing
    ref = real = packed = slots = 0
    for rows in slices:
        mb = batch.select(rows)
        ref += mb.input_ids.numel()
        real += int(mb.prompt_mask.sum() + mb.response_mask.sum())
        lay = packing.layout(mb)
        packed += len(lay.input_ids)
        slots += sum(q.numel() for q, _, _ in lay.blocks)
    return 1 - real / ref, packed / ref, 1 - packed / slots


def measure(run, batch, rounds: int) -> tuple[float, float]:
    """Median seconds of one update's gradients, reference then packed, alternating."""
    import train
    cfg = run.cfg
    keep = batch.in_policy > 0
    if batch.clip_mask is not None:
        keep = keep | (batch.clip_mask.sum(-1) > 0)
    minis = train.update_slices(batch.in_policy, cfg, keep)
    times = {False: [], True: []}
    run.model.train()
    for r in range(rounds + 1):                      # round 0 warms both paths up
        for pack in (False, True):
            cfg.train.pack = pack
            t0 = time.perf_counter()
            for micro in minis:
                run.model.zero_grad(set_to_none=True)
                train.accumulate_gradients(run.model, batch, micro, cfg)
            if r:
                times[pack].append(time.perf_counter() - t0)
    cfg.train.pack = True
    run.model.zero_grad(set_to_none=True)
    return median(times[False]), median(times[True])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--median", type=int, default=32, help="long-tail: median response length")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import train
    cfg = tiny_config(["train.device=cpu", f"train.threads={args.threads}", "reward.workers=1"])
    rounds = 2 if args.quick else args.rounds
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick or cached_warm_model(cfg) is None:
            cfg.model.name_or_path = str(random_model_dir(cfg, Path(tmp)))
        run = train.setup(cfg)
    print(machine("cpu"))
    print(f"model: {'random' if args.quick or cfg.model.name_or_path != 'tiny' else 'warm-started'} tiny; "
          f"{cfg.rollout.prompts_per_step} prompts x G={cfg.rollout.group_size}, micro-batch {cfg.train.micro_batch_size}, "
          f"{cfg.train.mini_batches} mini-batches, EchoRL {'on' if cfg.echo.enabled else 'off'}; "
          f"median of {rounds} alternating rounds after a warm-up")
    batch = train.collect(run, {}, {})
    train.compute_advantages(batch, cfg)
    train.old_policy(run, batch)
    if cfg.echo.enabled:
        train.echo_clips(batch, cfg, run.delims, run.eos, run.gen)
    tail = long_tail(batch, run.tok, args.median)
    rows = []
    for name, b in (("tiny", batch), ("long-tail", tail)):
        slices = [rows_ for mini in train.update_slices(b.in_policy, cfg) for rows_ in mini]
        pad_ref, kept, pad_attn = padding(b, slices)
        t_ref, t_new = measure(run, b, rounds)
        L = b.response_mask.sum(-1)
        rows.append([name, f"{int(L.median())} / {int(L.max())}", f"{t_ref:.3f}", f"{t_new:.3f}",
                     f"{t_ref / t_new:.2f}x", f"{100 * pad_ref:.1f}%", f"{100 * kept:.1f}%", "0%",
                     f"{100 * pad_attn:.1f}%"])
    print()
    print(table(["workload", "resp. len median / max", "reference s", "packed s", "speed-up",
                 "reference: padded positions", "packed: positions vs reference", "packed: padded (dense)",
                 "packed: padded attention queries"], rows))


if __name__ == "__main__":
    main()
