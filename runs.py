"""A run's folder: everything a run writes, and the checks that nothing there is ever lost.

    OUT/config.json            the run's config (written once the run is set up)
    OUT/metrics.jsonl          one line per step (and step 0: the evaluation before RL)
    OUT/rollouts/step_N.jsonl  one batch's texts, token entropies, step ids and EchoClip masks (plots.py)
    OUT/checkpoints/step_N/    model.safetensors, config.json, tokenizer files (any HF loader opens it)
                               state.pt     step, scheduler, world size (+ optimizer, stream, RNG in one process)
                               sharded/     under torchrun: model and optimizer shards (torch.distributed.checkpoint)
                               rank{r}.pt   under torchrun: each rank's stream and RNG state
    OUT/checkpoints/latest     the name of the newest complete checkpoint

A fresh run never writes into a folder that holds another run (prepare_out_dir). A checkpoint is
written to a temporary folder and renamed into place, and `latest` is replaced atomically, so a crash
mid-save never corrupts the last good checkpoint; a failed write (a full disk) removes its temporary
folder, and the next save removes any that a killed run left. `--resume` reloads everything a run
needs to reproduce the uninterrupted run's next metrics; a run written by N processes resumes with N
processes. Opening a run folder never runs code from it: weights are safetensors, state.pt and
rank{r}.pt load with torch.load(weights_only=True) (tensors, lists, ints, strings), and the sharded
metadata with an unpickler that knows only its own classes.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import random
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from tqdm import tqdm

import dist
from config import diff, to_dict
from entropy import step_ids

try:
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or resumed (full disk, another world size, a file that is not
    plain data); the last complete checkpoint is untouched."""


def rng_state() -> dict:
    """Every RNG's state as tensors, ints and lists: it loads with torch.load(weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, mt, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "python": [version, list(mt), py_gauss],
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    version, mt, py_gauss = s["python"]
    random.setstate((version, tuple(mt), py_gauss))
    n = s["numpy"]
    if isinstance(n, dict):
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    else:  # a checkpoint from before the plain-data format: numpy's own tuple
        np.random.set_state(n)
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


# Checkpoints written before the RNG states were plain data hold numpy's MT19937 key array; these are
# the only globals beyond tensors and plain data that loading accepts (no callable in them runs code
# from the file: they rebuild an array from its dtype and bytes).
_OLD_NUMPY_STATE = [_np_reconstruct, (_np_reconstruct, "numpy.core.multiarray._reconstruct"),
                    (_np_reconstruct, "numpy._core.multiarray._reconstruct"), np.ndarray, np.dtype,
                    type(np.dtype(np.uint32))]


def load_state(path: Path) -> dict:
    """A checkpoint's state.pt / rank{r}.pt: tensors and plain data only, never code (weights_only)."""
    try:
        with torch.serialization.safe_globals(_OLD_NUMPY_STATE):
            return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)|WeightsUnpickler error:\s*([^\n]{1,200})", str(e))
        what = next(g for g in found.groups() if g) if found else str(e).splitlines()[0][:200]
        raise CheckpointError(f"{path} is refused: it holds more than tensors and plain data ({what}), and "
                              f"loading it would run code from the file; resume only from checkpoints this "
                              f"project wrote") from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path} could not be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                              f"it is damaged or incomplete") from None


# The metadata of a torch.distributed.checkpoint folder is a plain pickle (sharded/.metadata); it is
# read with only the classes that metadata is made of, so a crafted file cannot run code.
_DCP_METADATA = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if name in _DCP_METADATA.get(module, ()) or (
                module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype))):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")


