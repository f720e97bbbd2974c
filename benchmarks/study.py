"""Does EchoRL help, with which methods, where its premise holds? A miniature of the paper's study.

    python benchmarks/study.py --seeds 4 --arith-seeds 3

About 86 minutes on 2 cores from a fresh clone (two warm starts of 2.5 minutes each, then 16 story
runs of ~65 s and 8 arith runs of ~30 s per seed): 4 story seeds are what fits the 90-minute budget
(a fifth adds ~18 minutes).

Two embedded tasks (tiny.py), each from its own cached warm start:
  arith  the default task: one equation per line; in its all-correct groups the clip tokens are
         near-certain, so EchoRL has almost nothing to learn there (the premise fails);
  story  the same problems solved in words: lines of two sentences whose wording the warm start
         chooses among several likely continuations, then the equation (the premise holds).
On both: GRPO, DAPO, Dr.GRPO and GSPO with EchoRL off and on. On story, ablations of GRPO + EchoRL:
the clip's end (select: peak / random_step / full / lowest_entropy), the coefficient (0.001, 0.01,
0.1, 1.0), the step delimiter (newline / sentence) and the normaliser of L_echo (mean over clip
tokens / the policy loss's own aggregation).

Every run of a seed starts from the same warm start and draws the same prompts; the warm start's
held-out accuracy is measured once per task and seed. Held-out accuracy is avg@8 on 200 problems at
the rollout temperature, with pass@8 beside it (supervised learning on the model's own answers can
trade diversity for accuracy). Differences are paired by seed: the mean difference with its 95%
interval (Student's t over seeds); an effect is named only when the interval excludes 0.

After the runs, the premise is checked on story: at the start of RL, the mean peak-step entropy of
the EchoClips of all-correct groups must be >= 0.3 nats (printed with the echo/policy gradient-norm
ratio that the probe measures; log.probe_every).

Writes OUT/results.md (tables), OUT/results.json, OUT/curves_<task>.png (accuracy, degenerate groups),
OUT/premise.png (the premise metrics over training next to accuracy), one folder per run. Finished
runs with the same config are reused: an interrupted study continues where it stopped.
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

import models  # noqa: E402
import tiny  # noqa: E402
import train  # noqa: E402
from eval import evaluate_run, load_benchmarks  # noqa: E402
from config import load_config, to_dict  # noqa: E402
from _common import cpu_model  # noqa: E402

# The budget of every run, then each task's settings (task, warm start) on top.
BUDGET = ["rollout.prompts_per_step=16", "train.steps=32", "eval.every=32", "eval.limit=200", "eval.n=8",
          "train.save_every=0", "log.log_rollouts_every=0"]
TASKS = {
    "arith": ["tiny.task=arith", "tiny.max_ops=2", "tiny.sft_steps=1000"],
    "story": ["tiny.task=story", "rollout.max_new_tokens=80"],
}
METHODS = ["grpo", "dapo", "drgrpo", "gspo"]
TITLES = {"grpo": "GRPO", "dapo": "DAPO", "drgrpo": "Dr.GRPO", "gspo": "GSPO"}
ABLATIONS = {  # on story, all GRPO + EchoRL (defaults: select=peak, coef=0.001, newline, clip_tokens)
    "select=random_step": ["echo.select=random_step"],
    "select=full": ["echo.select=full"],
    "select=lowest_entropy": ["echo.select=lowest_entropy"],
    "coef=0.01": ["echo.coef=0.01"],
    "coef=0.1": ["echo.coef=0.1"],
    "coef=1.0": ["echo.coef=1.0"],
    "delimiter=sentence": ["echo.delimiter=sentence"],
    "normalizer=policy": ["echo.normalizer=policy"],
}
PROBE = ["log.probe_every=8"]   # EchoRL runs: the gradient share and the peak step's sharpening
PREMISE = 0.3                   # nats: mean peak-step entropy of the clips at the start of RL
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def plan(ablations: bool = True) -> dict[str, list[str]]:
    """Run name -> overrides, for every task."""
    runs = {}
    for task in TASKS:
        for m in METHODS:
            runs[f"{task}/{m}"] = [f"algo.name={m}", "echo.enabled=false"]
            runs[f"{task}/{m}+echo"] = [f"algo.name={m}", "echo.enabled=true", *PROBE]
    if ablations:
        for name, ov in ABLATIONS.items():
            runs[f"story/grpo+echo {name}"] = ["algo.name=grpo", "echo.enabled=true", *PROBE, *ov]
    return runs


def task_of(name: str) -> str:
    return name.split("/")[0]


def run_one(config: str, overrides: list[str], out: Path) -> tuple[list[dict], float]:
    """Train one run into `out`, or reuse it if it finished with the same config; its metrics rows
    and wall seconds."""
    cfg = load_config(config, overrides + [f"train.out_dir={out}"])
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


def start_eval(config: str, overrides: list[str], out: Path) -> tuple[dict, float]:
    """The warm start's held-out metrics for one (task, seed), measured once (cached in out/start.json):
    the same evaluation, keyed on the same seed, as the runs' step 0 would be."""
    cfg = load_config(config, overrides + [f"train.out_dir={out}"])
    path = out / "start.json"
    key = json.loads(json.dumps(to_dict(cfg)))
    if path.exists() and json.loads(path.read_text())["config"] == key:
        saved = json.loads(path.read_text())
        return saved["metrics"], saved["wall_s"]
    t0 = time.perf_counter()
    run = train.setup(cfg)
    metrics = evaluate_run(run, load_benchmarks(cfg))
    wall = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": key, "metrics": metrics, "wall_s": wall}))
    return metrics, wall


