"""Cost of EchoRL in a training step: time and peak memory with the echo loss on vs off.

Target: EchoRL on costs at most 1.03x the time and 1.01x the memory of a step without it.

One batch of rollouts goes through the stages of train.train_step once (collect, old
policy, advantages). Then, on the same rollouts and from the same model + optimizer state:
    off  train.update with echo disabled
    on   echorl.echo_clips (step ids + select_clips) + train.update with the echo loss
Runs are interleaved (off, on, off, on, ...) so drift in machine load hits both alike.

With the warm-started tiny model (cached by train.py under .cache/tiny) real all-success groups
occur; without it a random model is used and correctness is set by hand (groups cycle
all-success / mixed / all-fail), so EchoClips exist either way.

Usage (from the repo root):
    python benchmarks/bench_echo_overhead.py [--quick] [--device cpu|cuda] [--model auto|warm|random]
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from _common import (PeakMemory, cached_warm_model, clock, hand_reward_fn, isolated, machine, median,  # noqa: E402
                     random_model_dir, resolve_device, table, tiny_config)

QUICK = ["rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=16",
         "train.micro_batch_size=8", "reward.workers=1"]


class Bench:
    """A run, an optimizer snapshot and one prepared batch; `run(on)` = one timed step remainder."""

    def __init__(self, run, batch, snap_model, snap_opt):
        self.run, self.batch = run, batch
        self.cfg_on = run.cfg
        self.cfg_off = copy.deepcopy(run.cfg)
        self.cfg_off.echo.enabled = False
        self.snap_model, self.snap_opt = snap_model, snap_opt
        self.device = str(batch.response_ids.device.type)

    def reset(self):
        """Same weights and Adam moments before every run (load_state_dict may alias: copy first)."""
        self.run.model.load_state_dict(self.snap_model)
        self.run.opt.load_state_dict(copy.deepcopy(self.snap_opt))
        self.run.sched.last_epoch = 0
        self.batch.clip_mask = None

    def step(self, on: bool) -> dict:
        """Seconds of (selection +) update; the caller resets state first."""
        import echorl
        import train
        run, b, dev = self.run, self.batch, self.device
        run.cfg = self.cfg_on if on else self.cfg_off
        t0 = clock(dev)
        echo = echorl.echo_clips(run, b) if on else {}
        t_sel = clock(dev)
        st = train.update(run, b)
        t1 = clock(dev)
        return {"step": t1 - t0, "select": t_sel - t0, "n_clips": echo.get("echo/n_clips", 0.0),
                "loss_echo": st["loss_echo"]}

    def timed(self, on: bool) -> dict:
        self.reset()
        return self.step(on)

    def peak(self, on: bool) -> tuple[float, float]:
        """(peak MiB above the loaded state, absolute peak MiB) of one run."""
        self.reset()
        with PeakMemory(self.device) as pm:
            self.step(on)
        return pm.peak_mib, pm.total_mib


def prepare(cfg, hand: bool):
    """A run and one batch through the stages before the update, plus a mid-training snapshot: the
    initial weights with the Adam moments of one update (so timed runs do not allocate them)."""
    import train
    run = train.setup(cfg, reward_fn=hand_reward_fn(cfg.rollout.group_size) if hand else None)
    batch, _ = train.collect(run)
    train.old_policy(run, batch)
    train.compute_advantages(run, batch)
    snap_model = copy.deepcopy(run.model.state_dict())
    off = copy.deepcopy(cfg)
    off.echo.enabled = False
    run.cfg = off
    train.update(run, batch)
    run.cfg = cfg
    snap_opt = copy.deepcopy(run.opt.state_dict())
    run.model.load_state_dict(snap_model)
    return run, batch, snap_model, snap_opt


def mem_child(spec: dict) -> tuple[float, float]:
    """CPU peak memory of one variant in a fresh process: load the saved state, one warm-up run
    (first calls load code pages), then the measured run."""
    import train
    cfg = tiny_config(spec["overrides"])
    run = train.setup(cfg)
    from rollout import Rollout
    with torch.serialization.safe_globals([Rollout]):  # the parent's own batch: tensors inside a Rollout
        saved = torch.load(spec["state"], weights_only=True)
    bench = Bench(run, saved["batch"], saved["model"], saved["opt"])
    bench.timed(spec["on"])
    return bench.peak(spec["on"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small batch, 3 repeats (smoke test)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--model", default="auto", choices=["auto", "warm", "random"],
                    help="auto: the warm-started tiny model if cached, else a random one; warm: build it if needed")
    ap.add_argument("--repeats", type=int, default=15, help="timed runs of each variant")
    ap.add_argument("--mem-repeats", type=int, default=1, help="peak-memory runs of each variant")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, as in train.py")
    args = ap.parse_args(argv)

    import models
    device = resolve_device(args.device)
    overrides = (QUICK if args.quick else []) + [f"train.device={device}", "echo.enabled=true", *args.overrides]
    repeats = 3 if args.quick else args.repeats
    cfg = tiny_config(overrides)

    with tempfile.TemporaryDirectory() as tmp:
        warm = cached_warm_model(cfg) if args.model == "auto" else None
        if args.model == "warm":
            warm = Path(models.model_source(cfg))
        model_dir = str(warm or random_model_dir(cfg, Path(tmp) / "model"))
        overrides.append(f"model.name_or_path={model_dir}")
        if warm is None:  # random text never stops: score truncated rows, so the hand-made rewards stand
            overrides.append("reward.truncated=score")
        cfg = tiny_config(overrides)
        print(machine(device))
        print(f"model: {'warm-started tiny ' + model_dir if warm else 'random tiny (hand-set correctness)'}; "
              f"algo {cfg.algo.name}, {cfg.rollout.prompts_per_step} prompts x G={cfg.rollout.group_size}, "
              f"max_new_tokens {cfg.rollout.max_new_tokens}, micro-batch {cfg.train.micro_batch_size}")
        run, batch, snap_model, snap_opt = prepare(cfg, hand=warm is None)
        bench = Bench(run, batch, snap_model, snap_opt)
        c = batch.correct.view(-1, cfg.rollout.group_size)
        print(f"batch: {len(batch)} rollouts x {batch.response_ids.shape[1]} tokens, "
              f"{int(c.all(-1).sum())}/{c.shape[0]} all-success groups, "
              f"{int(batch.response_mask.sum())} response tokens")

        bench.timed(False)  # warm-up, untimed
        bench.timed(True)
        runs = {False: [], True: []}
        for _ in tqdm(range(repeats), desc="interleaved off/on"):
            for on in (False, True):
                runs[on].append(bench.timed(on))

        mem = {False: [], True: []}
        if device == "cuda":
            for _ in range(args.mem_repeats):
                for on in (False, True):
                    mem[on].append(bench.peak(on))
        else:
            state = Path(tmp) / "state.pt"
            torch.save({"batch": batch, "model": snap_model, "opt": snap_opt}, state)
            specs = [{"overrides": overrides, "state": str(state), "on": on}
                     for _ in range(args.mem_repeats) for on in (False, True)]
            for s in tqdm(specs, desc="peak memory (fresh process each)"):
                mem[s["on"]].append(isolated(mem_child, s))

    t_off, t_on = median([r["step"] for r in runs[False]]), median([r["step"] for r in runs[True]])
    ratio = median([a["step"] / b["step"] for a, b in zip(runs[True], runs[False])])
    sel = median([r["select"] for r in runs[True]])
    m_off, m_on = (median([m[0] for m in mem[k]]) for k in (False, True))
    a_off, a_on = (median([m[1] for m in mem[k]]) for k in (False, True))
    r_inc = m_on / m_off if m_off > 0 else float("nan")
    r_abs = a_on / a_off
    on0 = runs[True][0]
    probe = "CUDA max_memory_allocated" if device == "cuda" else "peak RSS of a fresh process per run"
    print(f"\nEchoClips: {on0['n_clips']:.0f}, L_echo {on0['loss_echo']:.3g}; {repeats} interleaved repeats; "
          f"memory: {probe}, median of {args.mem_repeats}")
    print(table(["variant", "median s", "time vs off", "step peak MiB", "vs off", "total peak MiB", "vs off"], [
        ["echo off (update)", t_off, "1.000", round(m_off, 1), "1.000", round(a_off, 1), "1.000"],
        ["echo on (select + update)", t_on, f"{ratio:.3f}", round(m_on, 1), f"{r_inc:.3f}", round(a_on, 1),
         f"{r_abs:.4f}"],
        ["selection only (step_ids + select_clips)", sel, f"{sel / t_off:.4f}", "-", "-", "-", "-"],
    ]))
    print("time vs off: median over repeats of on/off of the same pair; step peak = peak above the loaded "
          "model + optimizer + batch; total peak = absolute")
    print(f"selection = {100 * sel / t_on:.2f}% of the echo-on step")
    ok = lambda b: "met" if b else "NOT met"
    print(f"target time <= 1.03x: {ok(ratio <= 1.03)} ({ratio:.3f}x); memory <= 1.01x: "
          f"total peak {ok(r_abs <= 1.01)} ({r_abs:.4f}x), step peak {ok(r_inc <= 1.01)} ({r_inc:.3f}x)")


if __name__ == "__main__":
    main()
