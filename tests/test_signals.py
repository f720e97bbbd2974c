"""Ctrl-C or SIGTERM that reaches one rank of a 2-process run (gloo on CPU), at each point of a step:
before the stop exchange, after it, during a checkpoint, during the evaluation; on rank 0 alone and on
rank 1 alone. Every rank stops after the same step, saves it, and exits 130; one line says where the
run stopped and how to continue; `--resume` (2 processes) then writes the uninterrupted run's metrics.

Each rank is its own process with the environment torchrun gives it (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT, ...), so each rank's exit code and stderr are seen apart. The processes are
forked from a server that has imported train.py once (multiprocessing's forkserver): a run then costs
its steps, not the imports. tests/_signal_worker.py sends the signal from inside the named function on
the chosen rank and step. The last tests are Ctrl-C on torchrun itself, which forwards it to every rank,
and a step that outlasts torchrun's grace period (the workers are killed; the previous checkpoint stands).
"""
import json
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import runs

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")

# point -> (the step it happens in, the step every rank stops after); a checkpoint every step, eval at step 2
POINTS = {
    "step": (1, 1),        # the signal comes before the step's stop exchange: the run stops after this step
    "exchange": (1, 2),    # just after it: the next step's exchange carries the request
    "checkpoint": (1, 2),  # during step 1's checkpoint: that checkpoint completes, the run stops after step 2
    "eval": (2, 2),        # the evaluation runs before the exchange: the run stops after this step
}
CASES = [(point, rank, "INT") for point in POINTS for rank in (0, 1)] + [("exchange", 1, "TERM")]


def _args(model_dir, out, *extra):
    sets = [f"model.name_or_path={model_dir}", "data.train=tiny", "eval.benchmarks=[tiny]", "eval.limit=2",
            "eval.n=1", "eval.at_start=false", "eval.every=2", "rollout.group_size=4", "rollout.prompts_per_step=2",
            "rollout.max_new_tokens=8", f"train.steps={STEPS}", "train.save_every=1", "log.log_rollouts_every=0",
            f"train.out_dir={out}", "train.threads=1", "reward.workers=1",
            "algo.entropy_coef=0.1"]  # a random model earns no reward: the entropy bonus moves the weights
    return ["--config", str(ROOT / "configs" / "tiny.yaml"), *[a for s in sets for a in ("--set", s)], *extra]


@pytest.fixture(scope="module")
def forkserver():
    """multiprocessing's forkserver with train.py imported once (PYTHONPATH: the server does not take this
    process's sys.path); every rank process is forked from it."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["train"])
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        env.setenv("OMP_NUM_THREADS", "1")
        multiprocessing.forkserver.ensure_running()  # the server starts with this environment
    return ctx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(ctx, args: list[str], log: Path, signal_at: str = "", timeout: float = 120) -> list[tuple[int, str, str]]:
    """Both ranks of one run, each a process of its own; (exit code, stdout, stderr) per rank. signal_at:
    POINT:RANK:STEP:SIG, where the worker sends the signal (tests/_signal_worker.py)."""
    from _signal_worker import rank
    port = _free_port()
    procs = []
    for r in range(2):
        env = {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "ECHORL_TEST_SIGNAL": signal_at}
        procs.append(ctx.Process(target=rank, args=(env, args, f"{log}.rank{r}")))
        procs[-1].start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.exitcode is None]
    for p in procs:
        if p.exitcode is None:
            p.kill()
            p.join()
    assert not hung, f"rank(s) {hung} still running after {timeout} s"
    return [(p.exitcode, Path(f"{log}.rank{r}.stdout").read_text(), Path(f"{log}.rank{r}.stderr").read_text())
            for r, p in enumerate(procs)]


def _metrics(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if not k.startswith(("time/", "mem/"))}
            for line in (out / "metrics.jsonl").read_text().splitlines() if line]


@pytest.fixture(scope="module")
def reference(forkserver, model_dir, tmp_path_factory):
    """The uninterrupted 2-process run's metrics (every case's --resume must write them)."""
    out = tmp_path_factory.mktemp("signals") / "whole"
    ranks = two_ranks(forkserver, _args(model_dir, out), out.with_suffix(".log"))
    assert [code for code, _, _ in ranks] == [0, 0], ranks[0][2][-3000:] + ranks[1][2][-3000:]
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)) and "eval/tiny/acc" in rows[1]
    return rows


def _check_stopped(out: Path, stop: int, stderr: str) -> None:
    """One line about the stop, no traceback; the checkpoint of the last step complete, no temporary folder."""
    assert "Traceback" not in stderr, stderr[-3000:]
    said = [line for line in stderr.splitlines() if "stop" in line.lower()]
    ck = out / "checkpoints" / f"step_{stop:06d}"
    assert len(said) == 1 and said[0].startswith(f"stopped at step {stop} of {STEPS}; checkpoint {ck}; continue "
                                                 f"with: ") and said[0].endswith(" --resume"), said
    assert runs.latest_checkpoint(out) == ck
    assert {"model.safetensors", "config.json", "state.pt", "rank0.pt", "rank1.pt", "sharded"} <= \
        {p.name for p in ck.iterdir()} and (ck / "sharded" / ".metadata").exists()
    assert not list((out / "checkpoints").glob(".tmp*")) and not list(out.glob("**/*.tmp"))
    assert [r["step"] for r in _metrics(out)] == list(range(1, stop + 1))


@pytest.mark.parametrize("point, signalled, sig", CASES, ids=[f"{p}-rank{r}-SIG{s}" for p, r, s in CASES])
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step_and_resume_matches(
        forkserver, reference, model_dir, tmp_path, point, signalled, sig):
    at, stop = POINTS[point]
    out = tmp_path / "run"
    ranks = two_ranks(forkserver, _args(model_dir, out), tmp_path / "cut", f"{point}:{signalled}:{at}:{sig}")
    assert [code for code, _, _ in ranks] == [130, 130], [err[-2000:] for _, _, err in ranks]
    _check_stopped(out, stop, ranks[0][2] + ranks[1][2])
    notice = [sum("stopping after this step" in line for line in o.splitlines()) for _, o, _ in ranks]
    assert notice == [int(r == signalled) for r in range(2)]  # the signalled rank says so at once

    resumed = two_ranks(forkserver, _args(model_dir, out, "--resume"), tmp_path / "resume")
    assert [code for code, _, _ in resumed] == [0, 0], [err[-2000:] for _, _, err in resumed]
    assert _metrics(out) == reference


def _torchrun(model_dir, out: Path, logs: Path, signal_at: str, *options) -> subprocess.CompletedProcess:
    """torchrun (2 workers, each one's stdout and stderr in LOGS/<run>/attempt_0/<rank>/) on the worker."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *options,
           "--log-dir", str(logs), "--redirects", "3", str(ROOT / "tests" / "_signal_worker.py"),
           *_args(model_dir, out)]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "ECHORL_TEST_SIGNAL": signal_at},
                          capture_output=True, text=True, timeout=180)


