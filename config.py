"""One typed config: dataclasses with defaults, loaded from YAML, overridden by `--set a.b=value`.

The defaults ARE the embedded experiment (configs/tiny.yaml names only the model and the data); a
config for another model overrides what differs (configs/qwen1.5b.yaml). Each default lives in one
place: here, or in the dataclass of the module that owns the section (`echo` in echorl.py, `tiny` in
tiny.py).

Validation happens on load, before any work: an unknown key, a wrong type, a value outside a
`Literal` or outside a registry (the tables of losses.py: methods, advantages, policy losses,
aggregations) gives an error that names the key and what is allowed. Functions get the config
sections they need as arguments; the only module state the loop reads is reward.py's counter of
verifier bound hits (for logging) and its fixed bounds.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from echorl import EchoConfig
from losses import ADVANTAGES, AGGREGATIONS, POLICY_LOSSES, PRESETS
from tiny import TinyConfig


def choice(default, registry: dict | tuple, doc: str = ""):
    """A string key whose allowed values are the keys of a registry (the source of truth)."""
    return field(default=default, metadata={"choices": registry, "doc": doc})


@dataclass
class ModelConfig:
    name_or_path: str | None = None   # required: "tiny" (the embedded warm-started model), an HF id or a local dir
    init: Literal["pretrained", "random"] = "pretrained"  # random: name_or_path's architecture, random weights
    config_overrides: dict = field(default_factory=dict)  # set on the HF config before building, e.g. {num_hidden_layers: 2}
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32"  # weights (and optimizer states)
    autocast: Literal["none", "bfloat16", "float16"] = "none"         # mixed precision for every forward
    gradient_checkpointing: bool = False
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"


@dataclass
class DataConfig:
    train: str | None = None          # required: "tiny" (tiny.py's task) or a .jsonl/.json file of problems
    question_key: str | None = None   # None: detected from the file
    answer_key: str | None = None
    template: Literal["chat", "plain"] = "chat"
    system_prompt: str | None = None
    shuffle: bool = True
    max_question_chars: int = 16000   # a longer question stops the load with its file and line (3x MATH's longest)


@dataclass
class RolloutConfig:
    group_size: int = 8               # G
    prompts_per_step: int = 32
    max_new_tokens: int = 48
    temperature: float = 1.0          # > 0: greedy rollouts would make every group degenerate
    top_p: float = 1.0
    engine: Literal["slots", "hf"] = "slots"  # sampler.Sampler (continuous refill), or plain HF generate
    slots: int = 0                    # sequences decoded at once; a finished one's slot takes the next row. 0 = all
    compile: Literal["auto", "on", "off"] = "auto"  # the decoding step as CUDA graphs; auto: on for CUDA when a C
                                      # compiler and Python headers are there (else eager, said in one line)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # sampling weights; auto: model.autocast,
                                      # else model.dtype. Another dtype than the policy's keeps a copy in it


@dataclass
class RewardConfig:
    truncated: Literal["zero", "score"] = "zero"   # a response cut at the length limit scores 0, or is verified
    format_reward: float = 0.0        # reward of a wrong answer that is at least boxed (shaping); 0 = off
    workers: int = 1                  # verifier processes for score_batch (1 = in-process); 0 = all cores


@dataclass
class AlgoConfig:
    """`name` picks a row of losses.PRESETS; any key set here overrides the preset."""
    name: str = choice("grpo", PRESETS)
    advantage: str | None = choice(None, ADVANTAGES)
    policy_loss: str | None = choice(None, POLICY_LOSSES)
    aggregation: str | None = choice(None, AGGREGATIONS)
    eps_low: float | None = None
    eps_high: float | None = None
    dual_clip: float | None = None    # c > 1, e.g. 3.0; None = off
    dynamic_sampling: bool | None = None
    max_sampling_rounds: int = 3      # DAPO: extra generate rounds to refill the batch
    overlong_buffer: int | None = None  # DAPO soft overlong punishment over the last N tokens; -1 = max_new_tokens // 4
    overlong_penalty: float = 1.0
    kl_coef: float = 0.0              # k3 KL to the initial policy; 0 = no reference model
    tis_cap: float | None = None      # truncated importance sampling: per-token loss x min(pi_old / pi_sampler, cap)
    entropy_coef: float | None = None  # entropy bonus; 0 = off (the `paper` preset: 0.001, the authors' script)
    zvp_coef: float = 0.0             # RL-ZVP's alpha: zero-variance groups get per-token advantages +-alpha * entropy
                                      # (losses.zvp_advantages; the paper uses 0.1); 0 = off

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
    mini_batches: int = 2             # optimizer steps per epoch
    micro_batch_size: int = 64        # sequences per forward/backward
    logprob_chunk: int = 1024         # tokens per chunk of the LM head + log-softmax
    pack: bool = True                 # the update's forward over real tokens only, rows packed into one sequence
                                      # (packing.py); false: padded prompt + response rows (entropy.py, the reference)
    prompt_once: bool = True          # with pack: each distinct prompt of a micro-batch forwarded once, its keys and
                                      # values shared by the group's rows (not for float64 weights: packing.py)
    old_logprobs: Literal["auto", "recompute", "sampler"] = "auto"  # the old policy's log-probs and entropies:
                                      # the sampler's (no extra pass), or a teacher-forced pass. auto: the
                                      # sampler's where they are the same numbers (it samples with the policy's
                                      # own weights and dtype), else recompute and log the mismatch
    seed: int = 0
    device: str = "auto"              # auto: cuda if visible, else cpu; "cuda" without a GPU stops at load
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"  # under torchrun; auto: nccl on GPUs, gloo on CPU
    dist_timeout_min: float = 60.0    # how long a collective waits for the slowest rank (torch's default, 10, is
                                      # shorter than one rank's longest rollout or rank 0's HF export at 7B)
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
    n: int = 4                        # samples per problem (avg@n)
    temperature: float = 1.0          # 0 = greedy (n is then 1)
    max_new_tokens: int | None = None  # None: rollout.max_new_tokens
    limit: int = 200                  # problems per benchmark; 0 = all
    batch_size: int = 256             # sequences per generate call


@dataclass
class LogConfig:
    wandb: bool = False
    wandb_project: str = "echorl"
    wandb_mode: Literal["offline", "online"] = "offline"
    log_rollouts_every: int = 20      # steps; dump one batch's rollouts (texts, entropies, clips) as JSONL
    probe_every: int = 0              # steps; EchoRL's probes (echorl.probe_update, probe_sharpening): gradient
                                      # share, peak-step entropy change (whole update, echo-only, policy-only
                                      # step), peak-step stakes; 0 = off
    stakes_samples: int = 8           # K continuations per prefix for the stakes of the peak step; 0 = off
    stakes_clips: int = 16            # the most EchoClips whose stakes a probe measures (0: every clip)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    tiny: TinyConfig = field(default_factory=TinyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=lambda: AlgoConfig().resolved())
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
        if isinstance(value, bool) and {"on", "off"} <= set(args):  # YAML 1.1 reads a bare on/off as a bool
            v = "on" if value else "off"
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
        if origin is tuple and args and len(value) != len(args):
            raise ConfigError(f"config key '{key}': expected {len(args)} values, got {value!r}")
        return origin(_coerce(v, inner, key) for v in value)
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
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
        raise ConfigError(f"config section '{prefix[:-1] or 'top level'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in fields:
            raise ConfigError(f"unknown config key '{key}'; allowed keys{' in ' + prefix[:-1] if prefix else ''}: "
                              f"{list(fields)}")
        tp = hints[k]
        kwargs[k] = _build(tp, v, key + ".") if dataclasses.is_dataclass(tp) else _coerce(v, tp, key)
        registry = fields[k].metadata.get("choices")
        if registry is not None and kwargs[k] is not None and kwargs[k] not in registry:
            raise ConfigError(f"config key '{key}': {kwargs[k]!r} is not allowed; allowed values: {list(registry)}")
    return cls(**kwargs)


def _set(tree: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    for p in path:
        tree = tree.setdefault(p, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"--set {dotted}: '{p}' is not a section")
    tree[last] = value


def read_yaml(path: str | Path) -> dict:
    """A config file as a mapping; every problem is named with the file (and line, column)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        tree = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"config file {p}:{where}: YAML error: {getattr(e, 'problem', None) or e}") from None
    if tree is None:
        raise ConfigError(f"config file {p} is empty: a config names at least the model and the data "
                          f"(see configs/tiny.yaml)")
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections (model:, data:, ...), "
                          f"got a {type(tree).__name__}")
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """YAML file (optional) + `a.b=value` overrides (values parsed as YAML) -> validated Config."""
    tree = read_yaml(path) if path is not None else {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            value = yaml.safe_load(v) if v.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item}: the value is not valid YAML ({getattr(e, 'problem', e)})") from None
        _set(tree, k.strip(), value)
    return from_dict(tree)


