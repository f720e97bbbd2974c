"""Plots of a run: one rollout's step entropies with its EchoClip, and training curves.

    python plots.py RUN_DIR [RUN_DIR ...] [--step N] [--row I] [--out DIR]

writes into DIR (default: the first RUN_DIR/plots/)
  entropy_profile_stepN.png  a rollout of the first run: mean token entropy per step, the EchoClip
                             (steps 0..k*) shaded, the peak step k* marked, and each step's text.
                             Default: the first clipped rollout of the latest rollouts/step_N.jsonl
                             that has one.
  training_curves.png        metrics.jsonl of every RUN_DIR overlaid, labelled by directory name.

The functions are importable, for a study script or a notebook. matplotlib is optional; only the
plot functions need it.
"""
import argparse
import json
import sys
from pathlib import Path

STEP_TEXT_CHARS = 40     # per-step text is cut to this many characters in the profile plot
MAX_TEXT_LINES = 60      # steps listed in the text panel; longer responses are elided


def _figure(**kw):
    """A bare Figure: savefig renders it with Agg, headless, and pyplot's global state (a notebook's
    backend, its open figures) is left alone."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plots.py needs matplotlib: pip install matplotlib") from e
    return Figure(**kw)


def _read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_metrics(path) -> list[dict]:
    """Rows of a run's metrics.jsonl (`path` is the file or its run directory), by step.

    Should steps repeat (files of several attempts concatenated by hand), a step that does not increase
    starts over, and the later rows replace the earlier ones from that step on.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    rows: list[dict] = []
    for r in _read_jsonl(path):
        while rows and rows[-1]["step"] >= r["step"]:
            rows.pop()
        rows.append(r)
    return rows


