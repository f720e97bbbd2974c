"""plots.py: the per-step table of a rollout by hand, and that every plot and the CLI write a PNG."""
import json
import math
import re
import subprocess
import sys

import pytest

import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A response of 8 tokens in 3 steps (a step ends at a token holding a newline; the last runs to EOS):
#   step 0 = "Add 3\n"                  entropies [0.5, 1.5, 1.0]: mean 1.0, in the clip
#   step 1 = "Then 5.\n"                entropies [2.0, 4.0, 0.0]: mean 2.0, in the clip (the peak k*)
#   step 2 = "\boxed{8}<|endoftext|>"   entropies [0.3, 0.1]:      mean 0.2, outside the clip
ROLLOUT = {
    "group": 1, "correct": True, "reward": 1.0, "prompt": "What is 3 + 5?", "gold": "8",
    "text": "Add 3\nThen 5.\n\\boxed{8}",
    "tokens": ["Add", "Ġ3", "Ċ", "Then", "Ġ5", ".Ċ", "\\boxed{8}", "<|endoftext|>"],
    "token_text": ["Add", " 3", "\n", "Then", " 5", ".\n", "\\boxed{8}", "<|endoftext|>"],
    "entropy": [0.5, 1.5, 1.0, 2.0, 4.0, 0.0, 0.3, 0.1],
    "step_ids": [0, 0, 0, 1, 1, 1, 2, 2],
    "clip": [1, 1, 1, 1, 1, 1, 0, 0],
}
EXPECTED_TEXTS = ["Add 3\n", "Then 5.\n", "\\boxed{8}<|endoftext|>"]


def test_step_table_gives_each_steps_text_mean_entropy_and_clip_flag():
    table = plots.step_table(ROLLOUT)
    assert [r["index"] for r in table] == [0, 1, 2]
    assert [r["text"] for r in table] == EXPECTED_TEXTS
    assert [r["entropy"] for r in table] == pytest.approx([1.0, 2.0, 0.2])
    assert [r["n_tokens"] for r in table] == [3, 3, 2]
    assert [r["token_entropy"] for r in table] == [[0.5, 1.5, 1.0], [2.0, 4.0, 0.0], [0.3, 0.1]]
    assert [r["in_clip"] for r in table] == [True, True, False]


def test_step_table_of_a_run_without_echorl_uses_its_step_ids_and_refuses_a_dump_without_them():
    table = plots.step_table({**ROLLOUT, "clip": None})
    assert [r["text"] for r in table] == EXPECTED_TEXTS and [r["in_clip"] for r in table] == [False] * 3
    with pytest.raises(ValueError, match="no step ids"):
        plots.step_table({**ROLLOUT, "step_ids": None})


def metrics_rows():
    rows = [{"step": 0, "eval/tiny/acc": 0.45, "eval/gsm/acc": 0.2}]
    for s in (1, 2, 3):
        rows.append({"step": s, "reward": 0.5 + 0.1 * s, "accuracy": 0.5 + 0.1 * s,
                     "frac_degenerate": 0.2 * s, "frac_all_success": 0.1 * s, "frac_all_fail": 0.1 * s,
                     "echo/n_clips": 2.0, "echo/success_groups": 2.0, "echo/clip_group_share": 1.0})
    rows[2].update({"eval/tiny/acc": 0.5, "eval/gsm/acc": 0.25})
    return rows


def write_run(run, clip_steps=(2,)):
    """A run dir: metrics.jsonl and rollouts of steps 1..3; row 1 of each step in clip_steps has a clip."""
    (run / "rollouts").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics_rows()))
    no_clip = {**ROLLOUT, "correct": False, "clip": [0] * 8}
    for s in (1, 2, 3):
        rows = [no_clip, ROLLOUT if s in clip_steps else no_clip]
        (run / "rollouts" / f"step_{s:06d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_load_metrics_reads_a_run_dir_or_its_file(tmp_path):
    write_run(tmp_path)
    assert plots.load_metrics(tmp_path) == metrics_rows()
    assert plots.load_metrics(tmp_path / "metrics.jsonl") == metrics_rows()


def test_a_rerun_appended_to_the_metrics_file_replaces_the_earlier_rows(tmp_path):
    steps = [0, 1, 2, 3, 0, 1, 2, 3, 4, 3, 4]   # run 1 to step 3; run 2 to step 4; run 2 resumed at 3
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "line": i}) + "\n"
                                                    for i, s in enumerate(steps)))
    rows = plots.load_metrics(tmp_path)
    assert [(r["step"], r["line"]) for r in rows] == [(0, 4), (1, 5), (2, 6), (3, 9), (4, 10)]