def test_ctrl_c_on_torchrun_reaches_every_rank_once_and_the_run_stops_after_a_step(forkserver, reference, model_dir,
                                                                                   tmp_path):
    """torchrun forwards its SIGINT to every worker (one signal each: the stop, not the second Ctrl-C) and
    waits for them; the workers save the step they agree on and exit; torchrun then reports the signal
    itself (its own lines, exit code 1). Here rank 0 sends the SIGINT to torchrun at the end of step 1 and
    waits for the forwarded one, so the run stops after step 1."""
    out, logs = tmp_path / "run", tmp_path / "logs"
    proc = _torchrun(model_dir, out, logs, "step:0:1:INT:launcher")
    assert proc.returncode == 1 and f"got signal: {int(signal.SIGINT)}" in proc.stderr, proc.stderr[-3000:]
    assert "forcefully exiting" not in proc.stderr  # every worker left within torchrun's grace period
    err = {p.parent.name: p.read_text() for p in logs.glob("**/stderr.log")}
    said = {p.parent.name: p.read_text().count("stopping after this step") for p in logs.glob("**/stdout.log")}
    assert said == {"0": 1, "1": 1}  # each rank got the one signal torchrun forwarded, before step 1's exchange
    _check_stopped(out, 1, err["0"] + err["1"])
    resumed = two_ranks(forkserver, _args(model_dir, out, "--resume"), tmp_path / "resume")
    assert [code for code, _, _ in resumed] == [0, 0], [e[-2000:] for _, _, e in resumed]
    assert _metrics(out) == reference


def test_a_step_longer_than_torchruns_grace_period_is_killed_and_the_previous_checkpoint_resumes(
        forkserver, reference, model_dir, tmp_path):
    """Ctrl-C on torchrun while rank 0 writes step 2's checkpoint and stays there longer than torchrun's grace
    period (--shutdown-timeout, 30 s by default): torchrun kills the workers. Step 1's checkpoint is intact
    and `latest`; step 2's half-written temporary folder is left; --resume (here with no periodic
    checkpoint, so nothing rewrites step 2) reproduces the uninterrupted metrics and removes it."""
    out, logs = tmp_path / "run", tmp_path / "logs"
    proc = _torchrun(model_dir, out, logs, "checkpoint:0:2:INT:launcher:60", "--shutdown-timeout", "2")
    assert proc.returncode == 1 and "forcefully exiting" in proc.stderr, proc.stderr[-3000:]
    ck = out / "checkpoints"
    assert runs.latest_checkpoint(out) == ck / "step_000001" and (ck / ".tmp_step_000002").is_dir()
    assert not any("stopped at" in p.read_text() for p in logs.glob("**/stderr.log"))  # killed: no line
    resumed = two_ranks(forkserver, _args(model_dir, out, "--resume", "--set", "train.save_every=0"),
                        tmp_path / "resume")
    assert [code for code, _, _ in resumed] == [0, 0], [e[-2000:] for _, _, e in resumed]
    assert _metrics(out) == reference
    assert runs.latest_checkpoint(out) == ck / f"step_{STEPS:06d}" and not list(ck.glob(".tmp*"))
