"""Evaluate a model on math benchmarks: avg@n, pass@k, maj@n, response length, truncation rate.

    python eval.py --model runs/tiny/checkpoints/step_000060            # a run's checkpoint, its own settings
    python eval.py --model Qwen/Qwen2.5-Math-1.5B --config configs/qwen1.5b.yaml --benchmarks math500,aime24

Settings (benchmarks, n, temperature, max new tokens, prompt template, system prompt, the tiny task)
come from the command line, else from --config, else from the run's saved config.json when --model
is a run checkpoint (so `--benchmarks tiny` scores the same problems as the run's in-loop eval),
else from config.py's defaults. The script prints which.

Generations go through sampler.py (the same sampler as training) and are cached as JSONL in
--out-dir, one line per finished problem, under a name that holds the model's weight files (names,
sizes, modification times) and every sampling setting: an interrupted run resumes where it stopped,
and new weights at the same path are never scored from an old cache. Every sample has its own random
stream keyed on (seed, problem id, sample index), so a resumed run, another batch size or the
in-loop evaluation of the same weights draw the same texts. train.py's periodic evaluation calls
`evaluate()`.

Temperature 0 means greedy decoding: every sample would be identical, so n is forced to 1
(with a warning) and pass@k for k > 1 is refused.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm
from transformers.utils import logging as hf_logging

import data
import reward
import rollout
import tiny
from config import Config, ConfigError, from_dict, load_config
from data import DataError, Problem
from models import autocast, load_model, rollout_dtype
from sampler import Sampler, generate, row_seed

DEFAULT_BENCHMARKS = "math500,gsm8k,aime24,amc23,minerva_math,olympiadbench"


# ---------------------------------------------------------------------------------------------
# metrics

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), for c correct of n samples.

    The ratio is expanded as prod_{i=n-c+1}^{n} (1 - k/i), which never forms huge binomials.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _compact(answer: str) -> str:
    """The answer without whitespace: the cheap equality test before the verifier's."""
    return re.sub(r"\s+", "", answer)


def _same_answer(a: str, b: str) -> bool:
    # cheap string test first; the verifier (sympy) only for answers that look different
    return _compact(a) == _compact(b) or reward.verify(f"\\boxed{{{a}}}", b)


def _vote_index(answers: list[str | None]) -> int | None:
    """Index of the first sample of the largest equivalence class (ties: earliest class wins)."""
    reps: list[int] = []    # first sample index of each class, in order of appearance
    counts: list[int] = []
    for i, a in enumerate(answers):
        if a is None:
            continue
        j = next((j for j, r in enumerate(reps) if _same_answer(a, answers[r])), None)
        if j is None:
            reps.append(i)
            counts.append(1)
        else:
            counts[j] += 1
    if not reps:
        return None
    return reps[max(range(len(reps)), key=lambda j: (counts[j], -j))]


def majority_vote(answers: list[str | None]) -> str | None:
    """Most common answer up to equivalence; None answers (nothing extracted) do not vote."""
    i = _vote_index(answers)
    return None if i is None else answers[i]


def score_problem(problem: Problem, texts: list[str], lengths: list[int],
                  truncated: list[bool]) -> dict:
    """Per-problem record: extracted answers, correctness of each sample, majority vote."""
    answers = [reward.extract_answer(t) for t in texts]
    correct = [bool(reward.verify(t, problem.answer)) for t in texts]
    maj = _vote_index(answers)
    # the majority answer is right iff the sample it came from is (same text, same verifier)
    return {"id": problem.id, "gold": problem.answer, "answers": answers, "correct": correct,
            "maj_answer": None if maj is None else answers[maj],
            "maj_correct": maj is not None and correct[maj],
            "lengths": lengths, "truncated": truncated, "texts": texts}


def summarize(records: list[dict], n: int, ks: tuple[int, ...]) -> dict:
    """Benchmark metrics (fractions in [0, 1]; lengths in tokens) from per-problem records."""
    P = len(records)
    flat = lambda key: [x for r in records for x in r[key]]
    out = {"num_problems": P, "n": n, "avg@n": sum(flat("correct")) / (P * n)}
    for k in ks:
        out[f"pass@{k}"] = sum(pass_at_k(n, sum(r["correct"]), k) for r in records) / P
    out["maj@n"] = sum(r["maj_correct"] for r in records) / P
    out["mean_length"] = sum(flat("lengths")) / (P * n)
    out["truncation_rate"] = sum(flat("truncated")) / (P * n)
    return out


