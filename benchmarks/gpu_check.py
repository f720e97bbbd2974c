"""The parts of the GPU check (benchmarks/gpu_check.sh runs them in order); each appends its tables to --out.

  rollout  Qwen2.5-Math-1.5B's shape (random init, bf16 weights, the real tokenizer), 128 rows with
           long-tailed forced stops: HF generate (log-probs kept step by step) vs the slot sampler eager
           vs compiled (CUDA graphs). Compiled: a warm-up call (compile + capture, its time reported
           apart), then steady calls at T = 1, 0.6, 1 and one with a long prompt. Every call's log-probs
           are checked against the trainer's teacher-forced pass at the call's temperature, and the
           compiled calls after warm-up must compile nothing, skip no CUDA graph, and keep one KV cache.
  train    two full train_steps of configs/qwen1.5b.yaml (random init of the real shape, hand-made
           rewards: a random model solves nothing), seconds by phase; the last step is the steady one.
           --dist: the same under torchrun (FSDP2; one rank over NCCL on a GPU, gloo on CPU).

--cpu runs the same code on CPU with a 2-layer model of the same architecture (Inductor compiles the
sampler), so the check itself is tested on any machine. What fails is named in an exception.

    python benchmarks/gpu_check.py rollout --out benchmarks/results/gpu_check_DATE.md [--cpu]
    python benchmarks/gpu_check.py train --out ... [--cpu]
    torchrun --standalone --nproc_per_node 1 benchmarks/gpu_check.py train --dist --out ... [--cpu]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from _common import ROOT, clock, hand_reward_fn, machine, median, random_model_dir, table, tiny_config  # noqa: E402
from bench_generate import HFForcedStop, sampler_hook, stop_lengths  # noqa: E402

# a 2-layer model of the same architecture for --cpu (the real vocabulary when the real tokenizer is there)
CPU_SHAPE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 128, "max_window_layers": 2}
PHASES = ["generate", "score", "advantages", "old_logprobs", "echo_select", "update"]
SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


class CheckFailed(AssertionError):
    pass


def expect(ok: bool, what: str) -> None:
    if not ok:
        raise CheckFailed(what)


def model_source(args, tmp: Path) -> tuple[str, str | None]:
    """(model folder, training file or None for the embedded task). --cpu without ../shared: a random
    tiny Qwen2 with the embedded tokenizer, so a fresh clone runs the check."""
    if Path(args.model_dir, "config.json").is_file():
        return args.model_dir, args.train_file if Path(args.train_file).is_file() else None
    if not args.cpu:
        raise CheckFailed(f"no model folder {args.model_dir} (config.json + tokenizer; set MODEL_DIR)")
    return str(random_model_dir(tiny_config(), tmp / "tiny_qwen2")), None


def write(args, text: str) -> None:
    with open(args.out, "a") as f:
        f.write(text + "\n")
    print(text, flush=True)

# ----------------------------------------------------------------------------------------
# rollout


def longest_question(train_file: str | None, tok, floor: int) -> str:
    """The training file's longest question (MATH's: ~1,800 tokens rendered), or a synthetic one."""
    if train_file:
        from data import load_problems
        return max((p.question for p in load_problems(train_file)), key=len)
    return " ".join(["Ann has 3 pens and buys 4 more."] * max(1, floor // 10))


def rollout(args) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, LogitsProcessorList

    import tiny
    from entropy import response_logprobs
    from rollout import eos_ids, load_tokenizer, render_prompts
    from hf_generate import generate_hf
    from sampler import Sampler
    dev = "cpu" if args.cpu else "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, train_file = model_source(args, Path(tmp))
        conf = AutoConfig.from_pretrained(model_dir, **(CPU_SHAPE if args.cpu else {}))
        conf._attn_implementation = "sdpa"
        torch.manual_seed(0)
        with torch.device(dev):
            model = AutoModelForCausalLM.from_config(conf, dtype=torch.bfloat16).eval()
        tok = load_tokenizer(model_dir)
    G, B, N = 8, args.rows, args.new_tokens
    questions = [p.question for p in tiny.make_split(tiny.TinyConfig(), B // G, "heldout")]
    prompts = render_prompts(questions, tok, "chat", SYSTEM)
    lengths = stop_lengths(B, N, N / 8)
    long_prompt = render_prompts([longest_question(train_file, tok, 4 * N)], tok, "chat", SYSTEM)
    long_len = len(tok(long_prompt, add_special_tokens=False)["input_ids"][0])
    eos, V = eos_ids(tok, model), model.config.vocab_size
    n_params = sum(p.numel() for p in model.parameters())
    write(args, f"\n## Rollout: HF generate vs the slot sampler\n\n{machine(dev)}\n\nrandom-init "
                f"{n_params / 1e9:.3f} B parameters ({conf.num_hidden_layers} layers, vocabulary {V}), bf16; "
                f"{B} rows (G={G}), max_new_tokens {N}, forced lengths: median {median(lengths):.0f}, "
                f"{sum(x == N for x in lengths)} at the limit; long prompt: {long_len} tokens. Log-prob check: "
                f"|sampled - teacher-forced| over 16 rows' free tokens (bf16: mean < 0.05).\n")
    rows, failures = [], []

    def check_logprobs(r, T, label):
        """The trainer's pass scores what was drawn at the call's temperature (the forced last token excluded)."""
        sub = r.select(torch.arange(min(len(r), 16)))
        with torch.no_grad():
            lp, _ = response_logprobs(model, sub, temperature=T, chunk_size=2048)
        free = sub.response_mask.clone()
        free[torch.arange(len(sub)), sub.response_lengths.long() - 1] = 0
        d = ((lp - sub.sample_logprobs).abs() * free)
        mean, mx = float(d.sum() / free.sum().clamp_min(1)), float(d.max())
        if not mean < 0.05:
            failures.append(f"{label}: sampled log-probs off the teacher-forced pass at T={T} (mean |diff| {mean:.3g})")
        return mean, mx

    def row(engine, comp, T, prompt, r, wall, steps, peak, compile_s, lp, stats=None):
        tokens = int(r.response_mask.sum())
        rows.append([engine, comp, T, prompt, tokens, tokens / wall, 1000 * wall / steps, steps,
                     tokens / (steps * (stats or {}).get("slots", len(r))), peak, compile_s, lp[0], lp[1],
                     (stats or {}).get("recompiles", "-"), (stats or {}).get("cudagraph_skips", "-")])
        print(" | ".join(map(str, rows[-1])), flush=True)

    def timed(fn):
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = clock(dev)
        out = fn()
        wall = clock(dev) - t0
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if dev == "cuda" else 0.0
        return out, wall, peak

    # HF generate: static batch, log-probs step by step (StepLogprobs), the global RNG
    def hf(n=N):
        proc = LogitsProcessorList([HFForcedStop([min(x, n) for x in lengths], eos, V, model.device)])
        return generate_hf(model, tok, prompts, group_size=G, max_new_tokens=n, temperature=1.0,
                           return_logprobs=True, logits_processor=proc)
    hf(4)  # CUDA context, kernels' first launch
    r, wall, peak = timed(hf)
    expect(r.response_lengths.long().tolist() == lengths, "HF generate: forced lengths not reproduced")
    row("HF generate", "-", 1.0, "short", r, wall, r.response_ids.shape[1], peak, 0.0, check_logprobs(r, 1.0, "HF"))

    hook = sampler_hook(lengths, eos, V, dev)  # one hook object: the compiled step is traced once

    def call(s, T=1.0, ps=prompts, n=N, seed=0):
        return s.generate(ps, group_size=G, max_new_tokens=n, temperature=T, seed=seed, logits_processor=hook)
    eager = Sampler(model, tok, slots=B, compile=False, max_len=long_len + N)
    call(eager, n=4)
    r, wall, peak = timed(lambda: call(eager))
    expect(r.response_lengths.long().tolist() == lengths, "sampler eager: forced lengths not reproduced")
    row("sampler", "off", 1.0, "short", r, wall, eager.stats["steps"], peak, 0.0, check_logprobs(r, 1.0, "eager"),
        eager.stats)
    eager_ms = 1000 * wall / eager.stats["steps"]
    eager.release()

    compiled = Sampler(model, tok, slots=B, compile=True, max_len=long_len + N)
    _, warm, _ = timed(lambda: call(compiled))  # compile + CUDA graph capture for every window size
    steady = None
    for T, ps, label in [(1.0, prompts, "short"), (0.6, prompts, "short"), (1.0, prompts, "short"),
                         (1.0, long_prompt * 2, f"long ({long_len} tok)")]:
        r, wall, peak = timed(lambda: call(compiled, T, ps))
        s, name, first = compiled.stats, f"compiled T={T} {label}", steady is None
        steady = steady or wall
        if label == "short":
            expect(r.response_lengths.long().tolist() == lengths, f"{name}: forced lengths not reproduced")
        if s["recompiles"] or s["cudagraph_skips"]:
            failures.append(f"{name}: {s['recompiles']} graphs compiled, {s['cudagraph_skips']} CUDA graph skips "
                            f"after warm-up (0 and 0 expected)")
        row("sampler", "on", T, label, r, wall, s["steps"], peak, max(warm - wall, 0.0) if first else 0.0,
            check_logprobs(r, T, name), s)
    if compiled.allocations != 1:
        failures.append(f"compiled sampler: KV cache allocated {compiled.allocations} times (1 expected)")
    compiled_ms = 1000 * steady / max(compiled.stats["steps"], 1)
    compiled.release()
    write(args, table(["engine", "compile", "T", "prompt", "tokens", "tok/s", "ms/step", "steps", "efficiency",
                       "peak GiB", "compile s", "lp mean |d|", "lp max |d|", "recompiles", "cg skips"], rows))
    write(args, f"\ncompiled vs eager decoding step: {compiled_ms:.1f} vs {eager_ms:.1f} ms/step "
                f"(rows: one call each after warm-up; compile s = warm-up call - steady call)")
    if dev == "cuda" and not compiled_ms < eager_ms:
        failures.append(f"compiled step not faster than eager ({compiled_ms:.1f} vs {eager_ms:.1f} ms/step)")
    if failures:
        raise CheckFailed("; ".join(failures))

# ----------------------------------------------------------------------------------------
# train


def train_part(args) -> None:
    import dist
    import train
    from config import load_config
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, train_file = model_source(args, Path(tmp))
        sets = [f"model.name_or_path={model_dir}", "model.init=random", "eval.benchmarks=[]",
                "log.log_rollouts_every=0", "reward.workers=1", "reward.truncated=score",
                f"rollout.max_new_tokens={args.step_tokens}", f"train.out_dir={tmp}/run",
                f"data.train={train_file or 'tiny'}"]
        if args.cpu:
            sets += ["train.device=cpu", f"model.config_overrides={json.dumps(CPU_SHAPE)}", "rollout.group_size=4",
                     "rollout.prompts_per_step=2", "rollout.slots=8", "train.micro_batch_size=8"]
        elif args.dist:
            sets += ["rollout.prompts_per_step=16"]
        cfg = load_config(ROOT / "configs" / "qwen1.5b.yaml", sets)
        run = train.setup(cfg, reward_fn=hand_reward_fn(cfg.rollout.group_size))
        say = (lambda text: write(args, text)) if run.world.main else (lambda text: None)
        steps = []
        for i in range(2):
            t0 = time.perf_counter()
            m, batch = train.train_step(run)
            if batch.response_ids.is_cuda:
                torch.cuda.synchronize()
            m["time/step"] = time.perf_counter() - t0
            m["gen_tokens"] = float(batch.response_mask.sum())
            steps.append(m)
            print(f"step {i + 1}: " + json.dumps({k: round(v, 4) for k, v in m.items()}), flush=True)
        dev = cfg.train.device
        how = (f"torchrun, {run.world.size} rank, FSDP2 over {'NCCL' if dev == 'cuda' else 'gloo'}" if args.dist
               else "one process")
        say(f"\n## Training steps: configs/qwen1.5b.yaml, {how}\n\n{machine(dev)}\n\nrandom init of the real shape"
            f"{' (2-layer CPU stand-in)' if args.cpu else ''}, hand-made rewards, reward.truncated=score; "
            f"{cfg.rollout.prompts_per_step} prompts x G={cfg.rollout.group_size}, max_new_tokens "
            f"{cfg.rollout.max_new_tokens} (a random model rarely stops: every row runs to it), slots "
            f"{cfg.rollout.slots}, micro-batch {cfg.train.micro_batch_size}, chunk {cfg.train.logprob_chunk}, "
            f"tis_cap {cfg.algo.tis_cap}. Step 2 is the steady state (on CUDA step 1 compiles the sampler).\n")
        keys = [f"time/{p}" for p in PHASES] + ["time/step"]
        say(table(["step", "gen tokens", "gen tok/s", *PHASES, "step s", "peak GiB", "recompiles", "cg skips",
                   "sampler |d lp|", "loss_pg"],
                  [[i + 1, m["gen_tokens"], m["gen_tokens"] / max(m.get("time/generate", 0.0), 1e-9),
                    *(m.get(k, 0.0) for k in keys), m.get("mem/peak_gib", 0.0), m.get("sampler/recompiles", 0.0),
                    m.get("sampler/cudagraph_skips", 0.0), m.get("sampler/logprob_abs_diff", float("nan")),
                    m.get("loss_pg", float("nan"))] for i, m in enumerate(steps)]))
        last = steps[-1]
        dist.close(run.world)
    expect(all(math.isfinite(m.get("loss_pg", 0.0)) and math.isfinite(m.get("grad_norm", 0.0)) for m in steps),
           "a loss or gradient norm is not finite")
    expect(last.get("sampler/recompiles", 0.0) == 0 and last.get("sampler/cudagraph_skips", 0.0) == 0,
           f"step 2 compiled {last.get('sampler/recompiles')} graphs / skipped "
           f"{last.get('sampler/cudagraph_skips')} CUDA graphs (0 and 0 expected once warm)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["rollout", "train"])
    ap.add_argument("--out", required=True, help="markdown file the tables are appended to")
    ap.add_argument("--cpu", action="store_true", help="the same check on CPU with a 2-layer model")
    ap.add_argument("--dist", action="store_true", help="train: under torchrun (FSDP2)")
    ap.add_argument("--model-dir", default=os.environ.get("MODEL_DIR", str(ROOT.parent / "shared" / "models" /
                                                                           "qwen2.5-math-1.5b")))
    ap.add_argument("--train-file", default=os.environ.get("TRAIN_FILE", str(ROOT.parent / "shared" / "data" /
                                                                             "math" / "train.jsonl")))
    env = lambda key: int(os.environ[key]) if os.environ.get(key) else None  # gpu_check.sh passes these through
    ap.add_argument("--rows", type=int, default=env("GPU_CHECK_ROWS"), help="rollout rows (default 128; --cpu 16)")
    ap.add_argument("--new-tokens", type=int, default=env("GPU_CHECK_NEW_TOKENS"),
                    help="rollout max_new_tokens (default 512; --cpu 16)")
    ap.add_argument("--step-tokens", type=int, default=env("GPU_CHECK_STEP_TOKENS"),
                    help="train max_new_tokens (default 512, --dist 256; --cpu 12)")
    args = ap.parse_args(argv)
    args.rows = args.rows or (16 if args.cpu else 128)
    args.new_tokens = args.new_tokens or (16 if args.cpu else 512)
    args.step_tokens = args.step_tokens or (12 if args.cpu else 256 if args.dist else 512)
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to torch (bash benchmarks/gpu_check.sh --cpu: the same on CPU)")
    t0 = time.perf_counter()
    (rollout if args.part == "rollout" else train_part)(args)
    print(f"{args.part}{' --dist' if args.dist else ''}: passed in {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
