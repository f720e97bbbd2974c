"""Does EchoRL help, with which methods, at what cost? A miniature of the paper's study.

    python benchmarks/study.py --config configs/tiny.yaml --seeds 3

Runs GRPO, DAPO, Dr.GRPO and GSPO with EchoRL off and on, from the same warm-started model,
with the same seeds and step budget; then the ablations on GRPO + EchoRL: selection (peak vs
random_step vs full), coef (0.001 / 0.01 / 0.1) and delimiter (newline vs sentence).

The study budget (STUDY below) is applied on top of the config, then every `--set`: an easier
task than the embedded default (problems of 1-2 operations, a longer warm start: 1000 SFT steps),
so that more than half of the groups are degenerate within the budget, the regime EchoRL is for;
16 prompts x 8 samples, 32 steps; held-out accuracy on 200 problems (avg@4) at steps 16 and 32.
The step-0 accuracy is the warm start's, measured once per seed.

Writes OUT/results.md (the table), OUT/results.json, OUT/curves.png, OUT/curves_ablations.png
and one run folder per run. Runs that finished with the same config are reused, so an interrupted
study continues where it stopped; the wall time reported is the sum of the runs' own wall times.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tiny  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402
from config import load_config, to_dict  # noqa: E402
from _common import cpu_model  # noqa: E402

STUDY = ["tiny.max_ops=2", "tiny.sft_steps=1000", "rollout.prompts_per_step=16", "train.steps=32",
         "eval.every=16", "eval.limit=200", "eval.n=4"]
METHODS = ["grpo", "dapo", "drgrpo", "gspo"]
TITLES = {"grpo": "GRPO", "dapo": "DAPO", "drgrpo": "Dr.GRPO", "gspo": "GSPO"}
ABLATIONS = {  # name -> overrides, all on GRPO + EchoRL (defaults: select=peak, coef=0.001, newline)
    "select=random_step": ["echo.select=random_step"],
    "select=full": ["echo.select=full"],
    "coef=0.01": ["echo.coef=0.01"],
    "coef=0.1": ["echo.coef=0.1"],
    "delimiter=sentence": ["echo.delimiter=sentence"],
}


def plan(ablations: bool) -> dict[str, list[str]]:
    runs = {}
    for m in METHODS:
        runs[m] = [f"algo.name={m}", "echo.enabled=false"]
        runs[f"{m}+echo"] = [f"algo.name={m}", "echo.enabled=true"]
    if ablations:
        for name, ov in ABLATIONS.items():
            runs[f"grpo+echo {name}"] = ["algo.name=grpo", "echo.enabled=true", *ov]
    return runs


def run_one(config: str, overrides: list[str], out: Path) -> tuple[list[dict], float]:
    """Train one run into `out`, or reuse it if it finished with the same config; returns its
    metrics rows and wall seconds."""
    cfg = load_config(config, overrides + [f"train.out_dir={out}", "train.save_every=0", "log.log_rollouts_every=0"])
    metrics, wall_file, saved = out / "metrics.jsonl", out / "wall_s", out / "config.json"
    if metrics.exists() and wall_file.exists() and saved.exists() \
            and json.loads(saved.read_text()) == json.loads(json.dumps(to_dict(cfg))):
        rows = [json.loads(l) for l in metrics.read_text().splitlines() if l]
        if rows and rows[-1]["step"] == cfg.train.steps:
            return rows, float(wall_file.read_text())
    shutil.rmtree(out, ignore_errors=True)  # an unfinished or outdated run of this study: start it again
    t0 = time.perf_counter()
    train.train(cfg)
    wall = time.perf_counter() - t0
    wall_file.write_text(f"{wall:.1f}\n")
    return [json.loads(l) for l in metrics.read_text().splitlines() if l], wall


def acc_at(rows: list[dict], key: str, t: float | None) -> float:
    """Held-out accuracy after `t` seconds of training (sum of time/step), linearly interpolated
    between the evaluations around it; t=None: the last evaluation."""
    pts, clock = [], 0.0
    for r in rows:
        clock += r.get("time/step", 0.0)
        if key in r:
            pts.append((clock, r[key]))
    if t is None or t >= pts[-1][0]:
        return pts[-1][1]
    for (t0, a0), (t1, a1) in zip(pts, pts[1:]):
        if t <= t1:
            return a0 + (a1 - a0) * (t - t0) / (t1 - t0) if t1 > t0 else a1
    return pts[-1][1]


def summarize(rows: list[dict], key: str, t_equal: float | None) -> dict:
    steps = [r for r in rows if r["step"] > 0]
    tail = steps[-max(1, len(steps) // 4):]
    return {"acc_start": next(r[key] for r in rows if key in r), "acc_end": acc_at(rows, key, None),
            "acc_equal_time": acc_at(rows, key, t_equal),
            "frac_degenerate_end": statistics.mean(r["frac_degenerate"] for r in tail),
            "frac_all_success_end": statistics.mean(r["frac_all_success"] for r in tail),
            "clips_per_step": statistics.mean(r.get("echo/n_clips", 0.0) for r in steps),
            "loss_echo": statistics.mean(r.get("loss_echo", 0.0) for r in steps),
            "sec_per_step": statistics.mean(r["time/step"] for r in steps),
            "train_s": sum(r["time/step"] for r in steps)}


def mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def verdict(deltas: list[float]) -> str:
    """Mean paired difference over seeds and what it says: 'helps' only when the mean gain is more
    than twice its standard error; otherwise EchoRL does not help (worse, or within seed noise)."""
    m = statistics.mean(deltas)
    if all(abs(d) < 1e-9 for d in deltas):
        return f"{m:+.3f} (does not help: identical accuracy)"
    if len(deltas) < 2:
        return f"{m:+.3f} ({'helps' if m > 0 else 'does not help'}, 1 seed)"
    se = statistics.stdev(deltas) / math.sqrt(len(deltas))
    if m > 2 * se and m > 0:
        return f"{m:+.3f} ± {se:.3f} (helps)"
    if m < -2 * se and m < 0:
        return f"{m:+.3f} ± {se:.3f} (does not help: worse)"
    return f"{m:+.3f} ± {se:.3f} (does not help: within seed noise)"


def table(summ: dict, names: list[str], seeds: int, t_equal: float) -> list[str]:
    lines = [f"| run | held-out acc (end) | acc at equal training time ({t_equal:.0f} s) | frac_degenerate "
             "(last 25% of steps) | all-correct groups (last 25%) | clips / step | L_echo / step | s / step "
             "| Δ end acc vs EchoRL off (± s.e.) | Δ vs grpo+echo |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        s = [summ[(n, i)] for i in range(seeds)]
        off = n.split("+")[0]
        d_off = verdict([a["acc_end"] - summ[(off, i)]["acc_end"] for i, a in enumerate(s)]) if n != off else ""
        d_abl = ""
        if " " in n and ("grpo+echo", 0) in summ:
            d_abl = verdict([a["acc_end"] - summ[("grpo+echo", i)]["acc_end"] for i, a in enumerate(s)])
            d_abl = d_abl.replace("helps", "better").replace("does not help: worse", "worse") \
                         .replace("does not help: within seed noise", "within seed noise") \
                         .replace("does not help: identical accuracy", "identical accuracy")
        lines.append(f"| {n} | {mean_std([x['acc_end'] for x in s])} | {mean_std([x['acc_equal_time'] for x in s])} "
                     f"| {mean_std([x['frac_degenerate_end'] for x in s])} "
                     f"| {mean_std([x['frac_all_success_end'] for x in s])} "
                     f"| {statistics.mean(x['clips_per_step'] for x in s):.1f} "
                     f"| {statistics.mean(x['loss_echo'] for x in s):.1e} "
                     f"| {statistics.mean(x['sec_per_step'] for x in s):.2f} | {d_off} | {d_abl} |")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--no-ablations", action="store_true")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="applied to every run, after the study budget (e.g. train.steps=20)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = STUDY + args.overrides
    base = load_config(args.config, common)
    key = f"eval/{base.eval.benchmarks[0]}/acc"
    cached = base.model.name_or_path != "tiny" or tiny.cache_path(base.tiny).joinpath("config.json").exists()
    t0 = time.perf_counter()
    models.model_source(base)  # build the shared warm start once, before any run
    warm = "from the cache" if cached else f"built in {(time.perf_counter() - t0) / 60:.1f} min"
    runs = plan(not args.no_ablations)
    rows, walls = {}, {}
    n_runs, done = args.seeds * (len(runs) + 1), 0
    for seed in range(args.seeds):  # the warm start's accuracy: the same model for every run of a seed
        print(f"[study {done + 1}/{n_runs}] warm start eval, seed {seed}")
        done += 1
        start, walls[("start", seed)] = run_one(args.config, common + [f"train.seed={seed}", "train.steps=0",
                                                "eval.at_start=true"], out / "start" / f"seed{seed}")
        for name, ov in runs.items():
            print(f"[study {done + 1}/{n_runs}] {name}, seed {seed}")
            done += 1
            r, walls[(name, seed)] = run_one(args.config, common + ov + [f"train.seed={seed}", "eval.at_start=false"],
                                             out / name.replace(" ", "_") / f"seed{seed}")
            rows[(name, seed)] = start + r
    study_s = sum(walls.values())
    t_equal = min(sum(r.get("time/step", 0.0) for r in v) for v in rows.values())
    summ = {k: summarize(v, key, t_equal) for k, v in rows.items()}
    names = list(runs)
    start_acc = statistics.mean(summ[(names[0], i)]["acc_start"] for i in range(args.seeds))
    protocol = "greedy" if base.eval.temperature == 0 else f"avg@{base.eval.n} at temperature {base.eval.temperature}"
    header = (f"Held-out `{base.eval.benchmarks[0]}` accuracy ({base.eval.limit} problems, {protocol}) after "
              f"{base.train.steps} steps of {base.rollout.prompts_per_step} prompts x {base.rollout.group_size}, "
              f"mean ± std over {args.seeds} seeds; warm start = {start_acc:.3f}. Equal training time: accuracy "
              f"interpolated between evaluations at the training time of the fastest run. Δ: paired by seed. "
              f"Study wall time {study_s / 60:.1f} min ({len(walls)} runs, warm start {warm}) on {cpu_model()}, "
              f"{base.train.threads or 'default'} threads. "
              f"Command: `python benchmarks/study.py --config {args.config} --seeds {args.seeds}"
              f"{''.join(' --set ' + o for o in args.overrides)}{' --no-ablations' if args.no_ablations else ''}`.")
    text = header + "\n\n" + "\n".join(table(summ, names, args.seeds, t_equal)) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"study_wall_s": study_s, "t_equal_s": t_equal,
                                                  "runs": {f"{k[0]}|seed{k[1]}": v for k, v in summ.items()}},
                                                 indent=1))
    print(text)
    try:
        from plots import plot_study
        by_name = {n: [rows[(n, i)] for i in range(args.seeds)] for n in names}
        plot_study({TITLES[m]: {"EchoRL off": by_name[m], "EchoRL on": by_name[f"{m}+echo"]} for m in METHODS},
                   key, out / "curves.png")
        if not args.no_ablations:
            plot_study({"GRPO + EchoRL ablations": {n: by_name[n] for n in names if n.startswith("grpo")}},
                       key, out / "curves_ablations.png")
        print(f"plots: {out / 'curves.png'}")
    except ImportError as e:
        print(f"plots skipped: {e}")


if __name__ == "__main__":
    main()