# ---------------------------------------------------------------------------------------------
# generation cache: one JSON line per finished problem {"id", "texts", "lengths", "truncated"}

def read_cache(path: Path, n: int) -> dict[str, dict]:
    """Finished problems by id. A line cut short by a kill (or otherwise unreadable) is dropped
    and the file rewritten without it, so that later appends start on a fresh line."""
    if not path.exists():
        return {}
    raw = path.read_text(encoding="utf-8")
    done, kept = {}, []
    for line in raw.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and len(rec.get("texts", ())) == n:
            done[str(rec["id"])] = rec
            kept.append(line)
    clean = "".join(line + "\n" for line in kept)
    if clean != raw:
        warnings.warn(f"{path}: dropped {len(raw.splitlines()) - len(kept)} unreadable cache lines")
        path.write_text(clean, encoding="utf-8")
    return done


def _append_cache(path: Path, records: list[dict]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# ---------------------------------------------------------------------------------------------
# evaluation

def evaluate(model, tokenizer, problems: list[Problem], *, n: int = 1, temperature: float = 0.0,
             top_p: float = 1.0, max_new_tokens: int = 1024, template: str = "chat",
             system_prompt: str | None = None, batch_size: int | None = None,
             ks: tuple[int, ...] = (1,), cache_path: str | Path | None = None,
             progress: bool = True, desc: str = "eval", leave: bool = True, seed: int = 0,
             sampler=None) -> dict:
    """Sample n responses per problem and score them.

    Returns the metrics of `summarize` plus "records": [score_problem(...) per problem].
    `batch_size` bounds the sequences per generate call; problems are generated
    batch_size // n at a time and each finished chunk is appended to `cache_path`.
    Sample j of problem p draws from a random stream keyed on (seed, p.id, j): the same texts
    whatever the batching, the order of the problems, or an interruption and resume.
    `sampler`: a sampler.Sampler to reuse (train.py's, with its compiled step); default: one per call.
    """
    if not problems:
        raise ValueError("evaluate: no problems")
    if n < 1:
        raise ValueError(f"evaluate: n must be >= 1, got {n}")
    if len({p.id for p in problems}) < len(problems):
        raise ValueError("evaluate: problem ids must be unique (they key the generation cache)")
    if temperature == 0 and n > 1:
        warnings.warn(f"temperature 0 is greedy: all {n} samples would be identical; using n=1")
        n = 1
    if any(k > n for k in ks):
        warnings.warn(f"dropping pass@k for k > n={n}: {[k for k in ks if k > n]}")
    ks = tuple(k for k in ks if k <= n)

    cache_path = Path(cache_path) if cache_path is not None else None
    done = read_cache(cache_path, n) if cache_path is not None else {}
    todo = [p for p in problems if p.id not in done]
    per_call = max(1, (batch_size or n) // n)
    bar = tqdm(total=len(problems), initial=len(problems) - len(todo), desc=desc,
               disable=not progress, dynamic_ncols=True, leave=leave)
    for s in range(0, len(todo), per_call):
        chunk = todo[s:s + per_call]
        prompts = rollout.render_prompts([p.question for p in chunk], tokenizer, template, system_prompt)
        kw = dict(group_size=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                  row_seeds=[row_seed(p.id, j) for p in chunk for j in range(n)])
        out = sampler.generate(prompts, **kw) if sampler is not None else \
            generate(model, tokenizer, prompts, batch_size=batch_size, **kw)
        lengths = out.response_mask.sum(-1).long().tolist()  # [len(chunk) * n]
        truncated = out.truncated.tolist()
        new = [{"id": p.id, "texts": out.texts[i * n:(i + 1) * n], "lengths": lengths[i * n:(i + 1) * n],
                "truncated": truncated[i * n:(i + 1) * n]} for i, p in enumerate(chunk)]
        if cache_path is not None:
            _append_cache(cache_path, new)
        done.update((r["id"], r) for r in new)
        bar.update(len(chunk))
    bar.close()

    records = [score_problem(p, done[p.id]["texts"], done[p.id]["lengths"], done[p.id]["truncated"])
               for p in problems]
    return {**summarize(records, n, ks), "records": records}


# ---------------------------------------------------------------------------------------------
# reporting

def _cell(key: str, value: float) -> str:
    if key == "mean_length":
        return f"{value:.0f}"
    if key in ("num_problems", "n"):
        return f"{value:g}"
    return f"{100 * value:.1f}"  # accuracies and truncation rate, in percent


def format_table(results: dict[str, dict]) -> str:
    """Markdown table, one row per benchmark (+ a macro average row when there are several).
    Accuracies and truncation are in percent, lengths in tokens."""
    keys: list[str] = []
    for m in results.values():
        keys += [k for k in m if k not in keys]
    names = {"num_problems": "problems", "mean_length": "len", "truncation_rate": "trunc"}
    ns = {m.get("n") for m in results.values()}
    if len(ns) == 1:  # one n for all rows: name it in the header ("avg@4")
        (n,) = ns
        names |= {"avg@n": f"avg@{n}", "maj@n": f"maj@{n}"}
    rows = [[name] + [_cell(k, m[k]) if k in m else "-" for k in keys] for name, m in results.items()]
    if len(results) > 1:
        avg = lambda k: [m[k] for m in results.values() if k in m]
        rows.append(["average"] + [_cell(k, sum(avg(k)) / len(avg(k))) if k not in ("num_problems", "n")
                                   else "-" for k in keys])
    header = ["benchmark"] + [names.get(k, k) for k in keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


# ---------------------------------------------------------------------------------------------
# model loading and CLI

def _slug(text: str) -> str:
    """Short file-safe name + hash of the full string (two checkpoints named 'final' differ)."""
    p = Path(text)
    full = str(p.resolve()) if p.exists() else text
    name = re.sub(r"[^\w.-]+", "_", p.name or "x")[:40]
    return f"{name}-{hashlib.sha1(full.encode()).hexdigest()[:6]}"


def weights_fingerprint(model: str) -> str:
    """Names, sizes and modification times of a local model's weight files (a hub id: the id itself), so
    that new weights at the same path never reuse cached generations."""
    p = Path(model)
    if not p.is_dir():
        return model
    files = sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".pt") and f.name != "state.pt")
    return ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)


