"""benchmarks/stats.py and benchmarks/study.py: the exact t quantile (closed forms and published
tables, above 10 degrees of freedom too), the paired interval, TOST and the verdicts on worked numbers,
the premise line, and reuse of finished runs keyed on config and code."""
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import stats  # noqa: E402
import study  # noqa: E402

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


@pytest.mark.parametrize("t", [-3.0, -0.4, 0.0, 0.7, 2.5, 40.0])
def test_t_cdf_matches_the_closed_forms_for_one_and_two_degrees_of_freedom(t):
    assert stats.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)         # Cauchy
    assert stats.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


@pytest.mark.parametrize("p,df,table", [(0.975, 1, 12.7062), (0.975, 9, 2.2622), (0.95, 9, 1.8331),
                                        (0.975, 11, 2.2010), (0.975, 19, 2.0930), (0.975, 30, 2.0423),
                                        (0.95, 30, 1.6973), (0.975, 100, 1.9840), (0.995, 15, 2.9467)])
def test_t_quantile_matches_published_tables_including_above_ten_degrees_of_freedom(p, df, table):
    assert stats.t_quantile(p, df) == pytest.approx(table, abs=6e-5)
    assert stats.t_quantile(1 - p, df) == pytest.approx(-table, abs=6e-5)
    assert stats.t_cdf(stats.t_quantile(p, df), df) == pytest.approx(p, abs=1e-10)     # round trip


def test_t_quantile_approaches_the_normal_quantile():
    assert 1.959964 < stats.t_quantile(0.975, 1e6) < 1.96 and stats.t_quantile(0.975, 12) > 2.17
    with pytest.raises(ValueError, match="p must be in"):
        stats.t_quantile(1.0, 5)


def test_paired_interval_is_students_t_over_the_seeds():
    # mean 0.05, sd 0.01, n = 3: half-width t(0.975, 2) * 0.01 / sqrt(3) = 4.302653 * 0.0057735 = 0.024841
    m, h = stats.paired([0.05, 0.06, 0.04])
    assert m == pytest.approx(0.05) and h == pytest.approx(0.024841, abs=2e-6)
    # n = 12 (df 11 > 10, no normal fallback): sd of +-0.01 alternating = 0.0104447, t = 2.200985
    d = [0.01, -0.01] * 6
    assert stats.paired(d)[1] == pytest.approx(2.200985 * 0.0104447 / math.sqrt(12), abs=2e-6)
    assert stats.paired([0.02]) == (0.02, float("inf"))


def test_tost_p_value_on_worked_numbers():
    # n = 2, deltas 0.00 and 0.02: mean 0.01, sd 0.0141421, se 0.01; margin 0.02: t statistics +3 and -1 on 1 df:
    # p = max(1 - F1(3), F1(-1)) = max(0.5 - atan(3)/pi, 0.25) = 0.25 (Cauchy CDF)
    p, eq = stats.tost([0.0, 0.02], 0.02)
    assert p == pytest.approx(0.25, abs=1e-12) and not eq
    # ten seeds alternating +-0.01: mean 0, se 0.0033333: t = +-6 on 9 df -> both tests reject
    p, eq = stats.tost([0.01, -0.01] * 5, 0.02)
    assert eq and p < 1e-3
    assert stats.tost([0.01, 0.01, 0.01], 0.02) == (0.0, True)      # no spread, inside the margin
    assert stats.tost([0.03, 0.03, 0.03], 0.02) == (1.0, False)


def test_verdicts():
    assert stats.verdict([0.05, 0.06, 0.04]) == "helps"
    assert stats.verdict([-0.05, -0.06, -0.04]) == "hurts"
    assert stats.verdict([0.01, -0.01] * 5) == "no effect larger than 0.02"
    assert stats.verdict([0.05, -0.05] * 5) == "undecided"             # 90% interval +-0.0305: not inside +-0.02
    # a small but clear effect: 95% interval above 0 and the 90% interval inside +-0.02
    assert stats.verdict([0.005, 0.006, 0.004, 0.005, 0.006, 0.004]) == "helps, by less than 0.02"
    assert stats.effect([0.0, 0.0]) == "+0.000 (identical)"
    assert stats.effect([0.05, 0.06, 0.04]).startswith("+0.050 [+0.025, +0.075], TOST p ")