def _sharded_reader(path: Path):
    """A FileSystemReader for `path` whose metadata is read here, first, with only its own classes
    (torch.distributed.checkpoint would wrap a refusal in its own multi-line error)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta
    meta = path / ".metadata"
    try:
        with open(meta, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{meta} is refused: it holds more than checkpoint metadata ({e}), and loading it "
                              f"would run code from the file; resume only from checkpoints this project wrote"
                              ) from None
    except (OSError, EOFError, ValueError, AttributeError, TypeError) as e:
        raise CheckpointError(f"{meta} could not be read ({type(e).__name__}: {e}); it is damaged or incomplete"
                              ) from None

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata
    return Reader(str(path))


def _sharded_planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            # non-tensor items (the optimizer's hyperparameters) load as plain data; the parent's own
            # torch.load then only ever sees bytes written here from that plain data
            obj = torch.load(value, weights_only=True)
            buf = io.BytesIO()
            torch.save(obj, buf)
            buf.seek(0)
            super().load_bytes(read_item, buf)
    return Planner()


def save_checkpoint(out: Path, step: int, run, keep: int) -> Path:
    """OUT/checkpoints/step_N/ (+ OUT/checkpoints/latest) of a train.Run; keeps the newest `keep`.
    Under torchrun every rank calls it: the collectives (gathering the full model for the HF export,
    the sharded save) run on every rank in the same order whatever fails; each rank's own writes come
    after, and one exchange of errors decides, on every rank alike, whether the checkpoint stands."""
    world = run.world
    ckdir = out / "checkpoints"
    final, tmp = ckdir / f"step_{step:06d}", ckdir / f".tmp_step_{step:06d}"

    def attempt(fn, *args):
        try:
            fn(*args)
            return None
        except Exception as e:  # any writer's failure (safetensors, torch.save, json, a rename) is this save's
            return f"{type(e).__name__}: {str(e).strip() or 'no message'}"

    def fresh():
        ckdir.mkdir(parents=True, exist_ok=True)
        for old in ckdir.glob(".tmp_step_*"):  # this step's, or any a killed save left: never complete
            shutil.rmtree(old, ignore_errors=True)
        tmp.mkdir()
    errors = [e for e in world.gather(attempt(fresh) if world.main else None) if e]
    full, sharded_error = None, None
    if not errors and world.launched:  # collectives: every rank, same order
        full = dist.full_state_dict(run.model, world)
        model_sd, opt_sd = get_state_dict(run.model, run.opt)
        sharded_error = attempt(lambda: dcp.save({"model": model_sd, "optimizer": opt_sd},
                                                 checkpoint_id=str(tmp / "sharded")))

    def own_files():
        state = {"step": step, "scheduler": run.sched.state_dict(), "world_size": world.size,
                 "torchrun": world.launched}
        if not world.launched:
            state.update(optimizer=run.opt.state_dict(), stream=run.stream.state_dict(), rng=rng_state())
        if world.main:
            run.model.save_pretrained(tmp, safe_serialization=True, state_dict=full)
            run.tok.save_pretrained(tmp)
            torch.save(state, tmp / "state.pt")
        if world.launched:
            torch.save({"stream": run.stream.state_dict(), "rng": rng_state()}, tmp / f"rank{world.rank}.pt")
    if not errors:
        errors = [e for e in world.gather(sharded_error or attempt(own_files)) if e]
    def commit():
        shutil.rmtree(final, ignore_errors=True)  # a leftover of this step that `latest` never named
        os.replace(tmp, final)
        (ckdir / "latest.tmp").write_text(final.name)
        os.replace(ckdir / "latest.tmp", ckdir / "latest")
    if not errors:
        errors = [e for e in world.gather(attempt(commit) if world.main else None) if e]
    if errors:
        if world.main:
            shutil.rmtree(tmp, ignore_errors=True)
            with contextlib.suppress(OSError):
                (ckdir / "latest.tmp").unlink(missing_ok=True)
            if latest_checkpoint(out) != final:  # renamed but never recorded as latest
                shutil.rmtree(final, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {final}: {errors[0]}; the last complete checkpoint is "
                              f"{latest_checkpoint(out) or 'none'}")
    if world.main:
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
    st = load_state(ckpt / "state.pt")
    saved, sharded = st.get("world_size", 1), st.get("torchrun", False)
    if (saved, sharded) != (world.size, world.launched):
        how = lambda n, t: f"torchrun --nproc_per_node {n}" if t else "one process (plain python)"
        raise CheckpointError(f"{ckpt} was written by {how(saved, sharded)} and this run is "
                              f"{how(world.size, world.launched)}:"
                              f" resume it the way it was written; each rank's data stream and RNG state belong to it")
    run.sched.load_state_dict(st["scheduler"])
    if not world.launched:
        run.opt.load_state_dict(st["optimizer"])
        run.stream.load_state_dict(st["stream"])
        set_rng_state(st["rng"])
        return st["step"]
    model_sd, opt_sd = get_state_dict(run.model, run.opt)
    sd = {"model": model_sd, "optimizer": opt_sd}
    dcp.load(sd, storage_reader=_sharded_reader(ckpt / "sharded"), planner=_sharded_planner())
    set_state_dict(run.model, run.opt, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
    mine = load_state(ckpt / f"rank{world.rank}.pt")
    run.stream.load_state_dict(mine["stream"])
    set_rng_state(mine["rng"])
    return st["step"]

# ----------------------------------------------------------------------------------------
# Stopping: Ctrl-C finishes the step, saves it and exits


class StopAfterStep:
    """Ctrl-C (SIGINT), or the SIGTERM torchrun sends its workers when it is interrupted, asks the
    loop to stop after the current step, save it and exit; a second Ctrl-C stops at once (the last
    saved checkpoint stays). The handler only sets `requested`: the loop exchanges it between ranks
    once per step and acts on the agreed value. Only in the main thread."""

    def __enter__(self):
        self.requested, self.old = False, {}
        if threading.current_thread() is threading.main_thread():
            self.old = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("Ctrl-C: stopping after this step and saving it (Ctrl-C again to stop now, without saving)")

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)
        return False


class Interrupted(Exception):
    """The run stopped on Ctrl-C after saving its last completed step."""

# ----------------------------------------------------------------------------------------
# The folder: metrics, rollout dumps, the checks before a run starts, the closing lines


def dump_rollouts(batch, run, path: Path) -> None:
    """One JSON line per rollout: text, tokens, entropies, step ids and EchoClip mask (for plots)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sids = batch.extras.get("step_ids")
    if sids is None:  # EchoRL off: the steps it would have used
        sids = step_ids(batch.response_ids, batch.response_mask, run.delims, run.eos, run.cfg.echo.min_step_tokens)
    tok = run.tok
    with open(path, "w") as f:
        for i in range(len(batch)):
            n = int(batch.response_mask[i].sum())
            ids = batch.response_ids[i, :n].tolist()
            row = {"group": int(batch.group[i]), "correct": bool(batch.correct[i]), "reward": float(batch.rewards[i]),
                   "prompt": batch.extras["prompts"][i], "gold": batch.extras["golds"][i], "text": batch.texts[i],
                   "tokens": tok.convert_ids_to_tokens(ids), "token_text": [tok.decode([t]) for t in ids],
                   "entropy": [round(x, 5) for x in batch.entropies[i, :n].tolist()],
                   "step_ids": sids[i, :n].tolist(),
                   "clip": batch.clip_mask[i, :n].int().tolist() if batch.clip_mask is not None else None}
            f.write(json.dumps(row) + "\n")