def run_tag(model: str, n: int, temperature: float, top_p: float, max_new_tokens: int,
            template: str, system_prompt: str | None, seed: int = 0, dtype: str = "") -> str:
    """File-name stem naming the model, its weights and every setting that changes the generations."""
    key = f"{weights_fingerprint(model)}|{system_prompt}|{seed}|{dtype}"
    return (f"{_slug(model)}__n{n}_t{temperature:g}_p{top_p:g}_len{max_new_tokens}_{template}"
            f"_{hashlib.sha1(key.encode()).hexdigest()[:8]}")


def problems_digest(problems: list[Problem]) -> str:
    """A short hash of the problems themselves: two task settings that reuse ids never share a cache."""
    return hashlib.sha1("\x00".join(f"{p.id}\x01{p.question}\x01{p.answer}" for p in problems).encode()).hexdigest()[:8]


def run_config(model: str):
    """The saved config of the run a checkpoint belongs to (RUN/checkpoints/step_N -> RUN/config.json)."""
    p = Path(model)
    saved = p.parent.parent / "config.json"
    return saved if p.is_dir() and p.parent.name == "checkpoints" and saved.is_file() else None


def load_benchmark(name: str, cfg: Config) -> tuple[str, list[Problem]]:
    """(display name, problems) of one benchmark of cfg.eval: a registered name (data.BENCHMARKS),
    "tiny" (the held-out split of the config's own embedded task), or a .jsonl/.json file of problems;
    the first cfg.eval.limit problems (0: all). The one place benchmarks are resolved."""
    limit = cfg.eval.limit or None
    if name.endswith((".jsonl", ".json")):
        return _slug(name), data.load_problems(name, limit=limit, max_question_chars=cfg.data.max_question_chars)
    if name == "tiny":
        return name, tiny.heldout(cfg.tiny, limit)
    return name, data.load_benchmark(name, cfg.eval.data_dir, limit, max_question_chars=cfg.data.max_question_chars)


def load_benchmarks(cfg: Config) -> dict[str, list[Problem]]:
    """Every benchmark of cfg.eval.benchmarks, by display name."""
    return dict(load_benchmark(name, cfg) for name in cfg.eval.benchmarks)