def test_clip_share_is_a_gap_at_steps_without_all_success_groups():
    rows = [{"step": 1, "echo/success_groups": 2.0, "echo/clip_group_share": 0.5},
            {"step": 2, "echo/success_groups": 0.0, "echo/clip_group_share": 0.0}]
    steps, share = plots._series(rows, "echo/clip_group_share")
    assert steps == [1, 2] and share[0] == 0.5 and math.isnan(share[1])


def test_missing_metrics_file_is_an_error_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "metrics.jsonl"))):
        plots.load_metrics(tmp_path)
    with pytest.raises(SystemExit, match=re.escape(str(tmp_path / "metrics.jsonl"))):
        plots.main([str(tmp_path)])
    assert not (tmp_path / "plots").exists()


def test_default_profile_is_the_clearest_clipped_rollout_of_the_latest_step_with_a_clip(tmp_path):
    write_run(tmp_path, clip_steps=(1, 2))
    step, row, rollout = plots.pick_rollout(tmp_path)
    assert (step, row) == (2, 1) and rollout == ROLLOUT
    # among clipped rollouts: >= 3 steps first, then the largest peak margin (peak minus mean of the others)
    two_steps = {**ROLLOUT, "step_ids": [0, 0, 0, 0, 0, 0, 1, 1]}            # margin 1.5 - 0.2, but 2 steps
    flat = {**ROLLOUT, "entropy": [1.0] * 6 + [0.9, 0.9]}                    # 3 steps, margin 0.1
    rows = [{**ROLLOUT, "clip": [0] * 8}, two_steps, flat, ROLLOUT]           # ROLLOUT: 3 steps, margin 1.4
    (tmp_path / "rollouts" / "step_000002.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plots.pick_rollout(tmp_path)[:2] == (2, 3)
    step, row, _ = plots.pick_rollout(tmp_path, step=3, row=0)
    assert (step, row) == (3, 0)
    with pytest.raises(LookupError, match="step_000003.jsonl"):
        plots.pick_rollout(tmp_path, step=3)


def test_missing_matplotlib_is_an_error_saying_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)   # makes the import fail
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plots.plot_entropy_profile(ROLLOUT, "unused.png")


def test_plot_entropy_profile_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "profile.png"
    plots.plot_entropy_profile(ROLLOUT, path, title="step 2, gold: $8$")  # '$' must not be read as maths
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_plot_curves_writes_a_png_for_several_runs(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "curves.png"
    plain = [{k: v for k, v in r.items() if not k.startswith("echo/")} for r in metrics_rows()]
    plots.plot_curves({"echorl": metrics_rows(), "grpo": plain}, path)
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_plot_study_writes_a_png_with_one_column_per_panel(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "study.png"
    seeds = [metrics_rows(), metrics_rows()]
    plots.plot_study({"GRPO": {"off": seeds, "on": seeds}, "DAPO": {"off": seeds, "on": seeds}},
                     "eval/tiny/acc", path)
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_command_line_writes_both_pngs_into_run_plots(tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    write_run(run)
    subprocess.run([sys.executable, plots.__file__, str(run)], check=True, capture_output=True)
    for name in ("entropy_profile_step2.png", "training_curves.png"):
        assert (run / "plots" / name).read_bytes()[:8] == PNG_MAGIC


def test_cli_compares_runs_and_honours_step_row_and_out(tmp_path):
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "a")
    write_run(tmp_path / "b")
    out = tmp_path / "figs"
    plots.main([str(tmp_path / "a"), str(tmp_path / "b"), "--step", "3", "--row", "0", "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["entropy_profile_step3.png", "training_curves.png"]
