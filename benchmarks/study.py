"""Does EchoRL's mechanism work? A pre-registered miniature of the paper's late-training regime.

    python benchmarks/study.py                 # the primary comparison (README "Results"), <= 90 min on 2 cores
    python benchmarks/study.py --secondary     # the siblings, select ablations and story control, <= 60 min

Design (pre-registered in the README before the first run):
  task      fork (tiny.py): 2-operation arith problems with one decision line after the first equation;
            the warm start's habit answers there too early (tiny.sft_habit), so the decision is uncertain
            AND decides correctness. story (secondary) is the control: uncertain wording, no stakes.
  premise   at the warm start (and again at the branch point): over the EchoClips of all-correct groups,
            the mean peak-step entropy (>= 0.3 nats) and the mean stakes of the peak step (>= 0.10):
            P(correct | through the step) - P(correct | before it), K resampled continuations each
            (echorl.probe_stakes), beside the same number for a random step and the lowest-entropy step;
            on fork, story and arith (the embedded default) at their warm starts.
  burn-in   one shared run from the warm start, the authors' preset (algo.name=paper) without EchoRL,
            until the saturated regime: degenerate groups >= 0.6 of prompts over its last 16 steps
            (the gate is printed and recorded; the branches run either way and the verdict says so).
  branches  from the burn-in's last checkpoint (its weights; a fresh optimizer), per seed: the paper
            preset with EchoRL's lambda in {0 (off), 0.001, 0.01}; every arm of a seed draws the same
            prompts and sampling keys, so arms differ only through EchoRL.
  outcome   held-out avg@16 on the task's 200 held-out problems at the end of the branch.
  analysis  per lambda > 0: the paired difference to lambda = 0 over >= 10 seeds, its 95% interval
            (exact Student's t quantile), and TOST at +/- 0.02 (both one-sided tests at 5%). Verdict:
            "helps"/"hurts" if the 95% interval excludes 0, "no effect larger than 0.02" if only TOST
            holds, else "undecided". Two comparisons, each at 5%, no correction (said with the result).

Every run's per-seed numbers go to benchmarks/results/study/ (results.json, results.md, paired.png);
run folders live under --out (default runs/study). A finished run is reused only when its config and
the source code (a hash of the project's .py files and this script) are unchanged.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import echorl  # noqa: E402
import models  # noqa: E402
import tiny  # noqa: E402
import train  # noqa: E402
from config import load_config, to_dict  # noqa: E402
from _common import cpu_model  # noqa: E402
from stats import effect, paired, tost, verdict  # noqa: E402

MARGIN = 0.02                   # the equivalence margin (held-out accuracy)
GATE = 0.6                      # degenerate share of prompts over the burn-in's last 16 steps
PREMISE_ENTROPY, PREMISE_STAKES = 0.3, 0.10
TASKS = {  # each task's settings on top of configs/tiny.yaml (its warm start is keyed on them)
    "fork": ["tiny.task=fork", "tiny.min_ops=2", "tiny.max_ops=2", "tiny.sft_habit=0.25", "tiny.sft_steps=1000"],
    "story": ["tiny.task=story", "rollout.max_new_tokens=80"],
    "arith": [],  # the embedded default: its premise only
}
COMMON = ["algo.name=paper", "rollout.prompts_per_step=16", "train.save_every=0", "log.log_rollouts_every=0",
          "eval.limit=200"]
BURN = ["train.steps=64", "echo.enabled=false", "train.seed=1000", "eval.every=32", "eval.n=4"]
BRANCH = ["train.steps=24", "eval.every=0", "eval.at_start=false", "eval.n=16"]
PRIMARY = {"lambda=0": ["echo.enabled=false"],
           "lambda=0.001": ["echo.enabled=true", "echo.coef=0.001"],
           "lambda=0.01": ["echo.enabled=true", "echo.coef=0.01"]}
SECONDARY = {  # on fork (compared with lambda=0 of the same seed), then story's control pair
    "entropy bonus off": ["echo.enabled=false", "algo.entropy_coef=0.0"],
    "DAPO (drops zero-variance groups)": ["echo.enabled=false", "algo.name=dapo"],
    "RL-ZVP": ["echo.enabled=false", "algo.zvp_coef=0.1"],
    "RAFT++": ["echo.enabled=false", "algo.name=raftpp"],
    "positive-only SFT": ["echo.enabled=true", "echo.coef=0.01", "echo.select=full",
                                   "echo.clips_per_group=all", "echo.scope=success"],
    "lambda=0.01 select=random_step": ["echo.enabled=true", "echo.coef=0.01", "echo.select=random_step"],
    "lambda=0.01 select=lowest_entropy": ["echo.enabled=true", "echo.coef=0.01", "echo.select=lowest_entropy"],
    "lambda=0.01 select=full": ["echo.enabled=true", "echo.coef=0.01", "echo.select=full"],
}
STORY_ARMS = {"lambda=0": PRIMARY["lambda=0"], "lambda=0.01": PRIMARY["lambda=0.01"]}
KEY = "eval/tiny/acc"


def code_hash() -> str:
    """A hash of the source a run depends on: every .py of the project, this script, the default config."""
    files = sorted(ROOT.glob("*.py")) + [ROOT / "benchmarks" / "study.py", ROOT / "benchmarks" / "stats.py",
                                         ROOT / "configs" / "tiny.yaml"]
    h = hashlib.sha1()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def _fresh(out: Path, cfg) -> bool:
    """Whether out holds a finished run of exactly this config and code."""
    saved, code = out / "config.json", out / "code_hash"
    return (saved.exists() and code.exists() and code.read_text().strip() == code_hash()
            and json.loads(saved.read_text()) == json.loads(json.dumps(to_dict(cfg))))


def run_one(config: str, overrides: list[str], out: Path) -> tuple[list[dict], float]:
    """Train one run into `out`, or reuse it if it finished with the same config and code; its metrics
    rows and wall seconds."""
    cfg = load_config(config, overrides + [f"train.out_dir={out}"])
    metrics, wall_file = out / "metrics.jsonl", out / "wall_s"
    if _fresh(out, cfg) and metrics.exists() and wall_file.exists():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line]
        if rows and rows[-1]["step"] == cfg.train.steps:
            return rows, float(wall_file.read_text())
    shutil.rmtree(out, ignore_errors=True)  # an unfinished or outdated run: start it again
    t0 = time.perf_counter()
    train.train(cfg)
    wall = time.perf_counter() - t0
    wall_file.write_text(f"{wall:.1f}\n")
    (out / "code_hash").write_text(code_hash() + "\n")
    return [json.loads(line) for line in metrics.read_text().splitlines() if line], wall


def premise(config: str, overrides: list[str], out: Path, batches: int) -> tuple[dict, float]:
    """EchoRL's premise on the model that `overrides` load, over `batches` rollout batches: the clips'
    peak-step entropy and the stakes of their peak, random and lowest-entropy steps (means over clips,
    weighted by each batch's clip count). Cached in out/premise.json (keyed on config and code)."""
    cfg = load_config(config, overrides + [f"train.out_dir={out}", "echo.enabled=true"])
    path = out / "premise.json"
    key = {"config": json.loads(json.dumps(to_dict(cfg))), "code": code_hash(), "batches": batches}
    if path.exists() and json.loads(path.read_text())["key"] == key:
        saved = json.loads(path.read_text())
        return saved["premise"], saved["wall_s"]
    t0 = time.perf_counter()
    run = train.setup(cfg)
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for _ in range(batches):
        batch, stats = train.collect(run)
        stats |= train.old_policy(run, batch)
        stats |= echorl.echo_clips(run, batch)
        stats |= echorl.probe_stakes(run, batch)
        stats |= train.group_stats(batch.correct, batch.rewards, cfg.rollout.group_size)
        n = float(stats.get("echo/n_clips", 0.0))
        for k, v in stats.items():
            if k.startswith("probe/") or k == "echo/peak_step_entropy":
                w = float(getattr(v, "n", n) or 0.0)
                sums[k], weights[k] = sums.get(k, 0.0) + float(v) * w, weights.get(k, 0.0) + w
            elif k in ("frac_all_success", "frac_degenerate"):
                sums[k], weights[k] = sums.get(k, 0.0) + float(v), weights.get(k, 0.0) + 1
        sums["clips"] = sums.get("clips", 0.0) + n
        run.step += 1
    res = {k: sums[k] / weights[k] for k in weights if weights[k] > 0} | {"clips": sums.get("clips", 0.0)}
    wall = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "premise": res, "wall_s": wall}, indent=1))
    return res, wall


