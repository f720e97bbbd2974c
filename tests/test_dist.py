"""Many processes (torchrun + FSDP2, gloo on CPU): N ranks holding B/N rows take the same optimizer step
as one process holding all B rows; a 2-process run resumes after a kill as if never stopped; rank 0
alone writes files, and its HF export loads with from_pretrained."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from conftest import scripted, small_cfg, with_echo_only_groups

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")

# (case, config overrides, rewards of the 4 policy groups of 4, echo-only groups appended)
CASES = [
    ("grpo+echo", ["algo.name=grpo", "echo.enabled=true", "echo.coef=0.5"], (1, 0, 0, 1, 1, 1, 1, 1, 0, 1, 0, 0, 1, 1, 1, 1), 0),
    ("dapo+echo", ["algo.name=dapo", "echo.enabled=true", "echo.coef=0.5"], (1, 0, 0, 1, 0, 1, 1, 1, 0, 1, 0, 0, 1, 0, 0, 0), 2),
    ("gspo", ["algo.name=gspo", "echo.enabled=false"], (1, 0, 0, 1, 1, 1, 1, 1, 0, 1, 0, 0, 1, 0, 1, 1), 0),
    ("drgrpo", ["algo.name=drgrpo", "echo.enabled=false"], (1, 0, 0, 1, 0, 0, 1, 1, 0, 1, 0, 0, 1, 1, 0, 1), 0),
]


def build_cases(model_dir, tmp_path, dtype: str, lr: float) -> Path:
    """Scored rollout batches of 4 groups x 4 (+ echo-only all-correct groups for DAPO), saved for the worker."""
    cases = {}
    for name, overrides, rewards, n_echo in CASES:
        extra = [*overrides, "rollout.prompts_per_step=4", "rollout.group_size=4", "train.micro_batch_size=3",
                 "train.mini_batches=1", "train.old_logprobs=recompute",
                 "reward.truncated=score", "algo.overlong_buffer=0", f"model.dtype={dtype}", f"train.lr={lr}"]
        run = train.setup(small_cfg(model_dir, tmp_path, *extra),
                          reward_fn=scripted(rewards, (1,) * 4 * max(n_echo, 1)))
        run.cfg.algo.dynamic_sampling = False  # the batch is fixed here; echo-only rows are appended by hand
        batch, _ = train.collect(run)
        if n_echo:  # DAPO's dropped all-success groups, kept for EchoRL with in_policy = 0
            batch = with_echo_only_groups(run, batch, n_echo)
        cases[name] = (batch, extra)
    path = tmp_path / f"cases_{dtype}.pt"
    torch.save(cases, path)
    return path


def one_process(cases: Path, model_dir, out: Path) -> dict:
    threads = torch.get_num_threads()
    try:
        from _dist_worker import main
        main(str(cases), str(model_dir), str(out))
    finally:
        torch.set_num_threads(threads)
    return torch.load(out, weights_only=True)


def two_processes(cases: Path, model_dir, out: Path) -> dict:
    proc = subprocess.run([*TORCHRUN, str(ROOT / "tests" / "_dist_worker.py"), str(cases), str(model_dir), str(out)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("dtype, lr, atol", [
    # float64: the only differences are the order of floating-point sums (within a rank vs across ranks)
    ("float64", 1e-2, 1e-12),
    # float32: gradients agree to ~1e-7; Adam's first step divides by |g| + eps, which amplifies that
    # noise on parameters whose gradient is near eps (1e-8), so the bound is a few percent of lr, not 1e-7
    # (the packed forward sums a shared prompt's gradient over the rows of a micro-batch: another order)
    ("float32", 1e-3, 3e-5),
])
def test_two_ranks_with_half_the_rows_each_take_the_one_process_step(model_dir, tmp_path, dtype, lr, atol):
    cases = build_cases(model_dir, tmp_path, dtype, lr)
    ref = one_process(cases, model_dir, tmp_path / "one.pt")
    got = two_processes(cases, model_dir, tmp_path / "two.pt")
    for name, *_ in CASES:
        a, b = ref[name], got[name]
        moved = max(float((b["params"][k] - a["params"][k]).abs().max()) for k in a["params"])
        assert moved <= atol, (name, moved)
        assert any(not torch.equal(v, torch.zeros_like(v)) for v in b["params"].values())
        # losses (each rank's share of the global loss, summed), and means over rows, tokens and clips
        # (weighted by each rank's count): all equal to the one-process values
        keys = ["loss_pg", "loss_echo", "grad_norm", "clip_frac_low", "clip_frac_high", "reward", "accuracy", "entropy",
                "response_len", "batch/policy_tokens", "batch_rows"]
        keys += ["echo/clip_tokens", "echo/peak_step_entropy", "echo/clip_group_share"] if "echo" in name else []
        for key in keys:
            tol = (1e-9, 1e-12) if dtype == "float64" else (1e-5, 1e-7)  # (rel, abs): sums in another order
            assert b["stats"][key] == pytest.approx(a["stats"][key], rel=tol[0], abs=tol[1]), (name, key)
        if "echo" in name:
            assert a["stats"]["loss_echo"] > 0 and b["stats"]["echo/n_clips"] == a["stats"]["echo/n_clips"]


# The shipped tiny config with a small random model, fp64, and rewards fixed by problem and text; default
# mini-batches (2 per step), whole train_steps: sampling keyed on (seed, step, problem, sample),
# DAPO's refill decided over the global group order, random_step keyed on the row.
STEP_CASES = {
    "grpo+echo random_step": ["algo.name=grpo", "echo.select=random_step"],
    "dapo+echo": ["algo.name=dapo", "algo.max_sampling_rounds=2"],
    "rloo+echo all clips, sentences": ["algo.name=rloo", "echo.clips_per_group=all", "echo.delimiter=sentence"],
}


def test_one_process_and_two_ranks_take_the_same_two_train_steps_on_the_shipped_config(model_dir, tmp_path):
    common = [f"model.name_or_path={model_dir}", "model.dtype=float64", "eval.benchmarks=[]", "train.threads=1",
              "rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=8", "echo.coef=0.5",
              "train.lr=1e-2", "reward.truncated=score", "algo.overlong_buffer=0", "train.micro_batch_size=3"]
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps({k: [*common, *v] for k, v in STEP_CASES.items()}))
    threads = torch.get_num_threads()
    try:
        from _dist_worker import steps
        steps(str(spec), str(tmp_path / "one.pt"))
    finally:
        torch.set_num_threads(threads)
    proc = subprocess.run([*TORCHRUN, str(ROOT / "tests" / "_dist_worker.py"), "--steps", str(spec),
                           str(tmp_path / "two.pt")], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    machine = ("time/", "mem/", "rollout/decode_efficiency")  # depend on the machine and the slot count
    for name in STEP_CASES:
        a, b = one[name], two[name]
        assert max(float((b["params"][k] - a["params"][k]).abs().max()) for k in a["params"]) <= 1e-12, name
        for sa, sb in zip(a["stats"], b["stats"]):
            keys = {k for k in sa if not k.startswith(machine)}
            assert keys == {k for k in sb if not k.startswith(machine)}, name
            for k in keys:
                assert sb[k] == pytest.approx(sa[k], rel=1e-9, abs=1e-12), (name, k)
        assert sum(s["echo/n_clips"] for s in a["stats"]) > 0 and a["stats"][-1]["loss_echo"] > 0, name


def _train_cmd(model_dir, out, *extra):
    sets = [f"model.name_or_path={model_dir}", "data.train=tiny", "eval.benchmarks=[]", "rollout.group_size=4",
            "rollout.prompts_per_step=4", "rollout.max_new_tokens=8", "train.steps=4", "train.save_every=2",
            "log.log_rollouts_every=1", f"train.out_dir={out}", "train.threads=1",
            "algo.entropy_coef=0.1", *extra]  # a random model earns no reward: the entropy bonus moves the weights
    return [*TORCHRUN, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny.yaml")] + \
        [a for s in sets for a in ("--set", s)]


def _metrics(out):
    return [{k: v for k, v in json.loads(l).items() if not k.startswith("time/")}
            for l in (out / "metrics.jsonl").read_text().splitlines() if l]


def test_a_two_process_run_killed_after_a_checkpoint_resumes_as_if_never_stopped(model_dir, tmp_path):
    whole = tmp_path / "whole"
    done = subprocess.run(_train_cmd(model_dir, whole), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    full = _metrics(whole)
    assert [m["step"] for m in full] == [1, 2, 3, 4]   # each step once: rank 0 alone writes

    cut = tmp_path / "cut"
    proc = subprocess.Popen(_train_cmd(model_dir, cut), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (cut / "checkpoints" / "latest").exists():   # killed as soon as the step-2 checkpoint exists
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(_train_cmd(model_dir, cut) + ["--resume"], cwd=ROOT, env=ENV, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _metrics(cut) == full

    # the HF export of the sharded model opens with any HF loader and holds the trained weights
    from transformers import AutoModelForCausalLM
    ck = whole / "checkpoints" / "step_000004"
    model = AutoModelForCausalLM.from_pretrained(ck)
    start = AutoModelForCausalLM.from_pretrained(model_dir)
    assert sorted(p.name for p in ck.glob("rank*.pt")) == ["rank0.pt", "rank1.pt"] and (ck / "sharded").is_dir()
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), start.state_dict().values()))
    assert not list(whole.glob("**/*.tmp*")) and len(list((whole / "rollouts").glob("*.jsonl"))) == 4
    shutil.rmtree(tmp_path / "cut", ignore_errors=True)
