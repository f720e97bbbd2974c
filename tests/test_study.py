"""benchmarks/study.py: accuracy at equal training time, the verdict on each Δ, the table, the plan."""
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import study  # noqa: E402

KEY = "eval/tiny/acc"
CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
# warm start 0.5; training clock 4 s at step 2 (acc 0.7), 10 s at step 4 (acc 0.6)
ROWS = [{"step": 0, KEY: 0.5},
        {"step": 1, "time/step": 2.0, "frac_degenerate": 0.25, "frac_all_success": 0.25},
        {"step": 2, "time/step": 2.0, KEY: 0.7, "frac_degenerate": 0.5, "frac_all_success": 0.25, "echo/n_clips": 2.0},
        {"step": 3, "time/step": 4.0, "frac_degenerate": 0.75, "frac_all_success": 0.5, "echo/n_clips": 4.0},
        {"step": 4, "time/step": 2.0, KEY: 0.6, "frac_degenerate": 1.0, "frac_all_success": 0.75}]


@pytest.mark.parametrize("t, want", [(0.0, 0.5), (2.0, 0.6), (4.0, 0.7), (7.0, 0.65), (10.0, 0.6), (99.0, 0.6),
                                     (None, 0.6)])
def test_accuracy_at_a_training_time_interpolates_between_evaluations(t, want):
    assert study.acc_at(ROWS, KEY, t) == pytest.approx(want)


def test_summary_of_one_run():
    s = study.summarize(ROWS, KEY, 7.0)
    assert s["acc_start"] == 0.5 and s["acc_end"] == 0.6 and s["acc_equal_time"] == pytest.approx(0.65)
    assert s["frac_degenerate_end"] == 1.0          # last 25% of 4 steps = the last step
    assert s["frac_all_success_end"] == 0.75
    assert s["clips_per_step"] == pytest.approx(6.0 / 4) and s["loss_echo"] == 0.0
    assert s["sec_per_step"] == pytest.approx(2.5) and s["train_s"] == pytest.approx(10.0)


def test_verdict_says_helps_only_beyond_twice_the_standard_error():
    # mean 0.05, std 0.01, s.e. 0.01/sqrt(3) = 0.00577
    assert study.verdict([0.05, 0.06, 0.04]) == f"+0.050 ± {0.01 / math.sqrt(3):.3f} (helps)"
    assert study.verdict([-0.05, -0.06, -0.04]).endswith("(does not help: worse)")
    # mean +0.01, std 0.0458: a positive mean inside the noise is not a gain
    assert study.verdict([0.05, -0.04, 0.02]).endswith("(does not help: within seed noise)")
    assert study.verdict([0.0, 0.0, 0.0]) == "+0.000 (does not help: identical accuracy)"
    assert study.verdict([0.001, -0.001, 0.0]).endswith("(does not help: within seed noise)")
    assert study.verdict([0.02]) == "+0.020 (helps, 1 seed)"


def test_table_pairs_each_run_with_its_own_baseline_by_seed():
    def s(acc):
        return {"acc_end": acc, "acc_equal_time": acc, "frac_degenerate_end": 0.5, "frac_all_success_end": 0.4,
                "clips_per_step": 1.0, "loss_echo": 2e-6, "sec_per_step": 1.0}
    summ = {("dapo", 0): s(0.50), ("dapo", 1): s(0.60), ("dapo+echo", 0): s(0.40), ("dapo+echo", 1): s(0.50),
            ("grpo+echo", 0): s(0.5), ("grpo+echo", 1): s(0.5), ("grpo", 0): s(0.5), ("grpo", 1): s(0.5),
            ("grpo+echo coef=0.1", 0): s(0.6), ("grpo+echo coef=0.1", 1): s(0.7)}
    names = ["dapo", "dapo+echo", "grpo", "grpo+echo", "grpo+echo coef=0.1"]
    lines = dict(zip(names, study.table(summ, names, 2, 5.0)[2:]))
    cells = {n: [c.strip() for c in line.split("|")[1:-1]] for n, line in lines.items()}
    assert cells["dapo"][8] == "" and cells["dapo"][9] == ""
    assert cells["dapo+echo"][8] == "-0.100 ± 0.000 (does not help: worse)"    # 0.40-0.50, 0.50-0.60
    assert cells["grpo+echo coef=0.1"][8].startswith("+0.150") and cells["grpo+echo coef=0.1"][9].startswith("+0.150")
    assert cells["grpo+echo coef=0.1"][9] == "+0.150 ± 0.050 (better)"      # 0.1 and 0.2: 0.15 > 2 s.e.
    assert cells["dapo"][1] == "0.550 ± 0.071" and cells["dapo"][6] == "2.0e-06"


def test_plan_pairs_every_method_with_echo_and_runs_ablations_on_grpo_echo():
    runs = study.plan(ablations=True)
    assert len(runs) == 2 * len(study.METHODS) + len(study.ABLATIONS) == 13
    for m in study.METHODS:
        assert "echo.enabled=false" in runs[m] and "echo.enabled=true" in runs[f"{m}+echo"]
    for name, ov in runs.items():
        if " " in name:
            assert ov[:2] == ["algo.name=grpo", "echo.enabled=true"]
    assert len(study.plan(ablations=False)) == 8


def test_seed_mean_uses_the_steps_every_seed_logged():
    import plots
    a = [{"step": 0, KEY: 0.4}, {"step": 5, KEY: 0.6}]
    b = [{"step": 0, KEY: 0.6}, {"step": 3, KEY: 0.9}, {"step": 5, KEY: 0.8}]
    steps, mean, std = plots._seed_mean([a, b], KEY)
    assert steps == [0, 5] and mean == pytest.approx([0.5, 0.7]) and std == pytest.approx([2 ** 0.5 * 0.1] * 2)
    assert plots._smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


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
