"""The embedded task: solutions are right, splits are disjoint and reproducible, tokens round-trip."""
import random

import reward
import tiny


def _replay(solution: str) -> int:
    """Recompute a solution line by line with integer arithmetic (no evaluation of text)."""
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    value = None
    for line in solution.split("\n")[:-1]:
        lhs, rhs = line.split(" = ")
        a, op, b = lhs.split(" ")
        assert value is None or int(a) == value  # each step starts from the previous result
        value = ops[op](int(a), int(b))
        assert value == int(rhs)
    return value


def test_every_solution_line_is_correct_and_the_box_holds_the_answer():
    cfg = tiny.TinyConfig(min_ops=1, max_ops=4, max_value=20, max_operand=9)
    for p in tiny.make_split(cfg, 300, "train"):
        assert _replay(p.solution) == int(p.answer)
        assert 0 <= int(p.answer) <= cfg.max_value
        assert reward.verify(p.solution, p.answer)
        assert len(p.solution.split("\n")) - 1 in range(cfg.min_ops, cfg.max_ops + 1)


def test_splits_are_reproducible_and_heldout_never_reaches_training():
    cfg = tiny.TinyConfig()
    held = tiny.make_split(cfg, 200, "heldout")
    assert [p.question for p in held] == [p.question for p in tiny.make_split(cfg, 200, "heldout")]
    held_q = {p.question for p in held}
    stream = tiny.ProblemStream(cfg, seed=0)
    assert not held_q & {p.question for p in stream.next(2000)}
    assert not held_q & {p.question for p in tiny.make_split(cfg, 2000, "sft")}


def test_problem_stream_resumes_from_its_state():
    cfg = tiny.TinyConfig()
    a = tiny.ProblemStream(cfg, seed=3)
    a.next(5)
    state = a.state_dict()
    expected = [p.question for p in a.next(4)]
    b = tiny.ProblemStream(cfg, seed=99)
    b.load_state_dict(state)
    assert [p.question for p in b.next(4)] == expected


def test_habit_boxes_the_first_intermediate_result():
    p = tiny.Problem("x", "q", "10", "5 + 8 = 13\n13 - 3 = 10\n\\boxed{10}")
    assert tiny.with_habit(p).solution == "5 + 8 = 13\n13 - 3 = 10\n\\boxed{13}"
    one = tiny.Problem("y", "q", "13", "5 + 8 = 13\n\\boxed{13}")
    assert tiny.with_habit(one).solution == one.solution  # one step: nothing to get wrong


def test_tokenizer_round_trips_task_text_without_unknown_tokens():
    tok = tiny.build_tokenizer()
    rng = random.Random(0)
    for _ in range(100):
        p = tiny.make_problem(rng, tiny.TinyConfig())
        text = tok.apply_chat_template([{"role": "user", "content": p.question}], tokenize=False,
                                       add_generation_prompt=True) + p.solution
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    # '\n' is one token of its own, so newline steps are visible to the step splitter
    assert tok("1\n2", add_special_tokens=False)["input_ids"][1] == tok.convert_tokens_to_ids("\n")


def test_warm_start_cache_key_changes_with_the_tokenizer_vocabulary(monkeypatch):
    args = (tiny.TinyConfig(),)
    before = tiny.cache_path(*args)
    assert tiny.cache_path(*args) == before  # deterministic
    real = tiny.build_tokenizer

    def with_extra_word():
        tok = real()
        tok.add_tokens(["zebra"])
        return tok

    monkeypatch.setattr(tiny, "build_tokenizer", with_extra_word)
    assert tiny.cache_path(*args) != before  # a model trained on the old ids is not reused
