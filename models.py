"""Where a policy comes from and what it is loaded as: the tiny warm start, a local folder or an HF id;
its dtype, random init for throughput checks, config overrides, and the dtype rollouts sample in.
Used by train.py (the policy, the reference model) and eval.py (any model or checkpoint)."""
from __future__ import annotations

import os
import re
import socket
from contextlib import nullcontext
from pathlib import Path

import torch

import tiny
from config import ConfigError
from rollout import load_tokenizer


def load_model(path_or_id: str, dtype: str = "bfloat16", device: str = "auto", attn_implementation: str = "sdpa",
               init: str = "pretrained", config_overrides: dict | None = None, seed: int = 0):
    """(model, tokenizer) from a local HF folder or a hub id, in eval mode on `device`.

    init="random" builds the architecture of the folder's config.json with random weights drawn from
    `seed` (throughput and memory checks need no weights; the same seed gives the same weights).
    `config_overrides` are set on the HF config first (e.g. {"num_hidden_layers": 2}). The tokenizer
    gets a pad token if it has none."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = load_tokenizer(path_or_id)
    conf = AutoConfig.from_pretrained(path_or_id, **(config_overrides or {}))
    if init == "random":
        conf._attn_implementation = attn_implementation
        with torch.device(resolve_device(device)), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(conf, dtype=getattr(torch, dtype))
    else:
        model = AutoModelForCausalLM.from_pretrained(path_or_id, config=conf, dtype=getattr(torch, dtype),
                                                     attn_implementation=attn_implementation)
    return model.to(resolve_device(device)).eval(), tokenizer


def resolve_device(name: str, world=None) -> torch.device:
    """train.device as a torch device (auto: cuda if visible; under torchrun each rank its local GPU)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and world is not None and world.launched:
        name = f"cuda:{world.local_rank}"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key 'train.device' is {name!r} but torch sees no CUDA device "
                          f"(torch {torch.__version__}); on a CPU machine use --set train.device=cpu")
    return dev


_HF_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")  # org/name: anything else is a local path


def model_source(cfg) -> str:
    """Where the policy's weights come from: 'tiny' -> the cached warm start (built on first use), a
    local folder, or an HF hub id. A missing local folder is named as such, and a hub id that is
    neither cached nor reachable fails at once instead of after the hub's retries."""
    name = cfg.model.name_or_path
    if name == "tiny":
        return str(tiny.warm_start(cfg.tiny))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {path} has no config.json (model.name_or_path)")
        return str(path)
    if not _HF_ID.match(name):
        raise FileNotFoundError(f"model folder not found: {path} (model.name_or_path)")
    from huggingface_hub import try_to_load_from_cache
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return name
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("//")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        raise FileNotFoundError(f"model {name!r} (model.name_or_path) is not a local folder, not in the HF cache, "
                                f"and {host} is unreachable: download it first, or point model.name_or_path at a "
                                f"local folder") from None
    return name


def load_policy(path: str, cfg, device: torch.device, checkpoint: bool = False):
    """Policy (or reference) model and tokenizer, as the config asks (dtype, init, overrides, checkpointing).
    A `checkpoint` holds trained weights: it always loads them, whatever model.init says."""
    model, tok = load_model(path, cfg.model.dtype, str(device), cfg.model.attn_implementation,
                            init="pretrained" if checkpoint else cfg.model.init,
                            config_overrides=cfg.model.config_overrides, seed=cfg.train.seed)
    if cfg.model.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model, tok


def rollout_dtype(cfg) -> torch.dtype:
    """The dtype rollouts sample in: rollout.dtype, or the forward's (autocast) dtype, else the weights'."""
    name = cfg.rollout.dtype if cfg.rollout.dtype != "auto" else \
        cfg.model.autocast if cfg.model.autocast != "none" else cfg.model.dtype
    return getattr(torch, name)


def count_parameters(path: str, cfg) -> int:
    """Parameters of the model at `path`, from its config alone (built on the meta device: no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    conf = AutoConfig.from_pretrained(path, **cfg.model.config_overrides)
    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(conf).parameters())


def autocast(cfg, model):
    """Mixed precision for forwards (model.autocast); weights and optimizer states keep model.dtype."""
    if cfg.model.autocast == "none":
        return nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=getattr(torch, cfg.model.autocast))
