"""A run folder is loaded as data, never as code: crafted checkpoint and cache files are refused by name
and run nothing; checkpoint writes fail as one CheckpointError whatever fails; a cut-off metrics line
resumes."""
import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import runs
import tiny
import train
from config import load_config
from conftest import TINY, small_cfg

ROOT = Path(__file__).resolve().parents[1]


class Touch:
    """Unpickling it creates `path`: what a crafted file would do instead of something harmless."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def _drop_times(rows):
    return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in rows]


def _cli(model_dir, out):
    sets = [f"model.name_or_path={model_dir}", "data.train=tiny", "eval.benchmarks=[]", "rollout.group_size=4",
            "rollout.prompts_per_step=2", "rollout.max_new_tokens=8", "train.steps=3", "train.save_every=1",
            "log.log_rollouts_every=0", f"train.out_dir={out}", "reward.workers=1"]
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny.yaml")]
    return cmd + [a for s in sets for a in ("--set", s)], load_config(str(ROOT / "configs" / "tiny.yaml"), sets)


def _killed_after_step_2(cfg, monkeypatch):
    """cfg's run (4 steps, a checkpoint every 2) killed during step 3."""
    real, calls = train.train_step, {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(train, "train_step", dying)
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg)
    monkeypatch.setattr(train, "train_step", real)


# ----------------------------------------------------------------------------------------
# Loading: tensors and plain data only


def test_a_checkpoints_state_is_plain_data_and_restores_every_rng(model_dir, tmp_path):
    cfg = small_cfg(model_dir, tmp_path, "train.steps=2")
    train.train(cfg)
    state = runs.latest_checkpoint(Path(cfg.train.out_dir)) / "state.pt"
    assert torch.serialization.get_unsafe_globals_in_checkpoint(state) == []
    st = torch.load(state, weights_only=True)  # no allow-list needed
    assert st["step"] == 2 and isinstance(st["rng"]["numpy"]["keys"], torch.Tensor)
    assert st["stream"]["count"] > 0

    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    saved = runs.rng_state()
    torch.save(saved, tmp_path / "rng.pt")
    draws = (torch.rand(3), random.random(), np.random.standard_normal(3))
    runs.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), random.random(), np.random.standard_normal(3))
    assert torch.equal(draws[0], again[0]) and draws[1] == again[1] and (draws[2] == again[2]).all()


