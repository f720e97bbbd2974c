"""eval.py: metric formulas by hand, metric plumbing with scripted generations, resume, tiny CLI run."""
import json
import math
import re
import time
from types import SimpleNamespace

import pytest
import torch

import eval as ev
import tiny
from data import Problem


# --- pass@k: 1 - C(n-c, k) / C(n, k) ---------------------------------------------------------

@pytest.mark.parametrize("n,c,k,expected", [
    (4, 1, 2, 0.5),           # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (4, 2, 1, 0.5),           # k=1 is c/n: 1 - C(2,1)/C(4,1) = 1 - 2/4
    (4, 2, 2, 5 / 6),         # 1 - C(2,2)/C(4,2) = 1 - 1/6
    (5, 2, 3, 0.9),           # 1 - C(3,3)/C(5,3) = 1 - 1/10
    (10, 3, 5, 11 / 12),      # 1 - C(7,5)/C(10,5) = 1 - 21/252
    (4, 3, 2, 1.0),           # n-c=1 < k: every pair holds a correct sample
    (4, 0, 4, 0.0),           # nothing correct
    (4, 4, 1, 1.0),
])
def test_pass_at_k_by_hand(n, c, k, expected):
    assert ev.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_large_n_matches_exact_binomials():
    n, c, k = 200, 10, 100   # C(200,100) ~ 9e58: the product form must still be exact enough
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert ev.pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
    with pytest.raises(ValueError):
        ev.pass_at_k(4, 1, 5)


# --- majority vote ---------------------------------------------------------------------------

def test_majority_vote():
    assert ev.majority_vote(["1", "2", "2", None]) == "2"
    assert ev.majority_vote(["1", "2", "2", "1"]) == "1"        # tie: first to appear wins
    assert ev.majority_vote(["3", None, None, None]) == "3"     # no answer does not vote
    assert ev.majority_vote([None, None]) is None
    assert ev.majority_vote(["x + 1", "x+1", "2"]) == "x + 1"   # whitespace-insensitive
    assert ev.majority_vote(["7", "0.5", "\\frac{1}{2}"]) == "0.5"  # equal by the verifier


# --- metrics from scripted generations (n = 4) -------------------------------------------------

B = "\\boxed{{{}}}".format
SCRIPT = {  # question -> (gold, 4 responses); c = correct samples, maj = majority answer
    "q0": ("2", [B(2), B(2), B(3), B(3)]),               # c=2, maj 2 (tie with 3, 2 first): right
    "q1": ("5", [B(4), B(4), B(5), "I give up"]),         # c=1, maj 4: wrong; last is truncated
    "q2": ("7", [B(1), B(2), B(3), B(7)]),                # c=1, all differ, maj 1 (first): wrong
    "q3": ("9", [B(9)] * 4),                              # c=4, maj right
    "q4": ("1", [B(0)] * 4),                              # c=0, maj wrong
}
PROBLEMS = [Problem(f"p{i}", q, gold) for i, (q, (gold, _)) in enumerate(SCRIPT.items())]


def scripted_generate(calls: list, fail_after: int | None = None):
    """Stands in for sampler.generate: responses from SCRIPT; length = characters; optionally
    raises once `fail_after` problems have been generated (an interrupted run)."""
    def generate(model, tokenizer, prompts, *, group_size, **kw):
        if fail_after is not None and len(calls) >= fail_after:
            raise KeyboardInterrupt
        qs = [next(q for q in SCRIPT if prompt.rstrip().endswith(f"{q}\nAnswer:")) for prompt in prompts]
        calls.extend(qs)
        texts = [SCRIPT[q][1][j] for q in qs for j in range(group_size)]
        T = max(map(len, texts))
        mask = torch.tensor([[1.0] * len(t) + [0.0] * (T - len(t)) for t in texts])   # [B, T]
        return SimpleNamespace(texts=texts, response_mask=mask,
                               truncated=torch.tensor(["give up" in t for t in texts]))
    return generate


def run(problems=PROBLEMS, **kw):
    kw = dict(n=4, temperature=1.0, max_new_tokens=16, template="plain", ks=(1, 2, 4),
              batch_size=4, progress=False) | kw
    return ev.evaluate(None, None, problems, **kw)