def from_dict(tree: dict) -> Config:
    """A validated Config from a mapping (a parsed YAML file, or a run's saved config.json)."""
    cfg = _build(Config, tree, "")
    cfg.algo = cfg.algo.resolved()
    check(cfg)
    return cfg


def check(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express; all run before any work."""
    for key in ("model.name_or_path", "data.train"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) in (None, ""):
            raise ConfigError(f"config key '{key}' is required: 'tiny' for the embedded "
                              f"{'model' if section == 'model' else 'task'}, or "
                              f"{'an HF id or a local model folder' if section == 'model' else 'a .jsonl/.json file'}")
    positive = {"rollout.group_size": cfg.rollout.group_size, "rollout.prompts_per_step": cfg.rollout.prompts_per_step,
                "rollout.max_new_tokens": cfg.rollout.max_new_tokens, "train.micro_batch_size": cfg.train.micro_batch_size,
                "train.ppo_epochs": cfg.train.ppo_epochs, "train.mini_batches": cfg.train.mini_batches,
                "train.logprob_chunk": cfg.train.logprob_chunk, "train.steps": cfg.train.steps,
                "eval.n": cfg.eval.n, "eval.batch_size": cfg.eval.batch_size,
                "data.max_question_chars": cfg.data.max_question_chars}
    for k, v in positive.items():
        if v <= 0:
            raise ConfigError(f"config key '{k}' must be > 0, got {v}")
    nonneg = {"train.save_every": cfg.train.save_every, "train.warmup_steps": cfg.train.warmup_steps,
              "eval.every": cfg.eval.every, "eval.limit": cfg.eval.limit, "log.log_rollouts_every":
              cfg.log.log_rollouts_every, "log.probe_every": cfg.log.probe_every,
              "log.stakes_samples": cfg.log.stakes_samples, "log.stakes_clips": cfg.log.stakes_clips,
              "algo.max_sampling_rounds": cfg.algo.max_sampling_rounds,
              "reward.workers": cfg.reward.workers, "train.threads": cfg.train.threads,
              "rollout.slots": cfg.rollout.slots, "algo.kl_coef": cfg.algo.kl_coef,
              "algo.entropy_coef": cfg.algo.entropy_coef, "algo.zvp_coef": cfg.algo.zvp_coef, "echo.coef": cfg.echo.coef,
              "train.keep_checkpoints": cfg.train.keep_checkpoints}
    for k, v in nonneg.items():
        if v < 0:
            raise ConfigError(f"config key '{k}' must be >= 0, got {v}")
    if cfg.rollout.group_size < 2:
        raise ConfigError("config key 'rollout.group_size' must be >= 2 for group-relative advantages")
    if cfg.rollout.temperature == 0:
        raise ConfigError("config key 'rollout.temperature' is 0 (greedy): all G samples of a prompt would be "
                          "identical, every group degenerate and the policy loss 0 for the whole run; train with a "
                          "temperature > 0 (greedy decoding belongs in evaluation: eval.temperature=0)")
    if cfg.rollout.temperature < 0 or not 0 < cfg.rollout.top_p <= 1:
        raise ConfigError("rollout.temperature must be > 0 and rollout.top_p in (0, 1]")
    if cfg.eval.temperature < 0:
        raise ConfigError(f"config key 'eval.temperature' must be >= 0, got {cfg.eval.temperature}")
    if cfg.eval.max_new_tokens is not None and cfg.eval.max_new_tokens <= 0:
        raise ConfigError(f"config key 'eval.max_new_tokens' must be > 0 (or null), got {cfg.eval.max_new_tokens}")
    if cfg.train.dist_timeout_min <= 0:
        raise ConfigError(f"config key 'train.dist_timeout_min' must be > 0, got {cfg.train.dist_timeout_min}")
    if cfg.train.lr <= 0:
        raise ConfigError(f"config key 'train.lr' must be > 0, got {cfg.train.lr}")
    if cfg.algo.dual_clip is not None and cfg.algo.dual_clip <= 1:
        raise ConfigError(f"config key 'algo.dual_clip' must be > 1 (or null), got {cfg.algo.dual_clip}")
    if cfg.algo.tis_cap is not None and cfg.algo.tis_cap <= 0:
        raise ConfigError(f"config key 'algo.tis_cap' must be > 0 (or null), got {cfg.algo.tis_cap}")
    if cfg.log.probe_every and cfg.log.stakes_samples and cfg.rollout.engine != "slots":
        raise ConfigError("log.stakes_samples: the stakes probe continues prefixes with the slot sampler; set "
                          "rollout.engine: slots, or log.stakes_samples: 0")
    if cfg.algo.eps_low < 0 or cfg.algo.eps_high < 0:
        raise ConfigError("config keys 'algo.eps_low' and 'algo.eps_high' must be >= 0")
    if cfg.algo.zvp_coef > 0 and cfg.algo.policy_loss != "ppo_clip":
        raise ConfigError(f"config key 'algo.zvp_coef' gives per-token advantages, which need algo.policy_loss "
                          f"'ppo_clip' (got {cfg.algo.policy_loss!r}: one ratio per sequence)")
    if cfg.algo.zvp_coef > 0 and cfg.algo.dynamic_sampling:
        raise ConfigError("config key 'algo.zvp_coef' learns from the zero-variance groups that "
                          "'algo.dynamic_sampling' drops; set algo.dynamic_sampling=false")
    if cfg.echo.delimiter == "ids" and not cfg.echo.delimiter_ids:
        raise ConfigError("config key 'echo.delimiter_ids' must list at least one token id for echo.delimiter=ids")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (as saved in a run's config.json)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict) and k not in ("config_overrides",):
            out += diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out
