"""Many processes, many GPUs: what distribution needs, in one place (torchrun + torch.distributed + FSDP2).

    torchrun --nproc_per_node 8 train.py --config configs/qwen7b.yaml                  # one node
    torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 8 train.py --config ...

Without torchrun (no WORLD_SIZE in the environment) `World` is one process: every reduction below
returns its input, nothing is sharded, and train.py runs its single-process code path unchanged.

Under torchrun every process (rank) holds:
  * the policy, sharded with FSDP2 `fully_shard` on each decoder layer and on the root: fp32 master
    weights, gradients and AdamW states are split across ranks; forwards all-gather one layer at a
    time (in bf16 when the config asks for it, via a MixedPrecisionPolicy);
  * a full, unsharded copy of the policy for sampling (sampler.sampling_copy), refreshed after each
    step's update (all its optimizer steps) by gathering each layer once (`refresh_copy`): generation never all-gathers per
    token, and each rank can stop generating when its own rows are done;
  * its own share of the step's prompts, whole groups (`RankShare`), so group advantages stay local;
    DAPO's refill decides which groups to keep over the global order of the groups (train.collect),
    so N ranks keep the groups one process keeps.
Every quantity the loss divides by is summed over ranks (`World.sum`), so N ranks holding B/N rows
take the same optimizer step as one process holding all B rows (tests/test_dist.py). With
train.mini_batches = k > 1, mini-batch j holds the groups whose index in the step's global order is
j mod k (rollout.mini_batch_rows), on whichever rank they are: one process forms the same ones.
"""
from __future__ import annotations

import os
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as torch_dist

from config import ConfigError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # where reductions run (the rank's GPU under NCCL)
    launched: bool = False            # started by torchrun: the policy is sharded, even on one rank

    @property
    def main(self) -> bool:
        """Only rank 0 prints, shows progress bars and writes files."""
        return self.rank == 0

    def _reduce(self, x: torch.Tensor, op) -> torch.Tensor:
        if self.size == 1:
            return x
        x = x.clone()
        torch_dist.all_reduce(x, op=op)
        return x

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over ranks (x itself in one process)."""
        return self._reduce(x, torch_dist.ReduceOp.SUM)

    def max_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise maximum of x over ranks (x itself in one process)."""
        return self._reduce(x, torch_dist.ReduceOp.MAX)

    def max(self, n: float) -> float:
        """The largest n over ranks, of n's own type."""
        return n if self.size == 1 else type(n)(self.max_tensor(torch.tensor([float(n)], dtype=torch.float64,
                                                                               device=self.device)).item())

    def all(self, flag: bool) -> bool:
        """True when `flag` is true on every rank."""
        return flag if self.size == 1 else self.max(float(not flag)) == 0.0

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order (picklable objects)."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        torch_dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn, *args):
        """fn(*args) on rank 0 alone (one filesystem check, one download); its result, or the exception it
        raised, reaches every rank."""
        if self.size == 1:
            return fn(*args)
        out = None
        if self.main:
            try:
                out = ("ok", fn(*args))
            except Exception as e:  # re-raised on every rank below
                out = ("error", e)
        out = self.gather(out)[0]
        if out[0] == "error":
            raise out[1]
        return out[1]

    def barrier(self) -> None:
        if self.size > 1:
            torch_dist.barrier()