def test_metrics_by_hand(monkeypatch):
    calls = []
    monkeypatch.setattr(ev, "generate", scripted_generate(calls))
    res = run()
    m = {k: v for k, v in res.items() if k != "records"}
    assert m["num_problems"] == 5 and m["n"] == 4
    assert m["avg@n"] == pytest.approx((2 + 1 + 1 + 4 + 0) / 20)       # 0.4
    assert m["pass@1"] == pytest.approx(0.4)                           # mean of c/n
    # pass@2 per problem: 1-C(2,2)/C(4,2)=5/6, 1-C(3,2)/C(4,2)=1/2, 1/2, 1, 0
    assert m["pass@2"] == pytest.approx((5 / 6 + 0.5 + 0.5 + 1 + 0) / 5)  # 17/30
    assert m["pass@4"] == pytest.approx(4 / 5)                         # any correct
    assert m["maj@n"] == pytest.approx(2 / 5)                          # q0 and q3
    assert m["truncation_rate"] == pytest.approx(1 / 20)
    lengths = [len(t) for _, texts in SCRIPT.values() for t in texts]
    assert m["mean_length"] == pytest.approx(sum(lengths) / 20)
    r0, r1 = res["records"][:2]
    assert r0["answers"] == ["2", "2", "3", "3"] and r0["maj_answer"] == "2" and r0["maj_correct"]
    assert r1["correct"] == [False, False, True, False] and r1["maj_answer"] == "4"
    assert sorted(calls) == sorted(SCRIPT)   # batch_size 4 / n 4 -> one problem per call

    table = ev.format_table({"a": m, "b": m})
    assert "| benchmark | problems | n | avg@4 | pass@1 | pass@2 | pass@4 | maj@4 | len | trunc |" in table
    assert "| a | 5 | 4 | 40.0 | 40.0 | 56.7 | 80.0 | 40.0 |" in table and "| average | - | - | 40.0 |" in table


def test_greedy_forces_one_sample(monkeypatch):
    monkeypatch.setattr(ev, "generate", scripted_generate([]))
    with pytest.warns(UserWarning, match="greedy"), pytest.warns(UserWarning, match="dropping pass@k"):
        m = run(temperature=0.0, ks=(1, 4))
    # n=1: first response of each problem; correct for q0, q3 -> 2/5; pass@4 dropped
    assert m["n"] == 1 and m["avg@n"] == pytest.approx(0.4) and "pass@4" not in m


def test_resume_after_interruption(monkeypatch, tmp_path):
    cache = tmp_path / "gen.jsonl"
    calls = []
    monkeypatch.setattr(ev, "generate", scripted_generate(calls, fail_after=2))
    with pytest.raises(KeyboardInterrupt):
        run(cache_path=cache)
    assert calls == ["q0", "q1"] and len(cache.read_text().splitlines()) == 2
    with cache.open("a") as f:   # a kill in the middle of writing the 3rd line
        f.write('{"id": "p2", "texts": ["\\\\boxed{')

    calls.clear()
    monkeypatch.setattr(ev, "generate", scripted_generate(calls))
    with pytest.warns(UserWarning, match="unreadable cache"):
        resumed = run(cache_path=cache)
    assert calls == ["q2", "q3", "q4"]                       # only the unfinished problems
    assert [json.loads(line)["id"] for line in cache.read_text().splitlines()] == ["p0", "p1", "p2", "p3", "p4"]
    assert resumed == run(cache_path=tmp_path / "fresh.jsonl")  # same as an uninterrupted run

    calls.clear()
    assert run(cache_path=cache) == resumed and calls == []  # fully cached: nothing generated


# --- end to end: a random tiny Qwen2 saved to disk, through the CLI -----------------------------

def test_cli_tiny_model(tmp_path, monkeypatch):
    tok = tiny.build_tokenizer()
    model = tiny.build_model(tok, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, intermediate_size=64)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    bench = tmp_path / "five.jsonl"
    bench.write_text("".join(json.dumps({"question": f"Ann has {i} apples . How many ?", "answer": str(i)}) + "\n"
                             for i in range(5)))
    out = tmp_path / "out"
    argv = ["--model", str(tmp_path / "model"), "--benchmarks", str(bench), "--n", "2", "--k", "1,2",
            "--max-new-tokens", "6", "--batch-size", "4", "--out-dir", str(out), "--dtype", "float32",
            "--device", "cpu", "--system-prompt", ""]
    results = ev.main(argv)
    (name, m), = results.items()
    assert m["num_problems"] == 5 and m["n"] == 2
    for key in ("avg@n", "pass@1", "pass@2", "maj@n", "truncation_rate"):
        assert 0.0 <= m[key] <= 1.0
    assert 1 <= m["mean_length"] <= 6

    saved = json.loads(next(out.glob("*.json")).read_text())
    records = saved["records"][name]
    assert saved["results"][name] == m and len(records) == 5
    assert all(len(r["texts"]) == len(r["correct"]) == len(r["lengths"]) == 2 for r in records)
    assert sum(sum(r["correct"]) for r in records) == round(m["avg@n"] * 10)
    assert "| benchmark |" in next(out.glob("*.md")).read_text()
    cache = next(out.glob(f"*__{name}-*.jsonl"))
    assert len(cache.read_text().splitlines()) == 5

    def no_generation(*a, **kw):
        raise AssertionError("everything is cached")
    import sampler
    monkeypatch.setattr(sampler.Sampler, "generate", no_generation)
    assert ev.main(argv) == results   # a rerun reads the cache


# --- the cache follows the weights; settings follow the run; bad arguments stop before any work -----

