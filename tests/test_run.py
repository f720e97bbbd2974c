"""The run harness under misuse: nothing lost, every error clear (run folders, resume, Ctrl-C,
non-finite values, full disks, bad configs and data)."""
import errno
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import models
import runs
import tiny
import train
from config import ConfigError, load_config
from conftest import TINY, small_cfg
from data import DataError, load_problems

ROOT = Path(__file__).resolve().parents[1]


def _lines(path):
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l]


def test_a_fresh_run_into_a_finished_runs_folder_stops_and_loses_nothing(model_dir, tmp_path):
    cfg = small_cfg(model_dir, tmp_path, "train.steps=2")
    train.train(cfg)
    out = Path(cfg.train.out_dir)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    other = small_cfg(model_dir, tmp_path, "train.steps=2", "algo.name=dapo")
    with pytest.raises(runs.RunFolderError, match=r"already holds a run \(grpo\+echo, 2 steps planned, metrics up "
                                                   r"to step 2, last checkpoint step_000002\).*--resume.*--overwrite"):
        train.train(other)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # not a byte changed
    # the README's next command, --resume, still works on the untouched run (nothing left to do: 2 of 2)
    assert train.train(cfg, resume=True) == []


def test_overwrite_moves_the_old_run_aside_and_pruning_sees_only_the_new_runs_checkpoints(model_dir, tmp_path):
    cfg = small_cfg(model_dir, tmp_path, "train.steps=4", "train.save_every=1", "train.keep_checkpoints=2")
    train.train(cfg)
    short = small_cfg(model_dir, tmp_path, "train.steps=1", "train.save_every=1", "train.keep_checkpoints=2")
    train.train(short, overwrite=True)
    out = Path(cfg.train.out_dir)
    aside = [p for p in out.parent.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and [l["step"] for l in _lines(aside[0] / "metrics.jsonl")] == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_000001"]
    assert runs.latest_checkpoint(out).name == "step_000001"
    assert [l["step"] for l in _lines(out / "metrics.jsonl")] == [1]


def test_resume_with_a_changed_config_names_the_keys_and_refuses_unless_allowed(model_dir, tmp_path):
    cfg = small_cfg(model_dir, tmp_path, "train.steps=2")
    train.train(cfg)
    changed = small_cfg(model_dir, tmp_path, "train.steps=3", "echo.coef=0.5", "train.lr=0.02")
    saved = (Path(cfg.train.out_dir) / "config.json").read_text()
    with pytest.raises(runs.RunFolderError, match=r"echo.coef: 0.001 -> 0.5\n  train.lr: 0.01 -> 0.02\n"):
        train.train(changed, resume=True)
    assert (Path(cfg.train.out_dir) / "config.json").read_text() == saved  # a refused resume writes nothing
    longer = small_cfg(model_dir, tmp_path, "train.steps=3")  # a longer run is a plain resume
    assert [m["step"] for m in train.train(longer, resume=True)] == [3]
    assert [m["step"] for m in train.train(changed, resume=True, allow_changes=True)] == []


def test_a_non_finite_gradient_stops_before_the_optimizer_step_and_keeps_the_last_checkpoint(
        model_dir, tmp_path, monkeypatch):
    cfg = small_cfg(model_dir, tmp_path, "train.steps=4", "train.save_every=1")
    real, calls = train.rl_loss, {"n": 0}

    def poisoned(run, logp, *a, **k):  # the third step's loss has a NaN gradient
        calls["n"] += 1
        loss, stats = real(run, logp, *a, **k)
        return (loss + 0.0 * logp.sum() * float("nan") if calls["n"] == 3 else loss), stats
    monkeypatch.setattr(train, "rl_loss", poisoned)
    seen = {}
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (seen.update(n=seen.get("n", 0) + 1),
                                                                            real_step(self, *a, **k))[1])
    with pytest.raises(train.NonFiniteError, match=r"step 3: non-finite loss \(nan.*last good checkpoint: "
                                                   r".*step_000002"):
        train.train(cfg)
    out = Path(cfg.train.out_dir)
    assert seen["n"] == 2 and runs.latest_checkpoint(out).name == "step_000002"
    assert [l["step"] for l in _lines(out / "metrics.jsonl")] == [1, 2]