def test_premise_line_needs_both_entropy_and_stakes():
    p = {"clips": 12, "echo/peak_step_entropy": 0.45, "probe/peak_stakes": 0.2, "probe/peak_p_before": 0.7,
         "probe/peak_p_through": 0.9, "probe/random_stakes": 0.01, "probe/lowest_stakes": 0.0, "frac_all_success": 0.2}
    assert study.premise_line("fork", "warm start", p)[0]
    assert not study.premise_line("story", "warm start", p | {"probe/peak_stakes": 0.01})[0]
    ok, line = study.premise_line("x", "y", p | {"echo/peak_step_entropy": 0.29})
    assert not ok and line.endswith("FAIL |") and "+0.200" in line


def test_a_finished_run_is_reused_only_with_the_same_config_and_code(tmp_path, monkeypatch):
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
    assert calls == [1]                                                   # same config and code: reused
    monkeypatch.setattr(study, "code_hash", lambda: "changed")
    study.run_one(CONFIG, ov, tmp_path / "run")
    assert calls == [1, 1]                                                # changed code: run again
    study.run_one(CONFIG, ["train.steps=3", "train.seed=2"], tmp_path / "run")
    assert calls == [1, 1, 2]                                             # changed config: run again
    (tmp_path / "run" / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    study.run_one(CONFIG, ["train.steps=3", "train.seed=2"], tmp_path / "run")
    assert calls == [1, 1, 2, 2]                                          # unfinished: run again


def test_code_hash_covers_the_project_sources(tmp_path, monkeypatch):
    for name in ("a.py", "b.py"):
        (tmp_path / name).write_text("x = 1\n")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "configs").mkdir()
    for f in ("benchmarks/study.py", "benchmarks/stats.py", "configs/tiny.yaml"):
        (tmp_path / f).write_text("")
    monkeypatch.setattr(study, "ROOT", tmp_path)
    h = study.code_hash()
    (tmp_path / "b.py").write_text("x = 2\n")
    assert study.code_hash() != h


def test_plot_paired_writes_a_png(tmp_path):
    acc = {"lambda=0": [0.5, 0.6, 0.7], "lambda=0.01": [0.52, 0.6, 0.69]}
    study.plot_paired(acc, "lambda=0", ["lambda=0.01"], tmp_path / "p.png", "t")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_summary_and_per_seed_table():
    rows = [{"step": 0}, {"step": 1, "frac_degenerate": 0.5, "frac_all_success": 0.25, "echo/n_clips": 2.0,
                          "loss_echo": 1e-3, "reward": 0.5},
            {"step": 2, "frac_degenerate": 1.0, "frac_all_success": 0.75, "reward": 1.0, study.KEY: 0.625}]
    s = study.run_summary(rows, 12.0)
    assert s == {"acc": 0.625, "frac_degenerate": 0.75, "frac_all_success": 0.5, "clips_per_step": 1.0,
                 "loss_echo": 5e-4, "reward": 0.75, "wall_s": 12.0}
    lines = study.per_seed_table({"lambda=0": [0.5, 0.625], "lambda=0.01": [0.5, 0.75]})
    assert lines[0] == "| arm | seed 0 | seed 1 |" and lines[3] == "| lambda=0.01 | 0.5000 | 0.7500 |"


def test_plot_burn_in_writes_a_png(tmp_path):
    rows = [{"step": 0, study.KEY: 0.5}] + [{"step": s, "frac_degenerate": s / 20, "frac_all_success": s / 25}
                                           for s in range(1, 21)]
    rows[-1][study.KEY] = 0.9
    study.plot_burn_in(rows, tmp_path / "b.png", "t")
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
