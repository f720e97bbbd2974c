"""Shared helpers of the benchmark scripts: machine banner, markdown table, timing and peak memory.

Peak memory is measured where the allocations live:
  * CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` (tensors only; the
    caching allocator's reserve is not counted, so several variants can share one process);
  * CPU: the process's peak resident set (VmHWM) above its resident set when the probe starts.
    Memory freed by one variant stays in the allocator and hides the next one's allocations, so
    each CPU variant runs in a fresh process (`isolated`).
"""
from __future__ import annotations

import os
import platform
import re
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

MiB = 2 ** 20

# ----------------------------------------------------------------------------------------
# Machine, device, table


def resolve_device(name: str | None) -> str:
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    return name


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str) -> str:
    """One line naming the hardware and software the numbers come from."""
    hw = torch.cuda.get_device_name() if device == "cuda" else f"{cpu_model()} ({os.cpu_count()} logical cores)"
    extra = f", CUDA {torch.version.cuda}" if device == "cuda" else ""
    return (f"machine: {hw} | torch {torch.__version__}{extra} | threads {torch.get_num_threads()} | "
            f"python {platform.python_version()}")


def table(headers: list[str], rows: list[list]) -> str:
    """Markdown table; floats get 4 significant digits."""
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    cells = [[fmt(v) for v in r] for r in rows]
    width = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, width)) + " |"
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in width) + "|", *map(line, cells)])


def median(xs) -> float:
    return float(statistics.median(xs))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def clock(device: str) -> float:
    """Wall time after all queued device work is done."""
    sync(device)
    return time.perf_counter()

# ----------------------------------------------------------------------------------------
# Peak memory


def _proc_status_kib() -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(Vm\w+):\s+(\d+) kB", open("/proc/self/status").read())}


class PeakMemory:
    """`with PeakMemory(device) as pm: ...` then `pm.peak_mib` (peak above the start) and `pm.total_mib`.

    CPU: resets the kernel's peak-RSS counter (`/proc/self/clear_refs` <- 5, Linux >= 4.0) so the
    peak covers only the block; where that is not allowed it falls back to `ru_maxrss`, which is
    right only if the process had not been larger before the block.
    """

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.how = "VmHWM"
            self.base = _proc_status_kib()["VmRSS"] * 1024
        except OSError:
            self.how = "ru_maxrss"
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        elif self.how == "VmHWM":
            peak = _proc_status_kib()["VmHWM"] * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.total_mib = peak / MiB
        self.peak_mib = max(0, peak - self.base) / MiB
        return False


def isolated(fn, *args):
    """fn(*args) in a fresh spawned process (fn must be a module-level function); its return value.

    The child's glibc malloc serves every block >= 64 KiB with its own mmap and unmaps it on free
    (MALLOC_MMAP_THRESHOLD_), so its resident set follows the live tensors: otherwise freed blocks
    under 32 MiB stay in the heap and hide later allocations from the peak-RSS probe.
    """
    key, old = "MALLOC_MMAP_THRESHOLD_", os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ[key] = "65536"
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as ex:
            return ex.submit(fn, *args).result()
    finally:
        if old is None:
            del os.environ[key]
        else:
            os.environ[key] = old

# ----------------------------------------------------------------------------------------
# The tiny task: config, model choice, one prepared batch


def tiny_config(overrides: list[str] = ()):
    """configs/tiny.yaml, no evaluation or rollout dumps, cache folder anchored at the repo root."""
    from config import load_config
    return load_config(ROOT / "configs" / "tiny.yaml",
                       [f"tiny.cache_dir={ROOT / '.cache' / 'tiny'}", "eval.benchmarks=[]",
                        "log.log_rollouts_every=0", *overrides])


def cached_warm_model(cfg) -> Path | None:
    """The folder models.model_source(cfg) would return, if the warm start is already cached (never builds)."""
    import tiny
    path = tiny.cache_path(cfg.tiny)
    return path if (path / "config.json").exists() else None


def random_model_dir(cfg, out: Path) -> Path:
    """A randomly initialised tiny Qwen2 of cfg.tiny's size (+ tokenizer) saved as an HF folder."""
    import tiny
    tok = tiny.build_tokenizer()
    tiny.build_model(tok, cfg.tiny, seed=cfg.train.seed).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def hand_rewards(group: torch.Tensor) -> torch.Tensor:
    """Correctness for a random model (which solves nothing): groups cycle all-success, mixed
    (every other rollout), all-fail, so degenerate all-success groups and real advantages both exist."""
    g = group.cpu()
    row = torch.arange(len(g))
    kind = g % 3
    return (kind == 0) | ((kind == 1) & (row % 2 == 0))


def hand_reward_fn(group_size: int):
    """A reward function (train.RewardFn) giving hand_rewards by position: rows i*G .. i*G+G-1 are group i."""
    return lambda texts, golds: hand_rewards(torch.arange(len(texts)) // group_size).float().tolist()
