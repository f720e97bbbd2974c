"""One typed config: dataclasses with defaults, loaded from YAML, overridden by `--set a.b=value`.

Validation happens on load: an unknown key, a wrong type or a value outside a `Literal` gives
an error that names the key and what is allowed. Nothing reads a global; functions get the
parts of the config they need.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from echorl import EchoConfig
from losses import AGGREGATIONS, PRESETS


@dataclass
class ModelConfig:
    name_or_path: str = "tiny"        # "tiny": the embedded warm-started model; else an HF id or a local dir
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"       # weights (and optimizer states)
    autocast: Literal["none", "bfloat16", "float16"] = "none"         # mixed precision for every forward
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"


@dataclass
class TinyConfig:
    """The embedded task (tiny.py): difficulty, model size and the warm start."""
    min_ops: int = 1
    max_ops: int = 4
    max_value: int = 20
    max_operand: int = 9
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 512
    sft_steps: int = 300
    sft_lr: float = 5e-3
    sft_batch_size: int = 64
    sft_habit: float = 0.5            # share of multi-step SFT solutions that box the first intermediate result
    cache_dir: str = ".cache/tiny"


@dataclass
class DataConfig:
    train: str = "tiny"               # "tiny" or a .jsonl/.json file of problems (see data.load_problems)
    question_key: str | None = None   # None: detected from the file
    answer_key: str | None = None
    template: Literal["chat", "plain"] = "chat"
    system_prompt: str | None = None
    shuffle: bool = True


@dataclass
class RolloutConfig:
    group_size: int = 8               # G
    prompts_per_step: int = 16
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    gen_batch_size: int = 0           # sequences per generate call; 0 = all at once


@dataclass
class RewardConfig:
    truncated: Literal["zero", "score"] = "zero"   # a response cut at the length limit scores 0, or is verified
    format_reward: float = 0.0
    workers: int = 1                  # verifier processes for score_batch (1 = in-process); 0 = all cores


@dataclass
class AlgoConfig:
    """`name` picks a preset of losses.PRESETS; any key set here overrides the preset."""
    name: Literal["grpo", "dapo", "drgrpo", "rloo", "reinforce_pp", "gspo"] = "grpo"
    advantage: Literal["grpo", "drgrpo", "rloo", "reinforce_pp_baseline"] | None = None
    policy_loss: Literal["ppo_clip", "gspo"] | None = None
    aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] | None = None
    eps_low: float | None = None
    eps_high: float | None = None
    dual_clip: float | None = None    # c > 1, e.g. 3.0; None = off
    dynamic_sampling: bool | None = None
    max_sampling_rounds: int = 3      # DAPO: extra generate rounds to refill the batch
    overlong_buffer: int | None = None  # DAPO soft overlong punishment over the last N tokens; -1 = max_new_tokens // 4
    overlong_penalty: float = 1.0
    kl_coef: float = 0.0              # k3 KL to the initial policy; 0 = no reference model
    entropy_coef: float = 0.0         # entropy bonus (the authors' runs use 0.001); 0 = off

    def resolved(self) -> "AlgoConfig":
        """A copy with every unset key taken from the preset."""
        preset = PRESETS[self.name]
        return dataclasses.replace(self, **{k: v for k, v in preset.items() if getattr(self, k) is None})


@dataclass
class TrainConfig:
    steps: int = 60
    lr: float = 1e-4
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    ppo_epochs: int = 1
    mini_batches: int = 1             # optimizer steps per epoch
    micro_batch_size: int = 32        # sequences per forward/backward
    logprob_chunk: int = 1024         # tokens per chunk of the LM head + log-softmax
    seed: int = 0
    device: str = "auto"
    threads: int = 0                  # torch CPU threads; 0 = torch default
    out_dir: str = "runs/tiny"
    save_every: int = 20
    keep_checkpoints: int = 2


@dataclass
class EvalConfig:
    benchmarks: list[str] = field(default_factory=lambda: ["tiny"])
    data_dir: str = "../shared/data"
    every: int = 20                   # steps; 0 = only at the start and the end
    at_start: bool = True             # evaluate the initial model before the first step
    n: int = 1
    temperature: float = 0.0          # 0 = greedy
    max_new_tokens: int = 48
    limit: int = 200                  # problems per benchmark; 0 = all
    batch_size: int = 256


@dataclass
class LogConfig:
    wandb: bool = False
    wandb_project: str = "echorl"
    wandb_mode: Literal["offline", "online"] = "offline"
    log_rollouts_every: int = 20      # steps; dump one batch's rollouts (texts, entropies, clips) as JSONL


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    tiny: TinyConfig = field(default_factory=TinyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    echo: EchoConfig = field(default_factory=EchoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)


class ConfigError(ValueError):
    pass


def _coerce(value, tp, key: str):
    """Check/convert one value against a type annotation; raise ConfigError naming `key`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        v = str(value) if all(isinstance(a, str) for a in args) and isinstance(value, int) else value
        if v not in args:
            raise ConfigError(f"config key '{key}': {value!r} is not allowed; allowed values: {list(args)}")
        return v
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1])
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [x.strip() for x in str(value).split(",")] if origin is list else value
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        inner = args[0] if args else str
        return origin(_coerce(v, inner, key) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix or 'top level'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"unknown config key '{key}'; allowed keys{' in ' + prefix[:-1] if prefix else ''}: {names}")
        tp = hints[k]
        kwargs[k] = _build(tp, v, key + ".") if dataclasses.is_dataclass(tp) else _coerce(v, tp, key)
    return cls(**kwargs)