def longest_row(cfg: Config, tok, questions: list[str] | None) -> int | None:
    """Prompt + response tokens of the longest row a run will sample: the longest rendered prompt of
    the training problems and the evaluation benchmarks plus the larger max_new_tokens. The sampler's
    KV cache is allocated once at this length (a longer one would be reallocated and its step compiled
    again mid-run). None for the embedded task's endless stream (short prompts: grown on demand)."""
    if questions is None:
        return None
    questions = questions + [p.question for ps in load_benchmarks(cfg).values() for p in ps]
    prompts = rollout.render_prompts(questions, tok, cfg.data.template, cfg.data.system_prompt)
    longest = max(map(len, tok(prompts, add_special_tokens=False)["input_ids"]))
    return longest + max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens or 0)


def evaluate_run(run, problems: dict[str, list[Problem]], progress: bool = True) -> dict:
    """The in-loop evaluation of a train.Run: held-out avg@n (and pass@n) per benchmark, sampled with
    the run's sampler. Under torchrun each rank scores every size-th problem and the counts are summed."""
    cfg, world = run.cfg, run.world
    model = run.sampling_weights or run.model
    model.eval()
    out = {}
    n = cfg.eval.n if cfg.eval.temperature > 0 else 1
    for name, probs in problems.items():
        mine = probs[world.rank::world.size]
        res = {"avg@n": 0.0}  # a rank with no problem of this benchmark adds nothing
        if mine:
            with autocast(cfg, model) if run.sampling_weights is None and run.sampler is None else nullcontext():
                res = evaluate(model, run.tok, mine, n=n, temperature=cfg.eval.temperature, top_p=1.0,
                               max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
                               template=cfg.data.template, system_prompt=cfg.data.system_prompt,
                               batch_size=cfg.eval.batch_size, progress=progress and world.main, desc=f"eval {name}",
                               leave=False, sampler=run.sampler, seed=cfg.train.seed, ks=(n,))
        correct, passed, samples = world.sum(torch.tensor(
            [res["avg@n"] * len(mine) * n, res.get(f"pass@{n}", 0.0) * len(mine), len(mine) * n],
            dtype=torch.float64, device=world.device)).tolist()
        out[f"eval/{name}/acc"] = correct / samples               # avg@n
        if n > 1:                                                 # pass@n: a correct answer among the n samples
            out[f"eval/{name}/pass@{n}"] = passed / (samples / n)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Evaluate a model on math benchmarks (avg@n, pass@k, maj@n). Settings not given on the "
                    "command line come from --config, else from the run's saved config when --model is a run "
                    "checkpoint (RUN/checkpoints/step_N), else from config.py's defaults (the tiny experiment).")
    p.add_argument("--model", required=True, help="local HF model folder, run checkpoint, or hub id")
    p.add_argument("--config", default=None, help="a train config whose eval/data/tiny settings to use")
    p.add_argument("--benchmarks", default=None,
                   help=f"comma-separated registered names (e.g. {DEFAULT_BENCHMARKS}), 'tiny', or .jsonl/.json paths")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--n", type=int, default=None, help="samples per problem")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (forces n=1)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--k", default="1", help="comma-separated k for pass@k (1 <= k <= n)")
    p.add_argument("--limit", type=int, default=None, help="first L problems of each benchmark (0 = all)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per generate call")
    p.add_argument("--template", choices=["chat", "plain"], default=None)
    p.add_argument("--system-prompt", default=None, help='"" for none')
    p.add_argument("--out-dir", default="eval_out")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: the config's train.seed, so a "
                                                          "run's checkpoint draws what its in-loop eval drew)")
    return p.parse_args(argv)


def settings(args: argparse.Namespace):
    """(Config, where its values came from) with every command-line value applied."""
    if args.config:
        cfg, source = load_config(args.config), f"--config {args.config}"
    elif saved := run_config(args.model):
        cfg, source = from_dict(json.loads(saved.read_text())), f"the run's config {saved}"
    else:
        cfg, source = Config(), "config.py's defaults"
    e = cfg.eval
    for flag, attr in (("n", "n"), ("temperature", "temperature"), ("max_new_tokens", "max_new_tokens"),
                       ("batch_size", "batch_size"), ("data_dir", "data_dir")):
        if getattr(args, flag) is not None:
            setattr(e, attr, getattr(args, flag))
    if args.limit is not None:
        e.limit = args.limit
    if args.benchmarks is not None:
        e.benchmarks = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    if args.template is not None:
        cfg.data.template = args.template
    if args.system_prompt is not None:
        cfg.data.system_prompt = args.system_prompt or None
    e.max_new_tokens = e.max_new_tokens or cfg.rollout.max_new_tokens
    return cfg, source