def test_resume_refuses_a_crafted_state_pt_with_one_line_and_runs_none_of_it(model_dir, tmp_path):
    cmd, cfg = _cli(model_dir, tmp_path / "run")
    train.train(cfg)
    ck = runs.latest_checkpoint(tmp_path / "run")
    marker = tmp_path / "marker"
    st = torch.load(ck / "state.pt", weights_only=True)
    torch.save({**st, "payload": Touch(marker)}, ck / "state.pt")

    resume = subprocess.run(cmd + ["--resume", "--set", "train.steps=4"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert resume.returncode == 1 and "Traceback" not in resume.stderr
    err = [l for l in resume.stderr.splitlines() if l.strip() and not re.search(r"\d+%\|", l)]
    assert len(err) == 1 and str(ck / "state.pt") in err[0] and "refused" in err[0], resume.stderr
    assert not marker.exists()
    assert [json.loads(l)["step"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    # the file really is dangerous: full unpickling runs it
    torch.load(ck / "state.pt", weights_only=False)
    assert marker.exists()


def test_a_crafted_rank_file_and_sharded_metadata_are_refused_and_run_nothing(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"stream": {"pos": 0}, "rng": Touch(marker)}, tmp_path / "rank1.pt")
    with pytest.raises(runs.CheckpointError, match=r"rank1\.pt is refused: .*(system|getattr)"):
        runs.load_state(tmp_path / "rank1.pt")

    import torch.distributed.checkpoint as dcp
    m = torch.nn.Linear(3, 2)
    dcp.save({"model": m.state_dict()}, checkpoint_id=str(tmp_path / "sharded"))
    back = {"model": torch.nn.Linear(3, 2).state_dict()}
    dcp.load(back, storage_reader=runs._sharded_reader(tmp_path / "sharded"), planner=runs._sharded_planner())
    assert torch.equal(back["model"]["weight"], m.weight)  # a genuine sharded checkpoint loads
    meta = pickle.loads((tmp_path / "sharded" / ".metadata").read_bytes())
    meta.planner_data = Touch(marker)
    (tmp_path / "sharded" / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(runs.CheckpointError, match=r"sharded/\.metadata is refused: .*system"):
        dcp.load(back, storage_reader=runs._sharded_reader(tmp_path / "sharded"), planner=runs._sharded_planner())
    assert not marker.exists()


def test_a_checkpoint_in_the_earlier_format_resumes_exactly(model_dir, tmp_path, monkeypatch):
    """Checkpoints written before the plain-data format (numpy's and Python's RNG tuples, unpickled in
    full) still resume, through the numpy-array allow-list alone, and reproduce the uninterrupted run."""
    full = train.train(small_cfg(model_dir, tmp_path / "a"))
    cfg = small_cfg(model_dir, tmp_path / "b")
    _killed_after_step_2(cfg, monkeypatch)
    state = runs.latest_checkpoint(Path(cfg.train.out_dir)) / "state.pt"
    st = torch.load(state, weights_only=True)
    n, (version, mt, gauss) = st["rng"]["numpy"], st["rng"]["python"]
    st["rng"]["numpy"] = (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    st["rng"]["python"] = (version, tuple(mt), gauss)
    torch.save(st, state)
    assert "numpy.ndarray" in torch.serialization.get_unsafe_globals_in_checkpoint(state)
    assert _drop_times(train.train(cfg, resume=True)) == _drop_times(full[2:])


def test_a_warm_start_cache_without_safetensors_is_refused_and_runs_nothing(model_dir, tmp_path):
    cfg = load_config(None, [*TINY, f"tiny.cache_dir={tmp_path / 'cache'}", "tiny.hidden_size=32",
                             "tiny.num_hidden_layers=2", "tiny.intermediate_size=64"])
    entry = tiny.cache_path(cfg.tiny)
    shutil.copytree(model_dir, entry)
    (entry / "model.safetensors").unlink()
    marker = tmp_path / "marker"
    torch.save({"payload": Touch(marker)}, entry / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=re.escape(str(entry)) + r" holds no model\.safetensors"):
        tiny.warm_start(cfg.tiny)
    assert not marker.exists()


def test_no_module_unpickles_in_full():
    """Caches are JSON lines and weights safetensors; nothing in the project unpickles without limits."""
    pattern = re.compile(r"weights_only\s*=\s*False|allow_pickle\s*=\s*True|pickle\.loads?\(|np\.load\(")
    found = [f"{p.name}:{i}" for p in ROOT.glob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []


# ----------------------------------------------------------------------------------------
# Writing: whatever fails, one CheckpointError, no temporary folder, the previous checkpoint intact


def _fail_tokenizer_json(monkeypatch):
    from transformers import PreTrainedTokenizerBase

    def bad(self, *a, **k):
        raise TypeError("Object of type set is not JSON serializable")
    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", bad)


def _fail_config_json(monkeypatch):
    from transformers import PretrainedConfig

    def bad(self, *a, **k):
        raise TypeError("Object of type set is not JSON serializable")
    monkeypatch.setattr(PretrainedConfig, "to_json_file", bad)


def _fail_safetensors(monkeypatch):
    import transformers.modeling_utils as mu
    from safetensors import SafetensorError

    def bad(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: File too large (os error 27)")
    monkeypatch.setattr(mu, "safe_save_file", bad)


def _fail_torch_save(monkeypatch):
    def bad(*a, **k):
        raise pickle.PicklingError("Can't pickle <function <lambda>>")
    monkeypatch.setattr(runs.torch, "save", bad)


def _fail_rename(name):
    def inject(monkeypatch):
        real = os.replace

        def bad(src, dst):
            if Path(dst).name.startswith(name):
                raise PermissionError(13, "Permission denied", str(dst))
            return real(src, dst)
        monkeypatch.setattr(runs.os, "replace", bad)
    return inject


@pytest.mark.parametrize("inject, cause", [
    (_fail_safetensors, r"SafetensorError: .*File too large"),
    (_fail_torch_save, r"PicklingError: Can't pickle"),
    (_fail_config_json, r"TypeError: Object of type set is not JSON serializable"),
    (_fail_tokenizer_json, r"TypeError: Object of type set is not JSON serializable"),
    (_fail_rename("step_"), r"PermissionError: .*Permission denied"),
    (_fail_rename("latest"), r"PermissionError: .*Permission denied"),
], ids=["safetensors", "torch.save", "config-json", "tokenizer-json", "rename", "latest"])
def test_any_failed_checkpoint_write_is_one_error_and_keeps_the_previous_checkpoint(
        model_dir, tmp_path, monkeypatch, inject, cause):
    cfg = small_cfg(model_dir, tmp_path, "train.steps=2", "train.save_every=1")
    real_save = runs.save_checkpoint

    def second_save_fails(out, step, run, keep):
        if step == 2:
            inject(monkeypatch)
        return real_save(out, step, run, keep)
    monkeypatch.setattr(train, "save_checkpoint", second_save_fails)
    with pytest.raises(runs.CheckpointError, match=r"could not write checkpoint .*step_000002: " + cause +
                                                   r".*last complete checkpoint is .*step_000001"):
        train.train(cfg)
    monkeypatch.undo()
    ck = Path(cfg.train.out_dir) / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_000001"]
    assert runs.load_state(runs.latest_checkpoint(Path(cfg.train.out_dir)) / "state.pt")["step"] == 1


def test_a_file_size_limit_during_a_save_is_one_line_and_leaves_no_temporary_folder(model_dir, tmp_path):
    """`ulimit -f` below the weights' size: the safetensors write fails inside the first save."""
    import resource
    cmd, _ = _cli(model_dir, tmp_path / "run")
    limit = (model_dir / "model.safetensors").stat().st_size // 2

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, preexec_fn=small_files)
    err = [l for l in proc.stderr.splitlines() if l.strip() and not re.search(r"\d+%\|", l)]  # less the progress bar
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(err) == 1 and re.match(r"error: could not write checkpoint .*step_000001: SafetensorError: .*"
                                      r"last complete checkpoint is none", err[0]), proc.stderr
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == []


# ----------------------------------------------------------------------------------------
# metrics.jsonl cut off mid-line


def test_resume_drops_a_cut_off_last_metrics_line_with_a_warning_and_writes_that_step_again(
        model_dir, tmp_path, monkeypatch, capsys):
    full = train.train(small_cfg(model_dir, tmp_path / "a"))
    cfg = small_cfg(model_dir, tmp_path / "b")
    _killed_after_step_2(cfg, monkeypatch)
    metrics = Path(cfg.train.out_dir) / "metrics.jsonl"
    step3 = json.dumps({"step": 3, **full[2]})
    with open(metrics, "a") as f:
        f.write(step3[:len(step3) // 2])  # the kill came in the middle of step 3's line
    capsys.readouterr()
    resumed = train.train(cfg, resume=True)
    warning = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning:")]
    assert len(warning) == 1 and re.search(r"metrics\.jsonl:3: dropped the cut-off last line", warning[0])
    assert _drop_times(resumed) == _drop_times(full[2:])
    rows = [json.loads(l) for l in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and _drop_times(rows[2:]) == _drop_times(resumed)


def test_an_unreadable_metrics_line_before_the_last_is_named(model_dir, tmp_path):
    cfg = small_cfg(model_dir, tmp_path, "train.steps=2", "train.save_every=1")
    train.train(cfg)
    metrics = Path(cfg.train.out_dir) / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0][:10], *lines[1:]]) + "\n")
    with pytest.raises(runs.RunFolderError, match=r"metrics\.jsonl:1: unreadable metrics line"):
        train.train(small_cfg(model_dir, tmp_path, "train.steps=3", "train.save_every=1"), resume=True)