class Logger:
    """metrics.jsonl (always), wandb (optional, offline by default)."""

    def __init__(self, cfg, out: Path, resume_step: int):
        self.path = out / "metrics.jsonl"
        if self.path.exists():  # a resumed run drops the lines past its checkpoint
            rows = read_metrics(self.path)
            lines = [json.dumps(r) for r in rows if r["step"] <= resume_step]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(l + "\n" for l in lines))
            os.replace(tmp, self.path)  # a kill here keeps the old lines, never half of them
        self.wandb = None
        if cfg.log.wandb:
            import wandb
            self.wandb = wandb.init(project=cfg.log.wandb_project, mode=cfg.log.wandb_mode, config=to_dict(cfg),
                                    dir=str(out))

    def log(self, step: int, metrics: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)


def read_metrics(path: Path, warn: bool = True) -> list[dict]:
    """The rows of a metrics.jsonl. A cut-off last line (a kill or a full disk mid-write) is dropped with a
    warning: its step comes after the last checkpoint, so the resumed run writes it again. Any other
    unreadable line is a RunFolderError naming it."""
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("no integer 'step'")
        except ValueError as e:
            if i == len(lines):
                if warn:
                    print(f"warning: {path}:{i}: dropped the cut-off last line ({line[:40]!r}...); the resumed run "
                          f"writes that step again", file=sys.stderr)
                break
            raise RunFolderError(f"{path}:{i}: unreadable metrics line ({e}); only the last line may be cut off")
        rows.append(row)
    return rows


# Keys that may change when a run resumes (they change how long it runs or what it logs, not what it learns).
RESUMABLE_CHANGES = ("train.steps", "train.save_every", "train.keep_checkpoints", "train.threads", "reward.workers",
                     "eval.", "log.")


