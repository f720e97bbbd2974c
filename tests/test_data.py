"""Benchmark loaders against the shared data files (row counts from shared/data/SOURCES.md)."""
import json
from contextlib import nullcontext
from pathlib import Path

import pytest

import data
from data import Problem, load_benchmark, load_problems

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data not found at {DATA}")

# benchmark -> rows in SOURCES.md, less the rows without a gold answer (see UNLABELED)
COUNTS = {
    "math500": 500, "gsm8k": 1319, "gsm8k_train": 7473, "aime24": 30, "amc23": 40,
    "minerva_math": 272, "olympiadbench": 675, "math_train": 7498, "math_test": 5000,
    "deepscaler_math": 7470, "deepscaler_aime": 975, "college_math": 2818, "gaokao2023en": 383,
    "svamp": 1000, "asdiv": 2215, "mawps": 2065, "mawps_addsub": 395, "mawps_multiarith": 600,
    "mawps_singleeq": 508, "mawps_singleop": 562, "aqua": 254, "sat_math": 32, "mmlu_stem": 3018,
    "carp_en": 976, "cmath": 600, "cn_middle_school": 101, "gaokao2024_I": 14, "gaokao2024_II": 14,
    "gaokao2024_mix": 91, "gaokao_math_cloze": 118, "gaokao_math_qa": 351,
}
# rows dropped (with a warning) because the file has no gold answer for them:
# MATH train number_theory/7115 and 7117 end in an empty \boxed{}; deepscaler math has 2 null and
# 2 empty answers; gaokao2023en lines 168 and 193 have an empty answer
UNLABELED = {"math_train": 2, "deepscaler_math": 4, "gaokao2023en": 2}

# (benchmark, row index, expected gold answer), looked up by hand in the files
KNOWN = [
    ("math500", 0, "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("gsm8k", 0, "18"),
    ("gsm8k", 146, "2125"),            # "#### 2,125": thousands comma dropped
    ("aime24", 0, "204"),
    ("amc23", 0, "27"),                # stored as the float 27.0
    ("minerva_math", 0, "1.6"),        # last \boxed{} of the solution
    ("minerva_math", 1, "4.5e33"),
    ("olympiadbench", 0, "2"),
    ("olympiadbench", 1, "\\frac{1}{2 n+2}"),  # ['$\frac{1}{2 n+2}$']: list and $ stripped
    ("olympiadbench", 13, "69,84"),    # ['$69$,$84$']
    ("math_train", 0, "0"),
    ("deepscaler_math", 0, "0"),
    ("svamp", 0, "145"),
    ("asdiv", 0, "9"),                 # "9 (apples)"
    ("college_math", 0, "10-4 n"),     # "$10-4 n$"
    ("aqua", 0, "A"),
    ("mmlu_stem", 0, "C"),             # index 2
    ("mawps_singleeq", 0, "43"),
    ("gaokao2024_mix", 0, "C"),        # choice_answer of a multiple-choice row
    ("gaokao2024_mix", 10, "(4,0)"),   # empty choice_answer: the value answer
]


@needs_data
@pytest.mark.parametrize("name", sorted(COUNTS))
def test_benchmark_counts_and_fields(name):
    skipped = UNLABELED.get(name)
    with pytest.warns(UserWarning, match=f"skipped {skipped} rows without") if skipped else nullcontext():
        problems = load_benchmark(name, DATA)
    assert len(problems) == COUNTS[name]
    assert all(isinstance(p, Problem) and p.question.strip() and p.answer.strip() for p in problems)
    assert len({p.id for p in problems}) == len(problems)


@needs_data
@pytest.mark.parametrize("name,row,answer", KNOWN)
def test_known_answers(name, row, answer):
    assert load_benchmark(name, DATA, limit=row + 1)[row].answer == answer


@needs_data
def test_question_formats():
    svamp = load_benchmark("svamp", DATA, limit=1)[0]
    assert svamp.question.startswith("There are 87 oranges") and svamp.question.endswith("each group of bananas?")
    mmlu = load_benchmark("mmlu_stem", DATA, limit=1)[0]
    assert "Answer Choices: (A) maintain" in mmlu.question and "(D) increase" in mmlu.question
    aqua = load_benchmark("aqua", DATA, limit=1)[0]
    assert "Answer Choices: A)5(" in aqua.question
    m500 = load_benchmark("math500", DATA, limit=1)[0]
    assert m500.id == "test/precalculus/807.json"
    assert load_benchmark("gsm8k", DATA, limit=7)[6].id == "6"   # no id field: row index


@needs_data
def test_load_problems_training_files():
    train = load_problems(DATA / "math" / "train.jsonl", limit=50)   # problem + boxed solution
    assert train[0] == Problem("train/algebra/0.json", train[0].question, "0")
    assert all(p.answer for p in train)
    gsm = load_problems(DATA / "gsm8k" / "train.jsonl", limit=5)      # question + '#### X'
    assert gsm[0].answer == "72" and gsm[0].id == "0"
    aime = load_problems(DATA / "deepscaler" / "train" / "aime.json", limit=3)  # JSON array
    assert [p.answer for p in aime] == ["60", "15", "20"]
    math = DATA / "deepscaler" / "train" / "math.json"
    with pytest.warns(UserWarning, match="skipped 4 rows"):
        assert len(load_problems(math)) == 7470
    with pytest.raises(ValueError, match=r"math\.json: element 886: no gold answer in field 'answer'"):
        load_problems(math, skip_unlabeled=False)


def test_load_problems_keys(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"q": "1+1?", "sol": "so \\boxed{2}", "answer": "ignored"}) + "\n")
    assert load_problems(f, question_key="q", answer_key="sol") == [Problem("0", "1+1?", "2")]
    with pytest.raises(ValueError, match=r"no question field among \['q', 'sol', 'answer'\]"):
        load_problems(f)