def test_a_failed_checkpoint_write_leaves_no_temporary_folder_and_keeps_latest(model_dir, tmp_path, monkeypatch):
    cfg = small_cfg(model_dir, tmp_path, "train.steps=2", "train.save_every=1")
    real_save, calls = torch.save, {"n": 0}

    def full_disk(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(runs.torch, "save", full_disk)
    with pytest.raises(runs.CheckpointError, match=r"step_000002: .*No space left.*last complete checkpoint "
                                                         r"is .*step_000001"):
        train.train(cfg)
    ck = Path(cfg.train.out_dir) / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_000001"]


def test_ctrl_c_saves_the_last_completed_step_and_the_run_resumes(model_dir, tmp_path):
    """SIGINT to a real `python train.py`: it finishes the step, saves it, prints one line, exits 130;
    --resume then completes the run with no step lost or repeated."""
    out = tmp_path / "run"
    sets = [f"model.name_or_path={model_dir}", "data.train=tiny", "eval.benchmarks=[]", "rollout.group_size=4",
            "rollout.prompts_per_step=2", "rollout.max_new_tokens=8", "train.steps=200", "train.save_every=0",
            "log.log_rollouts_every=0", f"train.out_dir={out}", "train.threads=1"]
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny.yaml")]
    cmd += [a for s in sets for a in ("--set", s)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    steps = [l["step"] for l in _lines(out / "metrics.jsonl")]
    last = runs.latest_checkpoint(out)
    assert last is not None and last.name == f"step_{steps[-1]:06d}"
    hint = [line for line in stderr.splitlines() if "continue with:" in line]
    assert len(hint) == 1 and hint[0].endswith("--resume") and f"step_{steps[-1]:06d}" in hint[0]
    resume = subprocess.run(cmd + ["--resume", "--set", f"train.steps={steps[-1] + 1}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert resume.returncode == 0, resume.stderr
    assert [l["step"] for l in _lines(out / "metrics.jsonl")] == steps + [steps[-1] + 1]


def test_the_warm_start_is_the_same_whether_it_was_built_or_found_in_the_cache(tmp_path):
    """Building the warm start must not consume the run's RNG: the first step after a fresh build equals
    the first step of a run that found it cached."""
    small = ["tiny.sft_steps=3", "tiny.sft_batch_size=4", "tiny.sft_problems=50", "tiny.hidden_size=32",
             "tiny.num_hidden_layers=1", "tiny.intermediate_size=64", f"tiny.cache_dir={tmp_path / 'cache'}",
             "eval.benchmarks=[]", "rollout.prompts_per_step=2", "rollout.group_size=4", "train.steps=1",
             "train.save_every=0", "log.log_rollouts_every=0"]
    runs = []
    for name in ("built", "cached"):
        cfg = load_config(None, [*TINY, *small, f"train.out_dir={tmp_path / name}"])
        assert (tiny.cache_path(cfg.tiny) / "config.json").exists() == (name == "cached")
        runs.append([{k: v for k, v in m.items() if not k.startswith("time/")} for m in train.train(cfg)])
    assert runs[0] == runs[1]


# ----------------------------------------------------------------------------------------
# Validation before any work: each message names the file, key or line


def test_a_refused_config_writes_nothing_and_loads_no_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    loaded = []
    monkeypatch.setattr(train, "load_policy", lambda *a, **k: loaded.append(a))
    code, err = _main_exit(["--config", str(ROOT / "configs" / "tiny.yaml"), "--set", "train.steps=0",
                            "--set", f"train.out_dir={tmp_path / 'run'}"], capsys)
    assert code == 1 and "'train.steps' must be > 0" in err
    assert not (tmp_path / "run").exists() and not loaded


def test_a_missing_model_folder_and_a_gpu_config_on_a_cpu_machine_are_named(tmp_path):
    cfg = load_config(None, ["data.train=tiny", f"model.name_or_path={tmp_path / 'no_such_model'}"])
    with pytest.raises(FileNotFoundError, match=r"model folder not found: .*no_such_model"):
        models.model_source(cfg)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"'train.device' is 'cuda' but torch sees no CUDA device"):
            models.resolve_device("cuda")


def test_unreadable_and_oversized_data_rows_name_the_file_and_line(tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"problem": "1+1?", "answer": "2"}\n{"problem": "caf\xe9?", "answer": "3"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl: line 2: not UTF-8"):
        load_problems(bad)
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"problem": "x" * 50, "answer": "1"}) + "\n" +
                   json.dumps({"problem": "y" * 5000, "answer": "2"}) + "\n")
    with pytest.raises(DataError, match=r"big.jsonl: line 2: the question has 5,000 characters, over the bound "
                                        r"of 1,000 \(data.max_question_chars\)"):
        load_problems(big, max_question_chars=1000)


@pytest.mark.parametrize("command, expected", [
    ("train.py --config c.yaml", "train.py --config c.yaml --resume --set train.steps=120"),
    ("train.py --config c.yaml --set train.steps=80 --resume --set log.wandb=true",
     "train.py --config c.yaml --set log.wandb=true --resume --set train.steps=120"),
    ("train.py --config c.yaml --set=train.steps=80 --set train.steps_x=1",
     "train.py --config c.yaml --set train.steps_x=1 --resume --set train.steps=120"),
])
def test_the_train_further_line_drops_the_commands_own_resume_and_step_count(command, expected):
    assert runs.further(command, 120) == expected


def _main_exit(argv, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    return e.value.code, capsys.readouterr().err


def test_hints_name_a_command_that_will_be_accepted(model_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C before any checkpoint: exit 130 and the hint says --overwrite (a --resume would be refused);
    a finished run's --resume says it is complete and how to train further; an out_dir under a file is named."""
    base = ["--config", str(ROOT / "configs" / "tiny.yaml")] + [a for s in (
        f"model.name_or_path={model_dir}", "eval.benchmarks=[]", "rollout.group_size=4", "rollout.prompts_per_step=2",
        "rollout.max_new_tokens=8", "train.steps=1", "log.log_rollouts_every=0", f"train.out_dir={tmp_path / 'run'}",
        "train.threads=1") for a in ("--set", s)]
    real = train.train_step
    monkeypatch.setattr(train, "train_step", lambda run: (_ for _ in ()).throw(KeyboardInterrupt))
    code, err = _main_exit(base, capsys)
    assert code == 130 and "nothing was saved, start again with:" in err and err.strip().endswith("--overwrite")
    monkeypatch.setattr(train, "train_step", real)
    assert train.main(base + ["--overwrite"]) is None
    capsys.readouterr()
    assert train.main(base + ["--resume"]) is None
    out = capsys.readouterr().out
    assert "is complete: 1 of 1 steps; train further with:" in out and "--resume --set train.steps=2" in out
    (tmp_path / "file").write_text("")
    code, err = _main_exit(base + ["--set", f"train.out_dir={tmp_path / 'file' / 'run'}"], capsys)
    assert code == 1 and "is a file, not a folder" in err and "Traceback" not in err
