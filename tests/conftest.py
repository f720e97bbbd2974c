"""Shared fixtures: a small random tiny model saved as an HF folder, and a small run config around it."""
from pathlib import Path

import pytest
import torch

import tiny
import train
from config import load_config
from rollout import concat

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TINY = ["model.name_or_path=tiny", "data.train=tiny"]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_random")
    tok = tiny.build_tokenizer()
    tiny.build_model(tok, seed=0, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=64).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def small_cfg(model_dir, tmp_path, *extra):
    return load_config(None, [f"model.name_or_path={model_dir}", "data.train=tiny", "eval.benchmarks=[]",
                              "rollout.group_size=4", "rollout.prompts_per_step=2", "rollout.max_new_tokens=8",
                              "train.micro_batch_size=8", "train.mini_batches=1", "train.steps=4",
                              "train.save_every=2", "log.log_rollouts_every=0", "reward.workers=1",
                              f"train.out_dir={tmp_path}/run", "train.lr=1e-2", *extra])


def scripted(*rounds):
    """A reward function that returns the given rewards, one list per call (a random model solves nothing)."""
    it = iter(rounds)
    return lambda texts, golds: [float(x) for x in next(it)]




@pytest.fixture(scope="module")
def tok_model():
    """The tiny tokenizer and a small random model (2 layers), in eval mode."""
    tok = tiny.build_tokenizer()
    model = tiny.build_model(tok, seed=1, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=64).eval()
    return tok, model


def with_echo_only_groups(run, batch, n_groups: int):
    """`batch` with n_groups more sampled and scored groups appended as DAPO's echo-only rows (in_policy 0)."""
    G = run.cfg.rollout.group_size
    echo = train.sample(run, run.stream.next(n_groups))
    train.score(run, echo)
    echo.in_policy = torch.zeros(len(echo))
    echo.extras["global_group"] = [i // G for i in range(len(echo))]
    out = concat([batch, echo], run.tok.pad_token_id)
    out.group = torch.arange(len(out) // G).repeat_interleave(G)
    return out