def init(cfg) -> World:
    """The world this process belongs to; under torchrun, the process group (checked before any work)."""
    if "WORLD_SIZE" not in os.environ:  # not launched by torchrun: one process, no process group
        return World()
    world = World(rank=int(os.environ["RANK"]), size=int(os.environ["WORLD_SIZE"]),
                  local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    if cfg.rollout.prompts_per_step % world.size:
        raise ConfigError(f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} is not divisible by the "
                          f"{world.size} processes: every rank samples the same number of whole groups")
    device = cfg.train.device
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    backend = cfg.train.dist_backend if cfg.train.dist_backend != "auto" else ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise ConfigError("train.dist_backend 'nccl' needs CUDA devices; on CPU use 'gloo'")
    if cuda and not torch.cuda.is_available():
        raise ConfigError(f"train.device {device!r} but torch sees no CUDA device")
    if cuda:
        torch.cuda.set_device(world.local_rank)
    if not torch_dist.is_initialized():  # a second run in the same processes reuses the group
        # device_id binds the group to this rank's GPU at once (NCCL's communicators are built eagerly)
        torch_dist.init_process_group(backend, timeout=timedelta(minutes=cfg.train.dist_timeout_min),
                                      device_id=torch.device("cuda", world.local_rank) if backend == "nccl" else None)
    return World(rank=world.rank, size=world.size, local_rank=world.local_rank, launched=True,
                 device=torch.device("cuda", world.local_rank) if backend == "nccl" else torch.device("cpu"))


def even_out(slices: list[list], world: World) -> list[list]:
    """Under torchrun, pad this rank's mini-batches (and each one's micro-batches) with None up to the
    most any rank has: FSDP gathers weights in every forward and reduces gradients in every backward,
    so all ranks must run as many. In one process: the slices unchanged."""
    if world.size == 1:
        return slices
    slices = slices + [[] for _ in range(int(world.max(len(slices))) - len(slices))]
    return [mini + [None] * (int(world.max(len(mini))) - len(mini)) for mini in slices]


def first_in_global_order(flags: torch.Tensor, room: int, start: int, world: World) -> tuple[torch.Tensor, torch.Tensor]:
    """Of this rank's groups flagged [n] (True: wanted), those among the first `room` wanted groups of
    the global order (every rank's groups, rank by rank), and their global indices counted from `start`."""
    every = world.gather(flags.cpu().tolist())
    before = sum(sum(f) for f in every[:world.rank])
    rank_in_order = before + flags.cpu().long().cumsum(0)                          # 1-based, global
    take = flags.cpu() & (rank_in_order <= room)
    return take.to(flags.device), (start + rank_in_order - 1)[take]


def check_shared_folder(path: Path, world: World, wait_s: float = 10.0) -> None:
    """Stop at start-up unless every rank sees the same `path` (train.out_dir). Rank 0 creates each
    checkpoint's temporary folder and every rank writes its shards into it: on nodes that do not share
    that storage the first checkpoint would fail, hours in. Rank 0 writes a marker file; a rank that
    has not seen it after `wait_s` seconds (network file systems may show a new file late) is named."""
    if world.size == 1:
        return
    token = world.gather(secrets.token_hex(8) if world.main else None)[0]
    marker = Path(path) / f".shared_check_{token}"
    if world.main:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(token)
    world.barrier()
    deadline, seen = time.monotonic() + wait_s, False
    while not seen:
        try:
            seen = marker.read_text() == token
        except OSError:
            pass
        if not seen and time.monotonic() > deadline:
            break
        if not seen:
            time.sleep(0.5)
    blind = [(r, host) for r, (ok, host) in enumerate(world.gather((seen, socket.gethostname()))) if not ok]
    world.barrier()
    if world.main:
        marker.unlink(missing_ok=True)
    if blind:
        raise ConfigError(f"train.out_dir {path} is not one folder for every process: rank(s) "
                          f"{', '.join(f'{r} ({h})' for r, h in blind)} do not see the file rank 0 wrote there. "
                          f"Checkpoints are written there by every rank: on several nodes, point train.out_dir "
                          f"at storage every node mounts (NFS, Lustre, ...)")


def abandon(world: World) -> None:
    """Leave the process group after an error, without the barrier: the other ranks may never reach it."""
    if world.launched and torch_dist.is_initialized():
        try:
            torch_dist.destroy_process_group()
        except Exception:
            pass


def bytes_per_param(world_size: int, sampling_bytes: int) -> float:
    """Bytes a parameter costs each rank before activations: fp32 weights, gradients and AdamW's two
    moments (16 bytes) sharded over the ranks, plus the full sampling copy (2 in bf16, 0 if none)."""
    return 16 / world_size + sampling_bytes


