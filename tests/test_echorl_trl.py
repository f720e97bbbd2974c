"""EchoRL inside TRL (echorl_trl.py): on one fixed batch the plug-in's L_echo and its gradient equal our
loop's echo term; TRL's own loss is untouched; gradient accumulation leaves the update unchanged; a short
run on the tiny task selects clips; and the rest of the project never imports TRL."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if os.environ.get("CI"):
    import trl  # noqa: F401  .ci/run installs requirements-trl.txt: there a missing TRL fails, never skips
else:
    pytest.importorskip("trl", reason="pip install -r requirements-trl.txt")

from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import GRPOConfig, GRPOTrainer

import reward
import tiny
from config import load_config
from echorl import EchoConfig, select_clips
from echorl_trl import EchoGRPOTrainer, verifier_reward
from entropy import delimiter_table, response_logprobs, step_ids
from losses import Norm
from rollout import Rollout, load_tokenizer, render_prompts

# Our loop's echo term: the reference the plug-in must equal (the one place to change if it moves).
from echorl import echo_term


def reference_echo_term(logp, batch, norm, n_clip, cfg):
    return echo_term(logp, batch.clip_mask, cfg.echo, n_clip, cfg.algo.aggregation, norm)


ROOT = Path(__file__).resolve().parents[1]
G = 4            # completions per prompt
MAX_LEN = 40     # max_completion_length = our rollout.max_new_tokens (Dr. GRPO's constant)
TEMPERATURE = 0.7


def story(a: int, b: int, c: int, first: str, second: str, boxed: int) -> str:
    """A two-operation story solution (tiny's `story` style: two sentences, then the equation, per line)."""
    return (f"{first} Ann finds {b} more. So we add {b}.\n{a} + {b} = {a + b}\n"
            f"{second} she loses {c}. That takes away {c}.\n{a + b} - {c} = {a + b - c}\n\\boxed{{{boxed}}}")


# Three prompts of the same token length (no left padding: TRL's training forward passes no position
# ids) x G completions. Groups 0 and 2 are all correct, group 1 is mixed.
PROBLEMS = [(7, 5, 3), (3, 4, 2), (6, 2, 1)]
OPENERS = [("First,", "Then"), ("To start,", "Next,"), ("We begin:", "After that,"), ("At first,", "Later,")]


def completions_of(i: int) -> list[str]:
    a, b, c = PROBLEMS[i]
    out = [story(a, b, c, f, s, a + b - c) for f, s in OPENERS]
    if i == 1:
        out[1] = story(a, b, c, *OPENERS[1], a + b)      # boxes the first result
        out[3] = f"{a} + {b} = {a + b}\n\\boxed{{{a + b}}}"
    if i == 2:
        out[3] = f"{a} + {b} = {a + b}\n{a + b} - {c} = {a + b - c}\n\\boxed{{{a + b - c}}}"
    return out


def question(a: int, b: int, c: int) -> str:
    return f"Ann has {a} coins. Ann finds {b} more. Ann loses {c}. How many coins does Ann have now?"


@pytest.fixture(scope="module")
def tok(model_dir):
    return left_padded(load_tokenizer(model_dir))


def left_padded(tok):
    tok.padding_side = "left"  # TRL's requirement
    return tok


@pytest.fixture(scope="module")
def dataset(tok):
    return make_dataset(tok)


def make_dataset(tok, order=(0, 1, 2)) -> Dataset:
    """The prompts of PROBLEMS in `order`, with their gold answers (and problem index)."""
    problems = [PROBLEMS[i] for i in order]
    prompts = render_prompts([question(*p) for p in problems], tok, "chat")
    return Dataset.from_list([{"prompt": q, "answer": str(a + b - c), "problem": i}
                              for q, (a, b, c), i in zip(prompts, problems, order)])


def fixed_rollouts(dataset, tok):
    """A TRL rollout_func that returns the fixed completions (EOS appended, as TRL's generation returns them).
    TRL's rows are process-major and a group is G consecutive rows, so a row's place in its group is its
    index over every process's rows mod G, whatever the number of processes."""
    index = {row["prompt"]: row["problem"] for row in dataset}

    def rollout_func(prompts, trainer):
        out = {"prompt_ids": [], "completion_ids": [], "logprobs": []}
        first = trainer.accelerator.process_index * len(prompts)
        for row, p in enumerate(prompts, start=first):
            ids = tok(completions_of(index[p])[row % G], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            out["prompt_ids"].append(tok(p, add_special_tokens=False)["input_ids"])
            out["completion_ids"].append(ids)
            out["logprobs"].append([0.0] * len(ids))
        return out
    return rollout_func


def make_trainer(model_dir, tok, dataset, tmp_path, cls=EchoGRPOTrainer, echo=None, **args):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    conf = dict(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(PROBLEMS) * G, num_generations=G,
                max_completion_length=MAX_LEN, temperature=TEMPERATURE, report_to=[], use_cpu=True, bf16=False,
                save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True) | args
    kw = {} if cls is GRPOTrainer else {"echo": echo or EchoConfig()}
    trainer = cls(model=model, reward_funcs=[verifier_reward], args=GRPOConfig(**conf), train_dataset=dataset,
                  processing_class=tok, rollout_func=fixed_rollouts(dataset, tok), **kw)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop; these tests call the loss directly
    return trainer


def scored_batch(trainer, dataset):
    """TRL's batch dict for the fixed completions: rows i*G .. i*G+G-1 answer prompt i."""
    return trainer._generate_and_score_completions([dataset[i] for i in range(len(PROBLEMS)) for _ in range(G)])


def our_rollout(inputs) -> Rollout:
    """The same rows as our loop's batch record (prompts all real tokens, responses right-padded)."""
    B = inputs["completion_ids"].shape[0]
    return Rollout(prompt_ids=inputs["prompt_ids"], prompt_mask=inputs["prompt_mask"],
                   response_ids=inputs["completion_ids"], response_mask=inputs["completion_mask"].float(),
                   truncated=torch.zeros(B, dtype=torch.bool), group=torch.arange(B) // G, texts=[""] * B,
                   in_policy=torch.ones(B))


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------------------


def test_importing_the_project_never_imports_trl():
    """TRL is optional: with `import trl` made to fail, the loop's modules import, and only echorl_trl needs it."""
    code = """
import sys
class NoTrl:
    def find_spec(self, name, path=None, target=None):
        if name == "trl" or name.startswith("trl."):
            raise ImportError("trl is hidden in this test")
sys.meta_path.insert(0, NoTrl())
import train, echorl, losses, entropy, reward, eval
assert not any(m == "trl" or m.startswith("trl.") for m in sys.modules)
try:
    import echorl_trl
except ImportError as e:
    print("echorl_trl:", e)
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "echorl_trl: trl is hidden in this test" in r.stdout


def test_verifier_reward_scores_plain_and_conversational_completions_and_logs_bound_hits():
    texts = ["7 + 5 = 12\n\\boxed{12}", "\\boxed{13}", "no answer at all", "\\boxed{" + "1" * 2000 + "}"]
    golds = ["12", "12", "12", "12"]
    logged = {}
    log = lambda name, value: logged.__setitem__(name, value)
    assert verifier_reward(texts, golds, log_metric=log, prompts=["p"] * 4) == [1.0, 0.0, 0.0, 0.0]
    assert logged["verifier/bound_hits"] == 1.0 and logged["verifier/bound_size"] == 1.0  # the 2000-digit answer
    chat = [[{"role": "assistant", "content": t}] for t in texts[:3]]
    assert verifier_reward(chat, golds[:3]) == [1.0, 0.0, 0.0]
    blocks = [[{"role": "assistant", "content": [{"type": "text", "text": "so "}, {"type": "text", "text": t}]}]
              for t in texts[:2]]
    assert verifier_reward(blocks, golds[:2]) == [1.0, 0.0]


def test_a_reward_name_that_is_not_a_reward_function_is_refused(model_dir, tok, dataset, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with pytest.raises(ValueError, match=r"'accuracy' is not one of the reward functions: \['verifier_reward'\]"):
        EchoGRPOTrainer(model=model, reward_funcs=[verifier_reward], processing_class=tok, train_dataset=dataset,
                        args=GRPOConfig(output_dir=str(tmp_path), num_generations=G, per_device_train_batch_size=G,
                                        report_to=[], use_cpu=True, bf16=False), echo_reward="accuracy")


@pytest.mark.parametrize("delimiter", ["newline", "sentence"])
@pytest.mark.parametrize("normalizer,loss_type,algo,num_iterations", [
    ("clip_tokens", "dapo", "grpo", 1),
    ("clip_tokens", "dapo", "grpo", 2),       # TRL runs its own old-policy pass: its entropies are taken
    ("policy", "grpo", "grpo", 1),            # seq-mean-token-mean
    ("policy", "dapo", "dapo", 1),            # token-mean
    ("policy", "dr_grpo", "drgrpo", 1),       # seq-mean-token-sum-norm
])
def test_plugin_echo_loss_and_gradient_equal_our_loops_echo_term(model_dir, tok, dataset, tmp_path, delimiter,
                                                                  normalizer, loss_type, algo, num_iterations):
    echo = EchoConfig(coef=1.0, delimiter=delimiter, normalizer=normalizer)
    trainer = make_trainer(model_dir, tok, dataset, tmp_path, echo=echo, loss_type=loss_type,
                           num_iterations=num_iterations)
    model = trainer.model
    inputs = scored_batch(trainer, dataset)

    # Our loop on the same rows: old-policy entropies at the sampling temperature, steps, EchoClips.
    batch = our_rollout(inputs)
    correct = torch.tensor([1.0 if r == 1.0 else 0.0 for r in
                            reward.score_batch([t for i in range(3) for t in completions_of(i)],
                                               [row["answer"] for row in dataset for _ in range(G)])])
    assert correct.view(-1, G).all(-1).tolist() == [True, False, True]
    with torch.no_grad():
        _, ent = response_logprobs(model, batch, temperature=TEMPERATURE, with_entropy=True)
    sids = step_ids(batch.response_ids, batch.response_mask, delimiter_table(tok, delimiter),
                    trainer.eos_token_ids, echo.min_step_tokens)
    batch.clip_mask, _ = select_clips(correct.bool(), batch.group, batch.response_mask, ent, sids, echo)
    assert torch.equal(inputs["echo_clip_mask"], batch.clip_mask)
    assert batch.clip_mask.sum(-1).gt(0).sum() == 2  # one clip for each all-correct group
    assert float(inputs["echo_clip_tokens"]) == float(batch.clip_mask.sum())

    cfg = load_config(None, [f"model.name_or_path={model_dir}", "data.train=tiny", f"algo.name={algo}",
                             f"rollout.max_new_tokens={MAX_LEN}", "echo.coef=1.0", f"echo.delimiter={delimiter}",
                             f"echo.normalizer={normalizer}"])
    logp, _ = response_logprobs(model, batch, temperature=TEMPERATURE)
    ref = reference_echo_term(logp, batch, Norm.of(batch.policy_mask, MAX_LEN), float(batch.clip_mask.sum()), cfg)
    model.zero_grad(set_to_none=True)
    ref.backward()
    ref_grads = grads(model)

    # The plug-in: TRL's loss with the advantages zeroed (its policy term is then exactly 0) is L_echo.
    inputs["advantages"] = torch.zeros_like(inputs["advantages"])
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    got = grads(model)
    loss, ref = float(loss.detach()), float(ref.detach())
    assert abs(loss - ref) < 1e-6 and abs(ref) > 0.01
    assert got.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(got[name], g, atol=1e-6, rtol=0, msg=name)
    assert trainer._metrics["train"]["echo/loss"][-1] == pytest.approx(ref, abs=1e-6)


@pytest.mark.parametrize("echo", [EchoConfig(enabled=False), EchoConfig(coef=0.0)])
def test_trl_policy_loss_is_bit_equal_with_the_subclass(model_dir, tok, dataset, tmp_path, echo):
    """EchoRL off (or coef 0 with clips selected): the subclass's loss and gradient are TRL's, bit for bit."""
    plain = make_trainer(model_dir, tok, dataset, tmp_path, cls=GRPOTrainer)
    inputs = scored_batch(plain, dataset)
    assert inputs["advantages"].abs().sum() > 0  # group 1 is mixed: a real policy gradient
    subclass = make_trainer(model_dir, tok, dataset, tmp_path, echo=echo)
    with_clips = dict(inputs)
    if echo.enabled:  # the same rows, with the clips the subclass selects on them
        with_clips.update({k: v for k, v in scored_batch(subclass, dataset).items() if k.startswith("echo_")})
        assert with_clips["echo_clip_tokens"] > 0
    out = []
    for trainer, batch in ((plain, inputs), (subclass, with_clips)):
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        out.append((loss.detach(), grads(trainer.model)))
    assert torch.equal(out[0][0], out[1][0])
    assert out[0][1].keys() == out[1][1].keys()
    assert all(torch.equal(out[0][1][n], out[1][1][n]) for n in out[0][1])


# Every correct row of the all-correct groups gives a clip (8 of 12 rows), so every micro-batch and every
# process holds clips, and a normaliser that counted them per micro-batch or per process would show.
ECHO_ALL = dict(coef=1.0, clips_per_group="all")


def one_sgd_step(model_dir, tok, dataset, out, echo, **args):
    """One optimizer step of plain SGD at lr 1 (the update is minus the gradient), no clipping: the
    parameter update and the step's logged metrics."""
    trainer = make_trainer(model_dir, tok, dataset, out, echo=echo, optim="sgd", learning_rate=1.0,
                           lr_scheduler_type="constant", max_grad_norm=0.0, max_steps=1, weight_decay=0.0, **args)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    return {n: p.detach() - before[n] for n, p in trainer.model.named_parameters()}, trainer.state.log_history[0]


def assert_same_update(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name, u in a.items():
        torch.testing.assert_close(b[name], u, atol=1e-6, rtol=1e-5, msg=name)
    assert sum(float(u.abs().sum()) for u in a.values()) > 1.0


@pytest.mark.parametrize("normalizer", ["clip_tokens", "policy"])
def test_gradient_accumulation_1_or_2_gives_the_same_update(model_dir, tok, dataset, tmp_path, normalizer):
    """The same 12 rows as one micro-batch of 12 or two of 6 (TRL shuffles the rows before splitting them)."""
    echo = EchoConfig(**ECHO_ALL, normalizer=normalizer)
    (u1, log1), (u2, log2) = (one_sgd_step(model_dir, tok, dataset, tmp_path / f"ga{ga}", echo,
                                           gradient_accumulation_steps=ga, per_device_train_batch_size=12 // ga)
                              for ga in (1, 2))
    assert log1["echo/clips"] == log2["echo/clips"] == 8
    assert log1["echo/loss"] == pytest.approx(log2["echo/loss"], rel=1e-5)
    assert_same_update(u1, u2)


# Two processes hold 6 rows each. In this prompt order (not shuffled) the all-correct group of problem 2
# sits in rows 4-7, split 2 + 2 over the processes: a selection on each process's rows alone would take
# one clip from each half of it, 3 clips in all instead of 2.
STRADDLE = dict(order=(0, 2, 1), echo=dict(coef=1.0), shuffle_dataset=False)


def test_two_processes_give_the_same_update_as_one(model_dir, tok, tmp_path):
    """torchrun, 2 processes over gloo, 6 rows each, against one process with the 12 rows."""
    dataset = make_dataset(tok, STRADDLE["order"])
    one, log1 = one_sgd_step(model_dir, tok, dataset, tmp_path / "one", EchoConfig(**STRADDLE["echo"]),
                             shuffle_dataset=STRADDLE["shuffle_dataset"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "_trl_dist_worker.py"), str(model_dir), str(tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    two, log2 = torch.load(tmp_path / "two" / "update.pt")
    assert log1["echo/clips"] == log2["echo/clips"] == 2
    assert log1["echo/loss"] == pytest.approx(log2["echo/loss"], rel=1e-5)
    assert_same_update(one, two)


def test_a_five_step_run_on_the_tiny_task_selects_clips_and_logs_echo_metrics(tmp_path):
    """Real generation on a small warm start of the tiny task (one operation on numbers up to 4: about half
    its answers are right, so some groups of 4 are all correct), scored by verifier_reward."""
    cfg = tiny.TinyConfig(min_ops=1, max_ops=1, max_value=4, max_operand=2, hidden_size=32, num_hidden_layers=2,
                          intermediate_size=64, sft_steps=300, sft_batch_size=16, sft_problems=2000, sft_habit=0.0,
                          cache_dir=str(tmp_path / "cache"))
    path = tiny.warm_start(cfg)
    tok = left_padded(load_tokenizer(path))
    problems = tiny.make_split(cfg, 20, "train")
    prompts = render_prompts([p.question for p in problems], tok, "chat")
    ds = Dataset.from_list([{"prompt": q, "answer": p.answer} for q, p in zip(prompts, problems)])
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=32, num_generations=4,
                      max_completion_length=16, max_steps=5, learning_rate=1e-4, report_to=[], use_cpu=True, bf16=False,
                      save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True)
    trainer = EchoGRPOTrainer(model=str(path), reward_funcs=[verifier_reward], args=args, train_dataset=ds,
                              processing_class=tok)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "echo/clips" in h]
    assert len(logs) == 5
    for key in ("echo/loss", "echo/frac_degenerate", "echo/frac_all_success", "verifier/bound_hits"):
        assert all(key in h for h in logs), key
    assert sum(h["echo/clips"] for h in logs) > 0
    with_clips = [h for h in logs if h["echo/clips"] > 0]
    # A clip ends at its rollout's highest-entropy step; L_echo is an NLL, so positive.
    assert all(h["echo/peak_step_entropy"] >= h["echo/mean_step_entropy"] and h["echo/loss"] > 0 for h in with_clips)
