"""A step's metrics, and how each combines over torchrun's ranks, declared where it is made.

    stats["reward"] = Mean(value, n_rows)   # a mean over n items: ranks combine it weighted by n
    stats["echo/n_clips"] = Sum(count)      # a count, or a rank's share of a global sum: ranks add it
    stats["time/update"] = Max(seconds)     # the slowest rank's
    stats["lr"] = 1e-6                      # a plain float: equal on every rank (or a fraction of equal
                                            # shares, such as frac_degenerate): ranks average it

Each is a float (it prints, compares and adds as one); its class only says how ranks combine it.
`reduce(stats, world)` turns them into plain floats (in one process as well), so one process and N
ranks log the same numbers for the same rows.
"""
from __future__ import annotations

import torch


class Mean(float):
    """A mean over `n` items (rows, tokens, clips); n = 0: no item on this rank."""

    def __new__(cls, value: float, n: float):
        obj = super().__new__(cls, value)
        obj.n = float(n)
        return obj


class Sum(float):
    """A count, or this rank's share of a sum over every rank."""


class Max(float):
    """A time or memory peak: the slowest rank's."""


def add(total: dict, stats: dict) -> dict:
    """Accumulate per-mini-batch stats of one rank: sums add, means merge by their counts, maxima max."""
    for k, v in stats.items():
        old = total.get(k)
        if old is None:
            total[k] = v
        elif isinstance(v, Mean):
            n = old.n + v.n
            total[k] = Mean((old * old.n + v * v.n) / n if n else float(v), n)
        elif isinstance(v, Max):
            total[k] = Max(max(old, v))
        elif isinstance(v, Sum):
            total[k] = Sum(old + v)
        else:
            raise TypeError(f"metric {k!r}: accumulate only Mean, Sum or Max, got {type(v).__name__}")
    return total


def reduce(stats: dict, world) -> dict[str, float]:
    """Plain floats over every rank (each rank calls it with its own stats; keys may differ by rank)."""
    if world.size == 1:
        return {k: float(v) for k, v in stats.items()}
    kind = lambda v: type(v).__name__ if isinstance(v, (Mean, Sum, Max)) else "float"
    keys = sorted(set().union(*world.gather(sorted((k, kind(v)) for k, v in stats.items()))))
    if len({k for k, _ in keys}) < len(keys):
        raise TypeError(f"a metric is declared with different kinds on different ranks: {keys}")
    dev = world.device
    val = lambda k: stats.get(k, 0.0)
    weight = lambda k, kd: (stats[k].n if kd == "Mean" else 1.0) if k in stats else 0.0
    v = torch.tensor([float(val(k)) for k, _ in keys], dtype=torch.float64, device=dev)
    w = torch.tensor([float(weight(k, kd)) for k, kd in keys], dtype=torch.float64, device=dev)
    present = torch.tensor([float(k in stats) for k, _ in keys], dtype=torch.float64, device=dev)
    total, weighted, weights, ranks = world.sum(v), world.sum(v * w), world.sum(w), world.sum(present)
    largest = world.max_tensor(torch.where(present > 0, v, torch.full_like(v, float("-inf"))))
    out = {}
    for i, (k, kd) in enumerate(keys):
        if kd == "Max":
            out[k] = float(largest[i])
        elif kd == "Sum":
            out[k] = float(total[i])
        elif kd == "Mean":
            out[k] = float(weighted[i] / weights[i]) if weights[i] > 0 else float(total[i] / ranks[i])
        else:
            out[k] = float(total[i] / ranks[i])
    return out