def load_rollouts(path) -> list[dict]:
    """Rows of one rollouts/step_XXXXXX.jsonl: one dict per rollout of that step's batch."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no rollouts file at {path}")
    return _read_jsonl(path)


def step_table(rollout: dict) -> list[dict]:
    """Per step of a response: index, text, entropy (mean of its token_entropy), n_tokens, in_clip.

    Steps are the rollout's `step_ids` (entropy.step_ids, written by train.dump_rollouts whether or
    not EchoRL was on). A step is in_clip when any of its tokens is in the EchoClip.
    """
    texts, ents = rollout["token_text"], rollout["entropy"]
    if rollout.get("step_ids") is None:
        raise ValueError("this rollout dump has no step ids; rerun the step (train.dump_rollouts writes them)")
    clip = rollout.get("clip") or [0] * len(texts)
    rows: dict[int, dict] = {}
    for t, h, c, s in zip(texts, ents, clip, rollout["step_ids"], strict=True):
        r = rows.setdefault(s, {"index": s, "text": "", "token_entropy": [], "in_clip": False})
        r["text"] += t
        r["token_entropy"].append(h)
        r["in_clip"] |= bool(c)
    for r in rows.values():
        r["n_tokens"] = len(r["token_entropy"])
        r["entropy"] = sum(r["token_entropy"]) / r["n_tokens"]
    return list(rows.values())


def _short(text: str, n: int = STEP_TEXT_CHARS) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= n else text[: n - 1] + "…"


def plot_entropy_profile(rollout: dict, path, title: str | None = None) -> None:
    """Bar per step (mean token entropy), token entropies as dots, EchoClip shaded, step texts below."""
    table = step_table(rollout)
    S = len(table)
    if S == 0:
        raise ValueError("the rollout has no response tokens to plot")
    clipped = [i for i, r in enumerate(table) if r["in_clip"]]
    peak = clipped[-1] if clipped else None   # position of k*: the EchoClip ends with the peak step
    # Text panel: at most MAX_TEXT_LINES steps, a window that keeps the peak and a few steps after it.
    end = min(S, max(MAX_TEXT_LINES, (peak or 0) + 6))
    shown = table[max(0, end - MAX_TEXT_LINES):end]
    n_lines = len(shown) + 2
    fig = _figure(figsize=(min(max(8.0, 0.35 * S), 20.0), 4.2 + 0.15 * n_lines))
    ax, tx = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3.6, 0.15 * n_lines + 0.2]})

    if peak is not None:
        ax.axvspan(-0.5, peak + 0.5, color="tab:orange", alpha=0.15,
                   label=f"EchoClip (steps 0..{table[peak]['index']})")
    rest = [i for i in range(S) if i != peak]
    ax.bar(rest, [table[i]["entropy"] for i in rest], width=0.8, color="tab:blue", alpha=0.7,
           label="step mean entropy")
    if peak is not None:
        ax.bar([peak], [table[peak]["entropy"]], width=0.8, color="tab:red", alpha=0.7, label="peak step k*")
    # Token entropies, spread evenly across their step's bar.
    xs, hs = [], []
    for i, r in enumerate(table):
        xs += [i - 0.4 + 0.8 * (j + 0.5) / r["n_tokens"] for j in range(r["n_tokens"])]
        hs += r["token_entropy"]
    ax.plot(xs, hs, ".-", color="black", lw=0.5, ms=2.5, alpha=0.6, label="token entropy")
    ax.set_xlim(-0.6, S - 0.4)
    ax.set_ylim(0, 1.3 * max(hs + [1e-3]))  # headroom for the legend
    ticks = [str(r["index"]) for r in table]
    if peak is not None:
        ticks[peak] = f"k*={ticks[peak]}"
    stride = -(-S // 50)  # at most ~50 tick labels
    ticks = [t if i % stride == 0 or i == peak else "" for i, t in enumerate(ticks)]
    ax.set_xticks(range(S), ticks, fontsize=7 if S > 30 else 9)
    if peak is not None:
        ax.get_xticklabels()[peak].set_color("tab:red")
    ax.set_xlabel("step of the response")
    ax.set_ylabel("entropy (nats)")
    ax.legend(fontsize=8, loc="upper right", ncol=4)
    ax.set_title(title or f"gold: {rollout.get('gold')}  |  group {rollout.get('group')}  |  "
                 f"correct: {rollout.get('correct')}", fontsize=10, parse_math=False)

    lines = [f"{'*' if r['in_clip'] else ' '}{r['index']:>4}  {r['entropy']:7.2f}  {r['n_tokens']:>6}  "
             f"{_short(r['text'])}" for r in shown]
    if shown[0] is not table[0]:
        lines.insert(0, f"      ... {table.index(shown[0])} steps before")
    if end < S:
        lines.append(f"      ... {S - end} more steps")
    tx.axis("off")
    header = " step  H mean  tokens  text (* = in EchoClip)"
    tx.text(0.0, 1.0, "\n".join([header] + lines), family="monospace", fontsize=8,
            va="top", ha="left", transform=tx.transAxes, parse_math=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# (panel title, [(metric key, line style, legend name)]); held-out accuracy gets every eval/*/acc key.
PANELS = [
    ("degenerate groups (fraction of prompts)", [("frac_degenerate", "-", "degenerate"),
                                                 ("frac_all_success", "--", "all success"),
                                                 ("frac_all_fail", ":", "all fail")]),
    ("EchoClips per step", [("echo/n_clips", "-", "clips (left axis)"),
                            ("echo/clip_group_share", ":", "share of all-success groups\n"
                                                           "that gave a clip (right axis)")]),
    ("training accuracy (and reward, where shaping makes it differ)", [("accuracy", "-", "accuracy"),
                                                                       ("reward", "--", "reward")]),
]
SMOOTH = {"frac_degenerate", "frac_all_success", "frac_all_fail", "accuracy", "reward"}  # noisy per step
SMOOTH_STEPS = 5
TWIN_KEYS = {"echo/clip_group_share"}   # a fraction in [0, 1], drawn against its own axis
SHARE_OF = {"echo/clip_group_share": "echo/success_groups"}   # share -> the count it divides by
STYLES = ["-", "--", ":", "-."]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric; a share whose denominator was 0 is undefined: NaN, a gap."""
    den = SHARE_OF.get(key)
    pts = [(r["step"], float("nan") if den and r.get(den) == 0 else r[key])
           for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(runs: dict[str, list[dict]], path) -> None:
    """2x2 training curves of one or more runs ({label: metrics rows}): colour = run, line style = metric."""
    fig = _figure(figsize=(12, 7.5))
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    evals = sorted({k for rows in runs.values() for r in rows for k in r
                    if k.startswith("eval/") and k.endswith("/acc")})
    held_out = [(k, STYLES[j % len(STYLES)], k.split("/")[1]) for j, k in enumerate(evals)]
    panels = PANELS[:2] + [("held-out accuracy (step 0: before RL)", held_out)] + PANELS[2:]
    axes = fig.subplots(2, 2, sharex=True)
    share_ax = axes[0, 1].twinx()
    for ax, (title, metrics) in zip(axes.flat, panels):
        handles = []
        for key, ls, label in metrics:
            marker = "o" if key.startswith("eval/") else "." if key in TWIN_KEYS else None
            drawn = False
            for i, rows in enumerate(runs.values()):
                x, y = _series(rows, key)
                if key == "reward" and y == _series(rows, "accuracy")[1]:
                    continue  # no shaping: reward is accuracy, drawn once
                target = share_ax if key in TWIN_KEYS else ax
                if x and key in SMOOTH:  # raw values faint, a trailing moving average on top
                    target.plot(x, y, ls, color=f"C{i % 10}", lw=0.8, alpha=0.25)
                    target.plot(x, _smooth(y, SMOOTH_STEPS), ls, color=f"C{i % 10}", lw=1.6)
                    drawn = True
                elif x:
                    target.plot(x, y, ls, color=f"C{i % 10}", marker=marker, ms=4, lw=1.2)
                    drawn = True
            if drawn:
                smooth = f" (moving avg {SMOOTH_STEPS})" if key in SMOOTH else ""
                handles.append(Line2D([], [], color="0.3", ls=ls, marker=marker, ms=4, label=label + smooth))
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if handles:
            lo, hi = ax.get_ylim()
            lo = 0.0 if ax.dataLim.y0 >= 0 else lo   # counts and rates: keep zero in view
            ax.set_ylim(lo, hi + 0.25 * (hi - lo))   # headroom for the legend
            ax.legend(handles=handles, fontsize=8, loc="upper left", ncol=min(len(handles), 2))
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    share_ax.set_ylim(0, 1.3)
    share_ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    axes[1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[1]:
        ax.set_xlabel("training step")
    fig.legend(handles=[Line2D([], [], color=f"C{i % 10}", lw=2, label=name) for i, name in enumerate(runs)],
               loc="upper center", ncol=min(len(runs), 6), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=120)


def _smooth(y: list[float], w: int) -> list[float]:
    """Trailing moving average over up to `w` points."""
    return [sum(y[max(0, i - w + 1):i + 1]) / (i + 1 - max(0, i - w + 1)) for i in range(len(y))]


def _seed_mean(seed_rows: list[list[dict]], key: str) -> tuple[list[int], list[float], list[float]]:
    """(steps, mean, std) of a metric over seeds, at the steps every seed logged it."""
    per_seed = [dict(zip(*_series(rows, key))) for rows in seed_rows]
    steps = sorted(set.intersection(*(set(d) for d in per_seed))) if per_seed else []
    mean, std = [], []
    for s in steps:
        v = [d[s] for d in per_seed]
        m = sum(v) / len(v)
        mean.append(m)
        std.append((sum((x - m) ** 2 for x in v) / max(1, len(v) - 1)) ** 0.5)
    return steps, mean, std


def plot_study(panels: dict[str, dict[str, list[list[dict]]]], acc_key: str, path, smooth: int = 5) -> None:
    """A study's curves: one column per panel ({title: {label: [metrics rows of each seed]}}); top row
    held-out accuracy (mean over seeds, band = ±1 std), bottom row the fraction of degenerate groups
    (mean over seeds, moving average over `smooth` steps)."""
    fig = _figure(figsize=(4.2 * len(panels) + 0.5, 7))
    axes = fig.subplots(2, len(panels), sharex=True, squeeze=False)
    for j, (title, runs) in enumerate(panels.items()):
        top, bottom = axes[0, j], axes[1, j]
        for i, (label, seeds) in enumerate(runs.items()):
            c = f"C{i % 10}"
            x, m, s = _seed_mean(seeds, acc_key)
            top.plot(x, m, "-o", color=c, ms=4, lw=1.4, label=label)
            top.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], color=c, alpha=0.15)
            x, m, _ = _seed_mean(seeds, "frac_degenerate")
            bottom.plot(x, _smooth(m, smooth), "-", color=c, lw=1.4, label=label)
        top.set_title(title, fontsize=10)
        top.set_ylabel(f"held-out accuracy ({acc_key.split('/')[1]})" if j == 0 else "")
        bottom.set_ylabel(f"degenerate groups (moving avg {smooth})" if j == 0 else "")
        bottom.axhline(0.5, color="0.5", lw=0.8, ls=":")
        bottom.set_ylim(0, 1)
        bottom.set_xlabel("training step")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
        top.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


