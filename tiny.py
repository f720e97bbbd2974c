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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

NAMES = ["Ann", "Ben", "Cara", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivy", "Jon", "Kim", "Leo", "Mia", "Ned"]
ITEMS = ["apples", "coins", "books", "cards", "pens", "shells", "stamps", "marbles", "cookies", "stickers"]
ADD = ["gets {n} more", "finds {n} more", "buys {n} more", "wins {n} more"]
SUB = ["gives away {n}", "loses {n}", "sells {n}", "drops {n}"]
MUL = {2: "doubles them", 3: "triples them"}
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclass
class TaskConfig:
    min_ops: int = 1        # difficulty knob: number of operations (= solution steps before the box)
    max_ops: int = 4
    max_value: int = 20     # every intermediate result stays in [0, max_value]
    max_operand: int = 9
    seed: int = 0


@dataclass
class Problem:  # same fields as data.Problem, kept local so this module stands alone
    id: str
    question: str
    answer: str
    solution: str = ""


def make_problem(rng: random.Random, cfg: TaskConfig, pid: str = "") -> Problem:
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


def make_split(cfg: TaskConfig, n: int, split: str) -> list[Problem]:
    """Deterministic splits: 'heldout' comes from its own seed; 'train' skips held-out questions."""
    salt = {"train": 1, "heldout": 2, "sft": 3}[split]
    rng = random.Random(cfg.seed * 1000 + salt)
    held = {p.question for p in make_split(cfg, 200, "heldout")} if split != "heldout" else set()
    out = []
    while len(out) < n:
        p = make_problem(rng, cfg, f"tiny-{split}-{len(out)}")
        if p.question not in held:
            out.append(p)
    return out


class ProblemStream:
    """Endless training prompts: fresh problems from the generator, never a held-out one."""

    def __init__(self, cfg: TaskConfig, seed: int):
        self.cfg, self.rng = cfg, random.Random(seed)
        self.held = {p.question for p in make_split(cfg, 200, "heldout")}
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


@dataclass
class ModelSize:
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 512
    max_position_embeddings: int = 512


def build_model(tokenizer, seed: int = 0, **size):
    """A randomly initialised Qwen2ForCausalLM sized for the tiny task (fp32)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=len(tokenizer), tie_word_embeddings=True, rope_theta=10000.0,
                      bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, **asdict(ModelSize(**size)))
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg)


@dataclass
class WarmStart:
    steps: int = 300
    batch_size: int = 64
    lr: float = 5e-3
    n_problems: int = 20000
    habit: float = 0.5      # share of multi-step SFT solutions that box the FIRST intermediate result


def with_habit(p: Problem) -> Problem:
    """The same solution, but boxing the first line's result: a bad habit of the stand-in base model.

    A pretrained model brings habits that RL must unlearn; this one lives exactly at the step
    where the answer is committed, so RL (and EchoRL's entropy peak) has something real to find.
    One-step problems are unaffected (their first result is the answer).
    """
    lines = p.solution.split("\n")
    first = lines[0].split("= ")[-1]
    return Problem(p.id, p.question, p.answer, "\n".join(lines[:-1] + [f"\\boxed{{{first}}}"]))


def sft_batch(tokenizer, problems: list[Problem]) -> dict[str, torch.Tensor]:
    """Prompt + solution + EOS, loss on the solution and EOS only (labels -100 elsewhere)."""
    from rollout import render_prompts

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


def _key(task: TaskConfig, size: ModelSize, ws: WarmStart, seed: int) -> str:
    # the vocabulary is part of the key: a changed tokenizer must not reuse a model trained on the old ids
    vocab = hashlib.sha1(json.dumps(sorted(build_tokenizer().get_vocab().items())).encode()).hexdigest()[:12]
    return json.dumps({"task": asdict(task), "size": asdict(size), "ws": asdict(ws), "seed": seed,
                       "vocab": vocab}, sort_keys=True)


def cache_path(task: TaskConfig, size: ModelSize, ws: WarmStart, cache_dir: str | Path = ".cache/tiny",
               seed: int = 0) -> Path:
    """Where the warm start for these settings lives (a hash of every setting)."""
    return Path(cache_dir) / hashlib.sha1(_key(task, size, ws, seed).encode()).hexdigest()[:12]


def warm_start(task: TaskConfig, size: ModelSize, ws: WarmStart, cache_dir: str | Path = ".cache/tiny",
               seed: int = 0) -> Path:
    """SFT a fresh tiny model on synthetic solutions; cached by a hash of every setting."""
    path = cache_path(task, size, ws, cache_dir, seed)
    if (path / "config.json").exists():
        return path
    tok = build_tokenizer()
    model = build_model(tok, seed=seed, **asdict(size))
    rng = random.Random(seed)
    data = [with_habit(p) if rng.random() < ws.habit else p for p in make_split(task, ws.n_problems, "sft")]
    opt = torch.optim.AdamW(model.parameters(), lr=ws.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / ws.steps)))
    model.train()
    for _ in (bar := tqdm(range(ws.steps), desc="warm start (SFT)")):
        loss = model(**sft_batch(tok, rng.sample(data, ws.batch_size))).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "warm_start.json").write_text(_key(task, size, ws, seed))
    tmp.rename(path)  # atomic: a killed warm start never leaves a half-written cache entry
    return path
