"""benchmarks/study.py: the 95% interval and effect labels on worked numbers, one run's summary, the
table's pairing by seed, the premise check, the plan, and reuse of finished runs."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import study  # noqa: E402

KEY = "eval/tiny/acc"
CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


def test_interval_is_students_t_over_the_paired_seeds():
    # mean 0.05, sd 0.01, n = 3: half-width t(0.975, 2) * 0.01 / sqrt(3) = 4.303 * 0.005774 = 0.02484
    m, h = study.interval([0.05, 0.06, 0.04])
    assert m == pytest.approx(0.05) and h == pytest.approx(0.024843, abs=1e-6)
    # n = 5, deltas 0.01..0.05: mean 0.03, sd 0.015811, t(0.975, 4) = 2.776: 2.776 * 0.015811 / sqrt(5)
    assert study.interval([0.01, 0.02, 0.03, 0.04, 0.05])[1] == pytest.approx(0.019630, abs=1e-6)
    assert study.interval([0.02]) == (0.02, float("inf"))


def test_an_effect_is_named_only_when_the_interval_excludes_zero():
    assert study.effect([0.05, 0.06, 0.04]) == "+0.050 [+0.025, +0.075] (helps)"
    assert study.effect([-0.05, -0.06, -0.04]) == "-0.050 [-0.075, -0.025] (hurts)"
    # mean +0.01, sd 0.04583: half-width 0.1139 -> the interval holds 0
    assert study.effect([0.05, -0.04, 0.02]) == "+0.010 [-0.104, +0.124] (no detectable effect)"
    assert study.effect([0.0, 0.0, 0.0]) == "+0.000 (identical)"
    assert study.effect([0.02]).endswith("(no detectable effect)")  # one seed: no interval
    assert study.effect([0.05, 0.06, 0.04], "better", "worse").endswith("(better)")


ROWS = [{"step": 1, "time/step": 2.0, "frac_degenerate": 0.25, "frac_all_success": 0.25, "echo/n_clips": 2.0,
         "echo/peak_step_entropy": 0.5, "echo/mean_step_entropy": 0.2, "echo/clip_nll": 0.8, "loss_echo": 1e-3},
        {"step": 2, "time/step": 2.0, "frac_degenerate": 0.5, "frac_all_success": 0.25, "echo/n_clips": 4.0,
         "echo/peak_step_entropy": 0.4, "probe/echo_over_policy": 0.1},
        {"step": 3, "time/step": 4.0, "frac_degenerate": 0.75, "frac_all_success": 0.5,
         "echo/peak_step_entropy": 0.3},
        {"step": 4, "time/step": 2.0, "frac_degenerate": 1.0, "frac_all_success": 0.75, KEY: 0.6,
         "eval/tiny/pass@8": 0.9, "echo/peak_step_entropy": 0.2, "echo/clip_nll": 0.4,
         "probe/echo_over_policy": 0.3, "probe/peak_entropy_change": -0.05}]


def test_summary_of_one_run():
    s = study.summarize({KEY: 0.5, "eval/tiny/pass@8": 0.8}, ROWS, "tiny")
    assert (s["acc_start"], s["pass_start"], s["acc_end"], s["pass_end"]) == (0.5, 0.8, 0.6, 0.9)
    assert s["frac_degenerate_end"] == 1.0 and s["frac_all_success_end"] == 0.75   # last 25% = the last step
    assert s["peak_entropy_start"] == 0.5 and s["peak_entropy_end"] == 0.2          # first / last 25%
    assert s["clip_nll_start"] == 0.8 and s["clip_nll_end"] == 0.4
    assert s["echo_over_policy"] == pytest.approx(0.2) and s["peak_entropy_change"] == -0.05
    assert s["clips_per_step"] == pytest.approx(6.0 / 4) and s["sec_per_step"] == pytest.approx(2.5)


def _summ(acc, pass8=0.9, peak=0.5):
    return {"acc_end": acc, "pass_end": pass8, "frac_degenerate_end": 0.5, "clips_per_step": 1.0, "loss_echo": 2e-6,
            "peak_entropy_start": peak, "step_entropy_start": 0.2, "clip_nll_start": 0.7, "echo_over_policy": 0.1,
            "sec_per_step": 1.0}


def test_table_pairs_each_run_with_its_own_baseline_by_seed():
    summ = {("story/dapo", 0): _summ(0.50), ("story/dapo", 1): _summ(0.60), ("story/dapo", 2): _summ(0.70),
            ("story/dapo+echo", 0): _summ(0.40, 0.8), ("story/dapo+echo", 1): _summ(0.50, 0.8),
            ("story/dapo+echo", 2): _summ(0.60, 0.8),
            ("story/grpo+echo", 0): _summ(0.5), ("story/grpo+echo", 1): _summ(0.5), ("story/grpo+echo", 2): _summ(0.5),
            ("story/grpo", 0): _summ(0.5), ("story/grpo", 1): _summ(0.5), ("story/grpo", 2): _summ(0.5),
            ("story/grpo+echo coef=0.1", 0): _summ(0.6), ("story/grpo+echo coef=0.1", 1): _summ(0.7),
            ("story/grpo+echo coef=0.1", 2): _summ(0.6)}
    names = ["story/dapo", "story/dapo+echo", "story/grpo", "story/grpo+echo", "story/grpo+echo coef=0.1"]
    lines = study.table(summ, names, 3)
    cells = {n: [c.strip() for c in line.split("|")[1:-1]] for n, line in zip(names, lines[2:])}
    assert cells["story/dapo"][3] == cells["story/dapo"][5] == ""
    assert cells["story/dapo+echo"][3] == "-0.100 [-0.100, -0.100] (hurts)"   # every seed -0.10: no spread
    assert cells["story/dapo+echo"][4] == "-0.100 [-0.100, -0.100] (hurts)"   # pass@8 0.8 vs 0.9
    # deltas (0.1, 0.2, 0.1): mean 0.133, sd 0.0577, half-width 4.303 * 0.0577 / sqrt(3) = 0.143
    assert cells["story/grpo+echo coef=0.1"][3] == "+0.133 [-0.010, +0.277] (no detectable effect)"
    assert cells["story/grpo+echo coef=0.1"][5] == "+0.133 [-0.010, +0.277] (no detectable effect)"
    assert cells["story/dapo"][1] == "0.600 ± 0.100"


def test_premise_check_compares_the_start_of_rl_peak_entropy_with_the_bar():
    ok, text = study.premise_check({("story/grpo+echo", i): _summ(0.5, peak=p) for i, p in enumerate([0.35, 0.31])}, 2)
    assert ok and "0.330 nats (>= 0.3: PASS)" in text
    ok, text = study.premise_check({("story/grpo+echo", 0): _summ(0.5, peak=0.011)}, 1)
    assert not ok and "FAIL" in text


def test_plan_runs_every_method_off_and_on_on_both_tasks_and_the_ablations_on_story():
    runs = study.plan(ablations=True)
    assert len(runs) == 2 * 2 * len(study.METHODS) + len(study.ABLATIONS) == 24
    for task in study.TASKS:
        for m in study.METHODS:
            assert "echo.enabled=false" in runs[f"{task}/{m}"] and "echo.enabled=true" in runs[f"{task}/{m}+echo"]
    ablations = [n for n in runs if " " in n]
    assert ablations and all(n.startswith("story/grpo+echo ") for n in ablations)
    assert {"echo.select=lowest_entropy", "echo.coef=1.0", "echo.delimiter=sentence", "echo.normalizer=policy"} <= \
        {o for n in ablations for o in runs[n]}
    assert len(study.plan(ablations=False)) == 16


def test_a_finished_run_is_reused_only_with_the_same_config(tmp_path, monkeypatch):
    calls = []

    def fake_train(cfg):  # writes what train.train writes: config.json and one metrics row per step
        calls.append(cfg.train.seed)
        out = Path(cfg.train.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(study.to_dict(cfg)))
        (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, cfg.train.steps + 1)))

    monkeypatch.setattr(study.train, "train", fake_train)
    ov = ["train.steps=3", "train.seed=1"]
    rows, _ = study.run_one(CONFIG, ov, tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3] and calls == [1]
    study.run_one(CONFIG, ov, tmp_path / "run")
    assert calls == [1]                                                   # same config: reused
    study.run_one(CONFIG, ["train.steps=3", "train.seed=2"], tmp_path / "run")
    assert calls == [1, 2]                                                # changed config: run again
    (tmp_path / "run" / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    study.run_one(CONFIG, ["train.steps=3", "train.seed=2"], tmp_path / "run")
    assert calls == [1, 2, 2]                                             # unfinished: run again


def test_seed_mean_uses_the_steps_every_seed_logged():
    import plots
    a = [{"step": 0, KEY: 0.4}, {"step": 5, KEY: 0.6}]
    b = [{"step": 0, KEY: 0.6}, {"step": 3, KEY: 0.9}, {"step": 5, KEY: 0.8}]
    steps, mean, std = plots._seed_mean([a, b], KEY)
    assert steps == [0, 5] and mean == pytest.approx([0.5, 0.7]) and std == pytest.approx([2 ** 0.5 * 0.1] * 2)
    assert plots._smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_plot_premise_writes_a_png(tmp_path):
    import plots
    seeds = [ROWS, ROWS]
    plots.plot_premise({"arith": {"EchoRL off": seeds, "EchoRL on": seeds},
                        "story": {"EchoRL off": seeds, "EchoRL on": seeds}}, KEY, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