PREMISE_ROWS = [  # (metric keys drawn for the EchoRL-on runs, y label)
    (("echo/peak_step_entropy", "echo/mean_step_entropy"), "EchoClip step entropy (nats)\n— peak step, -- all steps"),
    (("echo/clip_nll",), "clip NLL (nats / token)"),
    (("probe/echo_over_policy",), "|grad L_echo| / |grad L_policy|"),
]


def plot_premise(panels: dict[str, dict[str, list[list[dict]]]], acc_key: str, path, smooth: int = 5) -> None:
    """EchoRL's premise over training next to accuracy: one column per task ({task: {"EchoRL off":
    [rows of each seed], "EchoRL on": [...]}}); top: held-out accuracy (mean over seeds ± std);
    below, for the EchoRL runs: the EchoClips' peak-step and mean step entropy, their NLL under the
    policy, and the norm of EchoRL's gradient relative to the policy loss's (moving average over
    `smooth` logged points)."""
    fig = _figure(figsize=(5.2 * len(panels) + 0.5, 10))
    axes = fig.subplots(1 + len(PREMISE_ROWS), len(panels), sharex=True, squeeze=False)
    for j, (task, runs) in enumerate(panels.items()):
        top = axes[0, j]
        for i, (label, seeds) in enumerate(runs.items()):
            x, m, sd = _seed_mean(seeds, acc_key)
            top.plot(x, m, "-o", color=f"C{i}", ms=4, lw=1.4, label=label)
            top.fill_between(x, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)], color=f"C{i}",
                             alpha=0.15)
        top.set_title(task, fontsize=10)
        top.legend(fontsize=8, loc="lower right")
        on = runs.get("EchoRL on", [])
        for r, (keys, ylabel) in enumerate(PREMISE_ROWS, start=1):
            ax = axes[r, j]
            for key, ls in zip(keys, ("-", "--")):
                x, m, _ = _seed_mean(on, key)
                if x:
                    ax.plot(x, _smooth(m, smooth), ls, color="C1", lw=1.4)
            if "entropy" in keys[0]:
                ax.axhline(0.3, color="0.5", lw=0.8, ls=":")
            ax.set_ylabel(ylabel if j == 0 else "", fontsize=8)
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
        axes[-1, j].set_xlabel("training step")
    axes[0, 0].set_ylabel(f"held-out accuracy ({acc_key.split('/')[1]}, avg@n)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def pick_rollout(run_dir, step: int | None = None, row: int | None = None) -> tuple[int, int, dict]:
    """(step, row, rollout) to profile; default: from the latest step that has EchoClips, the clipped
    rollout that shows the selection best: the most steps (at least 3 if any has them), then the
    clearest peak (peak step entropy minus the mean of the other steps)."""
    run_dir = Path(run_dir)
    files = sorted((run_dir / "rollouts").glob("step_*.jsonl"))
    if step is not None:
        files = [run_dir / "rollouts" / f"step_{step:06d}.jsonl"]
    for f in reversed(files):
        rollouts = load_rollouts(f)
        s = int(f.stem.split("_")[1])
        if row is not None:
            if not 0 <= row < len(rollouts):
                raise IndexError(f"--row {row} out of range: {f} has {len(rollouts)} rollouts")
            return s, row, rollouts[row]
        hits = [i for i, r in enumerate(rollouts) if any(r.get("clip") or [])]
        if hits:
            best = max(hits, key=lambda i: _showcase(rollouts[i]))
            return s, best, rollouts[best]
    where = files[0] if step is not None else run_dir / "rollouts"
    raise LookupError(f"no rollout with an EchoClip in {where}; pass --step N --row I to plot any rollout")


def _showcase(rollout: dict) -> tuple[bool, float]:
    """How well a rollout shows EchoClip selection: (has >= 3 steps, peak margin)."""
    h = [r["entropy"] for r in step_table(rollout)]
    k = max(range(len(h)), key=h.__getitem__)
    rest = [x for i, x in enumerate(h) if i != k]
    return len(h) >= 3, h[k] - (sum(rest) / len(rest) if rest else 0.0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="several are overlaid in the curves")
    p.add_argument("--step", type=int, metavar="N", help="rollouts of step N (default: latest with a clip)")
    p.add_argument("--row", type=int, metavar="I", help="row in that file (default: first with a clip)")
    p.add_argument("--out", type=Path, metavar="DIR", help="output dir (default: first RUN_DIR/plots)")
    a = p.parse_args(argv)
    names = [r.resolve().name for r in a.runs]
    if len(set(names)) < len(names):   # runs/x/tiny vs runs/y/tiny: label by the path as given
        names = [str(r) for r in a.runs]
    try:
        runs = {name: load_metrics(r) for name, r in zip(names, a.runs)}
    except FileNotFoundError as e:
        raise SystemExit(f"plots.py: {e}")
    out = a.out or a.runs[0] / "plots"
    out.mkdir(parents=True, exist_ok=True)
    plot_curves(runs, out / "training_curves.png")
    print(out / "training_curves.png")
    try:
        step, row, rollout = pick_rollout(a.runs[0], a.step, a.row)
    except (LookupError, FileNotFoundError) as e:
        if a.step is not None or a.row is not None:
            raise SystemExit(f"plots.py: {e}")
        print(f"skipping the entropy profile: {e}", file=sys.stderr)
        return
    n_clip = sum(rollout.get("clip") or [])
    title = (f"{names[0]}, step {step}, rollout {row} (group {rollout['group']}, "
             f"correct: {rollout['correct']}), gold: {rollout['gold']}\n"
             f"EchoClip: {n_clip} of {len(rollout['entropy'])} tokens")
    path = out / f"entropy_profile_step{step}.png"
    plot_entropy_profile(rollout, path, title)
    print(path)


if __name__ == "__main__":
    main()
