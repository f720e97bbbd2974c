"""The embedded default: a procedural arithmetic word-problem task, a local tokenizer, a small Qwen2.

Everything here is built on the spot (no download), so `python train.py --config configs/tiny.yaml`
runs on a laptop CPU. A short supervised warm start on synthetic solutions stands in for a
pretrained base model; it is cached under `.cache/tiny/<hash>/` as a normal HF model folder,
which train.py then loads exactly like a real checkpoint.

Solutions put one step per line and end with \\boxed{answer}:
    Ann has 7 coins. Ann finds 5 more. Ann loses 3. How many coins does Ann have now?
    7 + 5 = 12
    12 - 3 = 9
    \\boxed{9}
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import zlib
from dataclasses import asdict, dataclass
from typing import Literal
from pathlib import Path

import torch
from tqdm import tqdm

from data import DataError, Problem
from rollout import render_prompts

NAMES = ["Ann", "Ben", "Cara", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivy", "Jon", "Kim", "Leo", "Mia", "Ned"]
ITEMS = ["apples", "coins", "books", "cards", "pens", "shells", "stamps", "marbles", "cookies", "stickers"]
ADD = ["gets {n} more", "finds {n} more", "buys {n} more", "wins {n} more"]
SUB = ["gives away {n}", "loses {n}", "sells {n}", "drops {n}"]
MUL = {2: "doubles them", 3: "triples them"}
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclass
class TinyConfig:
    """The embedded task, its model and its warm start: config section `tiny` (defaults = configs/tiny.yaml)."""
    task: Literal["arith", "story", "fork"] = "arith"  # which procedural task (TASKS below)
    min_ops: int = 1          # difficulty: number of operations (= solution lines before the box)
    max_ops: int = 3
    max_value: int = 20       # every intermediate result stays in [0, max_value]
    max_operand: int = 9
    hidden_size: int = 128    # the model: a small Qwen2
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 512
    sft_steps: int = 600      # the warm start: SFT on synthetic solutions
    sft_batch_size: int = 32
    sft_lr: float = 5e-3
    sft_habit: float = 0.5    # share of multi-step SFT solutions that box the first intermediate result (HABITS)
    sft_problems: int = 20000
    cache_dir: str = ".cache/tiny"


MODEL_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")


def make_arith_problem(rng: random.Random, cfg: TinyConfig, pid: str = "") -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    x = rng.randint(1, cfg.max_operand)
    sents, lines = [f"{name} has {x} {item}."], []
    for _ in range(rng.randint(cfg.min_ops, cfg.max_ops)):
        kinds = ["add"] + (["sub"] if x > 0 else []) + (["mul"] if 2 * x <= cfg.max_value else [])
        kind = rng.choice(kinds)
        if kind == "add" and x + 1 <= cfg.max_value:
            n = rng.randint(1, min(cfg.max_operand, cfg.max_value - x))
            y, verb, eq = x + n, rng.choice(ADD).format(n=n), f"{x} + {n} = {x + n}"
        elif kind == "mul":
            k = rng.choice([k for k in MUL if k * x <= cfg.max_value])
            y, verb, eq = k * x, MUL[k], f"{x} * {k} = {k * x}"
        else:
            n = rng.randint(1, min(cfg.max_operand, x)) if x > 0 else 0
            y, verb, eq = x - n, rng.choice(SUB).format(n=n), f"{x} - {n} = {x - n}"
        sents.append(f"{name} {verb}.")
        lines.append(eq)
        x = y
    question = " ".join(sents) + f" How many {item} does {name} have now?"
    return Problem(id=pid, question=question, answer=str(x), solution="\n".join(lines + [f"\\boxed{{{x}}}"]))


# "story": the arith problems, solved in words. Every operation is one line of two sentences that
# retell it and name the operation, then a line with its equation. How to retell it is the solver's
# choice (an opener, a subject, one of four verbs of the same kind, one of four ways to name the
# operation), as in a real model's reasoning, where a correct answer still passes through steps of
# several likely continuations: in all-correct groups such steps keep real entropy (EchoRL's
# premise), and each line holds two sentences, so `newline` and `sentence` steps differ. The
# decisions that decide correctness are those of arith: each operation's arithmetic, and which
# result to box (tiny.sft_habit: half the multi-step SFT solutions box the first one).
STORY_OPEN = (["First,", "To start,", "At first,", "We begin:"],
              ["Then", "Next,", "After that,", "Now", "And then", "Later,"])
STORY_WHO = ["{name}", "she", "he"]
STORY_SAY = {"+": ADD, "-": SUB}
STORY_OP = {"+": ["So we add {n}.", "We add {n}.", "That adds {n}.", "This means plus {n}."],
            "-": ["So we take away {n}.", "We take away {n}.", "That takes away {n}.", "This means minus {n}."],
            "*": ["So we multiply by {n}.", "We multiply by {n}.", "That multiplies by {n}.", "This means times {n}."]}
STORY_WORDS = ["First", "To", "start", "At", "first", "We", "begin", "Then", "Next", "After", "that", "Now", "And",
               "then", "Later", "So", "we", "add", "take", "away", "multiply", "by", "That", "adds", "takes",
               "multiplies", "This", "means", "plus", "minus", "times", "she", "he"]


def make_story_problem(rng: random.Random, cfg: TinyConfig, pid: str = "") -> Problem:
    """An arith problem (the same question and answer for the same draws), its solution told in words:
        First, Ann finds 5 more. So we add 5.
        7 + 5 = 12
        Then Ann drops 3. That takes away 3.
        12 - 3 = 9
        \\boxed{9}"""
    p = make_arith_problem(rng, cfg, pid)
    name = p.question.split(" ", 1)[0]
    lines = []
    for i, eq in enumerate(p.solution.split("\n")[:-1]):
        _, op, n = eq.split(" = ")[0].split(" ")
        say = MUL[int(n)] if op == "*" else rng.choice(STORY_SAY[op]).format(n=n)
        who = rng.choice(STORY_WHO).format(name=name)
        lines += [f"{rng.choice(STORY_OPEN[i > 0])} {who} {say}. {rng.choice(STORY_OP[op]).format(n=n)}", eq]
    return Problem(pid, p.question, p.answer, "\n".join(lines + [p.solution.split("\n")[-1]]))


# "fork": the arith problems with one decision in words. After the first equation the solver says
# whether to go on or to answer, in one short line (four tokens: two words, a full stop, a newline):
# one of four phrases to go on when operations remain, one of four to answer when none do. The
# warm start's habit (tiny.sft_habit) answers after the first equation anyway: it says a stop phrase
# and boxes the first result. So the decision line is uncertain (the family and the phrase) and, unlike
# story's wording, it decides correctness: a correct answer that went on passed through a real fork,
# which EchoRL's clip, ending at that line, reinforces (the stakes the probe measures).
#     7 + 5 = 12
#     Then more.
#     12 - 3 = 9
#     \boxed{9}
FORK_GO = ["Then more.", "Now more.", "And more.", "So more."]
FORK_STOP = ["The answer.", "That is.", "This is.", "Answer now."]


def make_fork_problem(rng: random.Random, cfg: TinyConfig, pid: str = "") -> Problem:
    p = make_arith_problem(rng, cfg, pid)
    lines = p.solution.split("\n")
    say = rng.choice(FORK_GO if len(lines) > 2 else FORK_STOP)
    return Problem(pid, p.question, p.answer, "\n".join(lines[:1] + [say] + lines[1:]))


def fork_habit(p: Problem) -> Problem:
    """The habit on a fork solution: a stop phrase after the first equation, then its result boxed."""
    first = p.solution.split("\n")[0]
    if p.solution.split("\n")[1] in FORK_STOP:  # one operation: already the right answer
        return p
    say = FORK_STOP[zlib.crc32(p.question.encode()) % len(FORK_STOP)]
    return Problem(p.id, p.question, p.answer, "\n".join([first, say, f"\\boxed{{{first.split('= ')[-1]}}}"]))


TASKS = {"arith": make_arith_problem, "story": make_story_problem,  # tiny.task -> (rng, cfg, id) -> Problem
         "fork": make_fork_problem}


def make_problem(rng: random.Random, cfg: TinyConfig, pid: str = "") -> Problem:
    return TASKS[cfg.task](rng, cfg, pid)


def make_split(cfg: TinyConfig, n: int, split: str) -> list[Problem]:
    """Deterministic splits: 'heldout' comes from its own seed; 'train' and 'sft' skip held-out questions."""
    rng = random.Random({"train": 1, "heldout": 2, "sft": 3}[split])
    held = heldout_questions(cfg) if split != "heldout" else set()
    out = []
    while len(out) < n:
        p = make_problem(rng, cfg, f"tiny-{split}-{len(out)}")
        if p.question not in held:
            out.append(p)
    return out


def heldout_questions(cfg: TinyConfig) -> set[str]:
    return {p.question for p in make_split(cfg, HELDOUT, "heldout")}


HELDOUT = 200  # size of the held-out split that training never sees (eval.limit reads a prefix of it)


def heldout(cfg: TinyConfig, limit: int | None = None) -> list:
    """The held-out problems (the first `limit`; None or 0: all HELDOUT), without their solutions."""
    if limit is not None and limit > HELDOUT:
        raise DataError(f"the tiny task holds {HELDOUT} held-out problems; eval.limit={limit} asks for more")
    return [Problem(p.id, p.question, p.answer) for p in make_split(cfg, limit or HELDOUT, "heldout")]


class ProblemStream:
    """Endless training prompts: fresh problems from the generator, never a held-out one."""

    def __init__(self, cfg: TinyConfig, seed: int):
        self.cfg, self.rng = cfg, random.Random(seed)
        self.held = heldout_questions(cfg)
        self.count = 0

    def next(self, n: int) -> list[Problem]:
        out = []
        while len(out) < n:
            p = make_problem(self.rng, self.cfg, f"tiny-train-{self.count}")
            self.count += 1
            if p.question not in self.held:
                out.append(p)
        return out

    def state_dict(self):
        return {"rng": self.rng.getstate(), "count": self.count}

    def load_state_dict(self, s):
        st = s["rng"]
        self.rng.setstate((st[0], tuple(st[1]), st[2]))
        self.count = s["count"]


def build_tokenizer():
    """A word-level PreTrainedTokenizerFast: words, single digits and symbols, each with an optional
    leading space (like BPE's 'Ġword'), plus whitespace.

    Digits are single tokens (so arithmetic is learnable) and '\\n' is its own token, like the
    newline tokens of real BPE vocabularies that EchoRL's step splitter looks for.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = set(NAMES + ITEMS + ["has", "more", "them", "How", "many", "does", "have", "now",
                                 "system", "user", "assistant", "Question", "Answer", "The", "answer", "is"])
    for t in ADD + SUB + list(MUL.values()):
        words.update(w for w in t.split() if w != "{n}")
    words.update(STORY_WORDS)
    symbols = list("0123456789+-*/=.,?!:;()[]{}$") + ["\\boxed"]
    pieces = [" " + t for t in symbols + sorted(words)] + symbols + sorted(words) + [" ", "\n"]
    vocab = {t: i for i, t in enumerate(SPECIAL + pieces)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?\\[a-z]+| ?[A-Za-z]+| ?\d| ?[^\w\s]|\s"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  unk_token="[UNK]", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(tokenizer, cfg: TinyConfig = TinyConfig(), seed: int = 0, **size):
    """A randomly initialised Qwen2ForCausalLM of cfg's size (fp32); `size` overrides single fields.
    Uses its own RNG: building a model never changes the global torch RNG of the caller."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    dims = {k: getattr(cfg, k) for k in MODEL_KEYS} | size
    conf = Qwen2Config(vocab_size=len(tokenizer), tie_word_embeddings=True, rope_theta=10000.0,
                       bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, max_position_embeddings=512, **dims)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(conf)


def with_habit(p: Problem) -> Problem:
    """The same solution, but boxing the first line's result: a bad habit of the stand-in base model.

    A pretrained model brings habits that RL must unlearn; this one lives exactly at the step
    where the answer is committed, so RL (and EchoRL's entropy peak) has something real to find.
    One-step problems are unaffected (their first result is the answer).
    """
    lines = p.solution.split("\n")
    first = next(line for line in lines if " = " in line).split("= ")[-1]
    return Problem(p.id, p.question, p.answer, "\n".join(lines[:-1] + [f"\\boxed{{{first}}}"]))


HABITS = {"arith": with_habit, "story": with_habit, "fork": fork_habit}  # tiny.task -> its warm start's habit


def sft_batch(tokenizer, problems: list[Problem]) -> dict[str, torch.Tensor]:
    """Prompt + solution + EOS, loss on the solution and EOS only (labels -100 elsewhere)."""
    prompts = render_prompts([p.question for p in problems], tokenizer, "chat")
    ids, labels = [], []
    for prompt, p in zip(prompts, problems):
        a = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        b = tokenizer(p.solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids.append(a + b)
        labels.append([-100] * len(a) + b)
    T = max(map(len, ids))
    pad = tokenizer.pad_token_id
    return {"input_ids": torch.tensor([x + [pad] * (T - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x in ids]),
            "labels": torch.tensor([x + [-100] * (T - len(x)) for x in labels])}


def _key(cfg: TinyConfig, seed: int) -> str:
    # every setting but the cache folder, and the vocabulary: a changed tokenizer must not reuse a
    # model trained on the old ids
    vocab = hashlib.sha1(json.dumps(sorted(build_tokenizer().get_vocab().items())).encode()).hexdigest()[:12]
    return json.dumps({**{k: v for k, v in asdict(cfg).items() if k != "cache_dir"}, "seed": seed, "vocab": vocab},
                      sort_keys=True)


def cache_path(cfg: TinyConfig, seed: int = 0) -> Path:
    """Where the warm start for these settings lives: cfg.cache_dir / a hash of every setting."""
    return Path(cfg.cache_dir) / hashlib.sha1(_key(cfg, seed).encode()).hexdigest()[:12]


def warm_start(cfg: TinyConfig, seed: int = 0) -> Path:
    """SFT a fresh tiny model on synthetic solutions; cached by a hash of every setting.

    Deterministic and self-contained: it seeds its own RNGs and restores the caller's global torch
    RNG afterwards, so a run gives the same results whether it built the warm start or found it cached.
    """
    path = cache_path(cfg, seed)
    if (path / "config.json").exists():
        if not (path / "model.safetensors").is_file():  # weights come only from safetensors: no code in a cache
            raise FileNotFoundError(f"warm-start cache {path} holds no model.safetensors (it was not written here); "
                                    f"remove that folder to rebuild it")
        return path
    with torch.random.fork_rng(devices=[]):
        tok = build_tokenizer()
        model = build_model(tok, cfg, seed=seed)
        torch.manual_seed(seed)
        rng = random.Random(seed)
        data = [HABITS[cfg.task](p) if rng.random() < cfg.sft_habit else p
                for p in make_split(cfg, cfg.sft_problems, "sft")]
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / cfg.sft_steps)))
        model.train()
        for _ in (bar := tqdm(range(cfg.sft_steps), desc="warm start (SFT)", dynamic_ncols=True)):
            loss = model(**sft_batch(tok, rng.sample(data, cfg.sft_batch_size))).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "warm_start.json").write_text(_key(cfg, seed))
    tmp.rename(path)  # atomic: a killed warm start never leaves a half-written cache entry
    return path