def test_load_problems_numbers_and_duplicate_ids(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps([{"id": 7, "input": "a", "target": 3.0}, {"id": 7, "input": "b", "target": 0.5}]))
    assert load_problems(f) == [Problem("0", "a", "3"), Problem("1", "b", "0.5")]  # ids repeat: row index


def test_malformed_rows(tmp_path):
    f = tmp_path / "bad.jsonl"
    good = json.dumps({"problem": "1+1?", "answer": "2"})
    f.write_text(good + "\n" + '{"problem": "x", "answer": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2: bad JSON"):
        load_problems(f)
    f.write_text(good + "\n\n" + json.dumps({"problem": "2+2?"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 3: missing field 'answer'"):
        load_problems(f)
    f.write_text(good + "\n" + json.dumps({"problem": "2+2?", "answer": " "}) + "\n")
    with pytest.raises(ValueError, match=r"line 2: no gold answer in field 'answer'"):
        load_problems(f, skip_unlabeled=False)
    with pytest.warns(UserWarning, match=r"skipped 1 rows without a gold answer \(.*line 2\)"):
        assert load_problems(f) == [Problem("0", "1+1?", "2")]
    f.write_text(json.dumps({"problem": "p", "solution": "no box here"}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: no gold answer in field 'solution'"):
        load_problems(f, skip_unlabeled=False)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no row has a gold answer in field 'solution'"):
        load_problems(f)
    j = tmp_path / "bad.json"
    j.write_text(json.dumps([{"problem": "p", "answer": "1"}, {"answer": "2"}]))
    with pytest.raises(ValueError, match=r"bad\.json: element 1: missing field 'problem'"):
        load_problems(j, question_key="problem")


def test_benchmark_malformed_row(tmp_path):
    (tmp_path / "aime24").mkdir()
    (tmp_path / "aime24" / "test.jsonl").write_text(json.dumps({"id": 1, "question": "q", "answer": "5"}) + "\n")
    with pytest.raises(ValueError, match=r"test\.jsonl: line 1: missing field 'problem'"):
        load_benchmark("aime24", tmp_path)


def test_missing_file_and_unknown_benchmark(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"math500[/\\]test\.jsonl"):
        load_benchmark("math500", tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_problems(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match=r"unknown benchmark 'math5000'; known: .*math500"):
        load_benchmark("math5000", tmp_path)


def test_register_fileless_benchmark(tmp_path):
    def gen(data_dir, limit):
        return [Problem(str(i), f"{i}+1?", str(i + 1)) for i in range(limit or 3)]

    data.register_benchmark("_test_gen", gen)
    try:
        assert [p.answer for p in load_benchmark("_test_gen", tmp_path / "absent", limit=2)] == ["1", "2"]
    finally:
        del data.BENCHMARKS["_test_gen"]
