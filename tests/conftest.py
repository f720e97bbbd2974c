"""Shared fixtures: a small random tiny model saved as an HF folder, and a small run config around it."""
from pathlib import Path

import pytest

import tiny
from config import load_config

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