def premise_line(task: str, where: str, p: dict) -> tuple[bool, str]:
    ent, st = p.get("echo/peak_step_entropy", float("nan")), p.get("probe/peak_stakes", float("nan"))
    ok = ent >= PREMISE_ENTROPY and st >= PREMISE_STAKES
    return ok, (f"| {task} | {where} | {p['clips']:.0f} | {ent:.3f} | {st:+.3f} | "
                f"{p.get('probe/peak_p_before', float('nan')):.3f} -> {p.get('probe/peak_p_through', float('nan')):.3f} | "
                f"{p.get('probe/random_stakes', float('nan')):+.3f} | {p.get('probe/lowest_stakes', float('nan')):+.3f} | "
                f"{p.get('frac_all_success', float('nan')):.2f} | {'PASS' if ok else 'FAIL'} |")


PREMISE_HEAD = ["| task | model | clips | peak-step entropy (nats) | peak stakes | P(correct) before -> through | "
                "random-step stakes | lowest-entropy-step stakes | all-correct groups | premise (>= 0.3 and >= 0.10) |",
                "|---|---|---|---|---|---|---|---|---|---|"]


def burn_in(config: str, task: str, args, walls: dict) -> tuple[Path, float, list[dict]]:
    """The shared burn-in of a task: its last checkpoint, the degenerate share over its last 16 steps."""
    out = Path(args.out) / task / "burn"
    rows, walls[f"{task} burn-in"] = run_one(config, TASKS[task] + COMMON + BURN + args.overrides, out)
    steps = [r for r in rows if r["step"] > 0]
    degenerate = statistics.mean(r["frac_degenerate"] for r in steps[-16:])
    ckpt = out / "checkpoints" / f"step_{steps[-1]['step']:06d}"
    return ckpt, degenerate, rows


