"""The embedded task: solutions are right, splits are disjoint and reproducible, tokens round-trip."""
import random

import torch

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


# ----------------------------------------------------------------------------------------
# The story task: the arith problems, solved in words (several sentences per line, several lines)


def test_story_splits_are_reproducible_and_every_gold_verifies_against_its_own_solution():
    cfg = tiny.TinyConfig(task="story", min_ops=1, max_ops=4)
    problems = tiny.make_split(cfg, 500, "train")
    assert [p.solution for p in problems[:20]] == [p.solution for p in tiny.make_split(cfg, 20, "train")]
    for p in problems:
        equations = "\n".join(line for line in p.solution.split("\n") if " = " in line or "boxed" in line)
        assert _replay(equations) == int(p.answer)                        # the equations compute the answer
        assert reward.verify(p.solution, p.answer) and reward.verify(f"\\boxed{{{p.answer}}}", p.answer)
        assert not reward.verify(p.solution, str(int(p.answer) + 1))
    others = [q.answer for q in problems[1:] if q.answer != problems[0].answer]
    assert others and not reward.verify(problems[0].solution, others[0])


def test_story_lines_hold_several_sentences_so_sentence_steps_are_finer_than_newline_steps():
    from entropy import delimiter_table, step_ids
    tok = tiny.build_tokenizer()
    cfg = tiny.TinyConfig(task="story", min_ops=2, max_ops=3)
    for p in tiny.make_split(cfg, 50, "train"):
        ids = tok(p.solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert tok.unk_token_id not in ids and tok.decode(ids[:-1]) == p.solution
        resp, mask = torch.tensor([ids]), torch.ones(1, len(ids))
        lines = int(step_ids(resp, mask, delimiter_table(tok, "newline"), [tok.eos_token_id]).max()) + 1
        sentences = int(step_ids(resp, mask, delimiter_table(tok, "sentence"), [tok.eos_token_id]).max()) + 1
        assert lines == len(p.solution.split("\n")) and sentences > lines


def test_story_habit_boxes_the_first_equations_result():
    p = tiny.make_story_problem(random.Random(3), tiny.TinyConfig(min_ops=2, max_ops=2))
    first = next(line for line in p.solution.split("\n") if " = " in line).split("= ")[-1]
    habit = tiny.with_habit(p).solution
    assert habit.endswith(f"\\boxed{{{first}}}") and habit.split("\n")[:-1] == p.solution.split("\n")[:-1]


# The fork task: one decision line after the first equation (go on / answer), which decides correctness


def test_fork_decision_line_says_go_on_exactly_when_operations_remain_and_every_gold_verifies():
    cfg = tiny.TinyConfig(task="fork", min_ops=1, max_ops=3)
    problems = tiny.make_split(cfg, 300, "train")
    assert [p.solution for p in problems[:20]] == [p.solution for p in tiny.make_split(cfg, 20, "train")]
    for p in problems:
        lines = p.solution.split("\n")
        ops = sum(" = " in line for line in lines)
        assert lines[1] in (tiny.FORK_GO if ops > 1 else tiny.FORK_STOP)
        assert sum(line in tiny.FORK_GO + tiny.FORK_STOP for line in lines) == 1
        assert _replay("\n".join(lines[:1] + lines[2:])) == int(p.answer)
        assert reward.verify(p.solution, p.answer)
    assert {p.solution.split("\n")[1] for p in problems} == set(tiny.FORK_GO + tiny.FORK_STOP)  # every phrase occurs


def test_fork_decision_line_is_its_own_four_token_step():
    from entropy import delimiter_table, step_ids
    tok = tiny.build_tokenizer()
    p = tiny.Problem("x", "q", "19", "8 * 2 = 16\nThen more.\n16 + 3 = 19\n\\boxed{19}")
    ids = tok(p.solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.unk_token_id not in ids and tok.decode(ids[:-1]) == p.solution
    sids = step_ids(torch.tensor([ids]), torch.ones(1, len(ids)), delimiter_table(tok, "newline"), [tok.eos_token_id],
                    min_tokens=4)[0].tolist()
    # "8 * 2 = 16\n" = 7 tokens, "Then more.\n" = 4, "16 + 3 = 19\n" = 8, "\boxed{19}" + EOS = 6
    assert sids == [0] * 7 + [1] * 4 + [2] * 8 + [3] * 6
    for phrase in tiny.FORK_GO + tiny.FORK_STOP:
        assert len(tok(phrase + "\n", add_special_tokens=False)["input_ids"]) == 4


def test_fork_habit_answers_after_the_first_equation_and_is_wrong_when_operations_remain():
    p = tiny.Problem("x", "q", "19", "8 * 2 = 16\nThen more.\n16 + 3 = 19\n\\boxed{19}")
    habit = tiny.fork_habit(p).solution.split("\n")
    assert habit[0] == "8 * 2 = 16" and habit[1] in tiny.FORK_STOP and habit[2] == "\\boxed{16}" and len(habit) == 3
    assert not reward.verify("\n".join(habit), p.answer)
    one = tiny.Problem("y", "q", "16", "8 * 2 = 16\nThe answer.\n\\boxed{16}")
    assert tiny.fork_habit(one) == one                                  # one operation: nothing to stop early
