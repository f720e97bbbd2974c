"""What a first GPU run meets at start-up, checked on CPU: torch.compile's build tools, the NCCL
timeout, an out_dir that not every node sees, old log-probs forced from a bf16 sampler, a KV cache
sized once from the data, and the sampler's compile counters in every step's metrics."""
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

import dist
import tiny
import train
from config import ConfigError
from conftest import scripted, small_cfg
from eval import evaluate_run, load_benchmarks

ROOT = Path(__file__).resolve().parents[1]


def test_compile_on_without_a_compiler_stops_at_setup_with_the_reason(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))        # an empty folder: no g++, clang++, c++
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ConfigError, match=r"rollout.compile on: .*C\+\+ compiler"):
        train.setup(small_cfg(model_dir, tmp_path, "rollout.compile=on", "train.device=cpu"))


def test_process_group_gets_the_configured_timeout_and_no_gpu_under_gloo(monkeypatch, model_dir, tmp_path):
    """torch's default collective timeout (10 min) is shorter than one rank's longest rollout at 7B;
    train.dist_timeout_min (default 60) reaches init_process_group. device_id only binds NCCL's GPU."""
    calls = []
    monkeypatch.setattr(dist.torch_dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist.torch_dist, "init_process_group", lambda *a, **k: calls.append((a, k)))
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(key, value)
    dist.init(small_cfg(model_dir, tmp_path, "train.device=cpu"))
    dist.init(small_cfg(model_dir, tmp_path, "train.device=cpu", "train.dist_timeout_min=90"))
    assert [a for a, _ in calls] == [("gloo",), ("gloo",)]
    assert [k["timeout"] for _, k in calls] == [timedelta(minutes=60), timedelta(minutes=90)]
    assert all(k["device_id"] is None for _, k in calls)


def test_out_dir_that_not_every_rank_sees_stops_at_start_naming_the_ranks(tmp_path):
    """Two gloo ranks: a common folder passes; a folder of each rank's own (out_dir on node-local
    disks) stops every rank at start-up, before the first checkpoint would fail."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "tests" / "_shared_dir_worker.py"), str(tmp_path)],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for r in (0, 1):
        assert f"rank {r}: train.out_dir {tmp_path / f'rank{r}'} is not one folder for every process: rank(s) 1" \
            in proc.stdout, proc.stdout
    assert not list(tmp_path.rglob(".shared_check_*"))  # the marker is removed


def test_old_logprobs_forced_from_a_bf16_sampler_warn_that_tis_has_nothing_to_correct(model_dir, tmp_path):
    with pytest.warns(UserWarning, match="algo.tis_cap a no-op"):
        train.setup(small_cfg(model_dir, tmp_path, "rollout.dtype=bfloat16", "train.old_logprobs=sampler",
                              "algo.tis_cap=2.0"))


def test_qwen_configs_turn_truncated_importance_sampling_on():
    from config import load_config
    for name in ("qwen1.5b", "qwen7b"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        assert cfg.algo.tis_cap == 2.0 and cfg.model.autocast == "bfloat16" and cfg.train.old_logprobs == "auto"


def test_kv_cache_sized_from_the_data_is_allocated_once_through_a_step_and_an_evaluation(model_dir, tmp_path):
    """The training file's questions are the evaluation's, and evaluation asks for 4 more new tokens:
    a cache sized by the first call would be reallocated by the evaluation; sized at setup from the
    longest prompt of both plus the larger max_new_tokens, it is allocated once."""
    problems = tiny.heldout(tiny.TinyConfig(), 2)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"question": p.question, "answer": p.answer}) + "\n" for p in problems))
    cfg = small_cfg(model_dir, tmp_path, f"data.train={path}", "eval.benchmarks=[tiny]", "eval.limit=2", "eval.n=1",
                    "eval.max_new_tokens=12", "rollout.slots=4", "rollout.max_new_tokens=8")
    run = train.setup(cfg, reward_fn=scripted((1, 0, 0, 1, 0, 1, 1, 0)))
    stats, _ = train.train_step(run)
    evaluate_run(run, load_benchmarks(cfg), progress=False)
    assert run.sampler.allocations == 1
    # compile counters are logged with every step (an eager sampler compiles nothing)
    assert stats["sampler/recompiles"] == 0 and stats["sampler/cudagraph_skips"] == 0