def run_summary(rows: list[dict], wall: float) -> dict:
    """One branch run: its final held-out accuracy and the means over its steps of what EchoRL acts on."""
    steps = [r for r in rows if r["step"] > 0]
    mean = lambda k: statistics.mean(r.get(k, 0.0) for r in steps)
    return {"acc": next(x[KEY] for x in reversed(rows) if KEY in x), "frac_degenerate": mean("frac_degenerate"),
            "frac_all_success": mean("frac_all_success"), "clips_per_step": mean("echo/n_clips"),
            "loss_echo": mean("loss_echo"), "reward": mean("reward"), "wall_s": wall}


def branches(config: str, task: str, ckpt: Path, arms: dict, seeds: int, args, walls: dict, done: list) -> dict:
    """Every arm x seed from the burn-in's checkpoint: {arm: [final held-out avg@16 per seed]}, and per run
    its summary (run_summary)."""
    acc, runs = {a: [] for a in arms}, {}
    for seed in range(seeds):
        for arm, ov in arms.items():
            done[0] += 1
            print(f"[study] {task} {arm} seed {seed} ({done[0]} runs)", flush=True)
            run_ov = TASKS[task] + COMMON + BRANCH + [f"model.name_or_path={ckpt}", f"train.seed={seed}"] + ov
            r, walls[f"{task} {arm} seed{seed}"] = run_one(config, run_ov + args.overrides,
                                                           Path(args.out) / task / arm.replace(" ", "_") / f"seed{seed}")
            runs[f"{arm} | seed {seed}"] = run_summary(r, walls[f"{task} {arm} seed{seed}"])
            acc[arm].append(runs[f"{arm} | seed {seed}"]["acc"])
    return {"acc": acc, "runs": runs}


def per_seed_table(acc: dict) -> list[str]:
    """Every run's final held-out avg@16: one row per arm, one column per seed (the numbers behind each Δ)."""
    n = max(map(len, acc.values()))
    lines = ["| arm | " + " | ".join(f"seed {i}" for i in range(n)) + " |", "|---|" + "---|" * n]
    return lines + [f"| {a} | " + " | ".join(f"{x:.4f}" for x in xs) + " |" for a, xs in acc.items()]


