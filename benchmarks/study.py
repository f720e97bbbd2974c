"""Does EchoRL help, with which methods, at what cost? A miniature of the paper's study.

    python benchmarks/study.py --config configs/tiny.yaml --seeds 3

Runs GRPO, DAPO, Dr.GRPO and GSPO with EchoRL off and on, from the same warm-started model,
with the same seeds and step budget; then the ablations on GRPO + EchoRL: selection (peak vs
random_step vs full), coef (0.001 / 0.01 / 0.1) and delimiter (newline vs sentence).
Writes OUT/results.md (the table), OUT/results.json, OUT/curves.png and one run folder per run.
Runs already finished (their metrics reach the last step) are reused, so an interrupted study
continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from config import load_config  # noqa: E402
from _common import cpu_model  # noqa: E402

METHODS = ["grpo", "dapo", "drgrpo", "gspo"]
ABLATIONS = {  # name -> overrides, all on GRPO + EchoRL
    "select=random_step": ["echo.select=random_step"],
    "select=full": ["echo.select=full"],
    "coef=0.01": ["echo.coef=0.01"],
    "coef=0.1": ["echo.coef=0.1"],
    "delimiter=sentence": ["echo.delimiter=sentence"],
}


def plan(ablations: bool) -> dict[str, list[str]]:
    runs = {}
    for m in METHODS:
        runs[f"{m}"] = [f"algo.name={m}", "echo.enabled=false"]
        runs[f"{m}+echo"] = [f"algo.name={m}", "echo.enabled=true"]
    if ablations:
        for name, ov in ABLATIONS.items():
            runs[f"grpo+echo {name}"] = ["algo.name=grpo", "echo.enabled=true", *ov]
    return runs


def run_one(config: str, overrides: list[str], out: Path) -> list[dict]:
    cfg = load_config(config, overrides + [f"train.out_dir={out}", "train.save_every=0", "log.log_rollouts_every=0"])
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(l) for l in metrics.read_text().splitlines() if l]
        if rows and rows[-1]["step"] == cfg.train.steps:
            return rows
        metrics.unlink()
    train.train(cfg)
    return [json.loads(l) for l in metrics.read_text().splitlines() if l]


def summarize(rows: list[dict], bench: str, t_equal: float | None) -> dict:
    steps = [r for r in rows if r["step"] > 0]
    key = f"eval/{bench}/acc"
    evals = [(r["step"], r[key]) for r in rows if key in r]
    wall = 0.0
    acc_at_t = evals[0][1]
    for r in steps:  # held-out accuracy of the last eval reached within the common wall time
        wall += r["time/step"]
        if key in r and (t_equal is None or wall <= t_equal):
            acc_at_t = r[key]
    tail = steps[-max(1, len(steps) // 4):]
    return {"acc_start": evals[0][1], "acc_end": evals[-1][1], "acc_equal_time": acc_at_t,
            "frac_degenerate_end": statistics.mean(r["frac_degenerate"] for r in tail),
            "clips_per_step": statistics.mean(r.get("echo/n_clips", 0.0) for r in steps),
            "sec_per_step": statistics.mean(r["time/step"] for r in steps),
            "wall": sum(r["time/step"] for r in steps)}


def mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--no-ablations", action="store_true")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="applied to every run (e.g. train.steps=40)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_config(args.config, args.overrides)
    bench = base.eval.benchmarks[0]
    train.model_path(base)  # build the shared warm start once, outside the timed runs
    t0 = time.time()
    rows = {}
    for name, ov in plan(not args.no_ablations).items():
        for seed in range(args.seeds):
            # seed 0..S-1 -> different rollouts and prompt streams; the warm start is shared
            rows[(name, seed)] = run_one(args.config, args.overrides + ov + [f"train.seed={seed}",
                                         f"tiny.cache_dir={base.tiny.cache_dir}"], out / name.replace(" ", "_") / f"seed{seed}")
    study_wall = time.time() - t0
    t_equal = min(sum(r["time/step"] for r in v if r["step"] > 0) for v in rows.values())
    summ = {k: summarize(v, bench, t_equal) for k, v in rows.items()}
    names = list(dict.fromkeys(k[0] for k in rows))
    lines = [f"| run | held-out acc (end) | acc at equal wall time ({t_equal:.0f} s) | frac_degenerate (last 25%) "
             "| clips / step | s / step | Δ end acc vs base |", "|---|---|---|---|---|---|---|"]
    for n in names:
        s = [summ[(n, i)] for i in range(args.seeds)]
        base_name = n.split("+")[0]
        delta = ""
        if n != base_name and (base_name, 0) in summ:
            d = [a["acc_end"] - summ[(base_name, i)]["acc_end"] for i, a in enumerate(s)]
            delta = f"{statistics.mean(d):+.3f}" + (" (helps)" if statistics.mean(d) > 0 else " (does not help)")
        lines.append(f"| {n} | {mean_std([x['acc_end'] for x in s])} | {mean_std([x['acc_equal_time'] for x in s])} "
                     f"| {mean_std([x['frac_degenerate_end'] for x in s])} | {statistics.mean(x['clips_per_step'] for x in s):.1f} "
                     f"| {statistics.mean(x['sec_per_step'] for x in s):.2f} | {delta} |")
    start = statistics.mean(summ[(names[0], i)]["acc_start"] for i in range(args.seeds))
    protocol = "greedy" if base.eval.temperature == 0 else f"avg@{base.eval.n} at temperature {base.eval.temperature}"
    header = (f"Held-out `{bench}` accuracy ({protocol}), mean ± std over {args.seeds} seeds; "
              f"start (warm start) = {start:.3f}. Study wall time {study_wall / 60:.1f} min on {cpu_model()}, "
              f"{base.train.threads or 'default'} threads. Command: `python benchmarks/study.py --config {args.config} "
              f"--seeds {args.seeds}{''.join(' --set ' + o for o in args.overrides)}`.")
    table = header + "\n\n" + "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps({f"{k[0]}|seed{k[1]}": v for k, v in summ.items()}, indent=1))
    print(table)
    try:
        from plots import plot_curves
        for sd in range(min(args.seeds, 1)):
            plot_curves({n: rows[(n, sd)] for n in names if "=" not in n}, out / "curves.png")
            plot_curves({n: rows[(n, sd)] for n in names if n.startswith("grpo")}, out / "curves_ablations.png")
    except ImportError as e:
        print(f"plots skipped: {e}")


if __name__ == "__main__":
    main()
