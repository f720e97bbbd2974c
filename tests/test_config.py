"""config.py as a specification: YAML + --set overrides, presets, and every refused value named."""
import pytest

from config import ConfigError, load_config

from conftest import TINY


def test_config_errors_name_the_key_and_the_allowed_values(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'echo.coeff'.*'coef'"):
        load_config(None, [*TINY, "echo.coeff=0.1"])
    with pytest.raises(ConfigError, match=r"'algo.name': 'ppo' is not allowed.*'grpo'.*'gspo'"):
        load_config(None, [*TINY, "algo.name=ppo"])
    with pytest.raises(ConfigError, match=r"'echo.select': 'middle' is not allowed.*'peak'"):
        load_config(None, [*TINY, "echo.select=middle"])
    with pytest.raises(ConfigError, match=r"'train.steps': expected an integer"):
        load_config(None, [*TINY, "train.steps=many"])
    with pytest.raises(ConfigError, match=r"'rollout.group_size' must be >= 2"):
        load_config(None, [*TINY, "rollout.group_size=1"])
    with pytest.raises(ConfigError, match="expects key=value"):
        load_config(None, [*TINY, "echo.coef"])
    with pytest.raises(FileNotFoundError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trian:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'"):
        load_config(bad)


def test_set_values_are_parsed_as_yaml_and_floats_accept_exponents_without_a_dot():
    c = load_config(None, [*TINY, "train.lr=5e-4", "eval.benchmarks=[tiny, gsm8k]", "echo.clips_per_group=1",
                           "algo.dual_clip=null"])
    assert c.train.lr == 5e-4 and c.eval.benchmarks == ["tiny", "gsm8k"]
    assert c.echo.clips_per_group == "1" and c.algo.dual_clip is None


def test_presets_fill_unset_keys_and_explicit_keys_win():
    c = load_config(None, [*TINY, "algo.name=dapo"])
    assert (c.algo.eps_low, c.algo.eps_high, c.algo.aggregation, c.algo.dynamic_sampling) == (0.2, 0.28, "token-mean", True)
    c = load_config(None, [*TINY, "algo.name=dapo", "algo.eps_high=0.3"])
    assert c.algo.eps_high == 0.3


def test_config_file_problems_name_the_file_and_position(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing but a comment\n")
    with pytest.raises(ConfigError, match=r"empty.yaml is empty"):
        load_config(empty)
    listy = tmp_path / "list.yaml"
    listy.write_text("- model\n- data\n")
    with pytest.raises(ConfigError, match=r"list.yaml must hold a mapping.*got a list"):
        load_config(listy)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  name_or_path: tiny\ndata: [tiny\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: line 4, column 1: YAML error"):
        load_config(broken)
    with pytest.raises(ConfigError, match=r"'model.name_or_path' is required"):
        load_config(None, ["data.train=tiny"])


@pytest.mark.parametrize("override, message", [
    ("train.steps=0", r"'train.steps' must be > 0, got 0"),
    ("train.steps=-3", r"'train.steps' must be > 0, got -3"),
    ("rollout.temperature=0", r"'rollout.temperature' is 0 \(greedy\).*every group degenerate"),
    ("eval.n=0", r"'eval.n' must be > 0"),
    ("algo.aggregation=token-sum", r"'algo.aggregation': 'token-sum' is not allowed.*'token-mean'"),
])
def test_bad_values_are_refused_when_the_config_loads(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*TINY, override])


def test_entropy_bonus_comes_from_the_preset_and_an_explicit_value_wins():
    assert load_config(None, [*TINY, "algo.name=paper"]).algo.entropy_coef == 0.001
    assert load_config(None, [*TINY, "algo.name=grpo"]).algo.entropy_coef == 0.0
    assert load_config(None, [*TINY, "algo.name=paper", "algo.entropy_coef=0"]).algo.entropy_coef == 0.0
    assert load_config(None, [*TINY, "algo.name=grpo", "algo.entropy_coef=0.01"]).algo.entropy_coef == 0.01
    with pytest.raises(ConfigError, match=r"'algo.entropy_coef' must be >= 0"):
        load_config(None, [*TINY, "algo.entropy_coef=-0.1"])


def test_zvp_coef_is_refused_where_per_token_advantages_or_zero_variance_groups_are_missing():
    assert load_config(None, [*TINY, "algo.zvp_coef=0.1"]).algo.zvp_coef == 0.1
    with pytest.raises(ConfigError, match=r"'algo.zvp_coef' must be >= 0"):
        load_config(None, [*TINY, "algo.zvp_coef=-1"])
    with pytest.raises(ConfigError, match=r"'algo.zvp_coef'.*'ppo_clip'.*'gspo'"):
        load_config(None, [*TINY, "algo.name=gspo", "algo.zvp_coef=0.1"])
    with pytest.raises(ConfigError, match=r"'algo.zvp_coef'.*'algo.dynamic_sampling'"):
        load_config(None, [*TINY, "algo.name=dapo", "algo.zvp_coef=0.1"])


def test_delimiter_ids_default_to_the_authors_newline_ids_and_must_not_be_empty():
    c = load_config(None, [*TINY, "echo.delimiter=ids"])
    assert c.echo.delimiter_ids == [198, 271]
    assert load_config(None, [*TINY, "echo.delimiter=ids", "echo.delimiter_ids=[5, 7]"]).echo.delimiter_ids == [5, 7]
    with pytest.raises(ConfigError, match=r"'echo.delimiter_ids' must list at least one"):
        load_config(None, [*TINY, "echo.delimiter=ids", "echo.delimiter_ids=[]"])
    with pytest.raises(ConfigError, match=r"'echo.delimiter_ids': expected an integer"):
        load_config(None, [*TINY, "echo.delimiter_ids=[a]"])


def test_qwen7b_config_is_the_authors_setting():
    from pathlib import Path
    c = load_config(Path(__file__).resolve().parents[1] / "configs" / "qwen7b.yaml")
    assert c.algo.name == "paper" and c.algo.advantage == "drgrpo" and c.algo.entropy_coef == 0.001
    assert c.algo.aggregation == "seq-mean-token-sum-norm" and c.algo.kl_coef == 0.0
    # 128 prompts x 8 per step, PPO mini-batches of 64 prompts: two optimizer steps per batch
    assert (c.rollout.prompts_per_step, c.rollout.group_size, c.train.mini_batches) == (128, 8, 2)
    assert c.train.lr == 1e-6 and c.rollout.max_new_tokens == 8192 and c.echo.coef == 0.001