def plot_burn_in(rows: list[dict], path: Path, title: str) -> None:
    """The burn-in: degenerate groups per step (the gate's window shaded) and held-out accuracy."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"plot skipped: {e}")
        return
    steps = [r for r in rows if r["step"] > 0]
    fig, ax = plt.subplots(1, 2, figsize=(8, 3.2))
    ax[0].plot([r["step"] for r in steps], [r["frac_degenerate"] for r in steps], lw=1, label="degenerate groups")
    ax[0].plot([r["step"] for r in steps], [r["frac_all_success"] for r in steps], lw=1, label="all-correct groups")
    ax[0].axvspan(steps[-min(16, len(steps))]["step"], steps[-1]["step"], color="0.9")
    ax[0].axhline(GATE, color="C3", lw=0.8, ls="--", label=f"gate {GATE} (mean over the shaded steps)")
    ax[0].set_xlabel("step")
    ax[0].legend(fontsize=7)
    ev = [r for r in rows if KEY in r]
    ax[1].plot([r["step"] for r in ev], [r[KEY] for r in ev], "o-")
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("held-out avg@4")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def paired_table(acc: dict, base: str, arms: list[str]) -> list[str]:
    lines = [f"| arm | held-out avg@16 (mean ± SD over seeds) | Δ vs {base}: mean [95% CI], TOST ±{MARGIN} p (verdict) |"
             " seeds |", "|---|---|---|---|"]
    for a in [base] + arms:
        xs = acc[a]
        d = "" if a == base else effect([x - y for x, y in zip(xs, acc[base])], MARGIN)
        sd = f" ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else ""
        lines.append(f"| {a} | {statistics.mean(xs):.3f}{sd} | {d} | {len(xs)} |")
    return lines


def plot_paired(acc: dict, base: str, arms: list[str], path: Path, title: str) -> None:
    """Per-seed paired differences with their mean, 95% interval and the ±margin band."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"plot skipped: {e}")
        return
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(arms), 3.6))
    ax.axhspan(-MARGIN, MARGIN, color="0.9", label=f"±{MARGIN} (equivalence margin)")
    ax.axhline(0, color="0.5", lw=0.8)
    for i, a in enumerate(arms):
        d = [x - y for x, y in zip(acc[a], acc[base])]
        ax.plot([i] * len(d), d, "o", color="C0", alpha=0.5, ms=4)
        m, h = paired(d)
        ax.errorbar([i + 0.15], [m], yerr=[[h], [h]], fmt="s", color="C3", capsize=4)
    ax.set_xticks(range(len(arms)), arms, fontsize=8)
    ax.set_ylabel(f"held-out avg@16 − {base}")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--seeds", type=int, default=10, help="seeds of every primary arm (and of the secondary's base)")
    ap.add_argument("--secondary", action="store_true", help="the siblings, ablations and story control instead")
    ap.add_argument("--secondary-seeds", type=int, default=5)
    ap.add_argument("--premise-batches", type=int, default=16, help="rollout batches for each premise check")
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "study"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="applied to every run, after the study's settings")
    args = ap.parse_args(argv)
    t_call = time.perf_counter()
    part = "secondary" if args.secondary else "primary"
    res_dir = Path(args.results)
    res_dir.mkdir(parents=True, exist_ok=True)
    walls, report, record = {}, [], {"part": part, "code": code_hash(), "cpu": cpu_model(), "args": vars(args)}
    tasks = ["fork", "story", "arith"]
    ckpts, premises = {}, []
    for task in tasks:
        base = load_config(args.config, TASKS[task] + COMMON + args.overrides)
        cached = (tiny.cache_path(base.tiny) / "config.json").exists()
        t0 = time.perf_counter()
        models.model_source(base)  # the task's warm start, built once
        walls[f"{task} warm start"] = 0.0 if cached else time.perf_counter() - t0
        print(f"[study] {task}: warm start {'from the cache' if cached else 'built'}", flush=True)
        p, walls[f"{task} premise (warm start)"] = premise(args.config, TASKS[task] + COMMON + args.overrides,
                                                           Path(args.out) / task / "premise_start", args.premise_batches)
        premises.append((task, "warm start", p))
        if task == "fork" or (task == "story" and args.secondary):
            ckpt, degenerate, burn_rows = burn_in(args.config, task, args, walls)
            ckpts[task] = ckpt
            record[f"{task}_gate"] = {"degenerate_last16": degenerate, "passed": degenerate >= GATE,
                                      "burn_in_acc": [r[KEY] for r in burn_rows if KEY in r]}
            plot_burn_in(burn_rows, res_dir / f"burn_in_{task}.png", f"{task}: the shared burn-in (paper preset, EchoRL off)")
            p2, walls[f"{task} premise (branch point)"] = premise(
                args.config, TASKS[task] + COMMON + [f"model.name_or_path={ckpt}"] + args.overrides,
                Path(args.out) / task / "premise_branch", args.premise_batches)
            premises.append((task, "branch point", p2))
            report.append(f"{task} burn-in gate: degenerate groups over its last 16 steps {degenerate:.2f} "
                          f"({'>=' if degenerate >= GATE else '<'} {GATE}: {'PASS' if degenerate >= GATE else 'FAIL'})")
    lines = list(PREMISE_HEAD)
    for task, where, p in premises:
        ok, line = premise_line(task, where, p)
        lines.append(line)
        record[f"premise {task} {where}"] = p | {"passed": ok}
    report.insert(0, "\n".join(lines))
    done = [0]
    if not args.secondary:
        b = branches(args.config, "fork", ckpts["fork"], PRIMARY, args.seeds, args, walls, done)
        arms = [a for a in PRIMARY if a != "lambda=0"]
        report.append("**Primary (pre-registered)**: fork, the paper preset, EchoRL's lambda vs off, paired by seed\n\n"
                      + "\n".join(paired_table(b["acc"], "lambda=0", arms)))
        report.append("Per seed (held-out avg@16 at the end of each branch):\n\n" + "\n".join(per_seed_table(b["acc"])))
        record["fork"] = {"acc": b["acc"], "runs": b["runs"], "verdicts": {a: verdict([x - y for x, y in zip(b["acc"][a], b["acc"]["lambda=0"])],
                                                                   MARGIN) for a in arms}}
        plot_paired(b["acc"], "lambda=0", arms, res_dir / "paired_primary.png",
                    f"fork: EchoRL vs off, {args.seeds} seeds (paired)")
    else:
        arms = {"lambda=0": PRIMARY["lambda=0"], **SECONDARY}
        b = branches(args.config, "fork", ckpts["fork"], arms, args.secondary_seeds, args, walls, done)
        report.append(f"**Secondary**: fork, {args.secondary_seeds} seeds (fewer than the primary's), each arm vs "
                      f"lambda=0 of the same seed\n\n" + "\n".join(paired_table(b["acc"], "lambda=0", list(SECONDARY))))
        s = branches(args.config, "story", ckpts["story"], STORY_ARMS, args.secondary_seeds, args, walls, done)
        report.append(f"**Control**: story, {args.secondary_seeds} seeds\n\n"
                      + "\n".join(paired_table(s["acc"], "lambda=0", ["lambda=0.01"])))
        report.append("Per seed (held-out avg@16 at the end of each branch), fork then story:\n\n"
                      + "\n".join(per_seed_table(b["acc"])) + "\n\n" + "\n".join(per_seed_table(s["acc"])))
        record["fork"], record["story"] = {"acc": b["acc"], "runs": b["runs"]}, {"acc": s["acc"], "runs": s["runs"]}
        plot_paired(b["acc"], "lambda=0", list(SECONDARY), res_dir / "paired_secondary.png",
                    f"fork: siblings and ablations vs EchoRL off, {args.secondary_seeds} seeds")
    total = sum(walls.values())
    cmd = "python benchmarks/study.py" + (" --secondary" if args.secondary else "") + \
        "".join(f" --set {o}" for o in args.overrides)
    head = (f"{part.capitalize()} study: `{cmd}` (code {record['code']}) on {cpu_model()}: "
            f"{total / 60:.1f} min of runs, warm starts and premise checks ({(time.perf_counter() - t_call) / 60:.1f} "
            f"min this call). Held-out avg@16 on 200 held-out problems at temperature 1 after "
            f"{load_config(args.config, BRANCH).train.steps} branch steps of 16 prompts x 8. ± is the SD over seeds; "
            f"[ ] the 95% interval of the paired mean (exact t quantile); TOST: two one-sided tests at ±{MARGIN}.")
    text = "\n\n".join([head] + report) + "\n"
    record["walls_s"], record["total_s"] = walls, total
    (res_dir / f"{part}.md").write_text(text)
    (res_dir / f"{part}.json").write_text(json.dumps(record, indent=1))
    print(text)
    print(f"per-seed results: {res_dir}/{part}.json")


if __name__ == "__main__":
    main()