def mean_of(rows: list[dict], key: str, part: slice = slice(None)) -> float | None:
    vals = [r[key] for r in rows[part] if key in r and math.isfinite(r[key])]
    return statistics.mean(vals) if vals else None


def summarize(start: dict, rows: list[dict], task_key: str) -> dict:
    """One run: held-out avg@8 and pass@8 before and after, the state of its groups over the last 25%
    of steps, EchoRL's clips and loss, the premise metrics (first and last 25% of steps), time."""
    steps = [r for r in rows if r["step"] > 0]
    q = max(1, len(steps) // 4)
    last = next(r for r in reversed(rows) if f"eval/{task_key}/acc" in r)
    return {
        "acc_start": start[f"eval/{task_key}/acc"], "pass_start": start.get(f"eval/{task_key}/pass@8"),
        "acc_end": last[f"eval/{task_key}/acc"], "pass_end": last.get(f"eval/{task_key}/pass@8"),
        "frac_degenerate_end": mean_of(steps, "frac_degenerate", slice(-q, None)),
        "frac_all_success_end": mean_of(steps, "frac_all_success", slice(-q, None)),
        "clips_per_step": statistics.mean(r.get("echo/n_clips", 0.0) for r in steps),
        "loss_echo": statistics.mean(r.get("loss_echo", 0.0) for r in steps),
        "peak_entropy_start": mean_of(steps, "echo/peak_step_entropy", slice(0, q)),
        "peak_entropy_end": mean_of(steps, "echo/peak_step_entropy", slice(-q, None)),
        "step_entropy_start": mean_of(steps, "echo/mean_step_entropy", slice(0, q)),
        "clip_nll_start": mean_of(steps, "echo/clip_nll", slice(0, q)),
        "clip_nll_end": mean_of(steps, "echo/clip_nll", slice(-q, None)),
        "echo_over_policy": mean_of(steps, "probe/echo_over_policy"),
        "peak_entropy_change": mean_of(steps, "probe/peak_entropy_change"),
        "sec_per_step": statistics.mean(r["time/step"] for r in steps),
    }


def interval(deltas: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% interval (Student's t over the paired seeds)."""
    m = statistics.mean(deltas)
    if len(deltas) < 2:
        return m, float("inf")
    return m, T975.get(len(deltas) - 1, 1.96) * statistics.stdev(deltas) / math.sqrt(len(deltas))


def effect(deltas: list[float], better: str = "helps", worse: str = "hurts") -> str:
    """'+0.012 [-0.004, +0.028] (no detectable effect)': an effect is named only when the 95% interval
    excludes 0."""
    m, h = interval(deltas)
    if all(d == 0 for d in deltas):
        return f"{m:+.3f} (identical)"
    label = better if m - h > 0 else worse if m + h < 0 else "no detectable effect"
    return f"{m:+.3f} [{m - h:+.3f}, {m + h:+.3f}] ({label})"


def fmt(xs: list[float | None], digits: int = 3) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def table(summ: dict, names: list[str], seeds: int) -> list[str]:
    """One row per run: means ± std over seeds; Δ paired by seed against EchoRL off (and, for an
    ablation, against GRPO + EchoRL with the defaults)."""
    head = ("| run | held-out avg@8 (end) | pass@8 (end) | Δ avg@8 vs EchoRL off [95% CI] | Δ pass@8 vs off | "
            "Δ avg@8 vs default EchoRL | degenerate groups (last 25%) | clips / step | L_echo / step | "
            "peak-step entropy at start (nats) | clip NLL at start | echo / policy grad norm | s / step |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for n in names:
        s = [summ[(n, i)] for i in range(seeds)]
        task, rest = n.split("/")
        off = f"{task}/{rest.split('+')[0]}"
        d_off = d_pass = d_def = ""
        if n != off:
            d_off = effect([a["acc_end"] - summ[(off, i)]["acc_end"] for i, a in enumerate(s)])
            if s[0]["pass_end"] is not None:
                d_pass = effect([a["pass_end"] - summ[(off, i)]["pass_end"] for i, a in enumerate(s)])
        if " " in rest:
            base = f"{task}/grpo+echo"
            d_def = effect([a["acc_end"] - summ[(base, i)]["acc_end"] for i, a in enumerate(s)], "better", "worse")
        lines.append(f"| {n} | {fmt([x['acc_end'] for x in s])} | {fmt([x['pass_end'] for x in s])} | {d_off} | "
                     f"{d_pass} | {d_def} | {fmt([x['frac_degenerate_end'] for x in s], 2)} | "
                     f"{statistics.mean(x['clips_per_step'] for x in s):.1f} | "
                     f"{statistics.mean(x['loss_echo'] for x in s):.1e} | {fmt([x['peak_entropy_start'] for x in s])} | "
                     f"{fmt([x['clip_nll_start'] for x in s])} | {fmt([x['echo_over_policy'] for x in s], 2)} | "
                     f"{statistics.mean(x['sec_per_step'] for x in s):.2f} |")
    return lines


def premise_check(summ: dict, seeds: int) -> tuple[bool, str]:
    """Story, GRPO + EchoRL at the start of RL: the clips' mean peak-step entropy against PREMISE."""
    s = [summ[("story/grpo+echo", i)] for i in range(seeds)]
    peak = statistics.mean(x["peak_entropy_start"] for x in s)
    ratio = [x["echo_over_policy"] for x in s if x["echo_over_policy"] is not None]
    ok = peak >= PREMISE
    text = (f"premise check (story, GRPO + EchoRL, first 25% of steps): mean peak-step entropy of the EchoClips "
            f"{peak:.3f} nats ({'>=' if ok else '<'} {PREMISE}: {'PASS' if ok else 'FAIL'}); mean step entropy "
            f"{statistics.mean(x['step_entropy_start'] for x in s):.3f}; clip NLL "
            f"{statistics.mean(x['clip_nll_start'] for x in s):.3f} nats/token; echo / policy gradient norm "
            f"{statistics.mean(ratio) if ratio else float('nan'):.3f} (probe every 8 steps)")
    return ok, text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--seeds", type=int, default=4, help="seeds of every story run")
    ap.add_argument("--arith-seeds", type=int, default=3, help="seeds of every arith run")
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--no-ablations", action="store_true")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="applied to every run, after the study budget (e.g. train.steps=16)")
    args = ap.parse_args(argv)
    seeds = {"arith": args.arith_seeds, "story": args.seeds}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_study = time.perf_counter()
    runs = plan(not args.no_ablations)
    names = list(runs)
    walls, rows, starts = {}, {}, {}
    for task, task_ov in TASKS.items():
        base = load_config(args.config, BUDGET + task_ov + args.overrides)
        cached = (tiny.cache_path(base.tiny) / "config.json").exists()
        t0 = time.perf_counter()
        models.model_source(base)  # the task's warm start, built once before its runs
        built = 0.0 if cached else time.perf_counter() - t0
        record = out / task / "warm_start_s"  # a resumed study still counts the build in its wall time
        if not cached:
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(f"{built:.1f}")
        walls[("warm start", task)] = float(record.read_text()) if record.exists() else 0.0
        print(f"[study] {task}: warm start {'from the cache' if cached else f'built in {built / 60:.1f} min'}", flush=True)
    todo = sum(seeds[t] * (1 + sum(task_of(n) == t for n in names)) for t in TASKS)
    done = 0
    for seed in range(max(seeds.values())):
        for task, task_ov in TASKS.items():
            if seed >= seeds[task]:
                continue
            common = BUDGET + task_ov + args.overrides + [f"train.seed={seed}"]
            done += 1
            print(f"[study {done}/{todo}] {task}: warm start eval, seed {seed}", flush=True)
            starts[(task, seed)], walls[("start", task, seed)] = start_eval(args.config, common,
                                                                             out / task / "start" / f"seed{seed}")
            for name in (n for n in names if task_of(n) == task):
                done += 1
                print(f"[study {done}/{todo}] {name}, seed {seed}", flush=True)
                run_ov = common + ["eval.at_start=false"] + runs[name]
                rows[(name, seed)], walls[(name, seed)] = run_one(args.config, run_ov,
                                                                  out / name.replace(" ", "_") / f"seed{seed}")
    summ = {(n, s): summarize(starts[(task_of(n), s)], rows[(n, s)], "tiny") for n, s in rows}
    ok, premise = premise_check(summ, seeds["story"])
    study_s = sum(walls.values())
    header = (f"Held-out accuracy on each task's 200 held-out problems (avg@8 and pass@8 at temperature 1) after "
              f"{load_config(args.config, BUDGET).train.steps} steps of 16 prompts x 8, mean ± std over seeds "
              f"({seeds['story']} on story, {seeds['arith']} on arith); Δ paired by seed, with the 95% interval over "
              f"seeds (an effect is named only when it excludes 0). Study wall time {study_s / 60:.1f} min (the sum "
              f"of every run's, the warm starts' and the start evaluations'; {(time.perf_counter() - t_study) / 60:.1f}"
              f" min for this call) on {cpu_model()}. Command: `python benchmarks/study.py --config {args.config} "
              f"--seeds {args.seeds} --arith-seeds {args.arith_seeds}"
              f"{''.join(' --set ' + o for o in args.overrides)}{' --no-ablations' if args.no_ablations else ''}`.")
    starts_line = "\n".join(f"{task} warm start: avg@8 {fmt([starts[(task, s)]['eval/tiny/acc'] for s in range(seeds[task])])}"
                            f", pass@8 {fmt([starts[(task, s)].get('eval/tiny/pass@8') for s in range(seeds[task])])}"
                            for task in TASKS)
    text = "\n\n".join([header, premise, starts_line] + [
        f"**{task}**\n\n" + "\n".join(table(summ, [n for n in names if task_of(n) == task], seeds[task]))
        for task in TASKS]) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"study_wall_s": study_s, "premise_ok": ok, "walls": {
        " | ".join(map(str, k)): v for k, v in walls.items()}, "runs": {f"{k[0]}|seed{k[1]}": v for k, v in
                                                                         summ.items()}}, indent=1))
    print(text)
    try:
        from plots import plot_premise, plot_study
        # every curve starts at its seed's warm-start accuracy (measured once, as step 0)
        by_name = {n: [[{"step": 0, **starts[(task_of(n), i)]}] + rows[(n, i)] for i in range(seeds[task_of(n)])]
                   for n in names}
        for task in TASKS:
            plot_study({TITLES[m]: {"EchoRL off": by_name[f"{task}/{m}"], "EchoRL on": by_name[f"{task}/{m}+echo"]}
                        for m in METHODS}, "eval/tiny/acc", out / f"curves_{task}.png")
        if not args.no_ablations:
            plot_study({"story: GRPO + EchoRL ablations": {n.split(" ", 1)[-1] if " " in n else "defaults": by_name[n]
                                                           for n in names if n.startswith("story/grpo+echo")}},
                       "eval/tiny/acc", out / "curves_ablations.png")
        plot_premise({task: {"EchoRL off": by_name[f"{task}/grpo"], "EchoRL on": by_name[f"{task}/grpo+echo"]}
                      for task in TASKS}, "eval/tiny/acc", out / "premise.png")
        print(f"plots: {out}/*.png")
    except ImportError as e:
        print(f"plots skipped: {e}")


if __name__ == "__main__":
    main()