def prepare_out_dir(cfg, resume: bool, overwrite: bool, allow_changes: bool) -> Path | None:
    """Checks the run folder before any work; returns the checkpoint to resume from (or None).

    A fresh run never writes into a folder that holds another run: it stops, unless `overwrite`
    moves the old run aside. `resume` continues the folder's run from its latest checkpoint, with
    the same config (keys that only change length or logging may differ; others need allow_changes)."""
    out = Path(cfg.train.out_dir)
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            raise RunFolderError(f"train.out_dir {out}: {parent} is a file, not a folder; choose another "
                                 f"train.out_dir")
    saved = out / "config.json"
    has_run = saved.exists() or (out / "metrics.jsonl").exists() or (out / "checkpoints").exists()
    if not resume:
        if has_run and not overwrite:
            raise RunFolderError(
                f"{out} already holds a run ({describe_run(out)}). Continue it with --resume, train into another "
                f"folder with --set train.out_dir=..., or pass --overwrite to move the old run aside.")
        if has_run:
            aside = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(out, aside)
            print(f"moved the previous run in {out} to {aside}")
        return None
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        if has_run:
            raise RunFolderError(f"--resume: {out} holds a run but no complete checkpoint to resume from "
                                 f"({describe_run(out)}); start it again with --overwrite")
        print(f"--resume: no run in {out}; starting a new one")
        return None
    if saved.exists():
        changes = diff(json.loads(saved.read_text()), json.loads(json.dumps(to_dict(cfg))))
        blocking = [c for c in changes if not c.split(":")[0].startswith(RESUMABLE_CHANGES)]
        if blocking and not allow_changes:
            raise RunFolderError(f"--resume: the config differs from the one {out} was trained with:\n  "
                                 + "\n  ".join(blocking) + "\nresume with the same config, or pass --allow-changes")
    return ckpt


class RunFolderError(RuntimeError):
    pass


def describe_run(out: Path) -> str:
    """'grpo+echo, 60 of 60 steps, last checkpoint step_000060' from a run folder's files."""
    parts = []
    try:
        c = json.loads((out / "config.json").read_text())
        parts.append(f"{c['algo']['name']}{'+echo' if c['echo']['enabled'] else ''}, "
                     f"{c['train']['steps']} steps planned")
    except (OSError, ValueError, KeyError):
        pass
    try:
        steps = [r["step"] for r in read_metrics(out / "metrics.jsonl", warn=False)]
        parts.append(f"metrics up to step {steps[-1]}" if steps else "no metrics")
    except (OSError, RunFolderError):
        pass
    ck = latest_checkpoint(out)
    parts.append(f"last checkpoint {ck.name}" if ck else "no checkpoint")
    return ", ".join(parts)


def further(command: str, steps: int) -> str:
    """`command` resumed to `steps` steps: its own --resume and train.steps overrides are dropped."""
    kept = re.sub(r"\s--resume\b|\s--set[ =]train\.steps=\S+", "", command)
    return f"{kept} --resume --set train.steps={steps}"


def launch_command(args_line: str) -> str:
    """How this process was launched, as a command to print: this interpreter's path, and under
    torchrun the same interpreter's `-m torch.distributed.run` with the same number of processes."""
    if "WORLD_SIZE" in os.environ:
        n = os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])
        return f"{python_cmd()} -m torch.distributed.run --nproc_per_node {n} {args_line}"
    return f"{python_cmd()} {args_line}"


def rerun_hint(out: Path | None, command: str) -> str:
    """The command that continues a stopped run: --resume where a checkpoint exists, else --overwrite."""
    if out is None:
        return ""
    clean = re.sub(r"\s--(resume|overwrite)\b", "", command)
    if latest_checkpoint(out):
        return f"; continue with: {clean} --resume"
    return f"; nothing was saved, start again with: {clean} --overwrite"


def summary(cfg, rows: list[dict], wall: float, out: Path, command: str) -> None:
    """The closing lines of a run: held-out accuracy before -> after, time, where things are, what next."""
    py = python_cmd()
    evals = [h for h in rows if any(k.startswith("eval/") for k in h)]
    lines = [f"done: {cfg.train.steps} steps of {cfg.algo.name}{' + EchoRL' if cfg.echo.enabled else ''} "
             f"in {wall / 60:.1f} min"]
    for key in sorted({k for h in evals for k in h if k.startswith("eval/") and k.endswith("/acc")}):
        pts = [(h["step"], h[key]) for h in evals if key in h]
        lines.append(f"held-out {key.split('/')[1]} accuracy: " + " -> ".join(f"{v:.3f} (step {s})" for s, v in
                                                                              [pts[0], pts[-1]][:len(pts)]))
    last = latest_checkpoint(out)
    lines.append(f"run folder: {out} (metrics.jsonl, rollouts/, checkpoints/{last.name if last else ''})")
    lines.append("next:")
    lines.append(f"  {py} plots.py {out}")
    if last:
        lines.append(f"  {py} eval.py --model {last}")
    lines.append(f"  {further(command, 2 * cfg.train.steps)}   # train further")
    print("\n".join(lines))


def python_cmd() -> str:
    """How to call this Python in a printed command: the venv's path relative to here, else `python`."""
    exe = Path(sys.executable)
    try:
        return str(exe.relative_to(Path.cwd()))
    except ValueError:
        return "python"
