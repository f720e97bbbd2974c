"""One rank of a train.py run that is sent a signal at a named point of a named step (test_signals.py).

    ECHORL_TEST_SIGNAL=POINT:RANK:STEP:SIG[:TO[:HOLD]] torchrun ... tests/_signal_worker.py TRAIN_ARGS...
    rank(env, args, log)     # the same, as the target of a process forked with its torchrun environment

TRAIN_ARGS go to train.main unchanged. With ECHORL_TEST_SIGNAL set, the process of rank RANK sends SIG
(INT or TERM) once, at POINT of step STEP:
    step        the end of train_step: the step's collectives are done, the stop exchange comes next
    exchange    just after the stop exchange has returned (the next step's exchange carries it)
    checkpoint  inside save_checkpoint, between the full model's gather and the sharded write
    eval        at the start of the in-loop evaluation (which comes before that step's exchange)
TO: "self" (default; os.kill: the run's own handler receives it as from a terminal) or "launcher", the
parent process (Ctrl-C on torchrun, which forwards it to every rank). The rank then waits until its
handler has run (the forwarded signal, for "launcher") and, for HOLD seconds more, stays where it is:
a step that outlasts the launcher's grace period.
"""
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dist  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402


def arm(point: str, rank: int, step: int, sig: str, to: str = "self", hold: float = 0.0) -> None:
    if int(os.environ.get("RANK", 0)) != rank:
        return
    done = {"step": 0, "fired": False, "received": 0}  # done["step"]: the last step train_step finished

    def fire():
        if not done["fired"] and done["step"] == step:
            done["fired"] = True
            os.kill(os.getppid() if to == "launcher" else os.getpid(), getattr(signal, f"SIG{sig}"))
            deadline = time.monotonic() + 60
            while not done["received"] and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(hold)

    real_handle = runs.StopAfterStep._handle

    def handle(self, signum, frame):
        done["received"] += 1
        return real_handle(self, signum, frame)

    real_step, real_max, real_eval, real_gather = train.train_step, dist.World.max, train.evaluate_run, \
        runs.get_state_dict

    def train_step(run):
        out = real_step(run)
        done["step"] = run.step
        if point == "step":
            fire()
        return out

    def world_max(self, n):
        out = real_max(self, n)
        if point == "exchange" and sys._getframe(1).f_code is train.train.__code__:  # the loop's one world.max
            fire()
        return out

    def evaluate_run(*a, **k):
        if point == "eval":
            fire()
        return real_eval(*a, **k)

    def get_state_dict(*a, **k):  # save_checkpoint's: after the HF export's gather, before the sharded write
        if point == "checkpoint":
            fire()
        return real_gather(*a, **k)

    train.train_step, train.evaluate_run, runs.get_state_dict, dist.World.max = \
        train_step, evaluate_run, get_state_dict, world_max
    runs.StopAfterStep._handle = handle


def main(args: list[str]) -> None:
    if os.environ.get("ECHORL_TEST_SIGNAL"):
        point, rank_, step, sig, *more = os.environ["ECHORL_TEST_SIGNAL"].split(":")
        arm(point, int(rank_), int(step), sig, *more[:1], *map(float, more[1:2]))
    train.main(args)  # SystemExit(130) on a stop: the process's exit code


def rank(env: dict, args: list[str], log: str) -> None:
    """A forked process as one rank: torchrun's environment variables, stdout and stderr to LOG.stdout and
    LOG.stderr, then main(args)."""
    os.environ.update(env)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        f = os.open(f"{log}.{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    main(args)


if __name__ == "__main__":
    main(sys.argv[1:])