class UsageError(ValueError):
    """A mistake on the command line: printed as one line, exit code 2."""


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """The command line: every user mistake is one line and exit code 2; Ctrl-C keeps the cache, exit 130."""
    try:
        return run(parse_args(argv))
    except (UsageError, ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: the problems finished so far are cached; the same command continues from them",
              file=sys.stderr)
        sys.exit(130)


def check_model(model: str) -> None:
    """A local folder must exist; anything else must look like a hub id ('org/name')."""
    if Path(model).exists():
        if not (Path(model) / "config.json").is_file():
            raise UsageError(f"--model {model}: no config.json there (a model folder or a run checkpoint, "
                             f"RUN/checkpoints/step_N)")
    elif not re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        raise UsageError(f"--model {model}: no such folder, and not a hub id of the form org/name")


def run(args: argparse.Namespace) -> dict[str, dict]:
    check_model(args.model)
    cfg, source = settings(args)
    e = cfg.eval
    try:
        ks = tuple(int(k) for k in args.k.split(",") if k.strip())
    except ValueError:
        raise UsageError(f"--k: expected comma-separated integers, got {args.k!r}") from None
    if e.n < 1:
        raise UsageError(f"--n must be >= 1, got {e.n}")
    if e.limit < 0:
        raise UsageError(f"--limit must be >= 0 (0: every problem), got {e.limit}")
    if e.temperature < 0 or not 0 < args.top_p <= 1 or e.max_new_tokens < 1 or e.batch_size < 1:
        raise UsageError("need --temperature >= 0, --top-p in (0, 1], --max-new-tokens >= 1, --batch-size >= 1")
    if not e.benchmarks:
        raise UsageError(f"no benchmark to evaluate ({source} lists none): pass --benchmarks, e.g. "
                         f"--benchmarks {DEFAULT_BENCHMARKS} or tiny")
    n = 1 if e.temperature == 0 else e.n  # greedy: see module docstring
    bad = [k for k in ks if not 1 <= k <= n]
    if not ks or bad:
        raise UsageError(f"--k: every k must be in 1..n (n = {n}{', greedy' if e.temperature == 0 else ''}), "
                         f"got {args.k!r}")
    print(f"eval settings from {source}: n={n}, temperature={e.temperature}, max_new_tokens={e.max_new_tokens}, "
          f"template={cfg.data.template}, benchmarks={','.join(e.benchmarks)}")
    benchmarks = list(load_benchmarks(cfg).items())
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = args.dtype or str(rollout_dtype(cfg)).removeprefix("torch.")  # what the run's rollouts sampled in
    tag = run_tag(args.model, n, e.temperature, args.top_p, e.max_new_tokens, cfg.data.template,
                  cfg.data.system_prompt, cfg.train.seed if args.seed is None else args.seed, dtype)

    hf_logging.disable_progress_bar()
    seed = cfg.train.seed if args.seed is None else args.seed
    try:
        model, tokenizer = load_model(args.model, dtype, args.device)
    except OSError as e:  # a hub id that cannot be reached or found
        raise UsageError(f"--model {args.model}: {str(e).splitlines()[0]}") from None
    engine = Sampler(model, tokenizer, slots=e.batch_size)  # built once: its compiled step (CUDA) is reused
    results, records = {}, {}
    for name, problems in benchmarks:
        res = evaluate(model, tokenizer, problems, n=n, temperature=e.temperature, top_p=args.top_p,
                       max_new_tokens=e.max_new_tokens, template=cfg.data.template,
                       system_prompt=cfg.data.system_prompt, batch_size=e.batch_size, ks=ks,
                       cache_path=out_dir / f"{tag}__{name}-{problems_digest(problems)}.jsonl", desc=name, seed=seed,
                       sampler=engine)
        records[name] = res.pop("records")
        results[name] = res

    table = format_table(results)
    settings_used = {"model": args.model, "source": source, "n": n, "temperature": e.temperature,
                     "top_p": args.top_p, "max_new_tokens": e.max_new_tokens, "k": list(ks), "limit": e.limit,
                     "template": cfg.data.template, "system_prompt": cfg.data.system_prompt, "dtype": dtype,
                     "seed": seed, "weights": weights_fingerprint(args.model)}
    (out_dir / f"{tag}.json").write_text(json.dumps(
        {"settings": settings_used, "results": results, "records": records}, indent=1, ensure_ascii=False))
    (out_dir / f"{tag}.md").write_text(f"# {args.model}\n\n{table}\n")
    print(table)
    return results


if __name__ == "__main__":
    main()