def _save_random_model(path, seed):
    tok = tiny.build_tokenizer()
    tiny.build_model(tok, seed=seed, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, intermediate_size=64).save_pretrained(path)
    tok.save_pretrained(path)


def test_new_weights_at_the_same_path_are_generated_again_not_read_from_the_cache(tmp_path, monkeypatch):
    model = tmp_path / "model"
    _save_random_model(model, seed=0)
    argv = ["--model", str(model), "--benchmarks", "tiny", "--limit", "3", "--n", "2", "--max-new-tokens", "4",
            "--out-dir", str(tmp_path / "out"), "--dtype", "float32", "--device", "cpu"]
    ev.main(argv)
    calls = []
    import sampler
    real = sampler.Sampler.generate
    monkeypatch.setattr(sampler.Sampler, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    ev.main(argv)
    assert calls == []                       # same weights: everything cached
    time.sleep(0.01)
    _save_random_model(model, seed=1)        # other weights copied to the same path
    ev.main(argv)
    assert calls                             # generated again
    assert len(list((tmp_path / "out").glob("*__tiny-*.jsonl"))) == 2


def test_a_run_checkpoint_is_scored_on_the_runs_own_tiny_task(tmp_path, capsys):
    """--benchmarks tiny with a run checkpoint takes the task settings (here: 1-op problems) and the
    protocol (n, temperature, max new tokens) from the run's saved config, and says so."""
    from config import load_config, to_dict
    run = tmp_path / "run"
    ck = run / "checkpoints" / "step_000001"
    _save_random_model(ck, seed=0)
    cfg = load_config(None, ["model.name_or_path=tiny", "data.train=tiny", "tiny.max_ops=1", "eval.n=2",
                             "eval.max_new_tokens=5"])
    (run / "config.json").write_text(json.dumps(to_dict(cfg)))
    out = tmp_path / "out"
    results = ev.main(["--model", str(ck), "--limit", "4", "--out-dir", str(out), "--dtype", "float32"])
    assert f"eval settings from the run's config {run / 'config.json'}" in capsys.readouterr().out
    assert results["tiny"]["n"] == 2 and results["tiny"]["mean_length"] <= 5
    golds = [r["gold"] for r in json.loads(next(out.glob("*.json")).read_text())["records"]["tiny"]]
    assert golds == [p.answer for p in tiny.heldout(cfg.tiny, 4)]               # the run's 1-op problems
    assert golds != [p.answer for p in tiny.heldout(tiny.TinyConfig(), 4)]      # not the default task's


@pytest.mark.parametrize("args, message", [
    (["--n", "0"], r"--n must be >= 1, got 0"),
    (["--n", "-1"], r"--n must be >= 1, got -1"),
    (["--k", "0"], r"--k: every k must be in 1..n \(n = 4\), got '0'"),
    (["--n", "2", "--k", "1,4"], r"--k: every k must be in 1..n \(n = 2\), got '1,4'"),
    (["--k", "x"], r"--k: expected comma-separated integers"),
    (["--limit", "-5"], r"--limit must be >= 0 \(0: every problem\), got -5"),
    (["--benchmarks", "math5000"], r"unknown benchmark 'math5000'; known: .*math500.*tiny"),
    (["--benchmarks", ","], r"no benchmark to evaluate \(.*\): pass --benchmarks"),
    (["--model", "nowhere"], r"--model nowhere: no such folder, and not a hub id"),
    (["--model", "."], r"--model \.: no config.json there"),
])
def test_every_command_line_mistake_is_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.setattr(ev, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_:
        ev.main(["--model", str(tmp_path), "--benchmarks", "tiny", "--out-dir", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and re.search(message, err[0]), err


def test_ctrl_c_keeps_the_finished_problems_and_exits_130(tmp_path, monkeypatch, capsys):
    """Interrupted after 2 problems: exit 130, one line, and the 2 finished problems stay in the cache."""
    calls = []
    monkeypatch.setattr(ev, "generate", scripted_generate(calls, fail_after=2))
    monkeypatch.setattr(ev, "load_model", lambda *a, **k: (None, None))
    monkeypatch.setattr(ev, "Sampler", lambda *a, **k: None)
    bench = tmp_path / "five.jsonl"
    bench.write_text("".join(json.dumps({"question": q, "answer": gold}) + "\n" for q, (gold, _) in SCRIPT.items()))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_:
        ev.main(["--model", str(tmp_path / "m"), "--benchmarks", str(bench), "--n", "4", "--batch-size", "4",
                 "--out-dir", str(tmp_path / "o"), "--template", "plain"])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "it/s]" not in line]  # not the bar
    assert exit_.value.code == 130 and len(err) == 1 and err[0].startswith("interrupted")
    cached = [json.loads(line)["id"] for f in (tmp_path / "o").glob("*.jsonl") for line in f.read_text().splitlines()]
    assert len(cached) == 2