def check_fits(n_params: int, world: World, device: torch.device, sampling_bytes: int) -> None:
    """Stop before loading anything when weights, gradients, optimizer states and the sampling copy
    alone would fill the GPU (activations, the KV cache and the logits chunks need room on top)."""
    if device.type != "cuda":
        return
    need = n_params * bytes_per_param(world.size, sampling_bytes)
    have = torch.cuda.get_device_properties(device).total_memory
    if need > 0.8 * have:
            raise ConfigError(f"a {n_params / 1e9:.1f} B-parameter model needs about {need / 2 ** 30:.0f} GiB per GPU for "
                          f"fp32 weights, gradients, AdamW states ({16 / world.size:g} bytes a parameter over "
                          f"{world.size} process{'es' * (world.size > 1)}) and its sampling copy, and this GPU has "
                          f"{have / 2 ** 30:.0f} GiB: run on more GPUs (torchrun --nproc_per_node N)")


def close(world: World) -> None:
    """Leave the process group together: a rank that tears down its connections while another still
    uses them can abort the other (gloo)."""
    if world.launched and torch_dist.is_initialized():
        import gc
        gc.collect()  # sharded modules and their pending work go while the group still exists (reference cycles)
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def shard(model: torch.nn.Module, compute_dtype: torch.dtype | None) -> torch.nn.Module:
    """FSDP2 on each decoder layer and the root. `compute_dtype` (e.g. bf16): forwards and backwards run
    in it while the sharded master weights, gradients and optimizer states stay in the model's dtype.
    Gradients are summed over ranks, not averaged: the loss of each rank is already its share of the
    global loss (global normalisers), so the sum is the full-batch gradient."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if compute_dtype else \
        MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    for unit in fsdp_modules(model):  # each unit reduces its own gradients
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no pre-multiplied sum
    return model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of an HF causal LM (model.model.layers for Llama/Qwen/Mistral-style models)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no model.layers to shard; add its block list to dist.decoder_layers")
    return list(layers)


def fsdp_modules(model: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@torch.no_grad()
def refresh_copy(copy: torch.nn.Module, model: torch.nn.Module) -> None:
    """Copy the sharded policy's weights into the full sampling copy, one FSDP unit at a time: gather
    the unit (unshard), copy the parameters it owns, shard it again, so only one unit is ever full
    beside the copy. All ranks run the same collectives in the same order."""
    prefix = {id(m): name for name, m in model.named_modules()}
    units = [(m, prefix[id(m)]) for m in fsdp_modules(model)]
    target = dict(copy.named_parameters())
    for unit, name in units:
        inner = [p for _, p in units if p != name and (not name or p.startswith(name + "."))]
        unit.unshard()
        for key, param in unit.named_parameters(prefix=name):
            if not any(key.startswith(p + ".") for p in inner):  # another unit's: copied with that unit
                target[key].copy_(param)
        unit.reshard()


def full_state_dict(model: torch.nn.Module, world: World) -> dict | None:
    """The whole model's state dict on rank 0 (on CPU), None elsewhere; a collective: every rank calls it."""
    if not world.launched:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if world.main else None


class RankShare:
    """A rank's share of a problem stream: every rank draws the same global sequence (same seed) and
    keeps its own contiguous slice, so shares are distinct, reproducible, and together equal the
    one-process stream. `next(n)` draws n problems globally (all ranks call it with the same n);
    rank r keeps problems [n r / W, n (r + 1) / W)."""

    def __init__(self, stream, world: World):
        self.stream, self.world = stream, world

    def next(self, n: int) -> list:
        lo, hi = (n * r // self.world.size for r in (self.world.rank, self.world.rank + 1))
        return self.stream.next(n)[lo:hi]

    def state_dict(self):
        return self.stream.state_dict()

    def load_state_dict(self, s):
        self.stream.load_state_dict(s)
