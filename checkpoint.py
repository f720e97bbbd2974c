"""Checkpoints: HF safetensors + optimizer, scheduler, RNG and data-stream state, written atomically.

A checkpoint is written to a temporary folder and renamed into place, and the `latest` pointer is
replaced atomically, so a crash mid-save never corrupts the last good checkpoint; `--resume`
reloads everything a run needs to reproduce the uninterrupted run's next metrics.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (full disk, permissions); the previous one is untouched."""


def save_checkpoint(out: Path, step: int, model, tok, opt, sched, stream, gen, keep: int) -> Path:
    """OUT/checkpoints/step_N/ (+ OUT/checkpoints/latest); keeps the newest `keep` checkpoints.

    A failed write (e.g. a full disk) removes its temporary folder and raises CheckpointError; the
    last complete checkpoint and `latest` stay as they were."""
    ckdir = out / "checkpoints"
    final, tmp = ckdir / f"step_{step:06d}", ckdir / f".tmp_step_{step:06d}"
    try:
        ckdir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "stream": stream.state_dict(), "rng": rng_state(), "echo_rng": gen.get_state()}, tmp / "state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        (ckdir / "latest.tmp").write_text(final.name)
        os.replace(ckdir / "latest.tmp", ckdir / "latest")
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {final}: {e}; the last complete checkpoint is "
                              f"{latest_checkpoint(out) or 'none'}") from None
    for old in sorted(ckdir.glob("step_*"))[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint `latest` points at, if it is complete (its state.pt exists)."""
    p = out / "checkpoints" / "latest"
    if not p.exists():
        return None
    ck = out / "checkpoints" / p.read_text().strip()
    return ck if (ck / "state.pt").exists() else None


def load_checkpoint(ckpt: Path, opt, sched, stream, gen) -> int:
    """Restore optimizer, scheduler, stream and RNG state (weights load with the model); returns the step."""
    st = torch.load(ckpt / "state.pt", weights_only=False)
    opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["scheduler"])
    stream.load_state_dict(st["stream"])
    set_rng_state(st["rng"])
    gen.set_state(st["echo_rng"])
    return st["step"]
