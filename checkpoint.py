"""Checkpoints: HF safetensors + optimizer, scheduler, RNG and data-stream state, written atomically.

    OUT/checkpoints/step_N/   model.safetensors, config.json, tokenizer files (any HF loader opens it)
                              state.pt     step, scheduler, world size (+ optimizer, stream, RNG in one process)
                              sharded/     under torchrun: model and optimizer shards (torch.distributed.checkpoint)
                              rank{r}.pt   under torchrun: each rank's stream, RNG and EchoRL-generator state
    OUT/checkpoints/latest    the name of the newest complete checkpoint

A checkpoint is written to a temporary folder and renamed into place, and `latest` is replaced
atomically, so a crash mid-save never corrupts the last good checkpoint; a failed write (a full
disk) removes its temporary folder. `--resume` reloads everything a run needs to reproduce the
uninterrupted run's next metrics; a run written by N processes resumes with N processes.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or resumed (full disk, another world size); the last complete
    checkpoint is untouched."""


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(out: Path, step: int, run, keep: int) -> Path:
    """OUT/checkpoints/step_N/ (+ OUT/checkpoints/latest) of a train.Run; keeps the newest `keep`.
    Under torchrun every rank calls it (it gathers the full model for the HF export)."""
    import dist
    world = run.world
    ckdir = out / "checkpoints"
    final, tmp = ckdir / f"step_{step:06d}", ckdir / f".tmp_step_{step:06d}"
    error = None
    try:
        if world.main:
            ckdir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        world.barrier()
        full = dist.full_state_dict(run.model, world) if world.size > 1 else None
        state = {"step": step, "scheduler": run.sched.state_dict(), "world_size": world.size}
        if world.size == 1:
            state.update(optimizer=run.opt.state_dict(), stream=run.stream.state_dict(), rng=rng_state(),
                         echo_rng=run.gen.get_state())
        if world.main:
            run.model.save_pretrained(tmp, safe_serialization=True, state_dict=full)
            run.tok.save_pretrained(tmp)
            torch.save(state, tmp / "state.pt")
        if world.size > 1:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict
            model_sd, opt_sd = get_state_dict(run.model, run.opt)
            dcp.save({"model": model_sd, "optimizer": opt_sd}, checkpoint_id=str(tmp / "sharded"))
            torch.save({"stream": run.stream.state_dict(), "rng": rng_state(), "echo_rng": run.gen.get_state()},
                       tmp / f"rank{world.rank}.pt")
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        error = f"{e}"
    errors = [e for e in world.gather(error) if e]
    if errors:
        if world.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {final}: {errors[0]}; the last complete checkpoint is "
                              f"{latest_checkpoint(out) or 'none'}")
    if world.main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        (ckdir / "latest.tmp").write_text(final.name)
        os.replace(ckdir / "latest.tmp", ckdir / "latest")
        for old in sorted(ckdir.glob("step_*"))[:-keep] if keep > 0 else []:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    world.barrier()
    return final


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint `latest` points at, if it is complete (its state.pt exists)."""
    p = out / "checkpoints" / "latest"
    if not p.exists():
        return None
    ck = out / "checkpoints" / p.read_text().strip()
    return ck if (ck / "state.pt").exists() else None


def load_checkpoint(ckpt: Path, run) -> int:
    """Restore optimizer, scheduler, stream and RNG state into a train.Run (the weights load with the
    model); returns the step. A checkpoint resumes only with the number of processes that wrote it."""
    world = run.world
    st = torch.load(ckpt / "state.pt", weights_only=False)
    saved = st.get("world_size", 1)
    if saved != world.size:
        raise CheckpointError(f"{ckpt} was written by {saved} process{'es' * (saved > 1)} and this run has "
                              f"{world.size}: resume with the same number (torchrun --nproc_per_node {saved}"
                              f"{' (or plain python)' if saved == 1 else ''}); each rank's data stream and RNG "
                              f"state belong to it")
    run.sched.load_state_dict(st["scheduler"])
    if world.size == 1:
        run.opt.load_state_dict(st["optimizer"])
        run.stream.load_state_dict(st["stream"])
        set_rng_state(st["rng"])
        run.gen.set_state(st["echo_rng"])
        return st["step"]
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_sd, opt_sd = get_state_dict(run.model, run.opt)
    sd = {"model": model_sd, "optimizer": opt_sd}
    dcp.load(sd, checkpoint_id=str(ckpt / "sharded"))
    set_state_dict(run.model, run.opt, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
    mine = torch.load(ckpt / f"rank{world.rank}.pt", weights_only=False)
    run.stream.load_state_dict(mine["stream"])
    set_rng_state(mine["rng"])
    run.gen.set_state(mine["echo_rng"])
    return st["step"]