def _set(tree: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    for p in path:
        tree = tree.setdefault(p, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"--set {dotted}: '{p}' is not a section")
    tree[last] = value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """YAML file (optional) + `a.b=value` overrides (values parsed as YAML) -> validated Config."""
    tree = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        tree = yaml.safe_load(p.read_text()) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        _set(tree, k.strip(), yaml.safe_load(v) if v.strip() else "")
    cfg = _build(Config, tree, "")
    cfg.algo = cfg.algo.resolved()
    _check(cfg)
    return cfg


def _check(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    positive = {"rollout.group_size": cfg.rollout.group_size, "rollout.prompts_per_step": cfg.rollout.prompts_per_step,
                "rollout.max_new_tokens": cfg.rollout.max_new_tokens, "train.micro_batch_size": cfg.train.micro_batch_size,
                "train.ppo_epochs": cfg.train.ppo_epochs, "train.mini_batches": cfg.train.mini_batches,
                "train.logprob_chunk": cfg.train.logprob_chunk}
    for k, v in positive.items():
        if v <= 0:
            raise ConfigError(f"config key '{k}' must be > 0, got {v}")
    if cfg.rollout.group_size < 2:
        raise ConfigError("config key 'rollout.group_size' must be >= 2 for group-relative advantages")
    if cfg.rollout.temperature < 0 or not 0 < cfg.rollout.top_p <= 1:
        raise ConfigError("rollout.temperature must be >= 0 and rollout.top_p in (0, 1]")
    if cfg.train.lr <= 0:
        raise ConfigError(f"config key 'train.lr' must be > 0, got {cfg.train.lr}")
    if cfg.algo.aggregation not in AGGREGATIONS:
        raise ConfigError(f"config key 'algo.aggregation' must be one of {AGGREGATIONS}")
    if cfg.algo.dual_clip is not None and cfg.algo.dual_clip <= 1:
        raise ConfigError(f"config key 'algo.dual_clip' must be > 1 (or null), got {cfg.algo.dual_clip}")
    if cfg.echo.coef < 0:
        raise ConfigError(f"config key 'echo.coef' must be >= 0, got {cfg.echo.coef}")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
